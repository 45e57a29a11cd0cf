"""Flax linen wrappers: create the variables, then call the pure layer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import initializers

from jbn import _axes, _validate, precise
from jbn._batch_norm import batch_norm, running_rule
from jbn._state import Moments, RunningStats
from jbn.renorm import Limit, batch_renorm, next_step

Initializer = Callable[..., jax.Array]


class _Normalization(nn.Module):
    """The fields flax.linen.BatchNorm has, in its order (so positional arguments keep
    their meaning), and what both jbn modules do with them around the pure call."""

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

    @nn.nowrap
    def _check_existing(self, fshape: tuple[int, ...]) -> None:
        """Clear error when the input's feature shape differs from already-created variables
        (a checkpoint for another width, or `axis` pointing at the wrong dimension)."""
        names = [
            ("params", "scale"),
            ("params", "bias"),
            ("batch_stats", "mean"),
            ("batch_stats", "var"),
            ("batch_stats", "count"),
        ] + [("batch_stats", name) for name in precise.POPULATION_VARIABLES]
        for collection, name in names:
            if not self.has_variable(collection, name):
                continue
            shape = tuple(jnp.shape(nn.meta.unbox(self.get_variable(collection, name))))  # boxed: nn.with_partitioning
            if shape != fshape:
                raise ValueError(
                    f"{type(self).__name__} '{self.name}': input `x` has feature shape {fshape} along "
                    f"axis={self.axis!r}, but the existing variable {collection}/{name} has shape {shape}: pass an "
                    "input with that feature shape, set `axis` to the input's feature axis, or re-initialize."
                )

    @nn.nowrap
    def _prepare(self, x, use_running_average: bool | None, rule: Any):
        """Settle the mode, check `x`, create (or fetch) the variables. Returns
        (training, x, running variables, scale, bias). `rule`: the running-average
        rule, which says whether `batch_stats/count` is kept."""
        use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        x = _validate.check_input(x)
        fshape = _axes.feature_shape(x.shape, _axes.feature_axes(x.ndim, self.axis))
        self._check_existing(fshape)
        mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), fshape)
        var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), fshape)
        count = None  # batch_stats/count only when the update needs it or a checkpoint brought one
        if rule.needs_count or self.has_variable("batch_stats", "count"):
            count = self.variable("batch_stats", "count", lambda s: jnp.zeros(s, jnp.int32), fshape)
        scale = self.param("scale", self.scale_init, fshape, self.param_dtype) if self.use_scale else None
        bias = self.param("bias", self.bias_init, fshape, self.param_dtype) if self.use_bias else None
        return not use_running_average, x, (mean, var, count), scale, bias

    @nn.nowrap
    def _call_pure(self, function, x, scale, bias, running_vars, training: bool, mask, **options):
        """The pure call with this module's `options`. At init, as in flax: the axis names
        need not be bound, and one value per feature is not worth a warning (init trains
        nothing)."""
        mean, var, count = running_vars
        running = RunningStats(mean.value, var.value, None if count is None else count.value)
        initializing = self.is_initializing()
        names = (None, None) if initializing else (self.axis_name, self.axis_index_groups)
        with _validate.quiet_one_value(initializing):
            return function(
                x,
                scale,
                bias,
                running,
                training=training,
                mask=mask,
                axis=self.axis,
                epsilon=self.epsilon,
                dtype=self.dtype,
                axis_name=names[0],
                axis_index_groups=names[1],
                **options,
            )

    @nn.nowrap
    def _record(self, x, mask, running_vars, new: RunningStats) -> bool:
        """After a training call: store the new running statistics, or, in a
        `recompute_batch_stats` pass, merge the batch into the population instead. Returns
        whether the running statistics were stored (never during init)."""
        if self.is_initializing():
            return False
        if self.has_variable("batch_stats", "population_count"):
            population = [self.variable("batch_stats", name) for name in precise.POPULATION_VARIABLES]  # type: ignore[var-annotated]
            merged = precise.add_batch(
                Moments(*(v.value for v in population)),
                x,
                axis=self.axis,
                mask=mask,
                axis_name=self.axis_name,
                axis_index_groups=self.axis_index_groups,
            )
            for v, value in zip(population, merged):
                v.value = value
            return False
        mean, var, count = running_vars
        mean.value, var.value = new.mean, new.var
        if count is not None:
            count.value = new.count
        return True


class BatchNorm(_Normalization):
    """Batch normalization, a drop-in replacement for `flax.linen.BatchNorm`.

    Same fields, defaults, call signature and variables (`params/{scale,bias}`,
    `batch_stats/{mean,var}`, feature-shaped), so checkpoints move between the two. What
    differs: the variance is accurate when |mean| >> std whatever the order of the
    elements; under `axis_name` the statistics are weighted by each device's valid count
    (exact with uneven masks, finite with all-padding devices) in one collective; a batch
    whose statistics are NaN/inf leaves the running statistics unchanged; bad arguments
    fail at trace time.

    Attributes:
      use_running_average: normalize with `batch_stats` instead of the batch statistics.
      axis: feature axis or axes of the input (int or tuple).
      momentum: running average decay, `new = momentum * old + (1 - momentum) * batch`.
      epsilon: added to the variance.
      dtype: output dtype; default flax's promotion of the input and the parameters.
      param_dtype: dtype of `scale` and `bias`.
      use_bias, use_scale: learn a feature-wise bias / scale.
      bias_init, scale_init: their initializers (boxed ones, `nn.with_partitioning`, work).
      axis_name: name(s) bound by pmap, shard_map or vmap to synchronize statistics over.
      axis_index_groups: pmap-style groups along `axis_name`.
      use_fast_variance: accepted for compatibility with flax; jbn's variance is always
        fast and accurate, so it has no effect.
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
      fused: use the fused derivative rule in training (default); False uses plain
        autodiff (same numbers, more saved memory).
      running_average: a running-average rule object (see `jbn.batch_norm`); when given,
        it replaces `momentum`, `debias` and `unbiased_running_var`.

    `momentum=None` keeps the cumulative average of all batches seen (PyTorch's
    `momentum=None`) and creates `batch_stats/count`; without these options the variables
    are exactly flax's.
    """

    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    virtual_batch_size: int | None = None
    debias: bool = False
    unbiased_running_var: bool = False
    activation: str | None = None
    negative_slope: float = 0.01
    save_output_only: bool = False
    fused: bool = True
    running_average: Any = None

    @nn.nowrap
    def _rule(self) -> Any:
        return running_rule(self.running_average, self.momentum, self.debias, self.unbiased_running_var)

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask: jax.Array | None = None):
        """Normalize `x` (any rank, features on `axis`).

        Args:
          x: floating (or complex) input.
          use_running_average: overrides the field of the same name.
          mask: True where an element counts towards the statistics (see `jbn.moments`).

        Returns:
          The normalized input, same shape; `batch_stats` is updated in training
          (when mutable) and never during `init`.
        """
        rule = self._rule()
        training, x, running_vars, scale, bias = self._prepare(x, use_running_average, rule)
        y, new = self._call_pure(
            batch_norm,
            x,
            scale,
            bias,
            running_vars,
            training,
            mask,
            running_average=rule,
            # a dummy example at init is no multiple of the ghost batch size
            virtual_batch_size=None if self.is_initializing() else self.virtual_batch_size,
            activation=self.activation,
            negative_slope=self.negative_slope,
            save_output_only=self.save_output_only,
            fused=self.fused,
        )
        if training:
            self._record(x, mask, running_vars, new)
        return y


class BatchRenorm(_Normalization):
    """Batch Renormalization (Ioffe 2017) for flax linen; calls `jbn.batch_renorm`.

    Variables: `params/{scale,bias}` and `batch_stats/{mean,var}` as in `BatchNorm` (eval is
    batch norm's, so the checkpoint is interchangeable with a `BatchNorm` one), plus
    `batch_stats/step` (int32 scalar), the number of training calls so far, which the
    `r_max`/`d_max` schedules read; it is not advanced by `init`, and saturates at 2**31 - 1.

    Attributes: those of `BatchNorm` (without `virtual_batch_size` and the fused options), and
      r_max: >= 1, or a schedule `step -> r_max` (e.g. `jbn.paper_renorm_schedules()[0]`).
      d_max: >= 0, or a schedule `step -> d_max`.
      running_average: a running-average rule object, as in `BatchNorm`.
    """

    r_max: Limit = 3.0
    d_max: Limit = 5.0
    debias: bool = False
    unbiased_running_var: bool = False
    running_average: Any = None

    @nn.nowrap
    def _rule(self) -> Any:
        return running_rule(self.running_average, self.momentum, self.debias, self.unbiased_running_var)

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask: jax.Array | None = None):
        """Renormalize `x` (any rank, features on `axis`); arguments as in `BatchNorm`."""
        rule = self._rule()
        training, x, running_vars, scale, bias = self._prepare(x, use_running_average, rule)
        step = self.variable("batch_stats", "step", lambda: jnp.zeros((), jnp.int32))
        y, new = self._call_pure(
            batch_renorm,
            x,
            scale,
            bias,
            running_vars,
            training,
            mask,
            running_average=rule,
            r_max=self.r_max,
            d_max=self.d_max,
            step=step.value,
        )
        if training and self._record(x, mask, running_vars, new):
            step.value = next_step(step.value)
        return y
