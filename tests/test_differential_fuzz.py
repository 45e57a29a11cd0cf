"""Differential fuzz: jbn's paths against the float64 NumPy reference (tests/reference.py).

Hypothesis draws shapes (rank 1-5), feature axes (int, tuple, negative), masks (every
broadcastable form, the non-feature-axes form, all-padding features and batches, NaN, inf
and 3e38 padding), data (means up to 1e22, standard deviations 1e-3..1e18, an outlier first,
constant and heavy-tailed features), input dtypes (float32, bfloat16, float16, float64 under
x64, complex64), running-state dtypes, momentum (a float, None, debias), activations, fused
on and off, eager and compiled, and the path: `moments`, training and evaluation
`batch_norm`, `batch_renorm`, ghost batches, synchronized statistics (vmap, jit of vmap,
pmap, shard_map, sharded jit), gradients, and bad arguments. Each example is judged
against the reference, written from the contract (DESIGN.md), never from jbn's code, with
the tolerances of `Tolerance` (derived from the dtypes, stated once).

Profiles: "ci" (the default: the examples below, about 1,100, fixed seed, a few minutes on
two cores) and "long" (`JBN_FUZZ_PROFILE=long`, 20 times as many; `make fuzz`).
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jbn
from tests import reference as ref
from tests.compiled_programs import release_compiled_programs_if_needed

# ---------------------------------------------------------------------------- profiles

_COMMON = dict(
    derandomize=True,  # a fixed seed: CI runs the same examples every time
    deadline=None,
    database=None,
    phases=(Phase.explicit, Phase.generate),  # no shrinking: a failure reports its first example
    suppress_health_check=list(HealthCheck),
)
settings.register_profile("ci", max_examples=1, **_COMMON)
settings.register_profile("long", max_examples=20, **_COMMON)
PROFILE = settings.get_profile(os.environ.get("JBN_FUZZ_PROFILE", "ci"))


def fuzz(examples: int):
    """A fuzz test of `examples` times the profile's multiplier (1 for ci, 20 for long), drawing
    from `st.data()`; before each example, compiled programs are dropped if the process holds too
    many of them (`tests/compiled_programs.py`: the long profile compiles tens of thousands)."""

    def decorate(test):
        @functools.wraps(test)
        def example(draw):
            release_compiled_programs_if_needed()
            return test(draw)

        return settings(PROFILE, max_examples=examples * PROFILE.max_examples)(given(st.data())(example))

    return decorate


# -------------------------------------------------------------------------- tolerances

DTYPES = {
    "float32": np.float32,
    "bfloat16": ml_dtypes.bfloat16,
    "float16": np.float16,
    "float64": np.float64,
    "complex64": np.complex64,
}


def eps(dtype) -> float:
    return float(np.finfo(np.dtype(dtype)).eps)


@dataclass(frozen=True)
class Tolerance:
    """Every tolerance of this file, derived from the dtypes, stated once.

    `compute` is the dtype the statistics are accumulated in (float32, float64 under x64 for
    float64 inputs), `out` the output's. A statistic over n elements may carry 16 roundings
    plus those of a sum of n terms, whose rms grows as sqrt(n) (2x headroom):
    `e = eps(compute) * (16 + 2 sqrt(n))`, relative to the size of what is summed. So
      mean:     1 ulp of the mean + 4 e std (deviations are taken from a base within a few std)
      variance: 4 e var + mean tolerance^2 (the base's own rounding enters squared)
    and anything computed from them (outputs, running statistics, gradients) gets the first
    order propagation of these errors plus its own roundings (a few ulps of its dtype)."""

    compute: type
    out: type
    n: int

    @property
    def e(self) -> float:
        return eps(self.compute) * (16 + 2 * math.sqrt(self.n))

    def representable(self, var_ref):
        """Where the contract judges statistics, and everything computed from them: a variance
        representable in the dtype they are accumulated in comes out finite and accurate; one
        that is not (bfloat16 data near 1e22 is an ulp of 7e19 apart: a variance of 1e39)
        must overflow there too (see `check_statistics`), and nothing computed from it is judged."""
        return np.asarray(var_ref) <= float(np.finfo(self.compute).max)

    def mean(self, mean_ref, var_ref):
        return 2 * eps(self.compute) * np.abs(mean_ref) + 4 * self.e * np.sqrt(var_ref)

    def var(self, mean_ref, var_ref):
        return 4 * self.e * var_ref + self.mean(mean_ref, var_ref) ** 2

    def normalized(self, x, mean_ref, var_ref, y_ref, scale, bias, epsilon, *, stats=True):
        """|y - y_ref| for y = scale (x - mean) / sqrt(var + epsilon) + bias (features
        expanded already): the statistics' errors (when they are the batch's) propagated, the
        centring's rounding, and a few ulps of the output dtype."""
        err = self.x_hat(x, mean_ref, var_ref, epsilon, stats=stats)
        return np.abs(scale) * err + 4 * eps(self.compute) * np.abs(bias) + 2 * eps(self.out) * np.abs(y_ref)

    def x_hat(self, x, mean_ref, var_ref, epsilon, *, stats=True):
        """|x_hat - x_hat_ref| for x_hat = (x - mean) / sqrt(var + epsilon): the centring's
        rounding (relative to |x| + |mean|: the mean is known to its ulp, so this grows with
        |mean| / std), its own roundings, and the statistics' errors when they are the batch's."""
        sigma = np.sqrt(var_ref + epsilon)
        x_hat = np.abs(x - mean_ref) / sigma
        err = 4 * eps(self.compute) * (np.abs(x) + np.abs(mean_ref)) / sigma + 8 * eps(self.compute) * x_hat
        if stats:
            err = err + self.mean(mean_ref, var_ref) / sigma + x_hat * self.var(mean_ref, var_ref) / (2 * sigma**2)
        return err

    def running(self, state_dtype, new_ref, old, batch_ref, weight_new, stat_tol):
        """|new - new_ref| of a running statistic: the batch statistic's error times its
        weight, the mix's roundings (of its terms, and of its coefficient, a few roundings
        of the compute dtype that weigh |old - batch|), and the rounding to the state's
        dtype or (narrower than float32) its one-ulp anti-stall step: two ulps."""
        mix = 4 * eps(self.compute) * (np.abs(new_ref) + np.abs(old) + 2 * np.abs(old - batch_ref))
        narrow = 2 * eps(state_dtype) * np.maximum(np.abs(new_ref), np.abs(old))
        return weight_new * stat_tol + mix + narrow

    def grad(self, size, grad_ref, grad_dtype):
        """A gradient entry: roundings of a sum of n terms of the given size, then the
        rounding to the gradient's dtype (that of its primal: a float32 scale gets a
        float32 gradient)."""
        return 8 * self.e * size + 2 * eps(grad_dtype) * np.abs(grad_ref)


