"""The statistics of a batch, however it is split (past 400 lines: one concept, from one participant's moments to the merge of all).

Read top-down in the order a call runs: `moments` (the public entry point) and `batch_moments`
(the core, on a checked `Layout`); the dispatch to the formulation of one participant's moments
for the backend the program is lowered for (`FORMULATIONS`: the cpu formulation is here, the
tpu and cuda ones in `jbn._accelerator_moments` and `jbn._triton_moments`, looked up when a
program for their platform is traced); the cpu formulation (the `Local` record a merge takes);
the exact merge of participants (Chan et al. 1979) across bound axis names (ONE collective: an
all-gather, or a psum of shifted sums), across the shards of a batch-sharded array under plain
jit, or between two sets of elements (`merge_moments`); and the helpers that shape the
computation so that XLA fuses it well, with the dtype rules of the statistics.
"""

from __future__ import annotations

import importlib
import itertools
import math
from collections.abc import Callable, Hashable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jbn import _options
from jbn._options import Axes, AxisName, axis_name_arg, bound_axis_size, element_count, promoted
from jbn._state import Moments

if TYPE_CHECKING:
    from jbn._options import Layout

Array = jax.Array
Names = tuple[Hashable, ...]
Groups = tuple[tuple[int, ...], ...] | None


# The dtype rules of the statistics, and where an array is split.


def stats_dtype(*dtypes) -> jnp.dtype:
    """float32 (complex64 for complex inputs), or wider when an input is wider (x64)."""
    return promoted(promoted(*dtypes), jnp.float32)


def real_dtype(dtype) -> jnp.dtype:
    """The real counterpart of a (possibly complex) floating dtype: the variance's dtype."""
    return jnp.finfo(dtype).dtype


def expand_features(v: jax.Array, ndim: int, features: tuple[int, ...]) -> jax.Array:
    """Reshape a feature-shaped array so that it broadcasts against the input."""
    shape = [1] * ndim
    for a, size in zip(features, v.shape):
        shape[a] = size
    return v.reshape(shape)


def varying_axes(v: Any) -> frozenset:
    """The manual axes along which `v`'s value varies (empty outside shard_map, or when
    shard_map does not check them)."""
    aval = jax.typeof(v)
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))


def sharded_in_type(x: jax.Array) -> bool:
    """True when `x`'s type says it is split over a mesh axis (Explicit axes, the default of
    `jax.make_mesh`, under plain jit). Auto-sharded arrays and shard_map/pmap/vmap
    locals have no sharded axis in their type."""
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    return spec is not None and any(s is not None for s in spec)


def split_axes(x: jax.Array, axes: Sequence[int]) -> tuple[int, ...]:
    """Those of `axes` along which `x`'s type says it is split over mesh axes."""
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    if spec is None:
        return ()
    return tuple(a for a in axes if a < len(spec) and spec[a] is not None)


def mesh_axes_size(mesh: Any, entry: Any) -> int:
    """Number of shards of one PartitionSpec entry (a mesh axis name or a tuple of them)."""
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(mesh.shape[n] for n in names)


# The public entry point and the core.


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
    x = _options.check_input(x)
    layout = _options.resolve(x, axis, mask, axis_name, axis_index_groups)
    if shift is not None:
        shift = _options.check_feature_array(shift, layout.fshape, "shift", axis)
        shift = lax.stop_gradient(shift.astype(stats_dtype(x.dtype, shift.dtype)))  # type: ignore[union-attr]
    return batch_moments(x, layout, shift)


