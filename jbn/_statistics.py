"""The statistics of a batch, however it is split, in one module: one participant's moments come from the formulation of the
backend (`jbn._accelerator_moments`); here they are merged exactly (Chan et al. 1979) across
bound axis names (ONE collective: an all-gather, or a psum of shifted sums), across the shards
of a batch-sharded array under plain jit, or between two sets of elements (`merge_moments`).

Read top-down: the collectives, the merge, the shifted sums, the sharded path, then
`batch_moments` (the core, on a resolved `Layout`) and `moments` (the public entry point).
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jbn import _accelerator_moments, _axes, _validate
from jbn._axes import Axes, AxisName, Layout
from jbn._fusion import separate_uses
from jbn._local_moments import Local, abs_square, valid_count
from jbn._state import Moments

Array = jax.Array
Names = tuple[Hashable, ...]
Groups = tuple[tuple[int, ...], ...] | None


# The collectives: a sum and an all-gather over bound axis names, optionally within
# `axis_index_groups`, each ONE `psum` under pmap, shard_map and vmap.
def gather(v: Array, names: Names, groups: Groups) -> Array:
    """All-gather as one psum of per-participant slots: its result is replicated, so it
    leaves shard_map as out_specs=P() with checks on, and works under pmap and vmap.

    With `groups`, every participant still receives every slot and keeps those of its own
    group: `lax.psum(..., axis_index_groups=)` exists only under pmap (shard_map with
    check_vma and vmap raise NotImplementedError in jax 0.10), and this way the grouped
    statistics cost the same single collective under every transform.
    Returns shape (participants in the group, *v.shape)."""
    name = _axes.axis_name_arg(names)
    index = lax.axis_index(name)
    size = _axes.bound_axis_size(names)
    if groups is None and not any(n in _axes.varying_axes(lax.axis_index(n)) for n in names):
        # Unchecked names (vmap, pmap, shard_map without checks): a plain all-gather,
        # innermost name first so that the order is the slots' (row-major over names).
        # Under vmap it is a broadcast, where the slots below would cost O(N^2).
        gathered = v
        for n in reversed(names):
            gathered = lax.all_gather(gathered, n)
        return gathered.reshape((size,) + v.shape)
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


def psum_in_groups(v: Array, names: Names, groups: Groups) -> Array:
    """`lax.psum(v, names, axis_index_groups=groups)` as one collective under pmap,
    shard_map (checks on) and vmap alike; the last two reject `axis_index_groups`."""
    if groups is None:
        return lax.psum(v, _axes.axis_name_arg(names))
    return jnp.sum(gather(v, names, groups), axis=0)


# The exact merge of participants.


def stack_participant(local: Local) -> Array:
    """(count, var, base, delta) of one participant stacked on axis 0, feature-shaped, as
    `chan_merge` takes them after a gather (complex parts kept apart)."""
    # var's shape AND sharding (a scalar count broadcast on its own is replicated, and jnp.stack
    # of it with split statistics is a ShardingTypeError under an Explicit mesh)
    count = local.count.astype(local.var.dtype) + jnp.zeros_like(local.var)
    parts = [count, local.var]
    for v in (local.base, local.delta):
        parts += [v.real, v.imag] if jnp.iscomplexobj(v) else [v]
    return jnp.stack(parts)


def unstack_participants(stacked: Array, axis: int, complex_mean: bool) -> Local:
    """`stack_participant`'s layout along `axis` of `stacked`, back as a `Local`."""
    parts = [jnp.take(stacked, i, axis=axis) for i in range(stacked.shape[axis])]
    if complex_mean:
        return Local(parts[0], parts[1], lax.complex(parts[2], parts[3]), lax.complex(parts[4], parts[5]))
    return Local(*parts)


def chan_merge(local: Local) -> Moments:
    """Merge participants' statistics stacked on axis 0 into those of all their elements:
    `mean = sum(w_i mean_i)`, `var = sum(w_i (var_i + |mean_i - mean|^2))` with weights
    `w_i = n_i / n`. The means are merged as offsets from the base of the first
    participant that holds data (close values subtract exactly, and each delta is small
    and precise), so that a mean near 1e4 loses nothing to rounding. A participant
    without elements contributes nothing (its terms are selected away, so a huge mean
    elsewhere cannot make 0 * inf)."""
    count, var, base, delta = local
    total = jnp.sum(count, axis=0)
    weight = count / jnp.maximum(total, 1)[None]
    has = count > 0
    reference = jnp.take_along_axis(base, jnp.argmax(has, axis=0)[None], axis=0)[0]
    offset = jnp.where(has, (base - reference[None]) + delta, 0)
    merged = jnp.sum(weight.astype(offset.dtype) * offset, axis=0)  # a complex mean's offsets: weight cast explicitly
    spread = jnp.where(has, weight * (var + abs_square(offset - merged[None])), 0)
    has_any = total > 0
    return Moments(jnp.where(has_any, reference + merged, 0), jnp.where(has_any, jnp.sum(spread, axis=0), 0), total)


