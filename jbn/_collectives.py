"""The collectives of the pure layer: a sum and an all-gather over bound axis names,
optionally within `axis_index_groups`, each ONE `psum` under pmap, shard_map and vmap."""

from __future__ import annotations

from collections.abc import Hashable

import jax
import jax.numpy as jnp
from jax import lax

from jbn import _axes

Array = jax.Array
Names = tuple[Hashable, ...]
Groups = tuple[tuple[int, ...], ...] | None


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