def batch_moments(x: Array, layout: Layout, shift: Array | None = None) -> Moments:
    """`moments` on a resolved layout (`x` checked, `shift` checked and feature-shaped)."""
    dtype = stats_dtype(x.dtype)
    if shift is not None:
        dtype = stats_dtype(x.dtype, shift.dtype)  # moments() widened the shift to this
        count, s1, s2 = shifted_sums(x, layout, shift, dtype)
        if layout.names is not None:
            count = jnp.broadcast_to(count, layout.fshape)
            parts = [count, s2] + ([s1.real, s1.imag] if jnp.iscomplexobj(s1) else [s1])
            summed = psum_in_groups(jnp.stack(parts), layout.names, layout.groups)
            count, s2 = summed[0], summed[1]
            s1 = lax.complex(summed[2], summed[3]) if jnp.iscomplexobj(s1) else summed[2]
        return from_shifted_sums(count, s1, s2, shift)
    if layout.names is None and sharded_in_type(x):
        by_shard = moments_by_shard(x, layout, dtype)
        if by_shard is not None:
            return by_shard
    if layout.names is None:
        return platform_batch_moments(x, layout, dtype)  # one participant: its moments are the batch's
    local = platform_moments(x, layout, dtype)  # the formulation of the target platform
    gathered = gather(stack_participant(local), layout.names, layout.groups)
    return chan_merge(unstack_participants(gathered, 1, jnp.iscomplexobj(local.base)))


# The formulation of one participant's moments, per backend: the one dispatch point. Each
# returns the same `Local` within rounding (tests/test_accelerator_moments.py checks each on CPU
# against float64). Each entry loads its formulation: those of other modules are imported when
# a program for their platform is traced (they import this module, for `Local` and the cpu
# formulation's pieces).
Formulation = Callable[[Array, "Layout", Any], "Local"]
FORMULATIONS: dict[str, Callable[[], Formulation]] = {
    "cpu": lambda: local_moments,
    "tpu": lambda: importlib.import_module("jbn._accelerator_moments").chan_reduce_moments,
    "cuda": lambda: importlib.import_module("jbn._triton_moments").triton_moments,
}


# Where one participant holds the whole batch, nothing merges its `Local`: `Local.moments()`
# (the mean rounded once from base + delta) is all that is used. Per backend, optionally, a
# formulation of exactly those `Moments` that moves less than its `Local` would: the cuda kernel
# writes the rounded mean (two per-feature vectors, not three). Backends without an entry use
# `Local.moments()` of their `FORMULATIONS` entry.
BatchFormulation = Callable[[Array, "Layout", Any], Moments]
BATCH_FORMULATIONS: dict[str, Callable[[], BatchFormulation]] = {
    "cuda": lambda: importlib.import_module("jbn._triton_moments").triton_batch_moments,
}


def formulation(platform: str) -> Formulation:
    """The formulation `FORMULATIONS` loads for `platform`."""
    return FORMULATIONS[platform]()


def batch_formulation(platform: str) -> tuple[Callable, BatchFormulation]:
    """(what it is built on, the formulation): `BATCH_FORMULATIONS`' entry for `platform`,
    else `Local.moments()` of its `FORMULATIONS` entry (built on that entry)."""
    if platform in BATCH_FORMULATIONS:
        f = BATCH_FORMULATIONS[platform]()
        return f, f
    local = formulation(platform)
    return local, partial(_local_then_moments, local)


def _local_then_moments(f: Formulation, x: Array, layout: Layout, dtype) -> Moments:
    return f(x, layout, dtype).moments()


def platform_moments(x: Array, layout: Layout, dtype) -> Local:
    """This participant's statistics, in the formulation of the platform the program is
    lowered for (`_on_platform`)."""
    return _on_platform(x, layout, dtype, _plain_formulation, local_moments)


def platform_batch_moments(x: Array, layout: Layout, dtype) -> Moments:
    """The `Moments` of one participant that holds the whole batch, in the formulation of
    the platform the program is lowered for (`batch_formulation`, `_on_platform`): the same
    values as `platform_moments(...).moments()`."""
    return _on_platform(x, layout, dtype, batch_formulation, partial(_local_then_moments, local_moments))


def _plain_formulation(platform: str) -> tuple[Formulation, Formulation]:
    f = formulation(platform)
    return f, f


