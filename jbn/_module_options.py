"""What the framework wrappers (linen, NNX, haiku) share around their pure call."""

from __future__ import annotations

import contextlib
import warnings

from jbn._validate import OneValuePerFeatureWarning


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
