"""The pure batch-norm layer: functions from arrays to arrays, jax and jax.lax only.

Shapes: `x` has any rank; `axis` names its feature axes (int or tuple, negative allowed)
and every other axis is reduced. "Feature shape" below means the sizes of `x` along the
feature axes, in increasing axis order: (C,) for NHWC with axis=-1 or NCHW with axis=1.
"""
from __future__ import annotations

import functools
import itertools
import math
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
    """The state kept between steps.

    Attributes:
      mean: running mean, feature shape.
      var: running variance, feature shape (biased, unless the update is asked to track
        the unbiased variance as PyTorch does: `unbiased_running_var=True`).
      count: number of batches averaged into each feature so far, int32, feature shape;
        or None (the default) when the update rule does not need it. Only the cumulative
        average (`momentum=None`) and the debiased EMA (`debias=True`) need it; start it at
        zeros. A trailing field with a default, so `RunningStats(mean, var)` still works.
    """

    mean: Array
    var: Array
    count: Array | None = None


# ----------------------------------------------------------------------------- moments


def _first_valid(xf: Array, valid: Array | None, reduce: tuple[int, ...]) -> Array:
    """One element per feature to subtract before summing: any sample close to the data
    keeps the one-pass variance accurate when |mean| >> std. It is the first element,
    or the first valid one under a mask. Shape: `xf` with the reduced axes removed."""
    if _checks.sharded_in_type(xf) and (valid is not None or _checks.split_axes(xf, reduce)):
        return lax.stop_gradient(_first_valid_by_reduction(xf, valid, reduce))
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


def _first_valid_by_reduction(xf: Array, valid: Array | None, reduce: tuple[int, ...]) -> Array:
    """`_first_valid` for an array whose type carries its sharding (a mesh with Explicit
    axes, the default of `jax.make_mesh`): indexing into a sharded axis is a
    ShardingTypeError there, so the element is picked by a min and a sum over the reduced
    axes instead (one more read of `xf`). Same element, same result."""
    position = jnp.zeros((), jnp.int32)  # row-major position over the reduced axes (< 2**31 elements)
    stride = 1
    for a in reversed(reduce):
        position = position + lax.broadcasted_iota(jnp.int32, xf.shape, a) * stride
        stride *= xf.shape[a]
    if valid is None:
        first = 0
    else:
        last = jnp.iinfo(jnp.int32).max  # nothing valid: no element is picked, the count is 0
        first = jnp.min(jnp.where(valid, position, last), axis=reduce, keepdims=True)
    return jnp.sum(jnp.where(position == first, xf, 0), axis=reduce)


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


def _gather_by_psum(v: Array, axis_name: tuple, groups) -> Array:
    """All-gather as one psum of per-participant slots: its result is replicated, so it
    leaves shard_map as out_specs=P() with checks on, and works under pmap and vmap.

    With `groups`, every participant still receives every slot and keeps those of its own
    group: `lax.psum(..., axis_index_groups=)` exists only under pmap (shard_map with
    check_vma and vmap raise NotImplementedError in jax 0.10), and this way the grouped
    statistics cost the same single collective under every transform.
    Returns shape (participants in the group, *v.shape)."""
    name = axis_name if len(axis_name) > 1 else axis_name[0]
    index = lax.axis_index(name)
    size = _checks.bound_axis_size(axis_name)
    slots = jnp.zeros((size,) + v.shape, v.dtype)
    slots = lax.dynamic_update_index_in_dim(slots, v, index, axis=0)
    gathered = lax.psum(slots, name)
    if groups is None:
        return gathered
    group_of = [0] * size
    for g, members in enumerate(groups):
        for i in members:
            group_of[i] = g
    own = jnp.asarray(groups)[jnp.asarray(group_of)[index]]
    return gathered[own]


def _psum_in_groups(v: Array, axis_name: tuple, groups) -> Array:
    """`lax.psum(v, axis_name, axis_index_groups=groups)` as one collective under pmap,
    shard_map (checks on) and vmap alike; the last two reject `axis_index_groups`."""
    if groups is None:
        return lax.psum(v, axis_name if len(axis_name) > 1 else axis_name[0])
    return jnp.sum(_gather_by_psum(v, axis_name, groups), axis=0)