def _on_platform(x: Array, layout: Layout, dtype, pick: Callable[[str], tuple[Callable, Callable]], portable: Callable):
    """`pick(platform)`'s formulation (the second of the pair) of the platform the program is
    lowered for (`jax.lax.platform_dependent`), one call where every platform's is built on
    the same one (the first of the pair). Complex data, and symbolic sizes under `jax.export`:
    `portable` everywhere, since every branch is traced and a reduction computation cannot
    close over a symbolic size."""
    symbolic = not all(isinstance(d, int) for d in x.shape)
    if symbolic or jnp.iscomplexobj(x) or jnp.issubdtype(dtype, jnp.complexfloating):
        return portable(x, layout, dtype)
    chosen = {platform: pick(platform) for platform in FORMULATIONS}
    base, default = chosen.pop("cpu")
    if all(built_on is base for built_on, _ in chosen.values()):
        return default(x, layout, dtype)
    branches = {platform: partial(_call, f, layout, dtype) for platform, (_, f) in chosen.items()}
    return lax.platform_dependent(x, default=partial(_call, default, layout, dtype), **branches)


def _call(f: Callable, layout: Layout, dtype, x: Array) -> Any:
    return f(x, layout, dtype)


# One participant's moments (one device, one shard, one sub-batch), the cpu formulation.
#
# A participant reduces its own elements around a base close to their mean (the mean of every
# 8th slice, provably within sqrt(7) standard deviations of the mean; under a mask the mean
# itself, one more pass): the sum and the sum of squares of the deviations from it (the
# corrected two-pass algorithm). The result does not depend on the order of the elements (an
# outlier first costs nothing) and stays accurate when |mean| >> std. Each element is scaled by
# 1/n (or 1/sqrt(n)) before it is summed, so that a representable mean and variance come out
# finite however many elements there are. On XLA:GPU the two sums of pass 2 fuse into one read
# of `x`; on XLA:CPU each reduction reads `x` once.


class Local(NamedTuple):
    """One participant's statistics as a merge needs them: the mean is `base + delta`,
    kept apart (a rounded mean near 1e4 would cost the merge its accuracy)."""

    count: Array  # type: ignore[assignment]  # a field, where tuple has a method
    var: Array
    base: Array
    delta: Array

    def moments(self) -> Moments:
        return Moments(jnp.where(self.count > 0, self.base + self.delta, 0), self.var, self.count)


def abs_square(v: Array) -> Array:
    """|v|^2, real, for real or complex v."""
    if jnp.iscomplexobj(v):
        return lax.square(lax.real(v)) + lax.square(lax.imag(v))
    return lax.square(v)


def valid_count(layout: Layout, dtype) -> Array:
    """Elements per feature that count: feature-shaped under a mask that varies per
    feature, a scalar otherwise."""
    rdtype = real_dtype(dtype)
    if layout.valid is None:
        return jnp.asarray(element_count(layout.shape, layout.reduce), rdtype)
    return jnp.sum(jnp.broadcast_to(layout.valid, layout.shape), axis=layout.reduce, dtype=rdtype)


SAMPLE_STRIDE = 8


def sample_mean(x: Array, layout: Layout, dtype) -> Array | None:
    """The per-feature mean of every 8th slice of `x` along one reduced axis: a base
    within sqrt(7) standard deviations of the mean whatever the data and its order (a
    subset holding a fraction f of the elements has its mean within std * sqrt((1-f)/f)
    of the mean), for an eighth of a pass over x. None where no reduced axis has 8 or more
    slices (known statically, and not split over devices)."""
    for a in layout.reduce:
        n = layout.shape[a]
        if isinstance(n, int) and n >= SAMPLE_STRIDE and not split_axes(x, (a,)):
            strides = [SAMPLE_STRIDE if i == a else 1 for i in range(len(layout.shape))]
            sample = lax.slice(x, [0] * len(layout.shape), list(layout.shape), strides)
            return jnp.mean(sample.astype(dtype), axis=layout.reduce)
    return None