def assert_within(got, want, tol, what, where=None):
    got = np.asarray(got).astype(np.complex128 if np.iscomplexobj(got) else np.float64)
    want = np.broadcast_to(want, got.shape)
    tol = np.broadcast_to(tol, got.shape)
    bad = ~(np.abs(got - want) <= tol)
    if where is not None:
        bad &= np.broadcast_to(where, got.shape)
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.size} outside tolerance; first at {i}: got {got[i]!r}, "
            f"reference {want[i]!r}, tolerance {tol[i]!r}"
        )


# --------------------------------------------------------------------------- strategies

# A small set of shapes per rank: jit compiles per shape, so reusing them keeps the compile
# time (which would dominate) small.
SHAPES = {
    1: [(9,), (64,)],
    2: [(7, 3), (48, 2), (16, 1)],
    3: [(4, 5, 3), (8, 2, 2), (3, 1, 4)],
    4: [(2, 3, 4, 2), (8, 2, 2, 3)],
    5: [(2, 2, 3, 2, 2), (4, 1, 2, 3, 2)],
}
PADDING = [np.nan, np.inf, -np.inf, 3e38, -1e30]


@st.composite
def layouts(draw, min_rank=1):
    """(shape, axis as the user writes it, sorted non-negative feature axes)."""
    rank = draw(st.integers(min_rank, 5))
    shape = draw(st.sampled_from(SHAPES[rank]))
    if rank == 1:
        features = (0,)
    else:
        k = draw(st.integers(1, min(2, rank - 1)))
        features = tuple(sorted(draw(st.permutations(range(rank)))[:k]))
    written = [a - rank if draw(st.booleans()) else a for a in features]
    axis = written[0] if len(written) == 1 and draw(st.booleans()) else tuple(written)
    return shape, axis, features


@st.composite
def masks(draw, shape, features, allow_none=True):
    """(mask as passed or None, mask broadcast to `shape` as bool, padding value)."""
    forms = ["full", "broadcast", "non-feature", "all-padding", "padded-feature"]
    form = draw(st.sampled_from((["none", "none"] if allow_none else []) + forms))
    if form == "none":
        return None, np.ones(shape, bool), 0.0
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    p = draw(st.sampled_from([0.3, 0.7, 0.95]))
    padding = draw(st.sampled_from(PADDING))
    reduce = [a for a in range(len(shape)) if a not in features]
    if form in ("non-feature", "broadcast"):
        if form == "non-feature":
            given = rng.random([shape[a] for a in reduce]) < p
        else:  # NumPy's broadcastable forms: axes of size 1, leading axes left out
            mshape = [1 if draw(st.booleans()) else s for s in shape]
            given = rng.random(mshape[draw(st.integers(0, len(shape) - 1)) :]) < p
        if ref.mask_is_ambiguous(given.shape, shape, features):
            return given, None, padding  # None: jbn must raise naming `mask`
        return given, ref.full_mask(given, shape, features) > 0, padding
    full = rng.random(shape) < p
    if form == "all-padding":
        full[...] = False
    if form == "padded-feature":
        index = tuple(0 if a in features else slice(None) for a in range(len(shape)))
        full[index] = False
    return full, full.copy(), padding