def _chan_merge(count: Array, shift: Array, delta: Array, m2: Array) -> Moments:
    """Merge per-participant statistics stacked on axis 0 (Chan et al. 1979).

    Each participant's mean is `shift + delta`, kept apart so that the merge works on
    small differences: |mean| >> std loses nothing to rounding a mean near 1e4. The
    differences are taken relative to the shift of the first participant that holds
    data (a participant without data has shift 0, far from a mean near 1e4).
    """
    total = jnp.sum(count, axis=0)
    safe = jnp.maximum(total, 1)
    reference = jnp.take_along_axis(shift, jnp.argmax(count > 0, axis=0)[None], axis=0)[0]
    offset = (shift - reference) + delta  # each mean relative to the reference shift
    merged = jnp.sum(count * offset, axis=0) / safe
    m2 = jnp.sum(m2, axis=0) + jnp.sum(count * jnp.square(offset - merged), axis=0)
    mean = jnp.where(total > 0, reference + merged, 0)
    return Moments(mean, jnp.where(total > 0, m2 / safe, 0), total)


def _participant_stats(count: Array, s1: Array, s2: Array, shift: Array, fshape) -> Array:
    """One participant's (count, shift, mean - shift, M2) from its shifted sums, stacked on
    axis 0, as `_chan_merge` takes them. A participant without valid elements contributes
    nothing, whatever its padding holds."""
    count = jnp.broadcast_to(count, fshape)
    delta = s1 / jnp.maximum(count, 1)
    m2 = jnp.maximum(s2 - s1 * delta, 0)
    return jnp.stack([count, jnp.where(count > 0, shift, 0), delta, jnp.where(count > 0, m2, 0)])


def _split_layout(shape, spec, shards: dict[int, int]) -> tuple[list[int], list]:
    """Shape and PartitionSpec entries of an array of x's rank after each split axis a
    becomes (shards[a], rows per shard), the shard axis keeping a's mesh axes. A size-1
    (broadcast) axis stays unsplit, as (1, 1) where x is split."""
    new_shape, new_spec = [], []
    for a, size in enumerate(shape):
        entry = spec[a] if size > 1 else None
        if a in shards:
            new_shape += [shards[a], size // shards[a]] if size > 1 else [1, 1]
            new_spec += [entry, None]
        else:
            new_shape.append(size)
            new_spec.append(entry)
    return new_shape, new_spec


def _moments_by_shard(x: Array, valid: Array | None, features, reduce, dtype) -> Moments | None:
    """`moments` under plain jit of an input whose type says it is split over mesh axes
    along reduced axes (Explicit axes, `jax.make_mesh`'s default): each shard's statistics
    around its own first valid element (no communication), then ONE all-gather of the
    per-shard (count, shift, mean - shift, M2), merged with Chan's formula. Left to XLA,
    the shift of the first shard would be broadcast (one collective) before the sums
    (another). None when no reduced axis is split, or a split does not divide evenly."""
    sharding = jax.typeof(x).sharding
    split = _checks.split_axes(x, reduce)
    if not split:
        return None
    shards = {a: _checks.mesh_axes_size(sharding.mesh, sharding.spec[a]) for a in split}
    if any(x.shape[a] % n for a, n in shards.items()):
        return None
    # Each split axis a becomes (shards, rows per shard): the shard axis is kept like a
    # feature axis, the rows are reduced. Masks are split the same way where they vary.
    mesh = sharding.mesh
    named = lambda entries: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*entries))  # noqa: E731
    shape, spec = _split_layout(x.shape, sharding.spec, shards)
    position = list(itertools.accumulate((2 if a in shards else 1 for a in range(x.ndim)), initial=0))
    group_axes = [position[a] for a in split]
    kept = tuple(sorted(group_axes + [position[a] for a in features]))
    reduce_g = _checks.reduction_axes(len(shape), kept)
    xg = x.reshape(shape, out_sharding=named(spec))
    valid_g = None
    if valid is not None:
        like_x = [sharding.spec[a] if size > 1 else None for a, size in enumerate(valid.shape)]
        vshape, vspec = _split_layout(valid.shape, sharding.spec, shards)
        valid_g = jax.sharding.reshard(valid, named(like_x)).reshape(vshape, out_sharding=named(vspec))
    fshape_g = _checks.feature_shape(shape, kept)
    shift = jnp.broadcast_to(_first_valid(xg.astype(dtype), valid_g, reduce_g), fshape_g)
    local = _participant_stats(*_local_sums(xg, valid_g, shift, reduce_g, kept, dtype), shift, fshape_g)
    # Shard axes first (in kept order they sit among the feature axes), flattened.
    positions = [kept.index(g) + 1 for g in group_axes]
    local = jnp.moveaxis(local, positions, list(range(1, len(positions) + 1)))
    local = local.reshape((4, -1) + _checks.feature_shape(x.shape, features))
    gathered = jax.sharding.reshard(local, named(()))
    return _chan_merge(*(gathered[i] for i in range(4)))


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
      axis_index_groups: pmap-style groups of indices along `axis_name`, e.g.
        [[0, 1, 2, 3], [4, 5, 6, 7]]; statistics are global within each group. Works under
        pmap, shard_map and vmap (under shard_map a 2-D mesh reduced over its inner axis
        moves less data).
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
            count = jnp.broadcast_to(count, fshape)
            count, s1, s2 = _psum_in_groups(jnp.stack([count, s1, s2]), names, groups)
        return _from_sums(count, s1, s2, shift)

    if names is None and _checks.sharded_in_type(x):
        by_shard = _moments_by_shard(x, valid, features, reduce, dtype)
        if by_shard is not None:
            return by_shard
    local_shift = _first_valid(x.astype(dtype), valid, reduce)
    if valid is not None and local_shift.shape != fshape:
        local_shift = jnp.broadcast_to(local_shift, fshape)
    count, s1, s2 = _local_sums(x, valid, local_shift, reduce, features, dtype)
    if names is None:
        return _from_sums(count, s1, s2, local_shift)
    gathered = _gather_by_psum(_participant_stats(count, s1, s2, local_shift, fshape), names, groups)
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
    epsilon = _checks.check_epsilon(epsilon)
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


