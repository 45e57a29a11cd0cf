"""One participant's statistics on NVIDIA GPUs: a Pallas (Triton) kernel that reads `x` once.

XLA:GPU cannot fuse an exact formulation into one read of `x` (sums shifted by a sampled base
cost a second read; a variadic (count, mean, M2) reduction writes its per-element operands
out). This kernel reads `x`, viewed as (rows, features), once: each program of a grid over
(row chunks, feature blocks) walks its chunk a tile of rows at a time, takes each tile's
exact two-pass statistics in registers (the tile's mean, then the corrected sum of squared
deviations from it), and merges tiles with Chan's formula, the mean carried as an unevaluated
sum `hi + lo` (Knuth's TwoSum) so that |mean| / std = 1e4 costs no accuracy. It writes one
(hi, lo, M2) per chunk and feature; a small XLA merge of those partials (Chan's formula again,
around the first chunk's mean) gives the `Local` statistics. Where one participant holds the
whole batch, nothing merges that `Local`: `triton_batch_moments` has the kernels write the mean
rounded once and the variance instead (two per-feature vectors, not three, for the layer to read).

The squared deviations are scaled by 1 / (elements per feature) before they are summed, so a
representable variance comes out finite. Masks, and feature axes that are not the trailing
contiguous ones, use the cpu formulation (`jbn._local_moments.local_moments`). Derivatives: a custom
JVP written in XLA operations (mean' = mean of x', var' = 2 mean((x - mean) x')), so any order
works. `interpret=True` runs the same kernel through Pallas' interpreter (how it is tested on
CPU); the GPU entry of the dispatch compiles it with Triton.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jbn import _statistics as _local_moments  # the cpu formulation, and what every formulation returns
from jbn._options import Layout
from jbn._state import Moments
from jbn._statistics import Local

Array = jax.Array

TILE_ROWS = 32  # rows per tile held in registers (a power of 2, as Triton blocks must be)
FEATURE_BLOCK = 64  # features per program (a power of 2)
MAX_CHUNK_ROWS = 4096  # rows per program at most: the partials stay < 0.1% of x's bytes
MIN_CHUNK_ROWS = 1024  # rows per program at least, past one chunk: the partials stay < 0.3% of x
MIN_PROGRAMS = 132  # one per multiprocessor of an H100 (132), where the data allows


def _two_sum(a: Array, b: Array) -> tuple[Array, Array]:
    """Knuth's TwoSum: s = fl(a + b) and its rounding error e, s + e == a + b exactly."""
    s = a + b
    back = s - a
    return s, (a - (s - back)) + (b - back)


def _pow2_at_most(n: int) -> int:
    return 1 << max(int(n).bit_length() - 1, 0)


