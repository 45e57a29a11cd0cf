"""`batch_norm` and `normalize_with_batch_stats`: the training and evaluation entry points,
ghost batches included. Each canonicalizes its arguments once, then calls the floors."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jbn import _activations, _axes, _fused, _normalize, _running, _validate
from jbn._axes import Axes, AxisName, Layout
from jbn._state import Moments, RunningStats
from jbn._statistics import batch_moments

Array = jax.Array


def check_params(scale: Any, bias: Any, x: Array, fshape: tuple[int, ...], axis: Axes) -> tuple:
    """scale and bias: feature-shaped, floating (complex only for a complex input)."""
    out = []
    for value, name in ((scale, "scale"), (bias, "bias")):
        v = _validate.check_feature_array(value, fshape, name, axis)
        if v is not None and jnp.iscomplexobj(v) and not jnp.iscomplexobj(x):
            raise TypeError(f"`{name}` is complex ({v.dtype}) but `x` is real: pass a real `{name}`.")
        out.append(v)
    return tuple(out)


def without_nonfinite_padding(x: Array, valid: Array | None) -> Array:
    """`x` with NaN/inf padding replaced by 0: padding then reaches no statistic and no
    gradient on any path, whatever it held (finite padding is kept as it is)."""
    if valid is None:
        return x
    return jnp.where(valid | jnp.isfinite(x), x, jnp.zeros((), x.dtype))


@dataclasses.dataclass(frozen=True)
class Normalization:
    """How to normalize, checked once by `normalization` (a frozen, hashable record): the
    epsilon (a Python float, or a traced value), the output dtype, the canonical
    activation name and its slope, whether training keeps only the output for the
    backward pass, and whether it uses the fused derivative rule."""

    epsilon: Any
    out_dtype: Any
    activation: str = "identity"
    negative_slope: float = 0.01
    save_output_only: bool = False
    fused: bool = True


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
    return _normalize.normalize_on_layout(
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


def canonical_arguments(
    x,
    scale,
    bias,
    *,
    axis,
    mask,
    axis_name,
    axis_index_groups,
    epsilon,
    dtype,
    activation=None,
    negative_slope=0.01,
    save_output_only=False,
    fused=True,
    training=True,
) -> tuple[Array, Any, Any, Layout, Normalization]:
    """The arguments shared by the entry points, checked once: (x, scale, bias, layout,
    how to normalize)."""
    x = _validate.check_input(x)
    epsilon = _validate.check_epsilon(epsilon)
    save_output_only = _validate.check_flag(save_output_only, "save_output_only")
    fused = _validate.check_flag(fused, "fused")
    negative_slope = _validate.check_negative_slope(negative_slope)
    synced = training  # evaluation uses no statistics of the batch: its axis names need not be bound
    layout = _axes.resolve(x, axis, mask, axis_name if synced else None, axis_index_groups if synced else None)
    scale, bias = check_params(scale, bias, x, layout.fshape, axis)
    act = _activations.check(activation, negative_slope, save_output_only and training)
    if act != "identity" and jnp.iscomplexobj(x):
        raise ValueError(f"`activation`={activation!r} needs a real input; `x` is {x.dtype}.")
    how = Normalization(
        epsilon=epsilon,
        out_dtype=_normalize.output_dtype(_validate.check_output_dtype(dtype), x, scale, bias),
        activation=act,
        negative_slope=negative_slope,
        save_output_only=save_output_only,
        fused=fused,
    )
    return x, scale, bias, layout, how


def running_rule(running_average: Any, momentum: Any, debias: Any, unbiased_running_var: Any) -> Any:
    """The running-average rule of a call: `running_average` when given, else the one
    `momentum`, `debias` and `unbiased_running_var` name; checked once."""
    if running_average is not None:
        return _running.check_rule(running_average)
    return _running.running_average_rule(momentum, debias, unbiased_running_var)


def warn_if_one_value_per_feature(layout: Layout, virtual_batch_size: int | None = None) -> None:
    per_participant = _axes.element_count(layout.shape, layout.reduce)
    _validate.warn_if_one_value(
        per_participant * _axes.participants(layout), layout.shape, layout.axis, virtual_batch_size=virtual_batch_size
    )


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
    x, scale, bias, layout, how = canonical_arguments(
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
    warn_if_one_value_per_feature(layout)
    return train_with_layout(x, scale, bias, layout, how)


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
    training = _validate.check_flag(training, "training")
    rule = running_rule(running_average, momentum, debias, unbiased_running_var)
    x, scale, bias, layout, how = canonical_arguments(
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
    )
    running = _running.check_running(running, layout.fshape, axis)
    if not training:
        return evaluate_with_layout(x, scale, bias, layout, running, how), running

    def train(x, scale, bias, layout):
        return train_with_layout(x, scale, bias, layout, how)

    if virtual_batch_size is None:
        warn_if_one_value_per_feature(layout)
        y, stats = train(x, scale, bias, layout)
    else:
        unbiased = isinstance(rule, _running.UnbiasedVariance)
        y, stats = ghost_batches(train, x, scale, bias, layout, virtual_batch_size, unbiased=unbiased)
        rule = rule.rule if unbiased else rule  # the correction is already applied per sub-batch
    return y, _running.apply_rule(rule, running, stats)


def ghost_batches(
    train: Callable, x: Array, scale, bias, layout: Layout, size: Any, *, unbiased: bool
) -> tuple[Array, Moments]:
    """Ghost batch norm as a reshape: (N, ...) -> (N // size, size, ...) with the new group
    axis 0 treated as one more feature axis, then the ordinary training path, so it
    composes with masks, `axis_name` and whatever the training path does. Returns the
    output and the sub-batch statistics combined for the running update."""
    n_groups = _validate.check_virtual_batch_size(size, layout.shape, layout.features)
    size = layout.shape[0] // n_groups
    grouped_layout = layout.split_leading(n_groups)
    grouped_shape = grouped_layout.shape
    warn_if_one_value_per_feature(grouped_layout, size)
    gshape = (n_groups,) + layout.fshape
    expand = lambda p: None if p is None else jnp.broadcast_to(p, gshape)  # noqa: E731  (gradients sum back)

    def grouped(x, scale, bias, valid):
        if valid is not None:
            lead = (n_groups, size) if valid.shape[0] == x.shape[0] else (1, 1)
            valid = valid.reshape(lead + valid.shape[1:])
        y, stats = train(x.reshape(grouped_shape), expand(scale), expand(bias), grouped_layout._replace(valid=valid))
        return y.reshape(x.shape), stats

    if _axes.sharded_in_type(x):
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
