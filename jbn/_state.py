"""The state types of the pure layer: one batch's statistics, the running ones, and the
interface of a rule that moves the second toward the first."""

from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

import jax

Array = jax.Array


class Moments(NamedTuple):
    """Per-feature statistics of one batch.

    Attributes:
      mean: feature shape, float32 or wider (complex for complex inputs).
      var: biased (population) variance, feature shape, real, never negative.
      count: number of elements reduced per feature (after the mask, summed over devices);
        broadcastable to `mean` (a scalar when every feature saw the same count).
    """

    mean: Array
    var: Array
    count: Array  # type: ignore[assignment]


class RunningStats(NamedTuple):
    """The state kept between steps.

    Attributes:
      mean: running mean, feature shape.
      var: running variance, feature shape (biased, unless the update is asked to track
        the unbiased variance as PyTorch does: `unbiased_running_var=True`).
      count: number of batches averaged into each feature so far, int32, feature shape;
        or None (the default) when the update rule does not need it. Only the cumulative
        average (`momentum=None`) and the debiased EMA (`debias=True`) need it; start it at
        zeros. It saturates at 2**31 - 1 instead of wrapping. A trailing field with a
        default, so `RunningStats(mean, var)` still works.
    """

    mean: Array
    var: Array
    count: Array | None = None  # type: ignore[assignment]


@runtime_checkable
class RunningAverage(Protocol):
    """A running-average rule: how `RunningStats` move toward one batch's `Moments`.

    `needs_count`: whether the rule keeps `RunningStats.count` (the modules then create
    `batch_stats/count`). `update` is called once per training step, with the batch
    statistics after the mask and across devices."""

    needs_count: bool

    def update(self, running: RunningStats, batch: Moments) -> RunningStats: ...