@st.composite
def data(draw, shape, features, dtype):
    """x of `shape` in float64 (rounded to `dtype` by the caller), per-feature location and
    scale drawn from the ranges the contract covers, clipped to what `dtype` can hold."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    real = np.finfo(np.dtype(dtype)).dtype if dtype != "complex64" else np.float32
    top = math.log10(float(np.finfo(real).max))
    # log10 of the std, then of |mean| / std: the ends of each range and |mean| / std = 1e4
    # (where a rounded mean costs a merge its accuracy) are drawn as often as the inside
    high = min(18.0, top - 2.5)
    std_exp = draw(st.one_of(st.sampled_from([-3.0, 0.0, high]), st.floats(-3, high)))
    ratio_exp = draw(st.one_of(st.sampled_from([-6.0, 0.0, 4.0, 7.0]), st.floats(-6, 25)))
    mean_exp = min(std_exp + ratio_exp, 22.0, top - 1.5)
    kind = draw(st.sampled_from(["normal", "normal", "outlier-first", "heavy-tailed", "constant-feature"]))
    fshape = [shape[a] for a in features]
    expand = lambda v: ref.expand(v, len(shape), features)  # noqa: E731
    loc = expand(rng.choice([-1, 1], fshape) * 10**mean_exp * rng.uniform(0.5, 2, fshape))
    scale = expand(10**std_exp * rng.uniform(0.5, 2, fshape))
    if kind == "heavy-tailed":
        z = np.clip(rng.standard_t(2, shape), -10, 10)
    else:
        z = rng.standard_normal(shape)
    if kind == "outlier-first":
        z.reshape(-1)[0] = 10.0
    x = loc + scale * z
    if kind == "constant-feature":
        index = tuple(0 if a in features else slice(None) for a in range(len(shape)))
        x[index] = loc[index]
    if dtype == "complex64":
        x = x + 1j * (0.5 * loc + scale * rng.standard_normal(shape))
    return x


def rounded(x, dtype):
    """x rounded to `dtype` (what jbn receives), back in float64 / complex128."""
    v = np.asarray(x).astype(DTYPES[dtype])
    return v, v.astype(np.complex128 if dtype == "complex64" else np.float64)


def compute_dtype(dtype):
    return np.float64 if dtype == "float64" else np.float32


def x64(dtype):
    """The x64 context a dtype needs (float64 inputs are float64 only under x64)."""
    return jax.enable_x64(dtype == "float64")


def flat_features(v, features, ndim):
    return ref.expand(v, ndim, features)


def reduced_count(shape, features):
    return int(np.prod([s for a, s in enumerate(shape) if a not in features]))


def hostile(x, full, padding, dtype):
    """x with `padding` where the mask is False, rounded to `dtype`."""
    with np.errstate(over="ignore", invalid="ignore"):
        return rounded(np.where(full, x, padding), dtype)


# ------------------------------------------------------------------------ 1. moments


@functools.cache
def jitted_moments(axis, has_mask):
    if has_mask:
        return jax.jit(lambda x, m: jbn.moments(x, axis=axis, mask=m))
    return jax.jit(lambda x: jbn.moments(x, axis=axis))


def check_statistics(stats, x64v, full, axis, features, dtype, what):
    """jbn's Moments against the reference's, with `Tolerance`; returns the reference."""
    mean_ref, var_ref, count_ref = ref.moments(np.where(full, x64v, 0), axis, full)
    tol = Tolerance(compute_dtype(dtype), compute_dtype(dtype), reduced_count(x64v.shape, features))
    assert_within(np.broadcast_to(stats.count, np.shape(stats.mean)), count_ref, 0, f"{what} count")
    assert_within(stats.mean, mean_ref, tol.mean(mean_ref, var_ref), f"{what} mean")
    fits = tol.representable(var_ref)
    assert_within(stats.var, var_ref, tol.var(mean_ref, var_ref), f"{what} var", where=fits)
    overflowed = np.asarray(stats.var, np.float64) >= float(np.finfo(tol.compute).max) / 2
    assert_within(overflowed, True, 0, f"{what} var of a variance beyond {tol.compute.__name__}", where=~fits)
    return mean_ref, var_ref, count_ref


@fuzz(300)
def test_moments_match_the_reference(draw):
    shape, axis, features = draw.draw(layouts())
    dtype = draw.draw(st.sampled_from(list(DTYPES)))
    given_mask, full, padding = draw.draw(masks(shape, features))
    compiled = draw.draw(st.booleans())
    note(
        f"shape={shape} axis={axis} dtype={dtype} compiled={compiled} mask={None if given_mask is None else given_mask.shape}"
    )
    with x64(dtype):
        if full is None:
            with pytest.raises(ValueError, match="`mask`"):
                jbn.moments(jnp.zeros(shape, DTYPES[dtype]), axis=axis, mask=jnp.asarray(given_mask))
            return
        x = draw.draw(data(shape, features, dtype))
        xd, xv = hostile(x, full, padding, dtype)
        args = (jnp.asarray(xd),) if given_mask is None else (jnp.asarray(xd), jnp.asarray(given_mask))
        if compiled:
            stats = jitted_moments(axis, given_mask is not None)(*args)
        else:
            stats = jbn.moments(*args[:1], axis=axis, mask=None if given_mask is None else args[1])
        check_statistics(stats, xv, full, axis, features, dtype, "moments")


# --------------------------------------------------------- 2. batch_norm, training


STATE_DTYPES = ["float32", "bfloat16", "float16"]
ACTIVATIONS = [None, "relu", "leaky_relu"]


@st.composite
def running_options(draw):
    momentum = draw(st.sampled_from([0.9, 0.99, 0.0, 1.0, None]))
    debias = momentum is not None and draw(st.booleans())
    return momentum, debias


def initial_running(rng, fshape, state_dtype, counted):
    mean = (rng.standard_normal(fshape) * 2).astype(DTYPES[state_dtype])
    var = rng.uniform(0.5, 3, fshape).astype(DTYPES[state_dtype])
    count = rng.integers(0, 5, fshape).astype(np.int32) if counted else None
    return mean, var, count


def check_running(new, old, batch_ref, x_dtype, state_dtype, momentum, debias, n, what):
    """new RunningStats against the reference update of `old` with the reference batch
    statistics (mean, var, count)."""
    mean_ref, var_ref, count_ref = batch_ref
    old_mean, old_var, old_count = (None if v is None else np.asarray(v).astype(np.float64) for v in old)
    tol = Tolerance(compute_dtype(x_dtype), compute_dtype(x_dtype), n)
    # A batch updates a feature when its statistics are finite. A variance beyond the dtype the
    # statistics are accumulated in overflows there (or lands within rounding of its largest
    # value): whether such a batch counted is not the contract's, only that it counted once or
    # not at all. Every other feature is judged exactly, as updated where it had valid elements.
    judged = np.asarray(var_ref) <= float(np.finfo(tol.compute).max) / 2
    ok = (count_ref > 0) & judged
    want_mean, want_var, want_count = ref.running_update(
        old_mean, old_var, old_count, mean_ref, var_ref, ok, momentum=momentum, debias=debias
    )
    if want_count is not None:
        assert_within(new.count, want_count, 0, f"{what} running count", where=judged)
        step = np.asarray(new.count, np.float64) - old_count
        assert_within(step, 0.5, 0.5, f"{what} running count of an overflowed batch (+0 or +1)", where=~judged)
    t = np.maximum(want_count, 1).astype(np.float64) if want_count is not None else None
    weight_new = 1 - ref.old_weight(momentum, t, debias) if t is not None else 1 - momentum
    limit = float(np.finfo(np.dtype(DTYPES[state_dtype])).max)
    for got, want, oldv, batch, stat_tol, name in (
        (new.mean, want_mean, old_mean, mean_ref, tol.mean(mean_ref, var_ref), "mean"),
        (new.var, want_var, old_var, var_ref, tol.var(mean_ref, var_ref), "var"),
    ):
        bound = tol.running(DTYPES[state_dtype], want, oldv, batch, np.where(ok, weight_new, 0), stat_tol)
        # judged where every value within the tolerance fits the state dtype (a float16 state
        # cannot hold a running variance that the float32 statistics may give within theirs)
        representable = (np.abs(want) + bound < limit / 2) & judged
        assert_within(got, want, bound, f"{what} running {name}", where=representable)


def check_output(y, xv, full, mean_ref, var_ref, scale, bias, features, epsilon, tol, activation, what, stats=True):
    nd = xv.ndim
    m, v = flat_features(mean_ref, features, nd), flat_features(var_ref, features, nd)
    s, b = flat_features(scale, features, nd), flat_features(bias, features, nd)
    x0 = np.where(full, xv, 0)
    y_ref = ref.normalize(x0, mean_ref, var_ref, scale, bias, tuple(features), epsilon)
    bound = tol.normalized(x0, m, v, y_ref, s, b, epsilon, stats=stats)
    y_ref = ref.activation(y_ref, activation)
    assert_within(y, y_ref, bound, f"{what} output", where=full & tol.representable(v))


@functools.cache
def jitted_batch_norm(**static):
    def f(x, scale, bias, running, mask):
        return jbn.batch_norm(x, scale, bias, running, mask=mask, **static)

    return jax.jit(f)


@functools.cache
def jitted_batch_norm_traced_momentum(**static):
    def f(x, scale, bias, running, mask, momentum):
        return jbn.batch_norm(x, scale, bias, running, mask=mask, momentum=momentum, **static)

    return jax.jit(f)


def run_batch_norm(compiled, x, scale, bias, running, mask, traced_momentum=False, **static):
    """batch_norm eagerly or under jit; `traced_momentum`: the momentum an argument of the
    jitted function (a traced value, as a schedule gives it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jbn.OneValuePerFeatureWarning)
        if traced_momentum:
            momentum = jnp.asarray(static.pop("momentum"), jnp.result_type(float))
            return jitted_batch_norm_traced_momentum(**static)(x, scale, bias, running, mask, momentum)
        if compiled:
            return jitted_batch_norm(**static)(x, scale, bias, running, mask)
        return jbn.batch_norm(x, scale, bias, running, mask=mask, **static)


@st.composite
def bn_case(draw, dtypes):
    shape, axis, features = draw(layouts())
    dtype = draw(st.sampled_from(dtypes))
    given_mask, full, padding = draw(masks(shape, features))
    if full is None:  # ambiguous masks are the bad-argument test's
        given_mask, full, padding = None, np.ones(shape, bool), 0.0
    x = draw(data(shape, features, dtype))
    return shape, axis, features, dtype, given_mask, full, padding, x


def parameters(rng, fshape, complex_input):
    scale = rng.uniform(0.5, 2, fshape) * rng.choice([-1, 1], fshape)
    bias = rng.standard_normal(fshape)
    return scale.astype(np.float32), bias.astype(np.float32)