def chunk_rows(rows: int, features: int) -> int:
    """Rows per program (a power of 2, a multiple of TILE_ROWS): all of them up to
    MAX_CHUNK_ROWS (one chunk: no partials to merge); beyond, as many as keep MIN_PROGRAMS
    programs busy, between MIN_CHUNK_ROWS and MAX_CHUNK_ROWS."""
    if rows <= MAX_CHUNK_ROWS:
        return max(TILE_ROWS, 1 << max(rows - 1, 0).bit_length())
    feature_blocks = -(-features // FEATURE_BLOCK)
    wanted_chunks = max(1, -(-MIN_PROGRAMS // feature_blocks))
    chunk = _pow2_at_most(max(rows // wanted_chunks, 1))
    return min(max(chunk, MIN_CHUNK_ROWS), MAX_CHUNK_ROWS)


def _kernel(
    x_ref,
    *out_refs,
    rows: int,
    features: int,
    chunk: int,
    scale: float,
    interpreted: bool,
    unrolled: bool,
):
    """One (row chunk, feature block): the chunk's mean as base + offset (base: its first
    tile's mean; offset: the compensated sum of x - base over the chunk, divided by its
    rows) and its M2 / rows (Chan's merge of the tiles' corrected two-pass M2). With two
    outputs (one chunk, `rounded`), the mean rounded once and M2 / rows."""
    first_row = pl.program_id(0) * chunk
    cols = pl.program_id(1) * FEATURE_BLOCK + jnp.arange(FEATURE_BLOCK, dtype=jnp.int32)
    col_ok = cols < features
    zeros = jnp.zeros((FEATURE_BLOCK,), jnp.float32)

    def tile(k, carry):
        n_a, base_a, s_hi, s_lo, m2_a, r_a = carry
        local = k * TILE_ROWS + jnp.arange(TILE_ROWS, dtype=jnp.int32)
        row_ok = (first_row + local) < rows
        ok = row_ok[:, None] & col_ok[None, :]
        window = x_ref.at[pl.ds(k * TILE_ROWS, TILE_ROWS), :]
        # Interpreted, the block is padded in memory (and a masked load trips shard_map's
        # varying-axes checks); compiled, a masked load never touches memory past the array.
        x = window[...] if interpreted else plgpu.load(window, mask=ok)
        x = jnp.where(ok, x.astype(jnp.float32), 0)
        n_b = jnp.sum(row_ok.astype(jnp.float32))
        inv_b = 1 / jnp.maximum(n_b, 1)
        rough_b = jnp.sum(x, axis=0) * inv_b
        # The base on x's own grid (a bfloat16 or float16 x): x - base is then exact for every x
        # within 2^15 of it. A base between grid points would round every x - base the same way
        # (the data's low bits are all zero), a bias that no compensated sum removes.
        base = jnp.where(n_a > 0, base_a, rough_b.astype(x_ref.dtype).astype(jnp.float32))
        d = jnp.where(ok, x - rough_b[None, :], 0)
        s1 = jnp.sum(d, axis=0)
        m2_b = jnp.sum((d * scale) * (d * scale), axis=0) - (s1 * scale) * (s1 * scale) * inv_b
        n = n_a + n_b
        w_b = n_b / jnp.maximum(n, 1)
        mean_a = (s_hi + s_lo) / jnp.maximum(n_a, 1)  # the chunk's mean so far, less base
        delta = ((rough_b - base) + s1 * inv_b) - mean_a
        m2, m2_err = _two_sum(m2_a, m2_b + (delta * (n_a * w_b * scale)) * (delta * scale))
        # x - base: exact where they are close (|mean| >> std); elsewhere (an outlier first)
        # its rounding is unbiased, where a mean updated by weighted steps keeps each step's error.
        s_hi, s_err = _two_sum(s_hi, jnp.sum(jnp.where(ok, x - base[None, :], 0), axis=0))
        return n, base, s_hi, s_lo + s_err, m2, r_a + m2_err  # M2 as m2 + r, compensated

    tiles = chunk // TILE_ROWS
    carry = (jnp.float32(0), zeros, zeros, zeros, zeros, zeros)
    _, base, s_hi, s_lo, m2, r = _loop(tiles, tile, carry, unrolled)
    n_chunk = jnp.minimum(rows - first_row, chunk).astype(jnp.float32)
    # The mean as its rounded value plus the rest, exactly (TwoSum): base + offset with base
    # rounded to the mean, whatever the first tile held (an outlier first).
    # TwoSum: `mean` is also the mean rounded once (what the two outputs write).
    mean, rest = _two_sum(base, (s_hi + s_lo) / n_chunk)
    outputs = (mean, m2 + r) if len(out_refs) == 2 else (mean, rest, m2 + r)
    for ref, value in zip(out_refs, outputs):
        ref[...] = value[None, :]


def chunk_partials(x2d: Array, *, interpret: bool, rounded: bool = False) -> tuple[Any, ...]:
    """Per (row chunk, feature): the mean as base + offset, and M2 / rows; with the rows per
    chunk. `rounded` (one chunk only): the mean rounded once, and M2 / rows."""
    rows, features = x2d.shape
    chunk = chunk_rows(rows, features)
    grid = (-(-rows // chunk), -(-features // FEATURE_BLOCK))
    kernel = partial(
        _kernel,
        rows=rows,
        features=features,
        chunk=chunk,
        scale=1 / math.sqrt(max(rows, 1)),
        interpreted=interpret,
        unrolled=_unrolled(x2d, interpret),
    )
    # Under shard_map the partials vary over the mesh axes that x varies over.
    part = jax.ShapeDtypeStruct((grid[0], features), jnp.float32, manual_axis_type=jax.typeof(x2d).mat)
    out_spec = pl.BlockSpec((1, FEATURE_BLOCK), lambda i, j: (i, j))
    outputs = 2 if rounded else 3
    if rounded and grid[0] != 1:
        raise ValueError(f"rounded partials need one chunk, not {grid[0]}")
    partials = pl.pallas_call(
        kernel,
        out_shape=(part,) * outputs,
        grid=grid,
        in_specs=[pl.BlockSpec((chunk, FEATURE_BLOCK), lambda i, j: (i, j))],
        out_specs=(out_spec,) * outputs,
        compiler_params=plgpu.CompilerParams(num_warps=4),
        interpret=interpret,
        name="jbn_moments",
    )(x2d)
    return (*partials, chunk)


def _merge_kernel(base_ref, offset_ref, m2_ref, *out_refs, rows, features, chunk, chunks, interpreted, unrolled):
    """One feature block: Chan's merge of the chunk partials, in three passes over them (they
    are < 0.1% of x): the rounded weighted mean hi of the chunk bases, each chunk's mean less
    hi as d (base - hi is exact where they are close, and weighted by the chunk's share where
    not), their weighted mean lo, and the spread of the d around lo added to the chunks' M2.
    Writes (hi, lo, var), or with two outputs (the mean rounded once: hi + lo, var)."""
    cols = pl.program_id(0) * FEATURE_BLOCK + jnp.arange(FEATURE_BLOCK, dtype=jnp.int32)
    col_ok = cols < features
    zeros = jnp.zeros((FEATURE_BLOCK,), jnp.float32)

    def rows_of(k):
        index = k * TILE_ROWS + jnp.arange(TILE_ROWS, dtype=jnp.int32)
        ok = (index < chunks)[:, None] & col_ok[None, :]
        share = (jnp.minimum(rows - index * chunk, chunk).astype(jnp.float32) / rows)[:, None]
        return ok, jnp.where(ok, share, 0)

    def read(ref, k, ok):
        window = ref.at[pl.ds(k * TILE_ROWS, TILE_ROWS), :]
        return jnp.where(ok, window[...] if interpreted else plgpu.load(window, mask=ok), 0)

    def mean_of_bases(k, acc):
        ok, share = rows_of(k)
        return acc + jnp.sum(read(base_ref, k, ok) * share, axis=0)

    tiles = -(-chunks // TILE_ROWS)
    hi = _loop(tiles, mean_of_bases, zeros, unrolled)

    def deviation(k, ok):
        return (read(base_ref, k, ok) - hi[None, :]) + read(offset_ref, k, ok)

    def mean_of_deviations(k, acc):
        ok, share = rows_of(k)
        return acc + jnp.sum(deviation(k, ok) * share, axis=0)

    lo = _loop(tiles, mean_of_deviations, zeros, unrolled)

    def spread(k, acc):
        ok, share = rows_of(k)
        e = jnp.where(ok, deviation(k, ok) - lo[None, :], 0)
        return acc + jnp.sum(read(m2_ref, k, ok) + e * e * share, axis=0)

    var = _loop(tiles, spread, zeros, unrolled)
    outputs = (hi + lo, var) if len(out_refs) == 2 else (hi, lo, var)
    for ref, value in zip(out_refs, outputs):
        ref[...] = value[None, :]


def _unrolled(x: Array, interpret: bool) -> bool:
    """Whether the kernels' loops run as Python loops: interpreted under shard_map's
    varying-axes checks, where Pallas' interpreter cannot discharge a loop reading a ref (jax
    0.10.2). Elsewhere `lax.fori_loop` (an unrolled loop of 128 tiles is slow to compile)."""
    return interpret and not jax.typeof(x).mat.empty


def _loop(steps: int, body, init, unrolled: bool):
    """`lax.fori_loop`, or the same steps in a Python loop (`_unrolled`)."""
    if not unrolled:
        return lax.fori_loop(0, steps, body, init)
    for k in range(steps):
        init = body(k, init)
    return init


def _merged(x2d: Array, interpret: bool, rounded: bool = False) -> tuple[Array, ...]:
    """(mean hi, mean lo, var) of the columns of x2d, or with `rounded` (the mean rounded
    once: fl(hi + lo), var): the one-read kernel's chunk partials, merged by a second, small
    kernel (one kernel where XLA makes several of the merge); one chunk needs no merge."""
    rows, features = x2d.shape
    one_chunk = chunk_rows(rows, features) >= rows
    *partials, chunk = chunk_partials(x2d, interpret=interpret, rounded=rounded and one_chunk)
    if one_chunk:
        return tuple(p[0] for p in partials)
    base, offset, m2 = partials
    kernel = partial(
        _merge_kernel,
        rows=rows,
        features=features,
        chunk=chunk,
        chunks=base.shape[0],
        interpreted=interpret,
        unrolled=_unrolled(x2d, interpret),
    )
    out = jax.ShapeDtypeStruct((1, features), jnp.float32, manual_axis_type=jax.typeof(x2d).mat)
    # All the chunks, in whole tiles (interpreted, padded in memory; compiled, masked loads).
    whole = pl.BlockSpec((-(-base.shape[0] // TILE_ROWS) * TILE_ROWS, FEATURE_BLOCK), lambda j: (0, j))
    one = pl.BlockSpec((1, FEATURE_BLOCK), lambda j: (0, j))
    outputs = 2 if rounded else 3
    merged = pl.pallas_call(
        kernel,
        out_shape=(out,) * outputs,
        grid=(-(-features // FEATURE_BLOCK),),
        in_specs=[whole, whole, whole],
        out_specs=(one,) * outputs,
        compiler_params=plgpu.CompilerParams(num_warps=4),
        interpret=interpret,
        name="jbn_moments_merge",
    )(base, offset, m2)
    return tuple(m[0] for m in merged)


@partial(jax.custom_jvp, nondiff_argnums=(1,))
def _moments(x2d: Array, interpret: bool) -> tuple[Array, Array, Array]:
    hi, lo, var = _merged(x2d, interpret)
    return hi, lo, var


@_moments.defjvp
def _moments_jvp(interpret, primals, tangents):
    (x2d,), (dx,) = primals, tangents
    hi, lo, var = _moments(x2d, interpret)
    inv_n = 1 / max(x2d.shape[0], 1)
    dx = dx.astype(jnp.float32)
    d_mean = jnp.sum(dx, axis=0) * inv_n
    centred = (x2d.astype(jnp.float32) - hi[None]) - lo[None]  # explicit broadcast (rank promotion "raise")
    d_var = 2 * jnp.sum(centred * dx, axis=0) * inv_n
    return (hi, lo, var), (d_mean, jnp.zeros_like(lo), d_var)


@partial(jax.custom_jvp, nondiff_argnums=(1,))
def _rounded_moments(x2d: Array, interpret: bool) -> tuple[Array, Array]:
    """(mean rounded once, var), one per-feature vector fewer written than `_moments`: its
    var, and its hi + lo rounded once (one chunk: TwoSum's rounded sum, which equals
    fl(hi + lo) in exact IEEE arithmetic; several: fl(hi + lo) in the merge kernel)."""
    mean, var = _merged(x2d, interpret, rounded=True)
    return mean, var


@_rounded_moments.defjvp
def _rounded_moments_jvp(interpret, primals, tangents):
    # The derivative centres x on hi + lo unrounded, as `_moments`' does.
    (hi, lo, var), (d_mean, _, d_var) = _moments_jvp(interpret, primals, tangents)
    return (hi + lo, var), (d_mean, d_var)


def applies(x: Array, layout: Layout, dtype) -> bool:
    """Whether the kernel computes these statistics: no mask, float32 statistics of a real
    floating input whose feature axes are the trailing ones, at least one element per feature."""
    n = x.ndim
    trailing = layout.features == tuple(range(n - len(layout.features), n))
    rows = math.prod(x.shape[a] for a in layout.reduce)
    return (
        layout.valid is None
        and trailing
        and rows > 0
        and jnp.dtype(dtype) == jnp.float32
        and jnp.issubdtype(x.dtype, jnp.floating)
        and jnp.dtype(x.dtype).itemsize <= 4
    )


def triton_moments(x: Array, layout: Layout, dtype, *, interpret: bool = False) -> Local:
    """`Local` statistics from the one-read kernel (see the module doc); other cases: the
    cpu formulation."""
    if not applies(x, layout, dtype):
        return _local_moments.local_moments(x, layout, dtype)
    feature_shape = tuple(x.shape[a] for a in layout.features)
    features = math.prod(feature_shape)
    hi, lo, var = _moments(x.reshape(-1, features), interpret)
    count = _local_moments.valid_count(layout, dtype)
    return Local(count, var.reshape(feature_shape), hi.reshape(feature_shape), lo.reshape(feature_shape))


def triton_batch_moments(x: Array, layout: Layout, dtype, *, interpret: bool = False) -> Moments:
    """`triton_moments(...).moments()` where nothing merges the `Local` (one participant
    holds the whole batch): the same var, and the mean rounded once by the kernel instead
    of after it (two per-feature vectors written, not three, for the layer to read)."""
    if not applies(x, layout, dtype):
        return _local_moments.local_moments(x, layout, dtype).moments()
    feature_shape = tuple(x.shape[a] for a in layout.features)
    features = math.prod(feature_shape)
    mean, var = _rounded_moments(x.reshape(-1, features), interpret)
    count = _local_moments.valid_count(layout, dtype)  # > 0: `applies` asks for rows
    return Moments(mean.reshape(feature_shape), var.reshape(feature_shape), count)
