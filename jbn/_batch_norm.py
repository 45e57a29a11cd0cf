"""The entry points of batch norm and their core: `batch_norm` (training and evaluation, ghost
batches included), `normalize_with_batch_stats` and `normalize`. Each public function checks its
arguments once (`jbn._options.checked_arguments`, the running options, the running state), then
calls the core, `batch_norm_core`, which trusts the records it is given: the framework wrappers
build the same records from their fields and call the core directly.

Read top-down: the public functions, the core, then its training and evaluation paths.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jbn import _fused, _options, _running
from jbn._options import Axes, AxisName, Layout, Normalization
from jbn._state import Moments, RunningStats
from jbn._statistics import batch_moments, sharded_in_type

Array = jax.Array


# The public entry points: each checks its arguments once.


def batch_norm(
    x: Array,
    scale: Array | None,
    bias: Array | None,
    running: RunningStats,
    *,
    training: bool,
    axis: Axes = -1,
    momentum: float | None = 0.99,
    epsilon: float = 1e-5,
    mask: Array | None = None,
    axis_name: AxisName = None,
    axis_index_groups: Any = None,
    dtype: Any = None,
    virtual_batch_size: int | None = None,
    debias: bool = False,
    unbiased_running_var: bool = False,
    activation: str | None = None,
    negative_slope: float = 0.01,
    save_output_only: bool = False,
    fused: bool = True,
    running_average: Any = None,
) -> tuple[Array, RunningStats]:
    """Batch normalization of `x` (optionally followed by an activation) and the next
    running statistics.

    In training, `x` is normalized with its own batch statistics (global over `axis_name`,
    restricted to `mask`) and the running statistics move towards them. In evaluation,
    `x` is normalized with `running` and `running` comes back unchanged.

    Training uses a fused derivative rule (`jbn._fused`): the backward pass keeps only `x`
    (or only `y`, see `save_output_only`) and per-feature statistics, computes two
    per-feature reductions and one elementwise pass, and sends the reductions in one psum
    under `axis_name`. It supports `grad`/`vjp`, forward mode (`jvp`, `jacfwd`,
    `linearize`), higher orders, `jit`, `vmap`, `pmap`, `shard_map` and `jax.export` with
    symbolic batch sizes.

    Args:
      x: floating (or complex) input of any rank.
      scale, bias: feature-shaped affine parameters, or None.
      running: `RunningStats` with feature-shaped mean and var (and count, when the
        update rule needs one: `momentum=None` or `debias=True`).
      training: use batch statistics (True) or the running ones (False). Static.
      axis, mask, axis_name, axis_index_groups: as in `moments`.
      momentum: in [0, 1]; `new = momentum * old + (1 - momentum) * batch`. None: the
        cumulative average of all batches seen (see `update_running_stats`).
      epsilon: > 0, added to the variance.
      dtype: output dtype; default flax's: the promoted dtype of `x`, `scale` and `bias`.
      virtual_batch_size: ghost batch norm (Hoffer et al. 2017). The leading axis of `x`
        (the batch axis, which must not be a feature axis) is split into consecutive
        sub-batches of this size, each normalized with its own statistics; the batch size
        must be a multiple of it. With `axis_name`, sub-batch g of every participant forms
        one virtual batch. The running statistics are updated once per call, from the mean
        of the sub-batch means and the mean of the sub-batch variances, as in Hoffer et
        al.'s implementation; a sub-batch without a valid element, or (with
        `unbiased_running_var`) with only one, is left out. Evaluation is unchanged.
      debias, unbiased_running_var: options of the running update, see
        `update_running_stats`. With `virtual_batch_size`, the unbiased correction uses
        each sub-batch's own count before the sub-batch variances are averaged.
      activation: None (or "identity"), "relu" or "leaky_relu", applied to the
        normalized output in the same fused pass (also in evaluation).
      negative_slope: the slope of "leaky_relu" for negative inputs (static).
      save_output_only: training memory saver: keep only the output `y` for the
        backward pass and recover the normalized input from it, as `(z - bias) / scale`
        with `z` the activation's inverse of `y`. Needs an invertible activation
        (identity, or leaky_relu with `negative_slope` > 0) and a `scale` with no zeros:
        a concrete zero raises, a traced zero gives NaN gradients for its feature.
        The recovered input carries the rounding of `y`'s dtype (a bfloat16 `y` gives
        bfloat16-accurate gradients). Worth it when the next layer saves `y` anyway.
      fused: use the fused derivative rule in training (default). False differentiates
        the plain jnp computation instead (more saved memory, same numbers).
      running_average: a running-average rule (`jbn.EMA`, `jbn.DebiasedEMA`,
        `jbn.CumulativeAverage`, `jbn.UnbiasedVariance`, or your own object with
        `update(running, batch) -> RunningStats` and a `needs_count` bool); when given, it
        replaces the rule of `momentum`, `debias` and `unbiased_running_var`.

    Returns:
      `(y, new_running)`: `y` has `x`'s shape; `new_running` is a `RunningStats`.

    Training on one value per feature (one example without spatial axes) computes as
    flax does (the output is the bias) and emits one `jbn.OneValuePerFeatureWarning`.
    """
    training = _options.check_flag(training, "training")
    running_options = _options.check_running_options(momentum, debias, unbiased_running_var, running_average)
    x, scale, bias, layout, how = _options.checked_arguments(
        x,
        scale,
        bias,
        axis=axis,
        mask=mask,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        epsilon=epsilon,
        dtype=dtype,
        activation=activation,
        negative_slope=negative_slope,
        save_output_only=save_output_only,
        fused=fused,
        training=training,
        virtual_batch_size=virtual_batch_size,
    )
    rule = _running.rule_of(*running_options)
    running = _running.check_running(running, layout.fshape, axis)
    return batch_norm_core(x, scale, bias, running, layout, how, rule, training=training)


def normalize_with_batch_stats(
    x: Array,
    scale: Array | None,
    bias: Array | None,
    *,
    axis: Axes = -1,
    epsilon: float = 1e-5,
    mask: Array | None = None,
    axis_name: AxisName = None,
    axis_index_groups: Any = None,
    dtype: Any = None,
    activation: str | None = None,
    negative_slope: float = 0.01,
    save_output_only: bool = False,
    fused: bool = True,
) -> tuple[Array, Moments]:
    """Normalize `x` with its own batch statistics: the training half of `batch_norm`,
    without the running statistics. Arguments as in `batch_norm`.

    Returns:
      `(y, stats)`: `y` has `x`'s shape (dtype `dtype`, default flax's promotion of `x`,
      `scale` and `bias`); `stats` are the batch `Moments`, whose mean and var are
      differentiable (count is not).
    """
    x, scale, bias, layout, how = _options.checked_arguments(
        x,
        scale,
        bias,
        axis=axis,
        mask=mask,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        epsilon=epsilon,
        dtype=dtype,
        activation=activation,
        negative_slope=negative_slope,
        save_output_only=save_output_only,
        fused=fused,
    )
    return train_with_layout(x, scale, bias, layout, how)


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
    x = _options.check_input(x)
    epsilon = _options.check_epsilon(epsilon)
    layout = _options.resolve(x, axis)
    fshape = layout.fshape
    mean = _options.check_feature_array(mean, fshape, "mean", axis)  # type: ignore[assignment]
    var = _options.check_feature_array(var, fshape, "var", axis)  # type: ignore[assignment]
    scale = _options.check_feature_array(scale, fshape, "scale", axis)
    bias = _options.check_feature_array(bias, fshape, "bias", axis)
    out = _options.output_dtype(_options.check_output_dtype(dtype), x, scale, bias)
    return _fused.normalize_on_layout(x, layout, mean, var, scale, bias, epsilon=epsilon, out_dtype=out)


# The core: trusts its arguments.


def batch_norm_core(
    x: Array, scale, bias, running: RunningStats, layout: Layout, how: Normalization, rule: Any, *, training: bool
) -> tuple[Array, RunningStats]:
    """`batch_norm` on checked arguments: `layout` and `how` from
    `jbn._options.checked_arguments`, `rule` from `jbn._running.rule_of`, `running` checked
    (or created by a wrapper for this input)."""
    if not training:
        return evaluate_with_layout(x, scale, bias, layout, running, how), running

    def train(x, scale, bias, layout):
        return train_with_layout(x, scale, bias, layout, how)

    if how.ghost_groups is None:
        y, stats = train(x, scale, bias, layout)
    else:
        unbiased = isinstance(rule, _running.UnbiasedVariance)
        y, stats = ghost_batches(train, x, scale, bias, layout, how.ghost_groups, unbiased=unbiased)
        rule = rule.rule if unbiased else rule  # the correction is already applied per sub-batch
    return y, _running.apply_rule(rule, running, stats)


def train_with_layout(x: Array, scale, bias, layout: Layout, how: Normalization) -> tuple[Array, Moments]:
    """Normalize with the batch's own statistics, on checked arguments."""
    if how.fused and _fused.can_fuse(x, how.epsilon):
        return _fused.fused_batch_norm(
            x,
            scale,
            bias,
            layout,
            epsilon=how.epsilon,
            out_dtype=how.out_dtype,
            activation=how.activation,
            negative_slope=how.negative_slope,
            save_output_only=how.save_output_only,
        )
    if how.save_output_only:
        raise ValueError(
            "`save_output_only=True` needs the fused training path, which is off here: set fused=True, pass a "
            "Python float `epsilon`, and a real (not complex) input."
        )
    x = without_nonfinite_padding(x, layout.valid)
    stats = batch_moments(x, layout)
    return normalized_with(x, layout, stats, scale, bias, how), stats


