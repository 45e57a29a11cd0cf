"""Statistics under plain `jit` of an input whose type says it is split over mesh axes
along reduced axes (Explicit axes, `jax.make_mesh`'s default): each shard reduces its own
rows (no communication), then ONE all-gather of the per-shard (count, var, mean), merged
with Chan's formula. Left to XLA, the same statistics cost two or three collectives."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp

from jbn import _accelerator_moments, _axes, _merge
from jbn._axes import Layout
from jbn._state import Moments

Array = jax.Array


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
    grouped = Layout(layout.axis, kept, _axes.reduction_axes(len(shape), kept), tuple(shape), valid)
    own = _accelerator_moments.local_moments(xg, grouped, dtype)  # the formulation of the target platform
    local = _merge.stack_participant(own)
    # Shard axes first (in kept order they sit among the feature axes), flattened.
    positions = [kept.index(g) + 1 for g in group_axes]
    local = jnp.moveaxis(local, positions, list(range(1, len(positions) + 1)))
    local = local.reshape((local.shape[0], -1) + layout.fshape)
    gathered = jax.sharding.reshard(local, named(()))
    return _merge.chan_merge(_merge.unstack_participants(gathered, 0, jnp.iscomplexobj(own.base)))