def rounded_base(base: Array) -> Array:
    """`base` rounded to one bit fewer than its dtype holds, by an explicit rounding step.

    XLA copies a cheap producer into each fusion that uses it and contracts a product
    feeding a sum into one fused multiply-add: `x - s * (1/k)` in one fusion and
    `base_i - base_0` in another would then see different bases (the rounded product in
    one, the exact one in the other), and the merge would lose up to an ulp of the mean
    (a relative variance error of 1e-5 at |mean|/std = 1e4). A `reduce_precision` is a
    rounding of its own that nothing contracts or folds away, so every use sees the same
    number; one bit less costs nothing (the base need only be near the mean)."""
    if jnp.iscomplexobj(base):
        return lax.complex(rounded_base(lax.real(base)), rounded_base(lax.imag(base)))
    info = jnp.finfo(base.dtype)
    return lax.reduce_precision(base, exponent_bits=info.nexp, mantissa_bits=info.nmant - 1)


def local_moments(x: Array, layout: Layout, dtype) -> Local:
    """This participant's count, variance and mean (as base + delta) over `layout.reduce`
    (see the module doc). Padding takes no part, whatever it holds."""
    valid, features, ndim = layout.valid, layout.features, len(layout.shape)
    count = valid_count(layout, dtype)
    inv_n = 1 / jnp.maximum(count, 1)
    root = jnp.sqrt(inv_n)
    # Each reduction gets its own handle on x, so that XLA:CPU fuses the cast and the
    # centring into each instead of writing a float32 copy of x (see `separate_uses` below). The
    # scales go as feature-shaped arrays in one pytree with x: a scalar (or a constant that
    # XLA folds out of its own barrier) is written out at x's full size to feed reductions.
    scales = (jnp.broadcast_to(inv_n, layout.fshape), jnp.broadcast_to(root, layout.fshape))

    def per_feature(v):
        return expand_features(v, ndim, features)

    def keep(v):
        return v if valid is None else jnp.where(valid, v, 0)  # where, not multiply: padded NaN/inf stay out

    # The base: the mean of an eighth of the slices (no mask), else the mean (one more pass
    # over x, needed where a sample might hold only padding). Then the sums of the scaled deviations
    # d = (x - base) / sqrt(n): sum(d) corrects the mean and the variance for the base's
    # distance from the mean, so |mean| >> std costs nothing (the corrected two-pass algorithm).
    base = sample_mean(x, layout, dtype) if valid is None else None
    if base is None:
        (((xa, (ia, _)),),) = separate_uses(1, (x, scales))
        base = jnp.sum(keep(xa.astype(dtype)) * per_feature(ia).astype(dtype), axis=layout.reduce)  # complex x
    base = rounded_base(lax.stop_gradient(base))  # the result does not depend on it (up to rounding)
    ((xb, _, bb),), ((xc, (_, rc), bc),) = separate_uses(2, (x, scales, base))
    # Only the squares need the 1/sqrt(n) against overflow: with the base within a few
    # standard deviations of the mean, sum(x - base) stays finite wherever the variance is.
    d_sum = jnp.sum(keep(xb.astype(dtype) - per_feature(bb)), axis=layout.reduce)
    # (the real scale cast to a complex x's dtype, as promotion would: an explicit cast under strict promotion)
    d_sq = jnp.sum(
        abs_square(keep((xc.astype(dtype) - per_feature(bc)) * per_feature(rc).astype(dtype))), axis=layout.reduce
    )
    # d_sum and 1/n pass a barrier together: XLA would otherwise rewrite the square of
    # `d_sum * (1/n)` (1/n a constant) as `d_sum^2 * (1/n)^2`, whose first factor overflows
    # for large values (a variance of 0 instead of 1e36).
    d_sum, inv_n = lax.optimization_barrier((d_sum, inv_n))
    correction = d_sum * inv_n.astype(d_sum.dtype)
    # d_sq overflows only where the variance is beyond the dtype (the base is near the mean):
    # the variance is then inf, not inf - inf = NaN (which would reach every output)
    var = jnp.where(jnp.isposinf(d_sq), d_sq, jnp.maximum(d_sq - abs_square(correction), 0))
    has = count > 0
    return Local(count, var, jnp.where(has, base, 0), jnp.where(has, correction, 0))


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
    da = xa.astype(dtype) - expand_features(sa, len(layout.shape), layout.features)
    db = xb.astype(dtype) - expand_features(sb, len(layout.shape), layout.features)
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
    dtype = stats_dtype(a.mean.dtype, b.mean.dtype)
    rdtype = real_dtype(dtype)
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
    name = axis_name_arg(names)
    index = lax.axis_index(name)
    size = bound_axis_size(names)
    if groups is None and not any(n in varying_axes(lax.axis_index(n)) for n in names):
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
        return lax.psum(v, axis_name_arg(names))
    return jnp.sum(gather(v, names, groups), axis=0)


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
    split = split_axes(x, layout.reduce)
    if not split:
        return None
    mesh = sharding.mesh
    shards = {a: mesh_axes_size(mesh, sharding.spec[a]) for a in split}
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
    own = platform_moments(xg, grouped, dtype)  # the formulation of the target platform
    local = stack_participant(own)
    # Shard axes first (in kept order they sit among the feature axes), flattened.
    positions = [kept.index(g) + 1 for g in group_axes]
    local = jnp.moveaxis(local, positions, list(range(1, len(positions) + 1)))
    local = local.reshape((local.shape[0], -1) + layout.fshape)
    gathered = jax.sharding.reshard(local, named(()))
    return chan_merge(unstack_participants(gathered, 0, jnp.iscomplexobj(own.base)))


