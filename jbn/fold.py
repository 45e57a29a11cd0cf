"""Fold an eval-mode batch-norm layer into the linear layer before it, for deployment.

In evaluation, BN is the feature-wise affine map `y = m * (z - mean) + beta` with
`m = gamma / sqrt(var + epsilon)`. When `z = x @ W + b` (Dense) or `z = conv(x, W) + b`
(Conv, any feature_group_count: each output feature has its own slice of the kernel), it is
the same layer with `W' = W * m` (scaling the kernel's output-feature axis, the last one in
flax's layout) and `b' = m * (b - mean) + beta`.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from jbn import _options, _statistics


def fold_batch_norm(
    layer_params: Mapping,
    bn_params: Mapping | None,
    bn_stats: Mapping,
    *,
    epsilon: float = 1e-5,
) -> dict:
    """The `{'kernel', 'bias'}` of a Dense/Conv layer with the BN layer after it folded in.

    Args:
      layer_params: the linear layer's params, `{'kernel': (..., out), 'bias': (out,)}`, as
        flax's `nn.Dense`, `nn.Conv` (NHWC kernel `(*window, in // groups, out)`, any
        `feature_group_count`) or `nn.DenseGeneral` with one output axis keep them; the
        bias may be missing (`use_bias=False`), then one is created.
      bn_params: the BN layer's params, `{'scale': (out,), 'bias': (out,)}`; either may be
        missing (`use_scale=False` / `use_bias=False`); None for neither.
      bn_stats: the BN layer's batch_stats, `{'mean': (out,), 'var': (out,)}`.
      epsilon: the BN layer's epsilon (jbn and flax default 1e-5; Keras 1e-3).

    Returns:
      `{'kernel', 'bias'}` for the same layer with `use_bias=True` and the BN removed:
      its outputs equal the original layer followed by BN in eval mode. Dtypes are the
      kernel's; the arithmetic runs in float32 or wider.
    """
    epsilon = _options.check_epsilon(epsilon)
    if "kernel" not in layer_params:
        raise ValueError(
            f"`layer_params` has keys {sorted(layer_params)}, not a 'kernel': pass the params of the nn.Dense or "
            "nn.Conv layer that feeds the BN layer, e.g. variables['params']['Conv_0']."
        )
    kernel = jnp.asarray(layer_params["kernel"])
    out = kernel.shape[-1:]
    bn_params = {} if bn_params is None else bn_params
    mean = _feature(bn_stats, "mean", out, "bn_stats")
    var = _feature(bn_stats, "var", out, "bn_stats")
    gamma = _feature(bn_params, "scale", out, "bn_params")
    beta = _feature(bn_params, "bias", out, "bn_params")
    bias = _feature(layer_params, "bias", out, "layer_params")
    compute = _statistics.stats_dtype(kernel.dtype, mean.dtype, var.dtype)

    multiplier = jax.lax.rsqrt(var.astype(compute) + epsilon)
    if gamma is not None:
        multiplier = multiplier * gamma.astype(compute)
    shifted = -mean.astype(compute) if bias is None else bias.astype(compute) - mean.astype(compute)
    new_bias = shifted * multiplier
    if beta is not None:
        new_bias = new_bias + beta.astype(compute)
    new_kernel = kernel.astype(compute) * multiplier.reshape((1,) * (kernel.ndim - 1) + (-1,))  # per output channel
    bias_dtype = kernel.dtype if bias is None else bias.dtype
    return {"kernel": new_kernel.astype(kernel.dtype), "bias": new_bias.astype(bias_dtype)}


def _feature(tree: Mapping, name: str, shape: tuple[int, ...], where: str):
    if name not in tree:
        if where == "bn_stats":
            raise ValueError(
                f"`bn_stats` has no '{name}': pass the BN layer's batch_stats, e.g. variables['batch_stats']['BatchNorm_0']."
            )
        return None
    v = jnp.asarray(tree[name])
    if v.shape != shape:
        raise ValueError(
            f"`{where}['{name}']` has shape {v.shape}, but the layer's kernel has {shape[0]} output features: fold "
            "a BN layer that normalizes the layer's output features (axis=-1, right after it), with one value per "
            "output feature."
        )
    return v
