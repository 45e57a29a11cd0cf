"""The pure batch-norm layer: functions from arrays to arrays, jax and jax.lax only.

Shapes: `x` has any rank; `axis` names its feature axes (int or tuple, negative allowed)
and every other axis is reduced. "Feature shape" below means the sizes of `x` along the
feature axes, in increasing axis order: (C,) for NHWC with axis=-1 or NCHW with axis=1.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jbn import _activations, _checks
from jbn._checks import Axes, AxisName
from jbn._fusion import separate_uses

Array = jax.Array


class Moments(NamedTuple):
    """Per-feature statistics of one batch.

    Attributes:
      mean: feature shape, float32 or wider.
      var: biased (population) variance, feature shape, never negative.
      count: number of elements reduced per feature (after the mask, summed over devices);
        broadcastable to `mean` (a scalar when every feature saw the same count).
    """

    mean: Array
    var: Array
    count: Array


class RunningStats(NamedTuple):
    """The state kept between steps: running mean and (biased) variance, feature shape."""

    mean: Array
    var: Array


# ----------------------------------------------------------------------------- moments


def _first_valid(xf: Array, valid: Array | None, reduce: tuple[int, ...]) -> Array:
    """One element per feature to subtract before summing: any sample close to the data
    keeps the one-pass variance accurate when |mean| >> std. It is the first element,
    or the first valid one under a mask. Shape: `xf` with the reduced axes removed."""
    if valid is None:
        index = tuple(0 if a in reduce else slice(None) for a in range(xf.ndim))
        return lax.stop_gradient(xf[index])
    keep = tuple(a for a in range(xf.ndim) if a not in reduce)
    moved = jnp.moveaxis(valid, reduce, tuple(range(len(reduce))))
    red_shape = moved.shape[: len(reduce)]
    flat = moved.reshape((-1,) + moved.shape[len(reduce):])
    first = jnp.argmax(flat, axis=0)  # 0 when nothing is valid; then the count is 0 anyway
    coords = jnp.unravel_index(first, red_shape)
    # Build an index into x: the found coordinate on reduced axes, an iota on feature axes.
    fshape = tuple(xf.shape[a] for a in keep)
    iotas = jnp.meshgrid(*[jnp.arange(s) for s in fshape], indexing="ij") if fshape else []
    index, r, k = [], 0, 0
    for a in range(xf.ndim):
        if a in reduce:
            index.append(jnp.broadcast_to(coords[r], fshape))
            r += 1
        else:
            index.append(iotas[k])
            k += 1
    return lax.stop_gradient(xf[tuple(index)])


def _local_sums(x: Array, valid: Array | None, shift: Array, reduce, features, dtype):
    """count, sum(x - shift), sum((x - shift)^2) over the reduced axes, in one pass."""
    # Each sum gets its own handle on x and the shift, so that XLA fuses `x - shift` into
    # both reductions instead of writing it to memory (see jbn._fusion).
    (xa, sa), (xb, sb) = separate_uses(2, x, shift)
    da = xa.astype(dtype) - _checks.expand_features(sa, x.ndim, features)
    db = xb.astype(dtype) - _checks.expand_features(sb, x.ndim, features)
    if valid is None:
        count = jnp.asarray(_checks.element_count(x.shape, reduce), dtype)
    else:
        # where, not multiply: padded NaN/inf must not leak in
        da, db = jnp.where(valid, da, 0), jnp.where(valid, db, 0)
        count = jnp.sum(jnp.broadcast_to(valid, x.shape), axis=reduce, dtype=dtype)
    return count, jnp.sum(da, axis=reduce), jnp.sum(db * db, axis=reduce)


def _from_sums(count, s1, s2, shift) -> Moments:
    safe = jnp.maximum(count, 1)  # keeps 0/0 out of both branches (and their gradients)
    delta = s1 / safe
    mean = jnp.where(count > 0, shift + delta, 0)
    var = jnp.where(count > 0, jnp.maximum(s2 / safe - delta * delta, 0), 0)
    return Moments(mean, var, count)


def _gather_by_psum(v: Array, axis_name, groups) -> Array:
    """All-gather as one psum of per-participant slots: its result is replicated, so it
    leaves shard_map as out_specs=P() with checks on, and works under pmap and vmap.
    Returns shape (participants, *v.shape)."""
    name = axis_name if len(axis_name) > 1 else axis_name[0]
    index = lax.axis_index(name)
    if groups is None:
        size = _checks.bound_axis_size(axis_name)
    else:
        size = len(groups[0])
        position = [0] * sum(len(g) for g in groups)
        for g in groups:
            for p, i in enumerate(g):
                position[i] = p
        index = jnp.asarray(position)[index]
    slots = jnp.zeros((size,) + v.shape, v.dtype)
    slots = lax.dynamic_update_index_in_dim(slots, v, index, axis=0)
    return lax.psum(slots, name, axis_index_groups=groups)


def _chan_merge(count: Array, shift: Array, delta: Array, m2: Array) -> Moments:
    """Merge per-participant statistics stacked on axis 0 (Chan et al. 1979).

    Each participant's mean is `shift + delta`, kept apart so that the merge works on
    small differences: |mean| >> std loses nothing to rounding a mean near 1e4.
    """
    total = jnp.sum(count, axis=0)
    safe = jnp.maximum(total, 1)
    offset = (shift - shift[0]) + delta  # each mean relative to participant 0's shift
    merged = jnp.sum(count * offset, axis=0) / safe
    m2 = jnp.sum(m2, axis=0) + jnp.sum(count * jnp.square(offset - merged), axis=0)
    mean = jnp.where(total > 0, shift[0] + merged, 0)
    return Moments(mean, jnp.where(total > 0, m2 / safe, 0), total)


def moments(
    x: Array,
    *,
    axis: Axes = -1,
    mask: Array | None = None,
    axis_name: AxisName = None,
    axis_index_groups: Any = None,
    shift: Array | None = None,
) -> Moments:
    """Per-feature mean and biased variance of `x`, in one pass, in float32 or wider.

    Args:
      x: floating input of any rank.
      axis: feature axis or axes; every other axis is reduced.
      mask: True where an element counts. Either `x`'s rank (broadcasts against `x`, may
        vary per feature) or `x.ndim - len(axis)` (broadcasts against `x` without its
        feature axes, e.g. (N, T) for (N, T, C)).
      axis_name: name (or tuple of names) bound by pmap, shard_map or vmap; the statistics
        are then those of the global batch, weighted by each participant's valid count.
      axis_index_groups: pmap-style groups of indices along `axis_name`; statistics are
        global within each group.
      shift: optional feature-shaped value close to the mean and EQUAL on every
        participant (e.g. the running mean). Without it each participant sums around one
        of its own samples and the global statistics come from one psum of per-participant
        (count, shift, mean - shift, M2) slots merged with Chan's formula; with it, one psum of the
        shifted sums (smaller when there are many participants).

    Returns:
      `Moments(mean, var, count)`: feature-shaped mean and var; count broadcastable to them.
    """
    x = _checks.check_floating(x)
    features = _checks.feature_axes(x.ndim, axis)
    reduce = _checks.reduction_axes(x.ndim, features)
    fshape = _checks.feature_shape(x.shape, features)
    names = _checks.normalize_axis_name(axis_name)
    groups = None
    if names is not None:
        groups = _checks.check_axis_index_groups(axis_index_groups, names, _checks.bound_axis_size(names))
    elif axis_index_groups is not None:
        _checks.check_axis_index_groups(axis_index_groups, None, 0)
    valid = _checks.broadcast_mask(mask, x.shape, features)
    dtype = _checks.stats_dtype(x.dtype)

    if shift is not None:
        shift = lax.stop_gradient(_checks.check_feature_array(shift, fshape, "shift", axis).astype(dtype))
        count, s1, s2 = _local_sums(x, valid, shift, reduce, features, dtype)
        if names is not None:
            name = names if len(names) > 1 else names[0]
            count = jnp.broadcast_to(count, fshape)
            count, s1, s2 = lax.psum(jnp.stack([count, s1, s2]), name, axis_index_groups=groups)
        return _from_sums(count, s1, s2, shift)

    local_shift = _first_valid(x.astype(dtype), valid, reduce)
    if valid is not None and local_shift.shape != fshape:
        local_shift = jnp.broadcast_to(local_shift, fshape)
    count, s1, s2 = _local_sums(x, valid, local_shift, reduce, features, dtype)
    if names is None:
        return _from_sums(count, s1, s2, local_shift)
    count = jnp.broadcast_to(count, fshape)
    safe = jnp.maximum(count, 1)
    delta = s1 / safe
    m2 = jnp.maximum(s2 - s1 * delta, 0)
    # A participant without valid elements contributes nothing, whatever its padding holds.
    local = [count, jnp.where(count > 0, local_shift, 0), delta, jnp.where(count > 0, m2, 0)]
    gathered = _gather_by_psum(jnp.stack(local), names, groups)
    return _chan_merge(*(gathered[:, i] for i in range(4)))


# --------------------------------------------------------------------------- normalize


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
      x: floating input of any rank.
      mean, var: feature-shaped statistics.
      scale, bias: feature-shaped affine parameters, or None to leave them out.
      axis: feature axis or axes of `x`.
      epsilon: added to the variance; > 0.
      dtype: output dtype; default `x.dtype`. The arithmetic runs in float32 or wider.
    """
    x = _checks.check_floating(x)
    _checks.check_epsilon(epsilon)
    features = _checks.feature_axes(x.ndim, axis)
    fshape = _checks.feature_shape(x.shape, features)
    mean = _checks.check_feature_array(mean, fshape, "mean", axis)
    var = _checks.check_feature_array(var, fshape, "var", axis)
    scale = _checks.check_feature_array(scale, fshape, "scale", axis)
    bias = _checks.check_feature_array(bias, fshape, "bias", axis)
    params = [p for p in (scale, bias) if p is not None]
    compute = _checks.stats_dtype(x.dtype, mean.dtype, var.dtype, *(p.dtype for p in params))

    def expand(v):
        return _checks.expand_features(v.astype(compute), x.ndim, features)

    multiplier = lax.rsqrt(var.astype(compute) + epsilon)
    if scale is not None:
        multiplier = multiplier * scale.astype(compute)
    y = (x.astype(compute) - expand(mean)) * expand(multiplier)
    if bias is not None:
        y = y + expand(bias)
    return y.astype(x.dtype if dtype is None else dtype)


