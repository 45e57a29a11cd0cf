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


def call_options(layer: Any, names: tuple[str, ...], *, initializing: bool = False) -> dict:
    """Keyword arguments for the pure function from `layer`'s attributes `names`. While
    `initializing` (flax's init runs outside the transform that binds the axis names, often
    on a dummy example), the call neither synchronizes nor splits ghost batches."""
    options = {name: getattr(layer, name) for name in names}
    if initializing:
        options["axis_name"] = options["axis_index_groups"] = None
        if "virtual_batch_size" in options:
            options["virtual_batch_size"] = None
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
