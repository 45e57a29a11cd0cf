"""The activations batch norm can apply to its output, and what the fused backward
pass needs from them: the derivative as a function of the pre-activation, and (for the
invertible ones) the pre-activation recovered from the output.

Names: None or "identity", "relu" (`max(z, 0)`, derivative 0 at 0 as in `jax.nn.relu`),
"leaky_relu" (`z` where `z >= 0`, else `negative_slope * z`, as in `jax.nn.leaky_relu`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

NAMES = ("identity", "relu", "leaky_relu")
# Invertible ones: the output alone determines the pre-activation.
INVERTIBLE = ("identity", "leaky_relu")


def check(activation: Any, negative_slope: Any, save_output_only: bool = False) -> str:
    """The canonical activation name; raises on an unknown name or a bad slope."""
    name = "identity" if activation is None else activation
    if name not in NAMES:
        raise ValueError(
            f"`activation`={activation!r} is not supported: use None (or 'identity'), 'relu' or 'leaky_relu' "
            "(or apply your own activation after batch norm)."
        )
    if not isinstance(negative_slope, (int, float)) or isinstance(negative_slope, bool):
        raise TypeError(f"`negative_slope` must be a Python number (it is static), got {negative_slope!r}.")
    if save_output_only:
        if name not in INVERTIBLE:
            raise ValueError(
                f"`save_output_only=True` recovers the normalized input from the output, which needs an invertible "
                f"activation, but `activation`={activation!r} is not: use 'identity' or 'leaky_relu', or set "
                "save_output_only=False (the default, which saves the input instead)."
            )
        if name == "leaky_relu" and not negative_slope > 0:
            raise ValueError(
                f"`save_output_only=True` with 'leaky_relu' needs `negative_slope` > 0 to invert the activation, "
                f"got {negative_slope}: use a positive slope such as 0.01, or save_output_only=False."
            )
    return name


def apply(z: Array, name: str, negative_slope: float) -> Array:
    # max/min rather than a select: XLA:CPU fuses these into a following reduction.
    if name == "relu":
        return jnp.maximum(z, 0)
    if name == "leaky_relu":
        return jnp.maximum(z, 0) + negative_slope * jnp.minimum(z, 0)
    return z


def cotangent(
    dy: Array, z: Array, name: str, negative_slope: float, *, zero: Any = 0, gap: Any = None, nan_safe: bool = False
) -> Array:
    """The cotangent of the pre-activation `z` given the cotangent `dy` of the output.

    At `z == 0`: relu' = 0 and leaky_relu' = 1, as `jax.nn.relu`/`jax.nn.leaky_relu`.
    The default form is arithmetic (sign/min/max): XLA:CPU fuses it into a following
    reduction, where it does not fuse a comparison or select; it gives NaN where `z` is
    NaN. `zero` is the 0 it compares against: an array that broadcasts against `z` (a
    per-feature vector) lets XLA:CPU fuse it as well, where a scalar constant shared by
    several reductions is written out at full size; `gap` (default `1 - negative_slope`)
    likewise. `nan_safe=True` uses comparisons
    instead, which give 0/1 (or the slope) for a NaN `z`, as `jax.nn` does.
    """
    if name == "identity":
        return dy
    if nan_safe:
        if name == "relu":
            return jnp.where(z > 0, dy, 0)
        return jnp.where(z >= 0, dy, negative_slope * dy)
    if name == "relu":
        return dy * jnp.sign(jnp.maximum(z, zero))  # 1 where z > 0, else 0
    # dy where z >= 0, slope * dy where z < 0 (sign(min(z, 0)) is -1 there, else 0).
    gap = 1 - negative_slope if gap is None else gap
    return dy + gap * dy * jnp.sign(jnp.minimum(z, zero))


def inverse(y: Array, name: str, negative_slope: float, *, zero: Any = 0, reciprocal: Any = None) -> Array:
    """The pre-activation `z` with `apply(z) == y`, for an invertible activation. The
    sign of `y` equals the sign of `z` when the slope is positive, so the branch is known.
    `zero` and `reciprocal` (default `1 / negative_slope`) as `zero` in `cotangent`."""
    if name == "leaky_relu":
        reciprocal = 1 / negative_slope if reciprocal is None else reciprocal
        return jnp.maximum(y, zero) + jnp.minimum(y, zero) * reciprocal
    return y
