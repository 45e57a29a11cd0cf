"""Flax linen wrapper: creates the variables, then calls the pure layer."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import initializers

from jbn import _checks
from jbn.functional import (
    Moments,
    RunningStats,
    batch_norm,
    merge_moments,
    moments,
    needs_batch_count,
    normalize_with_batch_stats,
)
from jbn.precise import POPULATION_VARIABLES
from jbn.renorm import Limit, batch_renorm

Initializer = Callable[..., jax.Array]


def check_existing_variables(module: nn.Module, fshape: tuple[int, ...], axis) -> None:
    """Clear error when the input's feature shape differs from already-created variables
    (a checkpoint for another width, or `axis` pointing at the wrong dimension)."""
    names = [("params", "scale"), ("params", "bias"), ("batch_stats", "mean"), ("batch_stats", "var"), ("batch_stats", "count")]
    names += [("batch_stats", name) for name in POPULATION_VARIABLES]
    for collection, name in names:
        if module.has_variable(collection, name):
            shape = tuple(jnp.shape(module.get_variable(collection, name)))
            if shape != fshape:
                raise ValueError(
                    f"{type(module).__name__} '{module.name}': input `x` has feature shape {fshape} along "
                    f"axis={axis!r}, but the existing variable {collection}/{name} has shape {shape}: pass an input "
                    f"with that feature shape, set `axis` to the input's feature axis, or re-initialize the variables."
                )


def running_variables(module: nn.Module, fshape: tuple[int, ...], momentum, debias: bool):
    """batch_stats/{mean,var} as flax names them, and batch_stats/count (int32, feature
    shape) only when the update needs it or a checkpoint brought one."""
    mean = module.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), fshape)
    var = module.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), fshape)
    count = None
    if needs_batch_count(momentum, debias) or module.has_variable("batch_stats", "count"):
        count = module.variable("batch_stats", "count", lambda s: jnp.zeros(s, jnp.int32), fshape)
    return mean, var, count


def affine_parameters(module: nn.Module, fshape: tuple[int, ...]):
    scale = module.param("scale", module.scale_init, fshape, module.param_dtype) if module.use_scale else None
    bias = module.param("bias", module.bias_init, fshape, module.param_dtype) if module.use_bias else None
    return scale, bias


def capture_population(module: nn.Module, x, mask) -> bool:
    """In a `recompute_batch_stats` pass, merge this batch's statistics into the
    population variables and return True; otherwise return False and touch nothing."""
    if not module.has_variable("batch_stats", "population_count"):
        return False
    population = [module.variable("batch_stats", name) for name in POPULATION_VARIABLES]
    batch = moments(x, axis=module.axis, mask=mask, axis_name=module.axis_name, axis_index_groups=module.axis_index_groups)
    merged = merge_moments(Moments(*(v.value for v in population)), batch)
    for v, new in zip(population, merged):
        v.value = new.astype(v.value.dtype)
    return True


def store_running(mean, var, count, new: RunningStats) -> None:
    mean.value, var.value = new.mean, new.var
    if count is not None:
        count.value = new.count


def prepare(module: nn.Module, x, use_running_average: bool | None):
    """What every linen module here does first: settle the mode, check `x`, and create (or
    fetch) the variables. Returns (use_running_average, x, (mean, var, count), scale, bias)."""
    use_running_average = nn.merge_param("use_running_average", module.use_running_average, use_running_average)
    x = _checks.check_floating(x)
    fshape = _checks.feature_shape(x.shape, _checks.feature_axes(x.ndim, module.axis))
    check_existing_variables(module, fshape, module.axis)
    running = running_variables(module, fshape, module.momentum, module.debias)
    return (use_running_average, x, running) + affine_parameters(module, fshape)


def shared_arguments(module: nn.Module, mask) -> dict:
    """Keyword arguments of `batch_norm` / `batch_renorm` that come from the module's fields."""
    initializing = module.is_initializing()
    return dict(
        axis=module.axis,
        momentum=module.momentum,
        epsilon=module.epsilon,
        mask=mask,
        # At init the named axis need not exist, as in flax.
        axis_name=None if initializing else module.axis_name,
        axis_index_groups=None if initializing else module.axis_index_groups,
        dtype=module.dtype,
        debias=module.debias,
        unbiased_running_var=module.unbiased_running_var,
    )


def initializing_on_one_value(module: nn.Module, x, use_running_average: bool) -> bool:
    """True while `init` runs in training mode on a batch with one value per feature (a
    dummy example, as flax code often initializes with). Training would reject that batch;
    `init` trains nothing, so the module then normalizes with the batch's own statistics
    and skips the checks that only training needs, as flax does."""
    if use_running_average or not module.is_initializing():
        return False
    features = _checks.feature_axes(x.ndim, module.axis)
    return _checks.element_count(x.shape, _checks.reduction_axes(x.ndim, features)) <= 1


