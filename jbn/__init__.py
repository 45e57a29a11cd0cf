"""jbn: batch normalization for JAX and Flax.

Pure functions (`moments`, `normalize`, `update_running_stats`, `batch_norm`) over arrays,
and a Flax linen module (`BatchNorm`) that creates variables and calls them.
Variants and tools: Batch Renormalization (`batch_renorm`, `BatchRenorm`), ghost batches
(`virtual_batch_size=`), cumulative and debiased running averages, exact population
statistics (`recompute_batch_stats`), inference folding (`fold_batch_norm`), flax NNX
modules (`jbn.nnx`), PyTorch/Keras interop (`jbn.interop`) and `optax_mask`.
Training runs a fused custom VJP with an optional activation (`activation=`) and a
memory-saving mode (`save_output_only=`); `normalize_with_batch_stats` is that training
path without the running statistics.
"""
from jbn.functional import Moments, RunningStats, batch_norm, moments, normalize, update_running_stats
from jbn.linen import BatchNorm
from jbn.functional import merge_moments, needs_batch_count, normalize_with_batch_stats, unbiased_moments
from jbn.renorm import batch_renorm, paper_renorm_schedules, renorm_schedule
from jbn.linen import BatchRenorm
from jbn.precise import recompute_batch_stats
from jbn.fold import fold_batch_norm
from jbn.weight_decay import optax_mask
from jbn import interop, nnx  # noqa: E402  (submodules: jbn.interop.from_torch, jbn.nnx.BatchNorm)

__all__ = [
    "BatchNorm",
    "Moments",
    "RunningStats",
    "batch_norm",
    "moments",
    "normalize",
    "update_running_stats",
    "BatchRenorm",
    "batch_renorm",
    "fold_batch_norm",
    "interop",
    "merge_moments",
    "needs_batch_count",
    "normalize_with_batch_stats",
    "nnx",
    "optax_mask",
    "paper_renorm_schedules",
    "recompute_batch_stats",
    "renorm_schedule",
    "unbiased_moments",
]
__version__ = "0.1.0"
