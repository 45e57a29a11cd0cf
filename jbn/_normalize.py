"""`normalize`: `(x - mean) / sqrt(var + epsilon) * scale + bias`, feature-wise, and the
output dtype rule shared by every path (flax's promotion by default)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jbn import _activations, _axes, _validate
from jbn._axes import Axes, Layout

Array = jax.Array


def output_dtype(dtype: Any, x: Array, scale: Array | None, bias: Array | None) -> jnp.dtype:
    """`dtype` when given; else flax's promotion of the input and the parameters (a
    bfloat16 input with float32 parameters gives float32)."""
    if dtype is not None:
        return jnp.dtype(dtype)
    return _axes.promoted(x.dtype, *(p.dtype for p in (scale, bias) if p is not None))


def compute_dtype(x: Array, *arrays: Array | None) -> jnp.dtype:
    """The arithmetic's dtype: float32 or wider (complex for complex data)."""
    return _axes.stats_dtype(x.dtype, *(a.dtype for a in arrays if a is not None))


def normalize_on_layout(
    x, layout: Layout, mean, var, scale, bias, *, epsilon, out_dtype, activation="identity", negative_slope=0.01
) -> Array:
    """`normalize` (then the activation, in the compute dtype) on checked arguments."""
    compute = compute_dtype(x, mean, scale, bias)

    def expand(v):
        return _axes.expand_features(v.astype(compute), layout.ndim, layout.features)

    multiplier = lax.rsqrt(var.astype(_axes.real_dtype(compute)) + epsilon).astype(compute)
    if scale is not None:
        multiplier = multiplier * scale.astype(compute)
    y = (x.astype(compute) - expand(mean)) * expand(multiplier)
    if bias is not None:
        y = y + expand(bias)
    return _activations.apply(y, activation, negative_slope).astype(out_dtype)


def normalize(
    x: Array,
    mean: Array,
    var: Array,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    axis: Axes = -1,
    epsilon: float = 1e-5,
    dtype: Any = None,
) -> Array:
    """`(x - mean) / sqrt(var + epsilon) * scale + bias`, feature-wise.

    Args:
      x: floating (or complex) input of any rank.
      mean, var: feature-shaped statistics.
      scale, bias: feature-shaped affine parameters, or None to leave them out.
      axis: feature axis or axes of `x`.
      epsilon: added to the variance; > 0.
      dtype: output dtype; default flax's: the promoted dtype of `x`, `scale` and `bias`.
        The arithmetic runs in float32 or wider.
    """
    x = _validate.check_input(x)
    epsilon = _validate.check_epsilon(epsilon)
    layout = _axes.resolve(x, axis)
    fshape = layout.fshape
    mean = _validate.check_feature_array(mean, fshape, "mean", axis)  # type: ignore[assignment]
    var = _validate.check_feature_array(var, fshape, "var", axis)  # type: ignore[assignment]
    scale = _validate.check_feature_array(scale, fshape, "scale", axis)
    bias = _validate.check_feature_array(bias, fshape, "bias", axis)
    out = output_dtype(_validate.check_output_dtype(dtype), x, scale, bias)
    return normalize_on_layout(x, layout, mean, var, scale, bias, epsilon=epsilon, out_dtype=out)
