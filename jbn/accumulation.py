"""Gradient accumulation: K micro-batches per optimizer step, ONE update of the running
statistics, with the statistics of the whole batch.

Semantics (ghost batches): while accumulating, each micro-batch is normalized by its own
statistics, as in an ordinary training step on that micro-batch (the gradients are those
of K small batches, as in ghost batch norm, Hoffer et al. 2017). Each batch-norm layer
merges its micro-batch statistics exactly into an accumulator (Chan's formula: counts
after masks, the between-micro-batch spread of the means included, global under
`axis_name`) and leaves its running statistics alone. `apply_accumulated` then moves the
running statistics once, towards the statistics of all K micro-batches together: exactly
the update one training step on the whole batch would make.

The accumulator of a layer is the `Moments` that `jbn.recompute_batch_stats` uses
(`population_mean`, `population_var`, `population_count` next to `mean` and `var`): a jbn
layer called in training mode while they exist merges into them instead of updating.

- Pure: `empty_accumulator`, `accumulate`, `apply_accumulated`.
- flax linen (a `batch_stats` collection): `start_accumulation`, `apply_accumulation`,
  `stop_accumulation` (the NNX versions, in place on a model, are in `jbn.nnx`; equinox:
  `jbn.equinox.BatchNorm(..., accumulation=True)` and `jbn.equinox.apply_accumulation`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jbn import precise
from jbn._running import update_running_stats
from jbn._state import Moments, RunningStats
from jbn._statistics import merge_moments

__all__ = [
    "accumulate",
    "apply_accumulated",
    "apply_accumulation",
    "empty_accumulator",
    "start_accumulation",
    "stop_accumulation",
]

ACCUMULATOR_VARIABLES = precise.POPULATION_VARIABLES


def empty_accumulator(mean: Any) -> Moments:
    """An accumulator that has seen nothing, shaped and typed for running mean `mean`."""
    return precise.empty_population(mean)


def accumulate(accumulator: Moments, batch: Moments) -> Moments:
    """`accumulator` merged exactly with one micro-batch's `Moments` (from `jbn.moments`,
    with the micro-batch's mask and `axis_name`). Keeps the accumulator's dtypes."""
    merged = merge_moments(Moments(*accumulator), batch)
    return Moments(
        *(jax.lax.stop_gradient(new).astype(jnp.asarray(old).dtype) for new, old in zip(merged, accumulator))
    )


def apply_accumulated(
    running: RunningStats,
    accumulator: Moments,
    momentum: float | None = 0.99,
    *,
    debias: bool = False,
    unbiased_running_var: bool = False,
) -> RunningStats:
    """The running statistics after ONE update with the accumulated statistics (the same
    options as `update_running_stats`); a feature that saw no element is unchanged."""
    return update_running_stats(
        running, Moments(*accumulator), momentum, debias=debias, unbiased_running_var=unbiased_running_var
    )


def _is_layer(node: Any) -> bool:
    return isinstance(node, Mapping) and "mean" in node and "var" in node


def _map_layers(tree: Mapping, fn) -> dict:
    """`fn` applied to every BN layer's mapping in `tree` (the whole tree of a lone layer)."""
    if _is_layer(tree):
        return fn(tree)
    return {k: _map_layers(v, fn) if isinstance(v, Mapping) else v for k, v in tree.items()}


def start_accumulation(batch_stats: Mapping) -> dict:
    """`batch_stats` (a linen model's collection) with an empty accumulator in every BN
    layer: from now on, training calls of jbn layers accumulate instead of updating."""

    def start(layer):
        return {**layer, **dict(zip(ACCUMULATOR_VARIABLES, empty_accumulator(layer["mean"])))}

    return _map_layers(batch_stats, start)


def apply_accumulation(
    batch_stats: Mapping,
    momentum: float | None = 0.99,
    *,
    debias: bool = False,
    unbiased_running_var: bool = False,
) -> dict:
    """Every layer's running statistics updated ONCE with its accumulated statistics, and
    its accumulator emptied (the tree keeps its structure, so this can sit under `jit`,
    `lax.cond` or `jnp.where`). Pass the layers' own `momentum`, `debias` and
    `unbiased_running_var` (the collection does not hold them)."""

    def apply(layer):
        acc = Moments(*(jnp.asarray(layer[name]) for name in ACCUMULATOR_VARIABLES))
        running = RunningStats(jnp.asarray(layer["mean"]), jnp.asarray(layer["var"]), layer.get("count"))
        new = apply_accumulated(running, acc, momentum, debias=debias, unbiased_running_var=unbiased_running_var)
        out = {
            **layer,
            "mean": new.mean,
            "var": new.var,
            **dict(zip(ACCUMULATOR_VARIABLES, empty_accumulator(new.mean))),
        }
        if new.count is not None:
            out["count"] = new.count
        return out

    return _map_layers(batch_stats, apply)


def stop_accumulation(batch_stats: Mapping) -> dict:
    """`batch_stats` without the accumulators (apply them first: what they hold is dropped)."""
    return _map_layers(batch_stats, lambda layer: {k: v for k, v in layer.items() if k not in ACCUMULATOR_VARIABLES})
