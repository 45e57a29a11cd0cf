"""One participant's statistics on TPUs: `chan_reduce_moments`, the tpu entry of
`jbn._statistics.FORMULATIONS` (the dispatch and the cpu formulation are in `jbn._statistics`,
the cuda one in `jbn._triton_moments`).

ONE variadic reduction carries (count, mean, variance) per partial result and merges partial
results with Chan's formula. XLA:TPU fuses it into a single read of `x` (the sampled base of
the cpu formulation is a strided read that XLA:TPU lays out badly, and the two sums of
deviations a second full read). The mean is carried as an unevaluated sum `hi + lo` (the
rounding error of each update kept in `lo`, Knuth's TwoSum), so that merging two means near
1e4 standard deviations away from zero keeps their difference exact: the variance is accurate
whatever |mean| / std, and whatever the order. It returns the same `Local` as the cpu
formulation within rounding (tests/test_accelerator_moments.py checks it on CPU against float64).
Under sharded jit (Auto mesh axes) each device's group of rows is reduced in place and the
groups' partial results cross the chips in ONE all-gather (`_grouped_reduce`).
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from jbn._options import Layout, element_count
from jbn._statistics import Local, expand_features, valid_count

Array = jax.Array


def _two_sum(a: Array, b: Array) -> tuple[Array, Array]:
    """Knuth's TwoSum: s = fl(a + b) and its rounding error e, s + e == a + b exactly."""
    s = a + b
    back = s - a
    return s, (a - (s - back)) + (b - back)


def _merger(inv_total: float):
    """Chan et al.'s merge of two partial results: (count, mean as hi + lo, M2 / total as
    hi + lo). Integer-valued counts (exact below 2^24 per feature and partial); M2 scaled by
    1 / (elements per feature), so that it stays below the variance (no overflow)."""

    def merge(a, b):
        ca, ha, la, qa, ra = a
        cb, hb, lb, qb, rb = b
        n = ca + cb
        wb = cb / jnp.where(n > 0, n, 1)
        d = (hb - ha) + (lb - la)  # hb - ha is exact where the means are close (Sterbenz)
        hi, err = _two_sum(ha, d * wb)
        q, q_err = _two_sum(qa, qb + (d * (ca * inv_total)) * (d * wb))
        return n, hi, la + err, q, ra + rb + q_err

    return merge


def _chan_reduce(x: Array, valid: Array | None, reduce: tuple[int, ...], dtype) -> tuple[Array, ...]:
    """(count, mean hi, mean lo, var) over `reduce` in one variadic reduction (per device
    group, then merged, for an unmasked input of a multi-device Auto mesh: see below)."""
    xs = x.astype(dtype)
    if valid is None:
        counts = jnp.ones_like(xs)
    else:
        valid = jnp.broadcast_to(valid, xs.shape)
        counts = valid.astype(dtype)
        xs = jnp.where(valid, xs, 0)  # where, not multiply: padded NaN/inf stay out
    total = element_count(x.shape, reduce)
    zero = jnp.zeros((), dtype)
    groups = _device_groups(x, valid, reduce)
    if groups > 1:
        count, hi, lo, q, r = _grouped_reduce(xs, reduce, dtype, total, groups)
    else:
        operands = (counts, xs, jnp.zeros_like(xs), jnp.zeros_like(xs), jnp.zeros_like(xs))
        count, hi, lo, q, r = lax.reduce(operands, (zero,) * 5, _merger(1 / max(total, 1)), reduce)
    var = (q + r) * (total / jnp.where(count > 0, count, 1))
    return count, hi, lo, var


# Under sharded jit, XLA's SPMD partitioner splits a variadic reduction with a custom merge into
# one per chip, then gathers each of its five results on its own (an all-gather each, or a
# zero-filled buffer, a dynamic-update-slice and an all-reduce each) and relayouts and merges
# the gathered rows in kernels of their own: 15-29 kernels on TPU v5e where flax has 9. The
# mesh of an Auto-sharded array is known when tracing, how XLA splits it is not: so the batch is
# cut into one group per device of the mesh, each group reduced where its rows are, the groups'
# (mean hi, mean lo, M2 hi, lo) laid end to end in one flat vector and exchanged in ONE
# all-gather (a shard_map over the whole mesh; a batch split over fewer devices only re-slices
# the small gathered vector), and the groups merged with Chan's formula as the reduction merges
# its parts. Each group holds total / groups elements per feature: the count needs no exchange.
# Flat, not stacked on a new axis: TPU tiles the second-minor axis in sublanes, so a gathered
# (groups, 4, features) array was sliced apart in a kernel of its own, where slices of the
# flat vector at multiples of the feature size are read by the merge itself. Each device lays
# out its own values inside the shard_map (the reductions stay outside it, where XLA places
# them with the rows, however `x` is split): the all-gather is then one of a 1-D vector, and at
# 256-1024 features nothing is sliced out of it on its own (benchmarks/RESULTS-accelerators.md:
# the forward's excess over flax's bytes 23-39% smaller in every op-level case, one kernel fewer
# in the forward at 512 and 1024 features and in forward+backward at 256-1024).


