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

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jbn._state import Moments
from jbn._statistics import merge_moments, moments

# The variables a jbn layer looks for (see jbn.linen): while they are in its batch_stats, a
# training call merges its batch statistics into them and changes nothing else.
POPULATION_VARIABLES = ("population_mean", "population_var", "population_count")


def empty_population(mean: Any) -> Moments:
    """The population statistics before any batch: zeros, float32 or wider."""
    mean = jnp.asarray(mean)
    zeros = jnp.zeros(mean.shape, jnp.promote_types(mean.dtype, jnp.float32))
    return Moments(
        zeros, jnp.zeros(mean.shape, jnp.promote_types(jnp.finfo(mean.dtype).dtype, jnp.float32)), zeros.real
    )


def add_batch(population: Moments, x: jax.Array, **moments_options: Any) -> Moments:
    """`population` merged exactly (Chan) with the statistics of one training batch;
    `moments_options` are `moments`' keyword arguments (axis, mask, axis_name, ...). The
    result keeps the population's dtypes. Called by the linen and NNX layers."""
    merged = merge_moments(Moments(*population), moments(x, **moments_options))
    return Moments(*(jax.lax.stop_gradient(new).astype(jnp.asarray(old).dtype) for new, old in zip(merged, population)))


def finished(population: Moments, mean: Any, var: Any) -> tuple[jax.Array, jax.Array]:
    """The layer's new (mean, var): the population's where it saw an element, else the
    old ones, in the old dtypes."""
    mean, var = jnp.asarray(mean), jnp.asarray(var)
    seen = population.count > 0
    return (
        jnp.where(seen, population.mean, mean).astype(mean.dtype),
        jnp.where(seen, population.var, var).astype(var.dtype),
    )


def progress_bar(iterable: Iterable, *, total: int | None, enabled: bool) -> Iterable:
    """`iterable` wrapped in a tqdm bar when `enabled` (tqdm is imported only then)."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm  # an optional dependency: only a progress bar needs it

    return tqdm(iterable, total=total, desc="recompute_batch_stats", unit="batch")


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
    found = {}  # type: ignore[var-annotated]
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
      ValueError: no BN layer in `variables`, no batch, `apply_fn` that does not return the
        mutated `batch_stats`, or a layer that recorded no statistics over the whole pass
        (not a jbn layer, not run in training mode, or only padding).
    """
    if "batch_stats" not in variables:
        raise ValueError("`variables` has no 'batch_stats' collection: there is no batch-norm layer to recompute.")
    layers = _layers(variables["batch_stats"])
    if not layers:
        raise ValueError("`variables['batch_stats']` holds no layer with `mean` and `var`: nothing to recompute.")

    def start(path, stats):
        return {**stats, **dict(zip(POPULATION_VARIABLES, empty_population(stats["mean"])))}

    current = {**variables, "batch_stats": _map_layers(variables["batch_stats"], start)}
    seen = 0
    for batch in progress_bar(batches, total=num_batches, enabled=progress):
        if num_batches is not None and seen >= num_batches:
            break
        mutated = _call(apply_fn, current, batch)
        current = {**current, "batch_stats": mutated["batch_stats"]}
        seen += 1
    if seen == 0:
        raise ValueError("`batches` gave no batch: pass an iterable with at least one input batch.")
    _check_recorded(current["batch_stats"], seen)

    def finish(path, stats):
        population = Moments(*(jnp.asarray(stats[name]) for name in POPULATION_VARIABLES))
        if device_axis:
            population = _merge_devices(population)
        out = {k: v for k, v in stats.items() if k not in POPULATION_VARIABLES}
        out["mean"], out["var"] = finished(population, stats["mean"], stats["var"])
        return out

    return {**current, "batch_stats": _map_layers(current["batch_stats"], finish)}


_HOW_TO_CALL = (
    "pass `apply_fn=lambda variables, batch: model.apply(variables, batch, train=True, mutable=['batch_stats'])` "
    "(with your model's own training flag): it must run the model in training mode with `batch_stats` mutable "
    "and return (output, mutated_variables)"
)


def _call(apply_fn: Callable, variables: Mapping, batch: Any) -> Mapping:
    """`apply_fn(variables, batch)`'s mutated variables, or an error that says what to pass."""
    try:
        result = apply_fn(variables, batch)
    except Exception as e:
        if type(e).__name__ in ("ModifyScopeVariableError", "ApplyScopeInvalidVariablesTypeError"):
            raise ValueError(
                f"`apply_fn` did not let the model update `batch_stats` ({type(e).__name__}): {_HOW_TO_CALL}."
            ) from e
        raise
    if not (
        isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], Mapping) and "batch_stats" in result[1]
    ):
        raise ValueError(
            f"`apply_fn` returned {type(result).__name__}, not (output, mutated variables with 'batch_stats'): {_HOW_TO_CALL}."
        )
    return result[1]


def _merge_devices(population: Moments) -> Moments:
    """Merge per-device statistics stacked on axis 0, then replicate the result."""
    merged = Moments(population.mean[0], population.var[0], population.count[0])
    for d in range(1, population.mean.shape[0]):
        merged = merge_moments(merged, Moments(population.mean[d], population.var[d], population.count[d]))
    return Moments(*(jnp.broadcast_to(v, population.mean.shape) for v in merged))


def _check_recorded(batch_stats: Mapping, batches: int) -> None:
    """Every layer must have recorded some element over the whole pass (a first batch of
    padding is fine): one that recorded none is not a jbn layer, was not run in training
    mode, or saw only padding."""
    missing = []
    for path, stats in _layers(batch_stats).items():
        count = jax.device_get(stats["population_count"])
        if not (count > 0).any():
            missing.append(path)
    if missing:
        names = ", ".join("/".join(p) or "<root>" for p in missing)
        raise ValueError(
            f"batch-norm layer(s) {names} recorded no statistics over {batches} batch(es). Either every element they "
            f"saw was padding (masked out), or they did not run as jbn layers in training mode: {_HOW_TO_CALL}; and "
            "every BN layer must be a jbn layer (jbn.BatchNorm or jbn.BatchRenorm; flax's nn.BatchNorm keeps an EMA "
            "that cannot be made exact)."
        )