def needs_batch_count(momentum: float | None, debias: bool) -> bool:
    """Whether the running update with these options keeps `RunningStats.count`."""
    return momentum is None or bool(debias)


def unbiased_moments(batch: Moments) -> Moments:
    """The batch variance times `count / (count - 1)` (Bessel's correction), as PyTorch
    tracks in `running_var`. A feature with a count of 1 or less gets a NaN variance,
    so that `update_running_stats` leaves it unchanged."""
    count = batch.count.astype(batch.var.dtype)
    var = jnp.where(count > 1, batch.var * count / jnp.maximum(count - 1, 1), jnp.nan)
    return Moments(batch.mean, var, batch.count)


def update_running_stats(
    running: RunningStats,
    batch: Moments,
    momentum: float | None = 0.99,
    *,
    debias: bool = False,
    unbiased_running_var: bool = False,
) -> RunningStats:
    """Move the running statistics towards the batch statistics, feature-wise.

    With a float `momentum` and `debias=False` (the default, Flax's and Keras' rule):
    `momentum * running + (1 - momentum) * batch`.

    With `momentum=None`, the cumulative average of every batch seen so far, each batch
    weighted equally (PyTorch's `momentum=None`): after t batches the running value is
    `(b_1 + ... + b_t) / t`, computed as `((t - 1) * running + batch) / t`.

    With `debias=True`, the bias-corrected EMA (as optax's Adam corrects its moments):
    the value stored is `ema_t / (1 - momentum**t)` where `ema` starts from zero, so the
    initial `mean=0, var=1` never pull the estimate and the first batch replaces them.
    It is kept in already-corrected form, `new = a_t * running + (1 - a_t) * batch` with
    `a_t = momentum * (1 - momentum**(t - 1)) / (1 - momentum**t)`, so `mean`/`var` are
    always usable as they are (by Flax too) and no correction happens at evaluation.

    Both need `running.count` (int32, feature shape, start at zeros). Whenever
    `running.count` is given it counts the batches that updated each feature and comes
    back incremented (like PyTorch's `num_batches_tracked`).

    A feature whose batch saw no valid element, or whose batch mean or variance is NaN or
    inf, keeps its previous running mean, variance and count: one bad batch must not
    poison the statistics used at evaluation (the normalized output still carries the
    NaN, so the loss shows it). The result keeps the dtypes of `running`.

    Args:
      running: the current `RunningStats`.
      batch: the batch `Moments` (count after mask and across devices).
      momentum: in [0, 1], or None for the cumulative average.
      debias: bias-correct the EMA (ignored with `momentum=None`, which is unbiased).
      unbiased_running_var: track the unbiased batch variance `var * n / (n - 1)`, as
        PyTorch does in `running_var` (n = elements per feature in the batch); a feature
        with n <= 1 is left unchanged. Normalization in training still uses the biased one.
    """
    momentum = _checks.check_momentum(momentum)
    counted = needs_batch_count(momentum, debias)
    count = getattr(running, "count", None)
    if counted and count is None:
        raise ValueError(
            f"`momentum`={momentum!r} with `debias`={debias!r} keeps a count of batches: pass "
            "RunningStats(mean, var, count=jnp.zeros(mean.shape, jnp.int32)) (the modules create "
            "batch_stats/count for you)."
        )
    if unbiased_running_var:
        batch = unbiased_moments(batch)
    ok = (batch.count > 0) & jnp.isfinite(batch.mean) & jnp.isfinite(batch.var)

    if count is not None:  # counts batches whenever it is kept, like PyTorch's num_batches_tracked
        ok = jnp.broadcast_to(ok, count.shape)
        count = count + ok.astype(count.dtype)
    keep = momentum
    if counted:
        keep = _counted_momentum(momentum, jnp.maximum(count, 1).astype(_checks.stats_dtype(running.mean.dtype)))

    def mix(old, new):
        mixed = keep * old + (1 - keep) * new.astype(old.dtype)
        return jnp.where(ok, mixed, old).astype(old.dtype)

    return RunningStats(mix(running.mean, batch.mean), mix(running.var, batch.var), count)


