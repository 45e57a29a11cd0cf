"""One participant's statistics, and the exact merge of several (Chan et al. 1979).

A participant (one device, one shard, one sub-batch) reduces its own elements in two
passes: the mean, then the mean of the squared deviations from it. The variance's error
then does not depend on the order of the elements (an outlier first costs nothing), nor
on |mean| / std beyond the rounding of the mean itself: about (eps * |mean| / std)^2
relative, 4e-7 at |mean| / std = 1e4 in float32. Each element is scaled by 1/n (and
1/sqrt(n)) before it is summed, so that a representable mean and variance come out
finite however many elements there are. On XLA:CPU the two passes cost about what
flax's `mean(x), mean(x^2)` cost (two reductions, each reading `x`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jbn import _axes
from jbn._axes import Layout
from jbn._fusion import separate_uses
from jbn._state import Moments

Array = jax.Array


def abs_square(v: Array) -> Array:
    """|v|^2, real, for real or complex v."""
    if jnp.iscomplexobj(v):
        return lax.square(lax.real(v)) + lax.square(lax.imag(v))
    return lax.square(v)


def valid_count(layout: Layout, dtype) -> Array:
    """Elements per feature that count: feature-shaped under a mask that varies per
    feature, a scalar otherwise."""
    rdtype = _axes.real_dtype(dtype)
    if layout.valid is None:
        return jnp.asarray(_axes.element_count(layout.shape, layout.reduce), rdtype)
    return jnp.sum(jnp.broadcast_to(layout.valid, layout.shape), axis=layout.reduce, dtype=rdtype)


def local_moments(x: Array, layout: Layout, dtype) -> Moments:
    """This participant's count, mean and biased variance over `layout.reduce`, in two
    passes (see the module doc). Padding takes no part, whatever it holds."""
    valid, features, ndim = layout.valid, layout.features, layout.ndim
    count = valid_count(layout, dtype)
    inv_n = 1 / jnp.maximum(count, 1)
    # Each pass gets its own handle on x, so that XLA:CPU fuses the cast into both
    # reductions instead of writing a float32 copy of x (see jbn._fusion).
    (xa, ia), (xb, ib) = separate_uses(2, x, inv_n)

    def per_feature(v):
        return _axes.expand_features(v, ndim, features) if jnp.ndim(v) else v

    a = xa.astype(dtype)
    if valid is not None:
        a = jnp.where(valid, a, 0)  # where, not multiply: padded NaN/inf must not leak in
    mean = jnp.sum(a * per_feature(ia), axis=layout.reduce)
    d = (xb.astype(dtype) - _axes.expand_features(mean, ndim, features)) * per_feature(jnp.sqrt(ib))
    if valid is not None:
        d = jnp.where(valid, d, 0)
    var = jnp.sum(abs_square(d), axis=layout.reduce)
    return Moments(jnp.where(count > 0, mean, 0), var, count)


def stack_participant(local: Moments) -> Array:
    """(count, mean, var) of one participant stacked on axis 0, feature-shaped, as
    `chan_merge` takes them after a gather (a complex mean keeps its real parts apart)."""
    mean = local.mean
    count = jnp.broadcast_to(local.count, mean.shape).astype(local.var.dtype)
    if jnp.iscomplexobj(mean):
        return jnp.stack([count, local.var, mean.real, mean.imag])
    return jnp.stack([count, local.var, mean])


def unstack_participants(stacked: Array, axis: int) -> tuple[Array, Array, Array]:
    """(count, var, mean) from `stack_participant`'s layout along `axis` of `stacked`."""
    parts = [jnp.take(stacked, i, axis=axis) for i in range(stacked.shape[axis])]
    mean = parts[2] if len(parts) == 3 else lax.complex(parts[2], parts[3])
    return parts[0], parts[1], mean


def chan_merge(count: Array, var: Array, mean: Array) -> Moments:
    """Merge participants' statistics stacked on axis 0 into those of all their elements:
    `mean = sum(w_i mean_i)`, `var = sum(w_i (var_i + |mean_i - mean|^2))` with weights
    `w_i = n_i / n`. A participant without elements contributes nothing (its terms are
    selected away, so a huge mean elsewhere cannot make 0 * inf)."""
    total = jnp.sum(count, axis=0)
    weight = count / jnp.maximum(total, 1)
    has = count > 0
    merged = jnp.sum(jnp.where(has, weight * mean, 0), axis=0)
    spread = jnp.where(has, weight * (var + abs_square(mean - merged)), 0)
    has_any = total > 0
    return Moments(jnp.where(has_any, merged, 0), jnp.where(has_any, jnp.sum(spread, axis=0), 0), total)


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
        return Moments(jnp.broadcast_to(jnp.asarray(m.mean, dtype), shape),
                       jnp.broadcast_to(jnp.asarray(m.var, rdtype), shape),
                       jnp.broadcast_to(jnp.asarray(m.count, rdtype), shape))

    a, b = stacked(a), stacked(b)
    merged = chan_merge(*(jnp.stack([u, v]) for u, v in zip((a.count, a.var, a.mean), (b.count, b.var, b.mean))))
    empty = merged.count == 0  # nothing on either side: `a` as it was
    return Moments(jnp.where(empty, a.mean, merged.mean), jnp.where(empty, a.var, merged.var), merged.count)
