"""jbn: batch normalization for JAX, with drop-in Flax (linen, NNX) and equinox modules.

Pure functions (`moments`, `normalize`, `update_running_stats`, `batch_norm`) over arrays,
and framework modules that create variables and call them: `jbn.BatchNorm` (flax linen),
`jbn.nnx.BatchNorm`, `jbn.equinox.BatchNorm`, `jbn.keras.BatchNormalization` (Keras 3 on
JAX). Variants and tools: Batch Renormalization (`batch_renorm`, `BatchRenorm`), ghost
batches (`virtual_batch_size=`), cumulative and debiased running averages, exact population
statistics (`recompute_batch_stats`), inference folding (`fold_batch_norm`), PyTorch/Keras
interop (`jbn.interop`), `weight_decay_mask`. Running-average rules are values
(`EMA`, `DebiasedEMA`, `CumulativeAverage`, `UnbiasedVariance`, or your own), passed as
`running_average=`.

`import jbn` and the pure functions load no framework: the linen, NNX, equinox, keras, haiku and
interop modules load on first use.

Where things live, in the order a training call runs through them (`jbn.BatchNorm()(x)`:
linen -> _options -> _running -> _batch_norm -> _fused -> _statistics):

    jbn/linen.py, nnx.py, equinox.py, keras.py   framework wrappers: variables/state, then the core
    jbn/haiku.py                       haiku's BatchNorm: its parameters and state, jbn's statistics
    jbn/renorm.py, precise.py, fold.py, interop.py, weight_decay.py   variants and tools
    jbn/accumulation.py                gradient accumulation: one running update per K micro-batches
    jbn/functional.py                  the public pure API, gathered from the modules below
    jbn/_options.py                    the arguments checked once: Layout, Normalization, every check
    jbn/_running.py                    running-average rules as values: EMA, cumulative, debiased, unbiased
    jbn/_batch_norm.py                 batch_norm, normalize_with_batch_stats, normalize; the trusting core
    jbn/_fused.py                      normalize, the activations, the fused training path (custom JVP)
    jbn/_statistics.py                 moments: one participant's (the cpu formulation and the per-backend
                                       dispatch), Chan's merge, the collectives, the sharded path
    jbn/_accelerator_moments.py        the tpu formulation of one participant's moments
    jbn/_triton_moments.py             the cuda formulation (a Pallas kernel)
    jbn/_state.py                      Moments, RunningStats, the RunningAverage interface

Imports point down this list, except that every module may import the records and checks of
`_options` and the state types of `_state` (the bottom of the imports); `_statistics` looks up
the tpu and cuda formulations when a program for their platform is traced.
"""

from __future__ import annotations

import importlib
from typing import Any

from jbn import functional
from jbn._version import __version__
from jbn.accumulation import (
    accumulate,
    apply_accumulated,
    apply_accumulation,
    empty_accumulator,
    start_accumulation,
    stop_accumulation,
)
from jbn.fold import fold_batch_norm
from jbn.functional import (
    EMA,
    CumulativeAverage,
    DebiasedEMA,
    Moments,
    OneValuePerFeatureWarning,
    RunningAverage,
    RunningStats,
    UnbiasedVariance,
    batch_norm,
    bessel_corrected,
    merge_moments,
    moments,
    normalize,
    normalize_with_batch_stats,
    running_average_rule,
    update_running_stats,
)
from jbn.functional import (
    needs_batch_count as needs_batch_count,
)
from jbn.functional import (
    unbiased_moments as unbiased_moments,
)
from jbn.precise import recompute_batch_stats
from jbn.renorm import batch_renorm, paper_renorm_schedules, renorm_schedule
from jbn.weight_decay import optax_mask as optax_mask
from jbn.weight_decay import weight_decay_mask

# Deprecated aliases (importable, out of __all__): unbiased_moments -> bessel_corrected,
# needs_batch_count -> running_average_rule(...).needs_count, optax_mask -> weight_decay_mask.

# Loaded on first use (PEP 562): they import flax, equinox, keras, haiku or torch.
_LAZY_MODULES = ("linen", "nnx", "equinox", "interop", "keras", "haiku")
_LAZY_NAMES = {"BatchNorm": "linen", "BatchRenorm": "linen"}


def __getattr__(name: str) -> Any:
    if name in _LAZY_MODULES:
        return importlib.import_module(f"jbn.{name}")
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(f"jbn.{_LAZY_NAMES[name]}"), name)
    raise AttributeError(f"module 'jbn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "EMA",
    "BatchNorm",
    "BatchRenorm",
    "CumulativeAverage",
    "DebiasedEMA",
    "Moments",
    "OneValuePerFeatureWarning",
    "RunningAverage",
    "RunningStats",
    "UnbiasedVariance",
    "__version__",
    "accumulate",
    "apply_accumulated",
    "apply_accumulation",
    "batch_norm",
    "batch_renorm",
    "bessel_corrected",
    "empty_accumulator",
    "equinox",
    "fold_batch_norm",
    "functional",
    "interop",
    "linen",
    "merge_moments",
    "moments",
    "nnx",
    "normalize",
    "normalize_with_batch_stats",
    "paper_renorm_schedules",
    "recompute_batch_stats",
    "renorm_schedule",
    "running_average_rule",
    "start_accumulation",
    "stop_accumulation",
    "update_running_stats",
    "weight_decay_mask",
]
