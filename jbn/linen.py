"""Flax linen wrappers: create the variables, then call the pure layer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import initializers

from jbn import _options, _running, precise
from jbn._batch_norm import batch_norm_core
from jbn._state import Moments, RunningStats
from jbn.renorm import Limit, batch_renorm_core, next_step, resolve_limit

Initializer = Callable[..., jax.Array]

# The variables whose feature shape must match the input's, when they exist.
EXISTING = (
    ("params", "scale"),
    ("params", "bias"),
    ("batch_stats", "mean"),
    ("batch_stats", "var"),
    ("batch_stats", "count"),
) + tuple(("batch_stats", name) for name in precise.POPULATION_VARIABLES)


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
    def _run(
        self,
        x,
        use_running_average: bool | None,
        mask,
        running_average: tuple,
        normalization: dict,
        core: Callable,
        **core_options,
    ):
        """One call, in the order it runs: settle the mode; check `x` and this module's
        options once (`jbn._options`); create (or fetch) the variables; call the trusting
        `core`; store the new running statistics (or, in a `recompute_batch_stats` pass,
        merge the batch into the population). Returns the output. Written as one function:
        each step a helper of its own would make a call walk back into this module.

        `running_average`: (momentum, debias, unbiased_running_var, running_average) as
        the fields hold them; `normalization`: this module's own options of
        `checked_arguments`; `core_options`: the core's own (renorm's limits). At init, as in
        flax: the axis names need not be bound, one value per feature is not worth a warning
        (init trains nothing), and the running statistics are not stored."""
        training = not nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        initializing = self.is_initializing()
        names = (None, None) if initializing else (self.axis_name, self.axis_index_groups)
        x, layout = _options.checked_layout(
            x, axis=self.axis, mask=mask, axis_name=names[0], axis_index_groups=names[1], training=training
        )
        fshape = layout.fshape
        running_options = _options.check_running_options(*running_average)
        # Existing variables of another feature shape (a checkpoint for another width, or
        # `axis` pointing at the wrong dimension): a clear error.
        for collection, name in EXISTING:
            if not self.has_variable(collection, name):
                continue
            shape = tuple(jnp.shape(nn.meta.unbox(self.get_variable(collection, name))))  # boxed: nn.with_partitioning
            if shape != fshape:
                raise ValueError(
                    f"{type(self).__name__} '{self.name}': input `x` has feature shape {fshape} along "
                    f"axis={self.axis!r}, but the existing variable {collection}/{name} has shape {shape}: pass an "
                    "input with that feature shape, set `axis` to the input's feature axis, or re-initialize."
                )
        mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), fshape)
        var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), fshape)
        scale = self.param("scale", self.scale_init, fshape, self.param_dtype) if self.use_scale else None
        bias = self.param("bias", self.bias_init, fshape, self.param_dtype) if self.use_bias else None
        with _options.quiet_one_value(initializing):
            scale, bias, layout, how = _options.checked_normalization(
                x,
                scale,
                bias,
                layout,
                axis=self.axis,
                epsilon=self.epsilon,
                dtype=self.dtype,
                training=training,
                **normalization,
            )
        rule = _running.rule_of(*running_options)
        count = None  # batch_stats/count only when the rule keeps one or a checkpoint brought one
        if rule.needs_count or self.has_variable("batch_stats", "count"):
            count = self.variable("batch_stats", "count", lambda s: jnp.zeros(s, jnp.int32), fshape)
        running = RunningStats(mean.value, var.value, None if count is None else count.value)
        running = _running.check_running(running, fshape, self.axis)
        y, new = core(x, scale, bias, running, layout, how, rule, training=training, **core_options)
        if not training or initializing:
            return y
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
            return y
        mean.value, var.value = new.mean, new.var
        if count is not None:
            count.value = new.count
        return y


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
        return self._run(
            x,
            use_running_average,
            mask,
            (self.momentum, self.debias, self.unbiased_running_var, self.running_average),
            dict(
                # a dummy example at init is no multiple of the ghost batch size
                virtual_batch_size=None if self.is_initializing() else self.virtual_batch_size,
                activation=self.activation,
                negative_slope=self.negative_slope,
                save_output_only=self.save_output_only,
                fused=self.fused,
            ),
            batch_norm_core,
        )


class BatchRenorm(_Normalization):
    """Batch Renormalization (Ioffe 2017) for flax linen: `jbn.batch_renorm` as a module.

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

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask: jax.Array | None = None):
        """Renormalize `x` (any rank, features on `axis`); arguments as in `BatchNorm`."""
        step = self.variable("batch_stats", "step", lambda: jnp.zeros((), jnp.int32))
        y = self._run(
            x,
            use_running_average,
            mask,
            (self.momentum, self.debias, self.unbiased_running_var, self.running_average),
            dict(fused=False),
            batch_renorm_core,
            r_max=resolve_limit(self.r_max, step.value, "r_max"),
            d_max=resolve_limit(self.d_max, step.value, "d_max"),
        )
        training = not nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        if training and not self.is_initializing() and not self.has_variable("batch_stats", "population_count"):
            step.value = next_step(step.value)
        return y