def init_output(module: nn.Module, x, scale, bias, mask, **options) -> jax.Array:
    """The output `init` gives in `initializing_on_one_value`'s case."""
    y, _ = normalize_with_batch_stats(x, scale, bias, axis=module.axis, epsilon=module.epsilon, mask=mask,
                                      dtype=module.dtype, **options)
    return y


def running_stats(mean, var, count) -> RunningStats:
    return RunningStats(mean.value, var.value, None if count is None else count.value)


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
      virtual_batch_size: ghost batch norm: normalize each consecutive sub-batch of this
        size along the leading axis with its own statistics (see `jbn.batch_norm`).
      debias: keep a bias-corrected EMA (creates `batch_stats/count`).
      unbiased_running_var: track the unbiased batch variance in `batch_stats/var`, as
        PyTorch does (for models ported from PyTorch).
      activation: None (or "identity"), "relu" or "leaky_relu", applied to the output
        inside the same fused pass (jbn only; flax has no such field).
      negative_slope: the slope of "leaky_relu" for negative inputs.
      save_output_only: in training, keep only the output for the backward pass and
        recover the normalized input from it (needs "identity" or "leaky_relu" and a
        scale without zeros; see `jbn.batch_norm`).
      fused: use the fused custom-gradient training path (default); False uses plain
        autodiff (needed only for forward-mode differentiation, `jax.jvp`).

    `momentum=None` keeps the cumulative average of all batches seen (PyTorch's
    `momentum=None`) and creates `batch_stats/count`; without these options the variables
    are exactly flax's.
    """

    use_running_average: bool | None = None
    axis: int | tuple[int, ...] = -1
    momentum: float | None = 0.99
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
    virtual_batch_size: int | None = None
    debias: bool = False
    unbiased_running_var: bool = False
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
        use_running_average, x, (mean, var, count), scale, bias = prepare(self, x, use_running_average)
        if initializing_on_one_value(self, x, use_running_average):
            return init_output(self, x, scale, bias, mask, activation=self.activation,
                               negative_slope=self.negative_slope, fused=self.fused)
        y, new = batch_norm(
            x,
            scale,
            bias,
            running_stats(mean, var, count),
            training=not use_running_average,
            virtual_batch_size=self.virtual_batch_size,
            activation=self.activation,
            negative_slope=self.negative_slope,
            save_output_only=self.save_output_only,
            fused=self.fused,
            **shared_arguments(self, mask),
        )
        if not use_running_average and not self.is_initializing() and not capture_population(self, x, mask):
            store_running(mean, var, count, new)
        return y


class BatchRenorm(nn.Module):
    """Batch Renormalization (Ioffe 2017) for flax linen; calls `jbn.batch_renorm`.

    Variables: `params/{scale,bias}` and `batch_stats/{mean,var}` as in `BatchNorm` (eval is
    batch norm's, so the checkpoint is interchangeable with a `BatchNorm` one), plus
    `batch_stats/step` (int32 scalar), the number of training calls so far, which the
    `r_max`/`d_max` schedules read; it is not advanced by `init`.

    Attributes: those of `BatchNorm` (without `virtual_batch_size`), and
      r_max: >= 1, or a schedule `step -> r_max` (e.g. `jbn.paper_renorm_schedules()[0]`).
      d_max: >= 0, or a schedule `step -> d_max`.
    """

    use_running_average: bool | None = None
    axis: int | tuple[int, ...] = -1
    momentum: float | None = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    axis_name: Any = None
    axis_index_groups: Any = None
    r_max: Limit = 3.0
    d_max: Limit = 5.0
    debias: bool = False
    unbiased_running_var: bool = False

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask: jax.Array | None = None):
        """Renormalize `x` (any rank, features on `axis`); arguments as in `BatchNorm`."""
        use_running_average, x, (mean, var, count), scale, bias = prepare(self, x, use_running_average)
        step = self.variable("batch_stats", "step", lambda: jnp.zeros((), jnp.int32))
        if initializing_on_one_value(self, x, use_running_average):
            return init_output(self, x, scale, bias, mask)
        y, new = batch_renorm(
            x,
            scale,
            bias,
            running_stats(mean, var, count),
            training=not use_running_average,
            r_max=self.r_max,
            d_max=self.d_max,
            step=step.value,
            **shared_arguments(self, mask),
        )
        if not use_running_average and not self.is_initializing() and not capture_population(self, x, mask):
            store_running(mean, var, count, new)
            step.value = step.value + 1
        return y
