"""jbn: batch normalization for JAX and Flax.

Pure functions (`moments`, `normalize`, `update_running_stats`, `batch_norm`) over arrays,
and a Flax linen module (`BatchNorm`) that creates variables and calls them.
"""
from jbn.functional import Moments, RunningStats, batch_norm, moments, normalize, update_running_stats
from jbn.linen import BatchNorm

__all__ = [
    "BatchNorm",
    "Moments",
    "RunningStats",
    "batch_norm",
    "moments",
    "normalize",
    "update_running_stats",
]
__version__ = "0.1.0"
