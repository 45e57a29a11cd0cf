"""The pure batch-norm layer: functions from arrays to arrays, jax and jax.lax only.

Shapes: `x` has any rank; `axis` names its feature axes (int or tuple, negative allowed)
and every other axis is reduced. "Feature shape" below means the sizes of `x` along the
feature axes, in increasing axis order: (C,) for NHWC with axis=-1 or NCHW with axis=1.

This module only gathers the public names; each lives in the module of its floor (see
`jbn/__init__.py` for the map).
"""

from __future__ import annotations

from jbn._batch_norm import batch_norm, normalize_with_batch_stats
from jbn._merge import merge_moments
from jbn._normalize import normalize
from jbn._running import needs_batch_count, unbiased_moments, update_running_stats
from jbn._state import Moments, RunningStats
from jbn._statistics import moments
from jbn._validate import OneValuePerFeatureWarning

__all__ = [
    "Moments",
    "OneValuePerFeatureWarning",
    "RunningStats",
    "batch_norm",
    "merge_moments",
    "moments",
    "needs_batch_count",
    "normalize",
    "normalize_with_batch_stats",
    "unbiased_moments",
    "update_running_stats",
]
