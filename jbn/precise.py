"""Exact population statistics for every batch-norm layer ("PreciseBN", Wu & Johnson 2021).

The EMA kept during training lags behind the weights and weighs recent batches more; after
training (or before an evaluation) one pass over some training data in training mode gives
the exact statistics of the inputs each BN layer sees. This module runs that pass.

How it works: for the length of the pass, every jbn layer's `batch_stats` gets three extra
variables (`population_mean`, `population_var`, `population_count`). A jbn layer
(`BatchNorm`, `BatchRenorm`) called in training mode while they exist merges its batch
statistics into them with Chan's formula (the exact statistics of the union, including the
between-batch variance of the means) and changes nothing else: its output is its ordinary
training output, so each later layer sees the inputs it sees in training, as PreciseBN
defines. At the end `mean`/`var` are replaced by the population statistics and the extra
variables are dropped.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from jbn.functional import Moments, merge_moments

# The variables a jbn layer looks for (see jbn.linen): while they are in its batch_stats, a
# training call merges its batch statistics into them and changes nothing else.
POPULATION_VARIABLES = ("population_mean", "population_var", "population_count")


def _is_bn_stats(node: Any) -> bool:
    return isinstance(node, Mapping) and "mean" in node and "var" in node and not isinstance(node["mean"], Mapping)


def _map_layers(tree: Any, fn: Callable[[tuple[str, ...], Mapping], Any], path: tuple[str, ...] = ()) -> Any:
    """Rebuild the nested mapping `tree` (as plain dicts), applying `fn(path, stats)` to each
    batch-norm layer's statistics (a mapping with leaves `mean` and `var`)."""
    if _is_bn_stats(tree):
        return fn(path, tree)
    if isinstance(tree, Mapping):
        return {k: _map_layers(v, fn, path + (str(k),)) for k, v in tree.items()}
    return tree


def _layers(tree: Any) -> dict[tuple[str, ...], Mapping]:
    found = {}
    _map_layers(tree, lambda p, s: found.setdefault(p, s))
    return found


def recompute_batch_stats(
    apply_fn: Callable[[Any, Any], tuple[Any, Mapping]],
    variables: Mapping,
    batches: Iterable,
    *,
    num_batches: int | None = None,
    device_axis: bool = False,
    progress: bool = True,
) -> dict:
    """Replace every BN layer's running mean and variance with the exact statistics of
    the inputs it sees over `batches`, with the model in training mode.

    Args:
      apply_fn: `apply_fn(variables, batch) -> (output, mutated)`: runs the model in
        TRAINING mode with the `batch_stats` collection mutable and returns what flax's
        `model.apply(variables, batch, train=True, mutable=["batch_stats"])` returns. It
        may be jitted, pmapped (with or without `axis_name` on the BN layers; then pass
        `device_axis=True`) or a shard_map. Parameters are never changed.
      variables: the model's variables (`params`, `batch_stats`, ...). Every mapping in
        `batch_stats` with leaves `mean` and `var` is a BN layer; all must be jbn layers
        (`jbn.BatchNorm`, `jbn.BatchRenorm`), at any depth of nesting.
      batches: an iterable of inputs for `apply_fn` (e.g. a list, a generator).
      num_batches: use at most this many batches (also the progress bar's total).
      device_axis: the variables carry a leading device axis (pmap-replicated). Each
        device's statistics are merged over it exactly, and the result is replicated again,
        so devices that saw different data without `axis_name` still get the global
        statistics; with `axis_name` the copies are equal and merging them changes nothing.
      progress: show a tqdm progress bar.

    Returns:
      `variables` (as plain dicts) with each BN layer's `batch_stats/{mean,var}` replaced by
      the mean and the biased variance of all the elements it saw (after masks), merged
      with Chan's formula. Other variables (`params`, `count`, `step`, ...) are unchanged.
      A layer that saw no element keeps its statistics.

    Raises:
      ValueError: no BN layer in `variables`, no batch, or a layer that did not record
        statistics (not a jbn layer, or not run in training mode).
    """
    if "batch_stats" not in variables:
        raise ValueError("`variables` has no 'batch_stats' collection: there is no batch-norm layer to recompute.")
    layers = _layers(variables["batch_stats"])
    if not layers:
        raise ValueError("`variables['batch_stats']` holds no layer with `mean` and `var`: nothing to recompute.")

    def start(path, stats):
        mean = jnp.asarray(stats["mean"])
        zeros = jnp.zeros(mean.shape, jnp.promote_types(mean.dtype, jnp.float32))
        return {**stats, "population_mean": zeros, "population_var": zeros, "population_count": zeros}

    current = {**variables, "batch_stats": _map_layers(variables["batch_stats"], start)}
    seen = 0
    bar = tqdm(total=num_batches, desc="recompute_batch_stats", unit="batch", disable=not progress)
    for batch in batches:
        if num_batches is not None and seen >= num_batches:
            break
        _, mutated = apply_fn(current, batch)
        current = {**current, "batch_stats": mutated["batch_stats"]}
        seen += 1
        bar.update(1)
        if seen == 1:
            _check_recorded(current["batch_stats"])
    bar.close()
    if seen == 0:
        raise ValueError("`batches` gave no batch: pass an iterable with at least one input batch.")

    def finish(path, stats):
        population = Moments(*(jnp.asarray(stats[name]) for name in POPULATION_VARIABLES))
        if device_axis:
            population = _merge_devices(population)
        out = {k: v for k, v in stats.items() if k not in POPULATION_VARIABLES}
        seen_any = population.count > 0
        out["mean"] = jnp.where(seen_any, population.mean, stats["mean"]).astype(jnp.asarray(stats["mean"]).dtype)
        out["var"] = jnp.where(seen_any, population.var, stats["var"]).astype(jnp.asarray(stats["var"]).dtype)
        return out

    return {**current, "batch_stats": _map_layers(current["batch_stats"], finish)}


def _merge_devices(population: Moments) -> Moments:
    """Merge per-device statistics stacked on axis 0, then replicate the result."""
    merged = Moments(population.mean[0], population.var[0], population.count[0])
    for d in range(1, population.mean.shape[0]):
        merged = merge_moments(merged, Moments(population.mean[d], population.var[d], population.count[d]))
    return Moments(*(jnp.broadcast_to(v, population.mean.shape) for v in merged))


def _check_recorded(batch_stats: Mapping) -> None:
    missing = []
    for path, stats in _layers(batch_stats).items():
        if "population_count" not in stats:
            missing.append(path)
            continue
        count = jax.device_get(stats["population_count"])
        if not (count > 0).any():
            missing.append(path)
    if missing:
        names = ", ".join("/".join(p) or "<root>" for p in missing)
        raise ValueError(
            f"batch-norm layer(s) {names} recorded no statistics in the first batch: `apply_fn` must run the model "
            "in training mode (e.g. train=True / use_running_average=False) with mutable=['batch_stats'] and return "
            "(output, mutated), and every BN layer must be a jbn layer (jbn.BatchNorm or jbn.BatchRenorm; flax's "
            "nn.BatchNorm keeps an EMA that cannot be made exact)."
        )