def _counted_momentum(momentum: float | None, t: Array) -> Array:
    """The weight of the old value at the t-th update (t >= 1): `(t - 1) / t` for the
    cumulative average; `m (1 - m^(t-1)) / (1 - m^t)` for the debiased EMA, which is 0 at
    t = 1 and tends to m."""
    if momentum is None:
        return (t - 1) / t
    if momentum >= 1:
        return jnp.ones_like(t)  # momentum 1 never moves, debiased or not
    if momentum <= 0:
        return jnp.zeros_like(t)
    log_m = math.log(momentum)
    # 1 - m^k as -expm1(k log m): no cancellation when m is close to 1.
    return momentum * -jnp.expm1((t - 1) * log_m) / -jnp.expm1(t * log_m)


def merge_moments(a: Moments, b: Moments) -> Moments:
    """The exact statistics of the union of two sets of elements (Chan et al. 1979).

    `mean = (n_a mean_a + n_b mean_b) / n`, `var = (n_a var_a + n_b var_b +
    (mean_b - mean_a)^2 n_a n_b / n) / n`: the last term is the between-set variance of the
    means, which a plain average of the variances misses. A side with count 0 contributes
    nothing. Counts broadcast to the mean's shape; the result has float counts of the
    wider dtype of the two.
    """
    dtype = _checks.stats_dtype(a.mean.dtype, b.mean.dtype)
    na = jnp.broadcast_to(jnp.asarray(a.count, dtype), a.mean.shape)
    nb = jnp.broadcast_to(jnp.asarray(b.count, dtype), b.mean.shape)
    n = na + nb
    safe = jnp.maximum(n, 1)
    delta = b.mean.astype(dtype) - a.mean.astype(dtype)
    fb = nb / safe
    mean = a.mean.astype(dtype) + delta * fb
    m2 = na * a.var.astype(dtype) + nb * b.var.astype(dtype) + delta * delta * na * fb
    mean = jnp.where(nb > 0, jnp.where(na > 0, mean, b.mean.astype(dtype)), a.mean.astype(dtype))
    var = jnp.where(n > 0, m2 / safe, 0)
    var = jnp.where(nb > 0, jnp.where(na > 0, var, b.var.astype(dtype)), a.var.astype(dtype))
    return Moments(mean, jnp.maximum(var, 0), n)


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
    epsilon = _checks.check_epsilon(epsilon)
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
      running: `RunningStats` with feature-shaped mean and var (and count, when the
        update rule needs one: `momentum=None` or `debias=True`).
      training: use batch statistics (True) or the running ones (False). Static.
      axis, mask, axis_name, axis_index_groups: as in `moments`.
      momentum: in [0, 1]; `new = momentum * old + (1 - momentum) * batch`. None: the
        cumulative average of all batches seen (see `update_running_stats`).
      epsilon: > 0, added to the variance.
      dtype: output dtype; default `x.dtype`.
      virtual_batch_size: ghost batch norm (Hoffer et al. 2017). The leading axis of `x`
        (the batch axis, which must not be a feature axis) is split into consecutive
        sub-batches of this size, each normalized with its own statistics; the batch size
        must be a multiple of it. With `axis_name`, sub-batch g of every participant forms
        one virtual batch. The running statistics are updated once per call, from the mean
        of the sub-batch means and the mean of the sub-batch variances (sub-batches without
        a valid element left out), as in Hoffer et al.'s implementation. Evaluation is
        unchanged. None: one batch.
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
      fused: use the fused custom VJP in training (default). False differentiates the
        plain jnp computation instead (more saved memory, but forward-mode works).

    Returns:
      `(y, new_running)`: `y` has `x`'s shape; `new_running` is a `RunningStats`.
    """
    x = _checks.check_floating(x)
    momentum = _checks.check_momentum(momentum)
    epsilon = _checks.check_epsilon(epsilon)
    features = _checks.feature_axes(x.ndim, axis)
    fshape = _checks.feature_shape(x.shape, features)
    running = check_running_stats(running, fshape, axis)
    act = _activations.check(activation, negative_slope, save_output_only and training)
    if not training:
        y = _activate(x, running.mean, running.var, scale, bias, features, epsilon, dtype, act, negative_slope)
        return y, running

    train = functools.partial(
        normalize_with_batch_stats, epsilon=epsilon, axis_name=axis_name, axis_index_groups=axis_index_groups,
        dtype=dtype, activation=activation, negative_slope=negative_slope, save_output_only=save_output_only,
        fused=fused,
    )
    if virtual_batch_size is None:
        _checks.check_values_per_feature(x.shape, features, axis, axis_name, axis_index_groups=axis_index_groups)
        y, stats = train(x, scale, bias, axis=axis, mask=mask)
    else:
        y, stats = _ghost(train, x, scale, bias, virtual_batch_size, axis=axis, mask=mask,
                          axis_name=axis_name, axis_index_groups=axis_index_groups, unbiased=unbiased_running_var)
        unbiased_running_var = False  # already applied per sub-batch
    new = update_running_stats(running, stats, momentum, debias=debias, unbiased_running_var=unbiased_running_var)
    return y, new


def check_running_stats(running: RunningStats, fshape: tuple[int, ...], axis: Axes) -> RunningStats:
    """`running` with its arrays checked against the feature shape (count may be None)."""
    count = getattr(running, "count", None)
    return RunningStats(
        _checks.check_feature_array(running.mean, fshape, "running.mean", axis),
        _checks.check_feature_array(running.var, fshape, "running.var", axis),
        _checks.check_feature_array(count, fshape, "running.count", axis),
    )


def _ghost(train, x, scale, bias, size, *, axis, mask, axis_name, axis_index_groups, unbiased) -> tuple[Array, Moments]:
    """Ghost batch norm as a reshape: (N, ...) -> (N // size, size, ...) with the new group
    axis 0 treated as one more feature axis, then the ordinary training path, so it
    composes with masks, `axis_name` and whatever the training path does. Returns the
    output and the sub-batch statistics combined for the running update."""
    features = _checks.feature_axes(x.ndim, axis)
    groups = _checks.check_virtual_batch_size(size, x.shape, features)
    grouped_shape = (groups, size) + x.shape[1:]
    grouped_features = (0,) + tuple(a + 1 for a in features)
    _checks.check_values_per_feature(grouped_shape, grouped_features, axis, axis_name, virtual_batch_size=size,
                                     axis_index_groups=axis_index_groups)
    valid = _checks.broadcast_mask(mask, x.shape, features)  # x's rank; axis 0 is N or 1
    gshape = (groups,) + _checks.feature_shape(x.shape, features)
    expand = lambda p: None if p is None else jnp.broadcast_to(p, gshape)  # noqa: E731  (gradients sum back)

    def grouped(x, scale, bias, valid):
        if valid is not None:
            lead = (groups, size) if valid.shape[0] == x.shape[0] else (1, 1)
            valid = valid.reshape(lead + valid.shape[1:])
        y, stats = train(x.reshape(grouped_shape), expand(scale), expand(bias), axis=grouped_features, mask=valid)
        return y.reshape(x.shape), stats

    if _checks.sharded_in_type(x):
        # Sub-batches cut across the shards in ways that one mesh axis cannot name (a
        # ShardingTypeError for the reshape): XLA lays this part out (Auto axes), and y
        # comes back split as x was.
        sharding = jax.typeof(x).sharding
        replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
        grouped = jax.sharding.auto_axes(grouped, out_sharding=(sharding, Moments(replicated, replicated, replicated)))
    y, stats = grouped(x, scale, bias, valid)
    if unbiased:
        stats = unbiased_moments(stats)
    return y, _combine_sub_batches(stats)


def _combine_sub_batches(stats: Moments) -> Moments:
    """Mean over sub-batches (axis 0) of the sub-batch means and of their variances,
    leaving out sub-batches without a valid element; count = all valid elements."""
    count = jnp.broadcast_to(stats.count, stats.mean.shape)
    used = count > 0
    n = jnp.maximum(jnp.sum(used, axis=0), 1).astype(stats.mean.dtype)
    mean = jnp.sum(jnp.where(used, stats.mean, 0), axis=0) / n
    var = jnp.sum(jnp.where(used, stats.var, 0), axis=0) / n
    return Moments(mean, var, jnp.sum(count, axis=0))
