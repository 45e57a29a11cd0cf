"""The pure batch-norm layer: functions from arrays to arrays, jax and jax.lax only.

Shapes: `x` has any rank; `axis` names its feature axes (int or tuple, negative allowed)
and every other axis is reduced. "Feature shape" below means the sizes of `x` along the
feature axes, in increasing axis order: (C,) for NHWC with axis=-1 or NCHW with axis=1.

This module only gathers the public names; each lives in the module of its floor (see
`jbn/__init__.py` for the map).
"""

from __future__ import annotations

import warnings

from jbn._batch_norm import batch_norm, normalize, normalize_with_batch_stats
from jbn._options import OneValuePerFeatureWarning
from jbn._running import (
    EMA,
    CumulativeAverage,
    DebiasedEMA,
    UnbiasedVariance,
    bessel_corrected,
    running_average_rule,
    update_running_stats,
)
from jbn._state import Moments, RunningAverage, RunningStats
from jbn._statistics import merge_moments, moments


def unbiased_moments(batch: Moments) -> Moments:
    """Deprecated alias of `bessel_corrected` (the mean was never changed, only the
    variance); it will be removed in the next release."""
    warnings.warn(
        "jbn.unbiased_moments is deprecated: use jbn.bessel_corrected (same argument).",
        DeprecationWarning,
        stacklevel=2,
    )
    return bessel_corrected(batch)


def needs_batch_count(momentum: float | None, debias: bool) -> bool:
    """Deprecated: `jbn.running_average_rule(momentum, debias).needs_count` says whether a
    rule keeps `RunningStats.count`; it will be removed in the next release."""
    warnings.warn(
        "jbn.needs_batch_count is deprecated: use jbn.running_average_rule(momentum, debias).needs_count.",
        DeprecationWarning,
        stacklevel=2,
    )
    return bool(running_average_rule(momentum, debias).needs_count)


__all__ = [
    "EMA",
    "CumulativeAverage",
    "DebiasedEMA",
    "Moments",
    "OneValuePerFeatureWarning",
    "RunningAverage",
    "RunningStats",
    "UnbiasedVariance",
    "batch_norm",
    "bessel_corrected",
    "merge_moments",
    "moments",
    "normalize",
    "normalize_with_batch_stats",
    "running_average_rule",
    "update_running_stats",
]