def _device_groups(x: Array, valid: Array | None, reduce: tuple[int, ...]) -> int:
    """Groups to cut the batch (axis 0) into: the devices of `x`'s mesh, where that is more
    than one, `x` has no mask, axis 0 is reduced and splits evenly; else 1 (one reduction)."""
    mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
    devices = math.prod(getattr(mesh, "axis_sizes", ())) if mesh is not None else 1
    auto = mesh is not None and all(t == jax.sharding.AxisType.Auto for t in getattr(mesh, "axis_types", ()))
    if devices <= 1 or not auto or valid is not None or 0 not in reduce or x.shape[0] % devices:
        return 1
    return devices


def _grouped_reduce(xs: Array, reduce: tuple[int, ...], dtype, total: int, groups: int) -> tuple[Array, ...]:
    """The variadic reduction of `_chan_reduce` (unmasked) per group of rows of axis 0, the
    groups' results exchanged in one all-gather and merged in a tree (see above)."""
    zero = jnp.zeros((), dtype)
    merge = _merger(1 / max(total, 1))
    xg = xs.reshape((groups, xs.shape[0] // groups) + xs.shape[1:])
    operands = (jnp.ones_like(xg), xg, jnp.zeros_like(xg), jnp.zeros_like(xg), jnp.zeros_like(xg))
    _, hi, lo, q, r = lax.reduce(operands, (zero,) * 5, merge, tuple(a + 1 for a in reduce))
    mesh = jax.typeof(xs).sharding.mesh
    axes = tuple(mesh.axis_names)
    spec = jax.sharding.PartitionSpec(axes)
    gather = jax.shard_map(
        lambda *v: lax.all_gather(jnp.concatenate([s.reshape(-1) for s in v]), axes, axis=0, tiled=True),
        mesh=mesh,
        in_specs=(spec,) * 4,
        out_specs=jax.sharding.PartitionSpec(),
        check_vma=False,
    )
    features = hi.shape[1:]
    size = math.prod(features)
    flat = gather(hi, lo, q, r)

    def piece(g: int, i: int) -> Array:  # statistic i of group g, from the flat (groups * 4 * size,) vector
        start = (4 * g + i) * size
        return flat[start : start + size].reshape(features)

    count = jnp.full(features, total // groups, dtype)
    parts = [(count, *(piece(g, i) for i in range(4))) for g in range(groups)]
    while len(parts) > 1:  # a merge tree: log2(groups) levels
        merged = [merge(parts[i], parts[i + 1]) for i in range(0, len(parts) - 1, 2)]
        parts = merged + parts[len(parts) - len(parts) % 2 :]
    return parts[0]


@partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _chan_moments(x: Array, valid: Array | None, reduce: tuple[int, ...], dtype) -> tuple[Array, Array, Array]:
    """(mean hi, mean lo, var): a custom JVP, since XLA's variadic reduce has no derivative in JAX."""
    _, hi, lo, var = _chan_reduce(x, valid, reduce, dtype)
    return hi, lo, var


@_chan_moments.defjvp
def _chan_moments_jvp(reduce, dtype, primals, tangents):
    x, valid = primals
    dx = tangents[0]
    count, hi, lo, var = _chan_reduce(x, valid, reduce, dtype)
    ndim = x.ndim
    features = tuple(a for a in range(ndim) if a not in reduce)
    inv_n = jnp.where(count > 0, 1 / jnp.maximum(count, 1), 0)

    def keep(v):
        return v if valid is None else jnp.where(valid, v, 0)

    def per_feature(v):
        return expand_features(v, ndim, features)

    dx = dx.astype(dtype)
    d_mean = jnp.sum(keep(dx), axis=reduce) * inv_n
    centred = x.astype(dtype) - per_feature(hi) - per_feature(lo)
    d_var = 2 * jnp.sum(keep(centred * dx), axis=reduce) * inv_n
    return (hi, lo, var), (d_mean, jnp.zeros_like(lo), d_var)


def chan_reduce_moments(x: Array, layout: Layout, dtype) -> Local:
    """`Local` statistics from one variadic reduction with Chan's merge (see the module doc)."""
    count = valid_count(layout, dtype)
    hi, lo, var = _chan_moments(x, layout.valid, layout.reduce, dtype)
    has = count > 0
    return Local(count, jnp.where(has, var, 0), jnp.where(has, hi, 0), jnp.where(has, lo, 0))