def shifted_sums(x: Array, layout: Layout, shift: Array, dtype) -> tuple[Array, Array, Array]:
    """count, sum(x - shift), sum(|x - shift|^2) in one pass: what a psum can add up when
    every participant shares the same `shift`."""
    (xa, sa), (xb, sb) = separate_uses(2, x, shift)
    da = xa.astype(dtype) - _axes.expand_features(sa, layout.ndim, layout.features)
    db = xb.astype(dtype) - _axes.expand_features(sb, layout.ndim, layout.features)
    if layout.valid is not None:
        da, db = jnp.where(layout.valid, da, 0), jnp.where(layout.valid, db, 0)
    return valid_count(layout, dtype), jnp.sum(da, axis=layout.reduce), jnp.sum(abs_square(db), axis=layout.reduce)


def from_shifted_sums(count: Array, s1: Array, s2: Array, shift: Array) -> Moments:
    safe = jnp.maximum(count, 1)  # keeps 0/0 out of both branches (and their gradients)
    delta = s1 / safe
    mean = jnp.where(count > 0, shift + delta, 0)
    var = jnp.where(count > 0, jnp.maximum(s2 / safe - abs_square(delta), 0), 0)
    return Moments(mean, var, count)


def merge_moments(a: Moments, b: Moments) -> Moments:
    """The exact statistics of the union of two sets of elements (Chan et al. 1979).

    `mean = (n_a mean_a + n_b mean_b) / n`, `var = (n_a var_a + n_b var_b +
    |mean_b - mean_a|^2 n_a n_b / n) / n`: the last term is the between-set variance of
    the means, which a plain average of the variances misses. A side with count 0
    contributes nothing. Counts broadcast to the mean's shape; the result has float
    counts of the wider dtype of the two.
    """
    dtype = _axes.stats_dtype(a.mean.dtype, b.mean.dtype)
    rdtype = _axes.real_dtype(dtype)
    shape = jnp.broadcast_shapes(jnp.shape(a.mean), jnp.shape(b.mean))

    def stacked(m: Moments) -> Moments:
        return Moments(
            jnp.broadcast_to(jnp.asarray(m.mean, dtype), shape),
            jnp.broadcast_to(jnp.asarray(m.var, rdtype), shape),
            jnp.broadcast_to(jnp.asarray(m.count, rdtype), shape),
        )

    a, b = stacked(a), stacked(b)
    merged = chan_merge(
        Local(
            *(
                jnp.stack([u, v])
                for u, v in zip(
                    (a.count, a.var, a.mean, jnp.zeros_like(a.mean)), (b.count, b.var, b.mean, jnp.zeros_like(b.mean))
                )
            )
        )
    )
    empty = merged.count == 0  # nothing on either side: `a` as it was
    return Moments(jnp.where(empty, a.mean, merged.mean), jnp.where(empty, a.var, merged.var), merged.count)


# Under plain `jit`, an input whose type says it is split over mesh axes along reduced axes
# (Explicit axes, `jax.make_mesh`'s default): each shard reduces its own rows (no
# communication), then ONE all-gather of the per-shard (count, var, mean), merged with Chan's
# formula. Left to XLA, the same statistics cost two or three collectives.


def split_layout(shape, spec, shards: dict[int, int]) -> tuple[list, list]:
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


def moments_by_shard(x: Array, layout: Layout, dtype) -> Moments | None:
    """`moments` of a batch-sharded `x` under plain jit; None when no reduced axis is
    split, or a split does not divide evenly (then XLA lays the reductions out)."""
    sharding = jax.typeof(x).sharding
    split = _axes.split_axes(x, layout.reduce)
    if not split:
        return None
    mesh = sharding.mesh
    shards = {a: _axes.mesh_axes_size(mesh, sharding.spec[a]) for a in split}
    if any(x.shape[a] % n for a, n in shards.items()):
        return None

    def named(entries):
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*entries))

    # Each split axis a becomes (shards, rows per shard): the shard axis is kept like a
    # feature axis, the rows are reduced. Masks are split the same way where they vary.
    shape, spec = split_layout(x.shape, sharding.spec, shards)
    position = list(itertools.accumulate((2 if a in shards else 1 for a in range(x.ndim)), initial=0))
    group_axes = [position[a] for a in split]
    kept = tuple(sorted(group_axes + [position[a] for a in layout.features]))
    xg = x.reshape(shape, out_sharding=named(spec))
    valid = None
    if layout.valid is not None:
        like_x = [sharding.spec[a] if size > 1 else None for a, size in enumerate(layout.valid.shape)]
        vshape, vspec = split_layout(layout.valid.shape, sharding.spec, shards)
        valid = jax.sharding.reshard(layout.valid, named(like_x)).reshape(vshape, out_sharding=named(vspec))
    grouped = layout.local(kept, shape, valid)
    own = _accelerator_moments.local_moments(xg, grouped, dtype)  # the formulation of the target platform
    local = stack_participant(own)
    # Shard axes first (in kept order they sit among the feature axes), flattened.
    positions = [kept.index(g) + 1 for g in group_axes]
    local = jnp.moveaxis(local, positions, list(range(1, len(positions) + 1)))
    local = local.reshape((local.shape[0], -1) + layout.fshape)
    gathered = jax.sharding.reshard(local, named(()))
    return chan_merge(unstack_participants(gathered, 0, jnp.iscomplexobj(own.base)))


