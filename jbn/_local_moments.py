"""One participant's moments (one device, one shard, one sub-batch): the `Local` record a
merge takes, and the cpu formulation of it; `jbn._accelerator_moments` picks a formulation
per backend, `jbn._statistics` merges participants.

A participant (one device, one shard, one sub-batch) reduces its own elements around a
base close to their mean (the mean of every 8th slice, provably within sqrt(7) standard
deviations of the mean; under a mask the mean itself, one more pass): the sum and the sum of squares of the deviations from it (the corrected
two-pass algorithm). The result does not depend on the order of the elements (an
outlier first costs nothing) and stays accurate when |mean| >> std. Each
element is scaled by 1/n (or 1/sqrt(n)) before it is summed, so that a representable
mean and variance come out finite however many elements there are. On XLA:GPU the two
sums of pass 2 fuse into one read of `x`; on XLA:CPU each reduction reads `x` once.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jbn import _axes
from jbn._axes import Layout
from jbn._fusion import separate_uses
from jbn._state import Moments

Array = jax.Array


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
    rdtype = _axes.real_dtype(dtype)
    if layout.valid is None:
        return jnp.asarray(_axes.element_count(layout.shape, layout.reduce), rdtype)
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
        if isinstance(n, int) and n >= SAMPLE_STRIDE and not _axes.split_axes(x, (a,)):
            strides = [SAMPLE_STRIDE if i == a else 1 for i in range(layout.ndim)]
            sample = lax.slice(x, [0] * layout.ndim, list(layout.shape), strides)
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
    valid, features, ndim = layout.valid, layout.features, layout.ndim
    count = valid_count(layout, dtype)
    inv_n = 1 / jnp.maximum(count, 1)
    root = jnp.sqrt(inv_n)
    # Each reduction gets its own handle on x, so that XLA:CPU fuses the cast and the
    # centring into each instead of writing a float32 copy of x (see jbn._fusion). The
    # scales go as feature-shaped arrays in one pytree with x: a scalar (or a constant that
    # XLA folds out of its own barrier) is written out at x's full size to feed reductions.
    scales = (jnp.broadcast_to(inv_n, layout.fshape), jnp.broadcast_to(root, layout.fshape))

    def per_feature(v):
        return _axes.expand_features(v, ndim, features)

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