@fuzz(250)
def test_batch_norm_training_matches_the_reference(draw):
    shape, axis, features, dtype, given_mask, full, padding, x = draw.draw(bn_case(list(DTYPES)))
    state_dtype = "float64" if dtype == "float64" else draw.draw(st.sampled_from(STATE_DTYPES))
    momentum, debias = draw.draw(running_options())
    activation = None if dtype == "complex64" else draw.draw(st.sampled_from(ACTIVATIONS))
    fused, compiled = draw.draw(st.booleans()), draw.draw(st.booleans())
    epsilon = draw.draw(st.sampled_from([1e-5, 1e-3]))
    traced = compiled and momentum is not None and draw.draw(st.booleans())
    if traced:  # a value from a schedule: an array in the default float dtype, the reference's momentum too
        momentum = float(np.asarray(momentum, np.float64 if dtype == "float64" else np.float32))
    note(f"shape={shape} axis={axis} dtype={dtype} state={state_dtype} momentum={momentum} debias={debias}")
    note(f"activation={activation} fused={fused} compiled={compiled} epsilon={epsilon} traced momentum={traced}")
    rng = np.random.default_rng(draw.draw(st.integers(0, 2**32 - 1)))
    fshape = tuple(shape[a] for a in features)
    scale, bias = parameters(rng, fshape, dtype == "complex64")
    counted = momentum is None or debias
    old = initial_running(rng, fshape, state_dtype, counted)
    with x64(dtype):
        xd, xv = hostile(x, full, padding, dtype)
        running = jbn.RunningStats(*(None if v is None else jnp.asarray(v) for v in old))
        mask = None if given_mask is None else jnp.asarray(given_mask)
        static = dict(training=True, axis=axis, momentum=momentum, debias=debias, epsilon=epsilon)
        static.update(activation=activation, fused=fused)
        y, new = run_batch_norm(
            compiled, jnp.asarray(xd), jnp.asarray(scale), jnp.asarray(bias), running, mask, traced, **static
        )
    n = reduced_count(shape, features)
    mean_ref, var_ref, count_ref = ref.moments(np.where(full, xv, 0), axis, full)
    tol = Tolerance(compute_dtype(dtype), np.dtype(y.dtype), n)
    check_output(y, xv, full, mean_ref, var_ref, scale, bias, features, epsilon, tol, activation, "training")
    check_running(new, old, (mean_ref, var_ref, count_ref), dtype, state_dtype, momentum, debias, n, "training")


# ------------------------------------------------------- 3. evaluation and batch renorm


@fuzz(100)
def test_evaluation_matches_the_reference(draw):
    shape, axis, features, dtype, given_mask, full, padding, x = draw.draw(bn_case(["float32", "bfloat16", "float64"]))
    renorm, compiled = draw.draw(st.booleans()), draw.draw(st.booleans())
    activation = None if renorm else draw.draw(st.sampled_from(ACTIVATIONS))
    note(f"shape={shape} axis={axis} dtype={dtype} renorm={renorm} compiled={compiled} activation={activation}")
    rng = np.random.default_rng(3)
    fshape = tuple(shape[a] for a in features)
    scale, bias = parameters(rng, fshape, False)
    x0 = np.where(full, x, 0)
    # running statistics near the data's (frozen statistics of the same distribution)
    mean_ref, var_ref, _ = ref.moments(x0, axis, full)
    rm = (mean_ref * (1 + 0.01 * rng.standard_normal(fshape))).astype(np.float32)
    rv = np.maximum(var_ref, 1e-6).astype(np.float32)
    with x64(dtype):
        xd, xv = hostile(x, full, padding, dtype)
        mask = None if given_mask is None else jnp.asarray(given_mask)
        running = jbn.RunningStats(jnp.asarray(rm), jnp.asarray(rv))
        args = (jnp.asarray(xd), jnp.asarray(scale), jnp.asarray(bias), running, mask)
        if renorm:
            f = functools.partial(jbn.batch_renorm, training=False, axis=axis)
            y, new = (jax.jit(f) if compiled else f)(*args[:4], mask=mask)
        else:
            y, new = run_batch_norm(compiled, *args, training=False, axis=axis, activation=activation)
    rmv, rvv = rm.astype(np.float64), rv.astype(np.float64)
    tol = Tolerance(compute_dtype(dtype), np.dtype(y.dtype), reduced_count(shape, features))
    check_output(y, xv, full, rmv, rvv, scale, bias, features, 1e-5, tol, activation, "evaluation", stats=False)
    np.testing.assert_array_equal(new.mean, rm)
    np.testing.assert_array_equal(new.var, rv)


@fuzz(100)
def test_batch_renorm_training_matches_the_reference(draw):
    shape, axis, features, dtype, given_mask, full, padding, x = draw.draw(
        bn_case(["float32", "bfloat16", "float16", "float64"])
    )
    momentum, debias = draw.draw(running_options())
    r_max, d_max = draw.draw(st.sampled_from([(1.0, 0.0), (1.5, 0.5), (3.0, 5.0)]))
    compiled = draw.draw(st.booleans())
    note(f"shape={shape} axis={axis} dtype={dtype} momentum={momentum} debias={debias} r_max={r_max} d_max={d_max}")
    rng = np.random.default_rng(5)
    fshape = tuple(shape[a] for a in features)
    scale, bias = parameters(rng, fshape, False)
    state_dtype = "float64" if dtype == "float64" else "float32"
    counted = momentum is None or debias
    mean_ref, var_ref, count_ref = ref.moments(np.where(full, x, 0), axis, full)
    # running statistics within a few batch standard deviations: r and d clip on some features
    old_mean = (mean_ref + np.sqrt(var_ref) * rng.normal(0, 1, fshape)).astype(DTYPES[state_dtype])
    old_var = (var_ref * rng.uniform(0.3, 3, fshape) + 1e-3).astype(DTYPES[state_dtype])
    old = (old_mean, old_var, rng.integers(0, 5, fshape).astype(np.int32) if counted else None)
    with x64(dtype):
        xd, xv = hostile(x, full, padding, dtype)
        mask = None if given_mask is None else jnp.asarray(given_mask)
        running = jbn.RunningStats(*(None if v is None else jnp.asarray(v) for v in old))

        def f(x, scale, bias, running, mask):
            return jbn.batch_renorm(
                x,
                scale,
                bias,
                running,
                training=True,
                axis=axis,
                mask=mask,
                momentum=momentum,
                debias=debias,
                r_max=r_max,
                d_max=d_max,
            )

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", jbn.OneValuePerFeatureWarning)
            y, new = (jax.jit(f) if compiled else f)(
                jnp.asarray(xd), jnp.asarray(scale), jnp.asarray(bias), running, mask
            )
    mean_ref, var_ref, count_ref = ref.moments(np.where(full, xv, 0), axis, full)
    n = reduced_count(shape, features)
    tol = Tolerance(compute_dtype(dtype), np.dtype(y.dtype), n)
    # Ioffe (2017): y = scale (x_hat r + d) + bias, r = clip(sigma_B / sigma, 1/r_max, r_max),
    # d = clip((mu_B - mu) / sigma, -d_max, d_max), sigma = sqrt(running var + epsilon)
    om, ov = old_mean.astype(np.float64), old_var.astype(np.float64)
    sigma_b, sigma = np.sqrt(var_ref + 1e-5), np.sqrt(ov + 1e-5)
    r = np.clip(sigma_b / sigma, 1 / r_max, r_max)
    d = np.clip((mean_ref - om) / sigma, -d_max, d_max)
    nd = len(shape)
    # the output is batch norm's with scale r and bias scale d + bias: the same tolerance,
    # plus d's error (the mean's error over sigma, times |scale|)
    y_ref_scale, y_ref_bias = scale * r, scale * d + bias
    x0 = np.where(full, xv, 0)
    y_ref = ref.normalize(x0, mean_ref, var_ref, y_ref_scale, y_ref_bias, tuple(features), 1e-5)
    m, v = flat_features(mean_ref, features, nd), flat_features(var_ref, features, nd)
    bound = tol.normalized(
        x0, m, v, y_ref, flat_features(y_ref_scale, features, nd), flat_features(y_ref_bias, features, nd), 1e-5
    )
    xhat = np.abs(x0 - m) / np.sqrt(v + 1e-5)
    d_err = tol.mean(mean_ref, var_ref) / sigma + tol.var(mean_ref, var_ref) / (2 * sigma_b * sigma)
    bound = bound + flat_features(np.abs(scale) * d_err, features, nd) * (1 + xhat)
    assert_within(y, y_ref, bound, "renorm output", where=full & tol.representable(v))
    check_running(new, old, (mean_ref, var_ref, count_ref), dtype, state_dtype, momentum, debias, n, "renorm")