# The core and the public entry point.


def batch_moments(x: Array, layout: Layout, shift: Array | None = None) -> Moments:
    """`moments` on a resolved layout (`x` checked, `shift` checked and feature-shaped)."""
    dtype = _axes.stats_dtype(x.dtype)
    if shift is not None:
        dtype = _axes.stats_dtype(x.dtype, shift.dtype)  # moments() widened the shift to this
        count, s1, s2 = shifted_sums(x, layout, shift, dtype)
        if layout.names is not None:
            count = jnp.broadcast_to(count, layout.fshape)
            parts = [count, s2] + ([s1.real, s1.imag] if jnp.iscomplexobj(s1) else [s1])
            summed = psum_in_groups(jnp.stack(parts), layout.names, layout.groups)
            count, s2 = summed[0], summed[1]
            s1 = lax.complex(summed[2], summed[3]) if jnp.iscomplexobj(s1) else summed[2]
        return from_shifted_sums(count, s1, s2, shift)
    if layout.names is None and _axes.sharded_in_type(x):
        by_shard = moments_by_shard(x, layout, dtype)
        if by_shard is not None:
            return by_shard
    local = _accelerator_moments.local_moments(x, layout, dtype)  # the formulation of the target platform
    if layout.names is None:
        return local.moments()
    gathered = gather(stack_participant(local), layout.names, layout.groups)
    return chan_merge(unstack_participants(gathered, 1, jnp.iscomplexobj(local.base)))


def moments(
    x: Array,
    *,
    axis: Axes = -1,
    mask: Array | None = None,
    axis_name: AxisName = None,
    axis_index_groups: Any = None,
    shift: Array | None = None,
) -> Moments:
    """Per-feature mean and biased variance of `x`, in float32 or wider.

    Args:
      x: floating or complex input of any rank (complex: complex mean, real variance
        `mean(|x - mean|^2)`, as flax).
      axis: feature axis or axes; every other axis is reduced.
      mask: True where an element counts. Broadcasts against `x` by NumPy's rules (as
        flax: a `(C,)` mask masks features of `(N, C)`). Where NumPy's rules cannot apply, a
        mask of rank `x.ndim - len(axis)` covers the non-feature axes (`(N, T)` for
        `(N, T, C)`); where both apply and differ, a ValueError asks for the full rank.
      axis_name: name (or tuple of names) bound by pmap, shard_map or vmap; the statistics
        are then those of the global batch, weighted by each participant's valid count,
        from one collective (an all-gather of per-participant (count, mean, var)).
      axis_index_groups: pmap-style groups of indices along `axis_name`, e.g.
        [[0, 1, 2, 3], [4, 5, 6, 7]]; statistics are global within each group. Works under
        pmap, shard_map and vmap.
      shift: optional. Without it (the default, right for nearly everyone) each
        participant computes its mean, then the mean squared deviation from it: exact
        whatever the order of the elements and accurate when |mean| >> std. With a
        feature-shaped `shift`, EQUAL on every participant, the statistics come instead
        from one psum of sums shifted by it (less data than the all-gather when there are
        very many participants); the variance is then accurate only while
        |mean - shift| is small against std: a running mean is a good shift once trained,
        a bad one at initialization (it starts at 0).

    Returns:
      `Moments(mean, var, count)`: feature-shaped mean and var; count broadcastable to them.
    """
    x = _validate.check_input(x)
    layout = _axes.resolve(x, axis, mask, axis_name, axis_index_groups)
    if shift is not None:
        shift = _validate.check_feature_array(shift, layout.fshape, "shift", axis)
        shift = lax.stop_gradient(shift.astype(_axes.stats_dtype(x.dtype, shift.dtype)))  # type: ignore[union-attr]
    return batch_moments(x, layout, shift)