# Helpers that shape the computation so that XLA fuses it well.
#
# XLA:CPU fuses a reduction with its elementwise producer only when that producer has no other
# user (it does not duplicate a shared producer), and never fuses a select or a comparison into
# a reduction. A shared `x - mean` (or `x.astype(float32)`, or a broadcast of `mean`) feeding two
# reductions is therefore written to memory in full and read back, which costs more than
# recomputing it. `separate_uses` hands each reduction its own handle on the inputs, so that
# each fuses its own copy of the cheap producer. Only on CPU: XLA:GPU duplicates cheap producers
# by itself and fuses sibling reductions over the same input into one pass (reading it once),
# which separate handles would hide.


def separate_uses(n: int, *arrays: Any) -> list[tuple[Any, ...]]:
    """`n` tuples, each holding the same `arrays` (arrays or pytrees of them). On CPU,
    XLA cannot merge them back into one (an optimization barrier: no copy, no numerical
    effect, differentiable); elsewhere they are the arrays themselves. XLA folds a
    barrier over constants only: put a constant in a pytree with a computed array."""

    def barrier(*arrays):
        # One barrier per argument: a barrier over values of different device-variance
        # (shard_map's vma) makes them all varying, so arguments keep their own types (and
        # the leaves of one pytree argument are given one type, below).
        copies = [lax.optimization_barrier((a,) * n) for a in arrays]
        return [tuple(c[i] for c in copies) for i in range(n)]

    arrays = tuple(_same_variance(a) for a in arrays)
    return lax.platform_dependent(*arrays, cpu=barrier, default=lambda *a: [a] * n)


def kept_apart(*arrays: Any) -> tuple[Any, ...]:
    """The `arrays`, behind one optimization barrier on CPU (elsewhere themselves). In a
    linear rule that JAX transposes, the barrier becomes one over the arrays' cotangents:
    terms summed into one output then get separate handles on the output's cotangent,
    and a cast of it fuses into each consumer. (Separate barriers would not do: XLA
    merges identical barriers over the same cotangent.)"""
    arrays = _same_variance(arrays)
    return lax.platform_dependent(*arrays, cpu=lambda *a: lax.optimization_barrier(a), default=lambda *a: a)


def _same_variance(tree):
    """The leaves of `tree`, each made to vary over every manual axis that any of them
    varies over (a no-op outside shard_map, or for a single array)."""
    leaves = list(jax.tree.leaves(tree))
    axes = frozenset().union(*(varying_axes(leaf) for leaf in leaves)) if leaves else frozenset()
    if not axes:
        return tree

    def widen(leaf):
        missing = tuple(a for a in axes if a not in varying_axes(leaf))
        return lax.pcast(leaf, missing, to="varying") if missing else leaf

    return jax.tree.map(widen, tree)