# ------------------------------------------------------------------ 4. ghost batches


@fuzz(80)
def test_ghost_batches_match_the_reference(draw):
    rank = draw.draw(st.integers(2, 4))
    shape = draw.draw(st.sampled_from([(8, 3), (12, 2), (8, 2, 3), (6, 2, 2, 2)][rank - 2 : rank]))
    rank = len(shape)
    features = (rank - 1,)
    axis = draw.draw(st.sampled_from([-1, rank - 1]))
    size = draw.draw(st.sampled_from([s for s in (1, 2, 3, 4, 6) if shape[0] % s == 0]))
    dtype = draw.draw(st.sampled_from(["float32", "bfloat16"]))
    given_mask, full, padding = draw.draw(masks(shape, features))
    if full is None:
        given_mask, full, padding = None, np.ones(shape, bool), 0.0
    x = draw.draw(data(shape, features, dtype))
    unbiased, fused, compiled = (draw.draw(st.booleans()) for _ in range(3))
    note(f"shape={shape} size={size} dtype={dtype} unbiased={unbiased} fused={fused} compiled={compiled}")
    rng = np.random.default_rng(7)
    fshape = (shape[-1],)
    scale, bias = parameters(rng, fshape, False)
    old = initial_running(rng, fshape, "float32", False)
    xd, xv = hostile(x, full, padding, dtype)
    mask = None if given_mask is None else jnp.asarray(given_mask)
    static = dict(training=True, axis=axis, momentum=0.9, virtual_batch_size=size, unbiased_running_var=unbiased)
    running = jbn.RunningStats(jnp.asarray(old[0]), jnp.asarray(old[1]))
    y, new = run_batch_norm(
        compiled, jnp.asarray(xd), jnp.asarray(scale), jnp.asarray(bias), running, mask, fused=fused, **static
    )
    # Hoffer et al. (2017): sub-batch g = rows [g size, (g+1) size) of the leading axis, each
    # normalized with its own statistics; the running update uses the mean over the
    # sub-batches with a defined variance of their means and (unbiased: Bessel-corrected) variances.
    tol = Tolerance(np.float32, np.dtype(y.dtype), reduced_count(shape, features) // (shape[0] // size))
    for g in range(shape[0] // size):
        rows = slice(g * size, (g + 1) * size)
        xs, fs = xv[rows], full[rows]
        mean_ref, var_ref, _ = ref.moments(np.where(fs, xs, 0), -1, fs)
        check_output(y[rows], xs, fs, mean_ref, var_ref, scale, bias, features, 1e-5, tol, None, f"ghost {g}")
    check_ghost_running(new, old, xv[None], full[None], size, unbiased, tol, "ghost")


def check_ghost_running(new, old, xv, full, size, unbiased, tol, what):
    """new RunningStats (float32) against the reference update of `old` by the ghost batches
    of `xv` (participants, n, ..., C), momentum 0.9."""
    (_, variances, _), (mean_b, var_b, ok) = ref.ghost_statistics(xv, full, size, unbiased=unbiased)
    want_mean, want_var, _ = ref.running_update(
        old[0].astype(np.float64), old[1].astype(np.float64), None, mean_b, var_b, ok, momentum=0.9
    )
    stat_mean, stat_var = tol.mean(mean_b, var_b), tol.var(mean_b, var_b) * (2 if unbiased else 1)
    bound_mean = tol.running(np.float32, want_mean, old[0], mean_b, 0.1, stat_mean)
    # as in check_running: nothing computed from a variance beyond float32 is judged
    fits = tol.representable(np.max(variances, 0))
    assert_within(new.mean, want_mean, bound_mean, f"{what} running mean", where=fits)
    bound_var = tol.running(np.float32, want_var, old[1], var_b, 0.1, stat_var)
    assert_within(new.var, want_var, bound_var, f"{what} running var", where=fits)


# -------------------------------------------------------- 5. synchronized statistics

SYNC_PARTICIPANTS = 4
SYNC_SHAPES = [(6, 3), (12, 2), (4, 2, 3)]


@functools.cache
def synchronized_call(transform, kind, groups=None, virtual_batch_size=None):
    """f(x, mask, scale, bias, mean, var) over x of shape (participants, n, ..., C): the
    per-participant results (participants, ...) of moments or a training batch_norm (ghost
    batches of `virtual_batch_size` rows per participant, if given), the statistics shared
    within each of `groups` (tuples of participant indices; None: all)."""
    sync = {} if groups is None else {"axis_index_groups": [list(g) for g in groups]}
    if virtual_batch_size is not None:
        sync["virtual_batch_size"] = virtual_batch_size

    def local(x, mask, scale, bias, mean, var, axis_name="p"):
        if kind == "moments":
            return jbn.moments(x, mask=mask, axis_name=axis_name, **sync)
        return jbn.batch_norm(
            x,
            scale,
            bias,
            jbn.RunningStats(mean, var),
            training=True,
            mask=mask,
            momentum=0.9,
            axis_name=axis_name,
            **sync,
        )

    devices = jax.devices()[:SYNC_PARTICIPANTS]
    if transform in ("vmap", "jit-vmap"):
        f = jax.vmap(local, in_axes=(0, 0, None, None, None, None), axis_name="p")
        return jax.jit(f) if transform == "jit-vmap" else f
    if transform == "pmap":
        return jax.pmap(local, axis_name="p", in_axes=(0, 0, None, None, None, None), devices=devices)
    if transform == "shard_map":
        mesh = Mesh(np.array(devices), ("p",))

        def body(x, mask, *rest):
            out = local(x[0], mask[0], *rest)
            return jax.tree.map(lambda v: v[None], out)

        spec = (P("p"), P("p"), P(), P(), P(), P())
        return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=P("p")))
    # sharded jit: the global batch (participants * n, ...) split over an Explicit mesh axis
    mesh = jax.make_mesh((SYNC_PARTICIPANTS,), ("p",), axis_types=(AxisType.Explicit,), devices=devices)

    def global_call(x, mask, scale, bias, mean, var):
        out = local(x, mask, scale, bias, mean, var, axis_name=None)
        return jax.tree.map(lambda v: jnp.broadcast_to(v, (SYNC_PARTICIPANTS,) + v.shape), out)

    jitted = jax.jit(global_call)

    def f(x, mask, *rest):
        def flat(a):
            return jax.device_put(a.reshape((-1,) + a.shape[2:]), NamedSharding(mesh, P("p")))

        out = jitted(flat(x), flat(mask), *rest)  # the inputs' sharding names the mesh
        if kind == "moments":
            return out
        y, new = out
        return y[0].reshape(x.shape), new

    return f