# ------------------------------------------------------------------- running statistics


def update_running_stats(running: RunningStats, batch: Moments, momentum: float = 0.99) -> RunningStats:
    """`momentum * running + (1 - momentum) * batch`, feature-wise.

    A feature whose batch saw no valid element, or whose batch mean or variance is NaN or
    inf, keeps its previous running mean and variance: one bad batch must not poison the
    statistics used at evaluation (the normalized output still carries the NaN, so the
    loss shows it). The result keeps the dtypes of `running`.
    """
    _checks.check_momentum(momentum)
    ok = (batch.count > 0) & jnp.isfinite(batch.mean) & jnp.isfinite(batch.var)

    def ema(old, new):
        mixed = momentum * old + (1 - momentum) * new.astype(old.dtype)
        return jnp.where(ok, mixed, old).astype(old.dtype)

    return RunningStats(ema(running.mean, batch.mean), ema(running.var, batch.var))


# --------------------------------------------------------------------------- batch norm


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
      `(y, stats)`: `y` has `x`'s shape (dtype `dtype`, default `x.dtype`); `stats` are
      the batch `Moments`, whose mean and var are differentiable (count is not).
    """
    x = _checks.check_floating(x)
    _checks.check_epsilon(epsilon)
    features = _checks.feature_axes(x.ndim, axis)
    fshape = _checks.feature_shape(x.shape, features)
    scale = _checks.check_feature_array(scale, fshape, "scale", axis)
    bias = _checks.check_feature_array(bias, fshape, "bias", axis)
    act = _activations.check(activation, negative_slope, save_output_only)
    names = _checks.normalize_axis_name(axis_name)
    groups = None
    if names is not None:
        groups = _checks.check_axis_index_groups(axis_index_groups, names, _checks.bound_axis_size(names))
    elif axis_index_groups is not None:
        _checks.check_axis_index_groups(axis_index_groups, None, 0)
    valid = _checks.broadcast_mask(mask, x.shape, features)

    from jbn import _vjp  # the fused path builds on `moments` and `normalize` above

    if fused and _vjp.can_fuse(epsilon, names):
        return _vjp.fused_batch_norm(
            x, scale, bias, features=features, epsilon=epsilon, valid=valid, names=names, groups=groups,
            dtype=dtype, activation=act, negative_slope=negative_slope, save_output_only=save_output_only,
        )
    if save_output_only:
        raise ValueError(
            "`save_output_only=True` needs the fused training path, which is off here: set fused=True, pass a "
            "Python float `epsilon`, and give `axis_name` names that are all checked (shard_map with "
            "check_vma=True) or all unchecked (pmap, vmap)."
        )
    # The autodiff path: forward-mode differentiable (jax.jvp), at the cost of more saved memory.
    stats = moments(x, axis=features, mask=valid, axis_name=names, axis_index_groups=groups)
    y = _activate(x, stats.mean, stats.var, scale, bias, features, epsilon, dtype, act, negative_slope)
    return y, stats


def _activate(x, mean, var, scale, bias, features, epsilon, dtype, activation, negative_slope):
    """`normalize`, then the activation (in the compute dtype, before the final cast)."""
    if activation == "identity":
        return normalize(x, mean, var, scale, bias, axis=features, epsilon=epsilon, dtype=dtype)
    params = [p.dtype for p in (scale, bias) if p is not None]
    compute = _checks.stats_dtype(x.dtype, jnp.result_type(mean), jnp.result_type(var), *params)
    z = normalize(x, mean, var, scale, bias, axis=features, epsilon=epsilon, dtype=compute)
    return _activations.apply(z, activation, negative_slope).astype(x.dtype if dtype is None else dtype)


def batch_norm(
    x: Array,
    scale: Array | None,
    bias: Array | None,
    running: RunningStats,
    *,
    training: bool,
    axis: Axes = -1,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    mask: Array | None = None,
    axis_name: AxisName = None,
    axis_index_groups: Any = None,
    dtype: Any = None,
    activation: str | None = None,
    negative_slope: float = 0.01,
    save_output_only: bool = False,
    fused: bool = True,
) -> tuple[Array, RunningStats]:
    """Batch normalization of `x` (optionally followed by an activation) and the next
    running statistics.

    In training, `x` is normalized with its own batch statistics (global over `axis_name`,
    restricted to `mask`) and the running statistics move towards them. In evaluation,
    `x` is normalized with `running` and `running` comes back unchanged.

    Training uses a fused custom VJP (`jbn._vjp`): the backward pass keeps only `x` (or
    only `y`, see `save_output_only`) and per-feature statistics, computes two
    per-feature reductions and one elementwise pass, and sends the reductions in one psum
    under `axis_name`. It supports `jax.grad`/`jax.vjp`, `jit`, `vmap`, `pmap`,
    `shard_map` and grad-of-grad; plain forward mode (`jax.jvp`/`jax.jacfwd` through a
    training call) needs `fused=False`.

    Args:
      x: floating input of any rank.
      scale, bias: feature-shaped affine parameters, or None.
      running: `RunningStats` with feature-shaped mean and var.
      training: use batch statistics (True) or the running ones (False). Static.
      axis, mask, axis_name, axis_index_groups: as in `moments`.
      momentum: in [0, 1]; `new = momentum * old + (1 - momentum) * batch`.
      epsilon: > 0, added to the variance.
      dtype: output dtype; default `x.dtype`.
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
      fused: use the fused custom VJP in training (default). False differentiates the
        plain jnp computation instead (more saved memory, but forward-mode works).

    Returns:
      `(y, new_running)`: `y` has `x`'s shape; `new_running` is a `RunningStats`.
    """
    x = _checks.check_floating(x)
    _checks.check_momentum(momentum)
    _checks.check_epsilon(epsilon)
    features = _checks.feature_axes(x.ndim, axis)
    fshape = _checks.feature_shape(x.shape, features)
    running = RunningStats(
        _checks.check_feature_array(running.mean, fshape, "running.mean", axis),
        _checks.check_feature_array(running.var, fshape, "running.var", axis),
    )
    act = _activations.check(activation, negative_slope, save_output_only and training)
    if not training:
        y = _activate(x, running.mean, running.var, scale, bias, features, epsilon, dtype, act, negative_slope)
        return y, running

    per_participant = _checks.element_count(x.shape, _checks.reduction_axes(x.ndim, features))
    names = _checks.normalize_axis_name(axis_name)
    participants = 1 if names is None else _checks.bound_axis_size(names)
    if per_participant * participants <= 1:
        raise ValueError(
            f"`x` of shape {x.shape} gives one value per feature along axis={axis!r}, so its batch variance is "
            "undefined: train with more than one example, synchronize over devices with `axis_name`, "
            "or normalize with the running statistics (training=False / use_running_average=True)."
        )
    y, stats = normalize_with_batch_stats(
        x, scale, bias, axis=axis, epsilon=epsilon, mask=mask, axis_name=axis_name,
        axis_index_groups=axis_index_groups, dtype=dtype, activation=activation, negative_slope=negative_slope,
        save_output_only=save_output_only, fused=fused,
    )
    return y, update_running_stats(running, stats, momentum)