def normalized_with(x: Array, layout: Layout, stats: Moments | RunningStats, scale, bias, how: Normalization) -> Array:
    """`(x - mean) / sqrt(var + epsilon) * scale + bias`, then the activation, with `stats`."""
    return _fused.normalize_on_layout(
        x,
        layout,
        stats.mean,
        stats.var,
        scale,
        bias,
        epsilon=how.epsilon,
        out_dtype=how.out_dtype,
        activation=how.activation,
        negative_slope=how.negative_slope,
    )


def evaluate_with_layout(x: Array, scale, bias, layout: Layout, running: RunningStats, how: Normalization) -> Array:
    """Normalize with the running statistics, on checked arguments. Padding is treated as
    in training: whatever it holds reaches no gradient."""
    return normalized_with(without_nonfinite_padding(x, layout.valid), layout, running, scale, bias, how)


def without_nonfinite_padding(x: Array, valid: Array | None) -> Array:
    """`x` with NaN/inf padding replaced by 0: padding then reaches no statistic and no
    gradient on any path, whatever it held (finite padding is kept as it is)."""
    if valid is None:
        return x
    return jnp.where(valid | jnp.isfinite(x), x, jnp.zeros((), x.dtype))


def ghost_batches(
    train: Callable, x: Array, scale, bias, layout: Layout, n_groups: int, *, unbiased: bool
) -> tuple[Array, Moments]:
    """Ghost batch norm as a reshape: (N, ...) -> (N // size, size, ...) with the new group
    axis 0 treated as one more feature axis, then the ordinary training path, so it
    composes with masks, `axis_name` and whatever the training path does. Returns the
    output and the sub-batch statistics combined for the running update."""
    size = layout.shape[0] // n_groups
    grouped_layout = layout.split_leading(n_groups)
    grouped_shape = grouped_layout.shape
    gshape = (n_groups,) + layout.fshape
    expand = lambda p: None if p is None else jnp.broadcast_to(p, gshape)  # noqa: E731  (gradients sum back)

    def grouped(x, scale, bias, valid):
        if valid is not None:
            lead = (n_groups, size) if valid.shape[0] == x.shape[0] else (1, 1)
            valid = valid.reshape(lead + valid.shape[1:])
        y, stats = train(x.reshape(grouped_shape), expand(scale), expand(bias), grouped_layout._replace(valid=valid))
        return y.reshape(x.shape), stats

    if sharded_in_type(x):
        # Sub-batches cut across the shards in ways that one mesh axis cannot name (a
        # ShardingTypeError for the reshape): XLA lays this part out (Auto axes), and y
        # comes back split as x was.
        sharding = jax.typeof(x).sharding
        replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
        grouped = jax.sharding.auto_axes(grouped, out_sharding=(sharding, Moments(replicated, replicated, replicated)))  # type: ignore[arg-type]
    y, stats = grouped(x, scale, bias, layout.valid)
    if unbiased:
        stats = _running.bessel_corrected(stats)
    return y, combine_sub_batches(stats, min_count=2 if unbiased else 1)


def combine_sub_batches(stats: Moments, *, min_count: int = 1) -> Moments:
    """Mean over sub-batches (axis 0) of the sub-batch means and of their variances,
    leaving out sub-batches with fewer than `min_count` valid elements (no element, or an
    undefined unbiased variance); count = the valid elements of those used."""
    count = jnp.broadcast_to(stats.count, stats.mean.shape)
    used = count >= min_count
    n = jnp.maximum(jnp.sum(used, axis=0), 1).astype(stats.var.dtype)
    # each term divided before the sum: a sum of representable variances may overflow
    mean = jnp.sum(jnp.where(used, stats.mean / n[None], 0), axis=0)
    var = jnp.sum(jnp.where(used, stats.var / n[None], 0), axis=0)
    return Moments(mean, var, jnp.sum(jnp.where(used, count, 0), axis=0))