@fuzz(120)
def test_synchronized_statistics_match_the_reference(draw):
    transform = draw.draw(st.sampled_from(["vmap", "jit-vmap", "pmap", "shard_map", "sharded-jit"]))
    kind = draw.draw(st.sampled_from(["moments", "batch_norm"]))
    shape = draw.draw(st.sampled_from(SYNC_SHAPES))
    # ghost batches across participants: sub-batch g is rows g of every participant (named axes)
    ghost = None
    if kind == "batch_norm" and transform != "sharded-jit" and draw.draw(st.booleans()):
        ghost = draw.draw(st.sampled_from([s for s in (1, 2, 3, 4, 6) if s < shape[0] and shape[0] % s == 0]))
    features = (len(shape),)
    gshape = (SYNC_PARTICIPANTS,) + shape
    x = draw.draw(data(gshape, features, "float32"))
    rng = np.random.default_rng(draw.draw(st.integers(0, 2**32 - 1)))
    p = draw.draw(st.sampled_from([0.5, 0.9, 1.0]))
    full = rng.random(gshape[:-1] + (1,)) < p
    if draw.draw(st.booleans()):
        full[draw.draw(st.integers(0, SYNC_PARTICIPANTS - 1))] = False  # a participant holds only padding
    full = np.broadcast_to(full, gshape)
    padding = draw.draw(st.sampled_from(PADDING))
    # axis_index_groups: pairs of participants share statistics (the collectives of vmap and pmap)
    groups = None
    if transform in ("vmap", "jit-vmap", "pmap"):
        groups = draw.draw(st.sampled_from([None, ((0, 1), (2, 3)), ((0, 2), (1, 3)), ((0, 3), (1, 2))]))
    note(f"transform={transform} kind={kind} shape={shape} p={p} groups={groups} virtual_batch_size={ghost}")
    xd, xv = hostile(x, full, padding, "float32")
    C = shape[-1]
    scale, bias = parameters(rng, (C,), False)
    old = initial_running(rng, (C,), "float32", False)
    f = synchronized_call(transform, kind, groups, ghost)
    out = f(jnp.asarray(xd), jnp.asarray(full), jnp.asarray(scale), jnp.asarray(bias), *map(jnp.asarray, old[:2]))
    for group in groups or (tuple(range(SYNC_PARTICIPANTS)),):
        flat_x, flat_full = xv[list(group)].reshape(-1, C), full[list(group)].reshape(-1, C)
        n = flat_x.shape[0]
        if kind == "moments":
            for q in group:
                stats = jbn.Moments(out.mean[q], out.var[q], np.broadcast_to(out.count, out.mean.shape)[q])
                check_statistics(stats, flat_x, flat_full, -1, (1,), "float32", f"participant {q}")
            continue
        y, new = out
        if ghost is not None:
            xg, fg, yg = xv[list(group)], full[list(group)], np.asarray(y)[list(group)]
            tol = Tolerance(
                np.float32, np.float32, len(group) * reduced_count(shape, (len(shape) - 1,)) // (shape[0] // ghost)
            )
            for g in range(shape[0] // ghost):
                rows = slice(g * ghost, (g + 1) * ghost)
                xs, fs = xg[:, rows].reshape(-1, C), fg[:, rows].reshape(-1, C)
                mean_ref, var_ref, _ = ref.moments(np.where(fs, xs, 0), -1, fs)
                ys = yg[:, rows].reshape(-1, C)
                check_output(
                    ys, xs, fs, mean_ref, var_ref, scale, bias, (1,), 1e-5, tol, None, f"synchronized ghost {g}"
                )
            for q in group:
                got = jbn.RunningStats(new.mean[q], new.var[q])
                check_ghost_running(got, old, xg, fg, ghost, False, tol, f"participant {q} ghost")
            continue
        mean_ref, var_ref, count_ref = ref.moments(np.where(flat_full, flat_x, 0), -1, flat_full)
        tol = Tolerance(np.float32, np.float32, n)
        y_flat = np.asarray(y)[list(group)].reshape(-1, C)
        check_output(y_flat, flat_x, flat_full, mean_ref, var_ref, scale, bias, (1,), 1e-5, tol, None, "synchronized")
        for q in group:
            got = jbn.RunningStats(new.mean[q], new.var[q])
            batch = (mean_ref, var_ref, count_ref)
            check_running(got, old, batch, "float32", "float32", 0.9, False, n, f"participant {q}")


# ------------------------------------------------------------------------ 6. gradients


@functools.cache
def gradient_of(path, axis, activation, has_mask):
    """grad of sum(where(valid, y, 0) * cot) w.r.t. (x, scale, bias), jitted once."""

    def loss(x, scale, bias, mean, var, mask, full, cot):
        running = jbn.RunningStats(mean, var)
        options = dict(axis=axis, mask=mask if has_mask else None)
        if path == "renorm":
            y, _ = jbn.batch_renorm(x, scale, bias, running, training=True, r_max=1.0, d_max=0.0, **options)
        elif path == "evaluation":
            y, _ = jbn.batch_norm(x, scale, bias, running, training=False, activation=activation, **options)
        else:
            fused, saved = path.startswith("fused"), path == "fused-save-output-only"
            y, _ = jbn.batch_norm(
                x,
                scale,
                bias,
                running,
                training=True,
                fused=fused,
                activation=activation,
                save_output_only=saved,
                **options,
            )
        return jnp.sum(jnp.where(full, y, 0) * cot)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    def quiet(*args):  # one value per feature is a drawn case: its warning is expected
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", jbn.OneValuePerFeatureWarning)
            return grad(*args)

    return quiet


@fuzz(100)
def test_gradients_match_the_reference(draw):
    shape, axis, features = draw.draw(layouts(min_rank=2))
    path = draw.draw(st.sampled_from(["fused", "fused-save-output-only", "unfused", "renorm", "evaluation"]))
    # save_output_only recovers the normalized input from the output: an invertible activation
    invertible = [None, "leaky_relu"]
    activation = (
        None
        if path == "renorm"
        else draw.draw(st.sampled_from(ACTIVATIONS if path != "fused-save-output-only" else invertible))
    )
    dtype = draw.draw(st.sampled_from(["float32", "float64"]))
    given_mask, full, padding = draw.draw(masks(shape, features))
    if full is None:
        given_mask, full, padding = None, np.ones(shape, bool), 0.0
    rng = np.random.default_rng(draw.draw(st.integers(0, 2**32 - 1)))
    nd = len(shape)
    fshape = tuple(shape[a] for a in features)
    # moderate data (|mean| <= 10, unit noise): gradients, not extreme statistics, are under test here
    x = flat_features(rng.uniform(-10, 10, fshape), features, nd) + rng.standard_normal(shape)
    scale, bias = parameters(rng, fshape, False)
    cot = rng.standard_normal(shape)
    # the running state's dtype: a narrow one takes a one-ulp step in training, with no derivative
    state = DTYPES[draw.draw(st.sampled_from(STATE_DTYPES))]
    mean0, var0 = rng.standard_normal(fshape).astype(state), rng.uniform(0.5, 2, fshape).astype(state)
    note(f"shape={shape} axis={axis} path={path} activation={activation} dtype={dtype} state={state.__name__}")
    with x64(dtype):
        xd, xv = hostile(x, full, padding, dtype)
        f = gradient_of(path, axis, activation, given_mask is not None)
        mask = jnp.asarray(full if given_mask is None else given_mask)
        dx, dscale, dbias = f(
            jnp.asarray(xd),
            jnp.asarray(scale),
            jnp.asarray(bias),
            mean0,
            var0,
            mask,
            jnp.asarray(full),
            cot.astype(xd.dtype),
        )
    x0 = np.where(full, xv, 0)
    training = path != "evaluation"
    if training:
        mean_ref, var_ref, _ = ref.moments(x0, axis, full)
    else:
        mean_ref, var_ref = mean0.astype(np.float64), var0.astype(np.float64)
    z = ref.normalize(x0, mean_ref, var_ref, scale, bias, tuple(features))
    # the activation's derivative (at and near its kink either slope is allowed: see below)
    slope = {None: 1.0, "relu": 0.0, "leaky_relu": 0.01}[activation]
    g = np.where(full, cot, 0) * np.where(z >= 0, 1.0, slope)
    inv = 1 / np.sqrt(flat_features(var_ref, features, nd) + 1e-5)
    x_hat = (x0 - flat_features(mean_ref, features, nd)) * inv
    reduce = tuple(a for a in range(nd) if a not in features)
    if training:
        dx_ref, dscale_ref, dbias_ref = ref.batch_norm_grads(x0, scale, g, axis=tuple(features), mask=full)
    else:
        dx_ref = g * flat_features(scale, features, nd) * inv
        dscale_ref, dbias_ref = (g * x_hat).sum(reduce), g.sum(reduce)
    tol = Tolerance(compute_dtype(dtype), compute_dtype(dtype), reduced_count(shape, features))
    # sizes of the sums (for their roundings) plus the error of x_hat they carry
    m, v = flat_features(mean_ref, features, nd), flat_features(var_ref, features, nd)
    x_hat_err = np.where(full, tol.x_hat(x0, m, v, 1e-5, stats=training), 0)
    count = np.maximum(full.sum(reduce), 1)
    size_g = flat_features(np.abs(g).sum(reduce) / count, features, nd)
    size_gx = flat_features((np.abs(g) * x_hat_err).sum(reduce) / count, features, nd)
    dx_size = np.abs(flat_features(scale, features, nd)) * inv * (np.abs(g) + 2 * size_g * (1 + x_hat**2))
    dx_size = dx_size + np.abs(flat_features(scale, features, nd)) * inv * (
        size_g * x_hat_err + np.abs(x_hat) * size_gx
    )
    # Near the activation's kink the computed pre-activation may fall on either side of 0 (within
    # its own error): there either slope is right, so each such element may change the cotangent
    # reaching the normalization by its own times the difference of the slopes.
    s_f = np.abs(flat_features(scale, features, nd))
    z_err = s_f * x_hat_err + 4 * eps(tol.compute) * (np.abs(z) + np.abs(flat_features(bias, features, nd)))
    at_kink = full & (np.abs(z) <= z_err) if activation is not None else np.zeros(shape, bool)
    g_unc = np.where(at_kink, np.abs(cot) * (1 - slope), 0)
    dx_unc = s_f * inv * g_unc
    if training:  # dx_i = scale inv (g_i - mean(g) - x_hat_i mean(g x_hat)): the means move too
        dx_unc = dx_unc + s_f * inv * (
            flat_features(g_unc.sum(reduce) / count, features, nd)
            + np.abs(x_hat) * flat_features((g_unc * np.abs(x_hat)).sum(reduce) / count, features, nd)
        )
    assert_within(dx, dx_ref, tol.grad(dx_size, dx_ref, dx.dtype) + dx_unc, f"{path} dx", where=full)
    dscale_tol = tol.grad(np.abs(g * x_hat).sum(reduce), dscale_ref, dscale.dtype) + (np.abs(g) * x_hat_err).sum(reduce)
    dscale_tol = dscale_tol + (g_unc * np.abs(x_hat)).sum(reduce)
    assert_within(dscale, dscale_ref, dscale_tol, f"{path} dscale")
    dbias_tol = tol.grad(np.abs(g).sum(reduce), dbias_ref, dbias.dtype) + g_unc.sum(reduce)
    assert_within(dbias, dbias_ref, dbias_tol, f"{path} dbias")


# --------------------------------------------------------------------- 7. bad arguments


BAD_ARGUMENTS = [
    "axis",
    "momentum",
    "epsilon",
    "scale",
    "bias",
    "x",
    "mask",
    "running",
    "virtual_batch_size",
    "r_max",
    "d_max",
]


@fuzz(100)
def test_bad_arguments_raise_naming_the_argument(draw):
    shape, axis, features = draw.draw(layouts(min_rank=2))
    bad = draw.draw(st.sampled_from(BAD_ARGUMENTS))
    if bad in ("axis", "x", "mask"):
        entry = draw.draw(st.sampled_from(["batch_norm", "batch_renorm", "moments"]))
    elif bad in ("r_max", "d_max"):
        entry = "batch_renorm"
    elif bad == "virtual_batch_size":
        entry = "batch_norm"
    else:
        entry = draw.draw(st.sampled_from(["batch_norm", "batch_renorm"]))
    training = draw.draw(st.booleans())
    fshape = tuple(shape[a] for a in features)
    x = jnp.ones(shape, jnp.float32)
    scale, bias = jnp.ones(fshape), jnp.zeros(fshape)
    running = jbn.RunningStats(jnp.zeros(fshape), jnp.ones(fshape))
    kwargs: dict = dict(axis=axis)
    rank = len(shape)
    if bad == "axis":
        kwargs["axis"] = draw.draw(st.sampled_from([rank, -rank - 1, rank + 3]))
    elif bad == "momentum":
        kwargs["momentum"] = draw.draw(st.sampled_from([-0.1, 1.5, float("nan")]))
    elif bad == "epsilon":
        kwargs["epsilon"] = draw.draw(st.sampled_from([0.0, -1e-5, float("nan"), float("inf")]))
    elif bad in ("scale", "bias"):
        wrong = jnp.ones(fshape + (2,)) if draw.draw(st.booleans()) else jnp.ones((sum(fshape) + 1,))
        scale, bias = (wrong, bias) if bad == "scale" else (scale, wrong)
    elif bad == "x":
        x = jnp.ones(shape, draw.draw(st.sampled_from([jnp.int32, jnp.bool_])))
    elif bad == "mask":
        kwargs["mask"] = jnp.ones(tuple(s + 1 for s in shape), bool)
    elif bad == "running":
        running = draw.draw(
            st.sampled_from(
                [
                    jbn.RunningStats(jnp.zeros(fshape + (3,)), jnp.ones(fshape + (3,))),
                    (jnp.zeros(fshape), jnp.ones(fshape)),
                    jbn.RunningStats(jnp.zeros(fshape, jnp.int32), jnp.ones(fshape)),
                ]
            )
        )
    elif bad == "virtual_batch_size":
        kwargs["virtual_batch_size"] = draw.draw(st.sampled_from([0, -2, shape[0] + 1]))
        training = True
        if 0 in features:
            kwargs["virtual_batch_size"] = 1  # the leading axis is a feature axis: any size is refused
    else:
        values = [0.5, -1.0, float("nan")] if bad == "r_max" else [-0.5, float("nan")]
        kwargs[bad] = draw.draw(st.sampled_from(values))
    note(f"entry={entry} bad={bad} shape={shape} axis={axis} training={training} kwargs={kwargs}")
    if entry == "moments":
        call = lambda: jbn.moments(x, **kwargs)  # noqa: E731
    elif entry == "batch_norm":
        call = lambda: jbn.batch_norm(x, scale, bias, running, training=training, **kwargs)  # noqa: E731
    else:
        call = lambda: jbn.batch_renorm(x, scale, bias, running, training=training, **kwargs)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jbn.OneValuePerFeatureWarning)
        with pytest.raises((ValueError, TypeError), match=f"`{bad}[`.=]"):
            call()


