"""What the framework wrappers (linen, NNX, equinox) share: the names of the options
they forward to the pure functions, read the same way from any layer object."""
from __future__ import annotations

import contextlib
import warnings
from typing import Any

from jbn._validate import OneValuePerFeatureWarning

# Options of `batch_norm` and `batch_renorm` that a layer keeps as attributes of the same name.
COMMON = ("axis", "momentum", "epsilon", "dtype", "axis_name", "axis_index_groups", "debias", "unbiased_running_var")
BATCH_NORM = COMMON + ("virtual_batch_size", "activation", "negative_slope", "save_output_only", "fused")
BATCH_RENORM = COMMON + ("r_max", "d_max")


def call_options(layer: Any, names: tuple[str, ...], *, synchronize: bool = True) -> dict:
    """Keyword arguments for the pure function from `layer`'s attributes `names`.
    `synchronize=False` drops the axis names (flax's init runs outside the transform that
    binds them)."""
    options = {name: getattr(layer, name) for name in names}
    if not synchronize:
        options["axis_name"] = options["axis_index_groups"] = None
    return options


@contextlib.contextmanager
def quiet_one_value(quiet: bool):
    """Silences `OneValuePerFeatureWarning` when `quiet` (initialization on a dummy
    example trains nothing, so it has nothing to warn about)."""
    if not quiet:
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OneValuePerFeatureWarning)
        yield
