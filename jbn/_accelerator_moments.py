"""One participant's statistics, formulated per backend: the one dispatch point.

`local_moments` picks, when the program is lowered, the formulation of the platform it is
lowered for (`jax.lax.platform_dependent`):

- cpu (and any platform not listed): `jbn._local_moments.local_moments`, the corrected two-pass
  sums around a sampled base, shaped for XLA:CPU's fusion rules.
- tpu: `chan_reduce_moments`, ONE variadic reduction that carries (count, mean, variance)
  per partial result and merges partial results with Chan's formula. XLA:TPU fuses it into a
  single read of `x` (the sampled base of the cpu formulation is a strided read that XLA:TPU
  lays out badly, and the two sums of deviations a second full read). The mean is carried
  as an unevaluated sum `hi + lo` (the rounding error of each update kept in `lo`, Knuth's
  TwoSum), so that merging two means near 1e4 standard deviations away from zero keeps their
  difference exact: the variance is accurate whatever |mean| / std, and whatever the order.
- cuda: `jbn._triton_moments.triton_moments`, a Pallas (Triton) kernel that reads `x` once
  (XLA:GPU fuses neither formulation above into one read); masks and feature axes that are
  not trailing use the cpu formulation. Only lowered for GPU programs: `platform_dependent`
  lowers the branches of the platforms a program is compiled for.

Every formulation returns the same `Local` within rounding (tests/test_accelerator_moments.py
checks each on CPU against float64). `FORMULATIONS` maps platform to formulation; the
dispatch reads it at trace time.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from jbn import _axes, _local_moments, _triton_moments  # _local_moments: the cpu formulation
from jbn._axes import Layout
from jbn._local_moments import Local

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
    """(count, mean hi, mean lo, var) over `reduce` in one variadic reduction."""
    xs = x.astype(dtype)
    if valid is None:
        counts = jnp.ones_like(xs)
    else:
        valid = jnp.broadcast_to(valid, xs.shape)
        counts = valid.astype(dtype)
        xs = jnp.where(valid, xs, 0)  # where, not multiply: padded NaN/inf stay out
    total = _axes.element_count(x.shape, reduce)
    zero = jnp.zeros((), dtype)
    operands = (counts, xs, jnp.zeros_like(xs), jnp.zeros_like(xs), jnp.zeros_like(xs))
    count, hi, lo, q, r = lax.reduce(operands, (zero,) * 5, _merger(1 / max(total, 1)), reduce)
    var = (q + r) * (total / jnp.where(count > 0, count, 1))
    return count, hi, lo, var


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
        return _axes.expand_features(v, ndim, features)

    dx = dx.astype(dtype)
    d_mean = jnp.sum(keep(dx), axis=reduce) * inv_n
    centred = x.astype(dtype) - per_feature(hi) - per_feature(lo)
    d_var = 2 * jnp.sum(keep(centred * dx), axis=reduce) * inv_n
    return (hi, lo, var), (d_mean, jnp.zeros_like(lo), d_var)


def chan_reduce_moments(x: Array, layout: Layout, dtype) -> Local:
    """`Local` statistics from one variadic reduction with Chan's merge (see the module doc)."""
    count = _local_moments.valid_count(layout, dtype)
    hi, lo, var = _chan_moments(x, layout.valid, layout.reduce, dtype)
    has = count > 0
    return Local(count, jnp.where(has, var, 0), jnp.where(has, hi, 0), jnp.where(has, lo, 0))


FORMULATIONS: dict[str, Callable[[Array, Layout, object], Local]] = {
    "cpu": _local_moments.local_moments,
    "tpu": chan_reduce_moments,
    "cuda": _triton_moments.triton_moments,
}


def local_moments(x: Array, layout: Layout, dtype) -> Local:
    """This participant's statistics, in the formulation of the platform the program is
    lowered for (`FORMULATIONS`; complex data, and symbolic sizes under `jax.export`: the cpu
    one everywhere, since every branch is traced and a reduction computation cannot close over a
    symbolic size)."""
    symbolic = not all(isinstance(d, int) for d in x.shape)
    if symbolic or jnp.iscomplexobj(x) or jnp.issubdtype(dtype, jnp.complexfloating):
        return _local_moments.local_moments(x, layout, dtype)
    branches = {platform: partial(_call, formulation, layout, dtype) for platform, formulation in FORMULATIONS.items()}
    default = branches.pop("cpu")
    if all(f.args[0] is FORMULATIONS["cpu"] for f in branches.values()):
        return default(x)
    return lax.platform_dependent(x, default=default, **branches)


def _call(formulation, layout: Layout, dtype, x: Array) -> Local:
    return formulation(x, layout, dtype)