# ------------------------------------------- 8. the judging rules, on the cases that set them


def test_a_variance_beyond_float32_must_overflow_and_nothing_from_it_is_judged():
    """bfloat16 data one ulp (7.4e19) apart near 1e22: the float64 variance, 4.2e38, is
    beyond float32, the dtype of the statistics (found by the long profile, in moments and
    ghost batches). `check_statistics` asks for an overflow there, and rejects a small one."""
    x = np.array([1.0256390e22] + [1.0182603e22] * 11).reshape(12, 1)
    xd, xv = rounded(x, "bfloat16")
    full = np.ones(xv.shape, bool)
    assert ref.moments(xv)[1][0] > float(np.finfo(np.float32).max)
    for f in (jbn.moments, jax.jit(jbn.moments)):
        stats = f(jnp.asarray(xd))
        check_statistics(stats, xv, full, -1, (1,), "bfloat16", "moments")
        with pytest.raises(AssertionError, match="beyond float32"):
            check_statistics(stats._replace(var=jnp.ones(1)), xv, full, -1, (1,), "bfloat16", "moments")
    running = jbn.RunningStats(jnp.zeros(1), jnp.ones(1))
    y, _ = run_batch_norm(False, jnp.asarray(xd), jnp.ones(1), jnp.zeros(1), running, None, training=True)
    assert not np.isnan(np.asarray(y, np.float32)).any()


