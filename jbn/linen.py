"""Flax linen wrapper: creates the variables, then calls the pure layer."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import initializers

from jbn import _checks
from jbn.functional import RunningStats, batch_norm

Initializer = Callable[..., jax.Array]


def check_existing_variables(module: nn.Module, fshape: tuple[int, ...], axis) -> None:
    """Clear error when the input's feature shape differs from already-created variables
    (a checkpoint for another width, or `axis` pointing at the wrong dimension)."""
    for collection, name in (("params", "scale"), ("params", "bias"), ("batch_stats", "mean"), ("batch_stats", "var")):
        if module.has_variable(collection, name):
            shape = tuple(jnp.shape(module.get_variable(collection, name)))
            if shape != fshape:
                raise ValueError(
                    f"{type(module).__name__} '{module.name}': input `x` has feature shape {fshape} along "
                    f"axis={axis!r}, but the existing variable {collection}/{name} has shape {shape}: pass an input "
                    f"with that feature shape, set `axis` to the input's feature axis, or re-initialize the variables."
                )


class BatchNorm(nn.Module):
    """Batch normalization, a drop-in replacement for `flax.linen.BatchNorm`.

    Same fields, defaults, call signature and variables (`params/{scale,bias}`,
    `batch_stats/{mean,var}`, feature-shaped), so checkpoints move between the two. What
    differs: the variance is one-pass AND accurate when |mean| >> std; under `axis_name`
    the statistics are weighted by each device's valid count (exact with uneven masks,
    finite with all-padding devices) in one collective; a batch whose statistics are
    NaN/inf leaves the running statistics unchanged; bad arguments fail at trace time.

    Attributes:
      use_running_average: normalize with `batch_stats` instead of the batch statistics.
      axis: feature axis or axes of the input (int or tuple).
      momentum: running average decay, `new = momentum * old + (1 - momentum) * batch`.
      epsilon: added to the variance.
      dtype: output dtype; default the input's dtype.
      param_dtype: dtype of `scale` and `bias`.
      use_bias, use_scale: learn a feature-wise bias / scale.
      bias_init, scale_init: their initializers.
      axis_name: name(s) bound by pmap, shard_map or vmap to synchronize statistics over.
      axis_index_groups: pmap-style groups along `axis_name`.
      use_fast_variance: accepted for compatibility with flax; jbn's variance is always
        the fast one-pass computation and always accurate, so it has no effect.
      force_float32_reductions: accepted for compatibility; jbn always accumulates in
        float32 or wider.
      activation: None (or "identity"), "relu" or "leaky_relu", applied to the output
        inside the same fused pass (jbn only; flax has no such field).
      negative_slope: the slope of "leaky_relu" for negative inputs.
      save_output_only: in training, keep only the output for the backward pass and
        recover the normalized input from it (needs "identity" or "leaky_relu" and a
        scale without zeros; see `jbn.batch_norm`).
      fused: use the fused custom-gradient training path (default); False uses plain
        autodiff (needed only for forward-mode differentiation, `jax.jvp`).
    """

    use_running_average: bool | None = None
    axis: int | tuple[int, ...] = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    axis_name: Any = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    activation: str | None = None
    negative_slope: float = 0.01
    save_output_only: bool = False
    fused: bool = True

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask: jax.Array | None = None):
        """Normalize `x` (any rank, features on `axis`).

        Args:
          x: floating input.
          use_running_average: overrides the field of the same name.
          mask: True where an element counts towards the statistics (see `jbn.moments`).

        Returns:
          The normalized input, same shape; `batch_stats` is updated in training
          (when mutable) and never during `init`.
        """
        use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        x = _checks.check_floating(x)
        features = _checks.feature_axes(x.ndim, self.axis)
        fshape = _checks.feature_shape(x.shape, features)
        check_existing_variables(self, fshape, self.axis)

        mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), fshape)
        var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), fshape)
        scale = self.param("scale", self.scale_init, fshape, self.param_dtype) if self.use_scale else None
        bias = self.param("bias", self.bias_init, fshape, self.param_dtype) if self.use_bias else None

        initializing = self.is_initializing()
        y, new = batch_norm(
            x,
            scale,
            bias,
            RunningStats(mean.value, var.value),
            training=not use_running_average,
            axis=self.axis,
            momentum=self.momentum,
            epsilon=self.epsilon,
            mask=mask,
            # At init the named axis need not exist, as in flax.
            axis_name=None if initializing else self.axis_name,
            axis_index_groups=None if initializing else self.axis_index_groups,
            dtype=self.dtype,
            activation=self.activation,
            negative_slope=self.negative_slope,
            save_output_only=self.save_output_only,
            fused=self.fused,
        )
        if not use_running_average and not initializing:
            mean.value, var.value = new.mean, new.var
        return y