def test_the_count_of_a_batch_whose_variance_overflows_is_judged_as_once_or_not_at_all():
    """batch_renorm (and batch_norm) with a counted running average, bfloat16 data near 1e22
    in one feature: its float64 variance is beyond float32, so its statistics overflow and
    the batch may not count there (found by the long profile: a running count the reference
    had advanced). The other feature counts exactly once; a count that jumps is caught."""
    rng = np.random.default_rng(0)
    x = np.stack([1.0e22 + rng.normal(0, 5e20, 12), rng.normal(0, 1, 12)], axis=1)
    xd, xv = rounded(x, "bfloat16")
    batch = ref.moments(xv)
    assert batch[1][0] > float(np.finfo(np.float32).max) and batch[1][1] < 10
    old = (np.zeros(2, np.float32), np.ones(2, np.float32), np.array([0, 3], np.int32))
    running = jbn.RunningStats(*(jnp.asarray(v) for v in old))
    for call in (jbn.batch_norm, jbn.batch_renorm):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", jbn.OneValuePerFeatureWarning)
            _, new = call(jnp.asarray(xd), jnp.ones(2), jnp.zeros(2), running, training=True, momentum=0.9, debias=True)
        check_running(new, old, batch, "bfloat16", "float32", 0.9, True, 12, call.__name__)
        assert int(new.count[1]) == 4
        with pytest.raises(AssertionError, match="overflowed batch"):
            check_running(
                new._replace(count=new.count.at[0].add(2)), old, batch, "bfloat16", "float32", 0.9, True, 12, ""
            )


def test_a_running_state_is_judged_where_its_dtype_holds_the_tolerance():
    """A constant complex feature near 8e21: float32 statistics give it a variance within
    their tolerance (an ulp of the mean squared, up to 4e30), which a float16 running state
    cannot hold (found by the long profile). The state is judged where the whole tolerance
    fits its dtype: not in float16 here, in float32 (where a wrong variance is caught)."""
    x = np.full((8, 1), 7.76722598e21 + 3.88361299e21j)
    xd, xv = rounded(x, "complex64")
    for state in ("float16", "float32"):
        old = (np.array([1.0], DTYPES[state]), np.array([2.5], DTYPES[state]), None)
        running = jbn.RunningStats(jnp.asarray(old[0]), jnp.asarray(old[1]))
        _, new = run_batch_norm(
            True, jnp.asarray(xd), jnp.ones(1), jnp.zeros(1), running, None, training=True, momentum=0.9
        )
        check_running(new, old, ref.moments(xv), "complex64", state, 0.9, False, 8, f"{state} state")
    with pytest.raises(AssertionError, match="running var"):
        check_running(new._replace(var=new.var + 1e31), old, ref.moments(xv), "complex64", "float32", 0.9, False, 8, "")
