"""Numerical edge cases never give wrong numbers: property tests over the classes of input
where batch norm's arithmetic is fragile, on every training path.

Paths: `batch_norm` (fused and fused=False), `batch_renorm`, linen `BatchNorm`/`BatchRenorm`
and NNX `BatchNorm`/`BatchRenorm`; each on one device and synchronized over `axis_name`
(vmap binds it: the cheap way), plus one shard_map case on the 8 fake devices.
Classes: padding contents (NaN, inf, huge), ghost sub-batches with 0 or 1 valid element,
low-precision running statistics, the order of elements and outliers, extremes of scale,
counters near int32's limit. Every number is checked against a float64 NumPy reference
(tests/reference.py), never against jbn itself.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jbn
from tests import reference as ref

C = 3
EPS = 1e-5
R_MAX, D_MAX = 1.5, 0.5  # renorm limits that clip on the data below (r and d are not trivially 1 and 0)
INT32_MAX = 2**31 - 1
PATHS = ("bn-fused", "bn-unfused", "renorm", "linen-bn", "linen-renorm", "nnx-bn", "nnx-renorm")
BN_PATHS = ("bn-fused", "bn-unfused", "linen-bn", "nnx-bn")  # those with virtual_batch_size
PARALLEL = pytest.mark.parametrize("parallel", [False, True], ids=["one-device", "axis_name"])


def prop(n):
    """Deterministic (CI runs the same examples every time), bounded, no deadline."""
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        phases=(Phase.explicit, Phase.generate),  # no shrinking: a failure reports its first example
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors],
    )


# ------------------------------------------------------------------------- the paths


def renorm_kind(path):
    return path in ("renorm", "linen-renorm", "nnx-renorm")


def initial_state(path, mean, var, count=None, step=None):
    """The running state a path carries, as the dict the linen modules keep in batch_stats."""
    state = {"mean": jnp.asarray(mean), "var": jnp.asarray(var)}
    if count is not None:
        state["count"] = jnp.asarray(count, jnp.int32)
    if path in ("linen-renorm", "nnx-renorm"):
        state["step"] = jnp.asarray(0 if step is None else step, jnp.int32)
    return state


def train(path, x, scale, bias, state, mask, *, axis_name=None, momentum=0.9, **options):
    """One training call on `path`; returns (y, the state after the call)."""
    running = jbn.RunningStats(state["mean"], state["var"], state.get("count"))
    if path in ("bn-fused", "bn-unfused", "renorm"):
        if path == "renorm":
            y, new = jbn.batch_renorm(
                x,
                scale,
                bias,
                running,
                training=True,
                r_max=R_MAX,
                d_max=D_MAX,
                momentum=momentum,
                mask=mask,
                axis_name=axis_name,
                **options,
            )
        else:
            y, new = jbn.batch_norm(
                x,
                scale,
                bias,
                running,
                training=True,
                momentum=momentum,
                mask=mask,
                axis_name=axis_name,
                fused=path == "bn-fused",
                **options,
            )
        out = {"mean": new.mean, "var": new.var}
        if new.count is not None:
            out["count"] = new.count
        return y, out
    if path.startswith("linen"):
        if path == "linen-bn":
            model = jbn.BatchNorm(use_running_average=False, momentum=momentum, axis_name=axis_name, **options)
        else:
            model = jbn.BatchRenorm(
                use_running_average=False, momentum=momentum, axis_name=axis_name, r_max=R_MAX, d_max=D_MAX, **options
            )
        variables = {"params": {"scale": scale, "bias": bias}, "batch_stats": state}
        y, updates = model.apply(variables, x, mask=mask, mutable=["batch_stats"])
        return y, dict(updates["batch_stats"])
    if path == "nnx-bn":
        model = jbn.nnx.BatchNorm(x.shape[-1], momentum=momentum, axis_name=axis_name, rngs=nnx.Rngs(0), **options)
    else:
        model = jbn.nnx.BatchRenorm(
            x.shape[-1], momentum=momentum, axis_name=axis_name, r_max=R_MAX, d_max=D_MAX, rngs=nnx.Rngs(0), **options
        )
    model.scale, model.bias = nnx.Param(scale), nnx.Param(bias)
    for name, value in state.items():
        setattr(model, name, nnx.BatchStat(value))
    y = model(x, mask=mask)
    return y, {name: getattr(model, name)[...] for name in state}


@functools.cache
def compiled(path, parallel, grad, options=()):
    """`train` jitted once per (path, parallel, grad, options): hypothesis examples reuse it.
    parallel: x is (participants, n, C), vmapped with axis_name "d". grad: return
    ((dx, dscale, dbias), (y, state)) of sum(where(mask, y, 0) * cot), the loss of the
    valid outputs only (padded outputs may hold anything)."""
    opts = dict(options)

    def local(x, scale, bias, state, mask):
        return train(path, x, scale, bias, state, mask, axis_name="d" if parallel else None, **opts)

    f = jax.vmap(local, in_axes=(0, None, None, None, 0), axis_name="d") if parallel else local
    if not grad:
        return jax.jit(f)

    def loss(x, scale, bias, state, mask, full, cot):  # full: the mask broadcast to x's shape
        y, new = f(x, scale, bias, state, mask)
        return jnp.sum(jnp.where(full, y, 0) * cot), (y, new)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))


def run(path, parallel, *args, grad=False, **options):
    """Call the compiled path; under axis_name, check that every participant holds the same
    state and return participant 0's."""
    out = compiled(path, parallel, grad, tuple(sorted(options.items())))(*args)
    if not parallel:
        return out
    grads, (y, state) = out if grad else (None, out)
    for name, value in state.items():
        np.testing.assert_array_equal(value, np.broadcast_to(value[0], value.shape), err_msg=f"state {name}")
    state = {name: value[0] for name, value in state.items()}
    return (grads, (y, state)) if grad else (y, state)


def params(seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.uniform(0.5, 1.5, C), jnp.float32), jnp.asarray(rng.normal(size=C), jnp.float32))


# ----------------------------------------------------- (2) padding never reaches anything

PADDING = [np.nan, np.inf, -np.inf, 3e38, -1e30, "garbage"]


@st.composite
def padded_batch(draw, parallel):
    shape = (4, 4, C) if parallel else (8, C)
    seed = draw(st.integers(0, 2**16))
    padding = draw(st.sampled_from(PADDING))
    per_example = draw(st.booleans())  # a mask of whole examples, or one that varies per feature
    empty_member = parallel and draw(st.booleans())  # one participant holds only padding
    return shape, seed, padding, per_example, empty_member


def make_padded(shape, seed, padding, per_example, empty_member):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=shape) * rng.uniform(0.5, 3, C) + rng.uniform(-3, 3, C)).astype(np.float32)
    mask_shape = shape[:-1] + (1,) if per_example else shape
    mask = np.broadcast_to(rng.random(mask_shape) < 0.6, shape).copy()
    if empty_member:
        mask[0] = False
    fill = rng.normal(size=shape) * 1e6 if padding == "garbage" else np.full(shape, padding)
    hostile = np.where(mask, x, fill).astype(np.float32)
    zeros = np.where(mask, x, 0).astype(np.float32)
    cot = rng.normal(size=shape).astype(np.float32)
    # a mask of whole examples is passed without its feature axis ((N,), the broadcast form)
    given = mask[..., 0] if per_example else mask
    return hostile, zeros, mask, given, cot


def padded_reference(path, zeros, mask, cot, scale, bias, state):
    """Float64 (y, new mean, new var, dx, dscale, dbias) of the whole (flattened) batch."""
    x2, m2, cot2 = zeros.reshape(-1, C), mask.reshape(-1, C), (cot * mask).reshape(-1, C)
    mean, var, count = ref.moments(x2, -1, m2)
    ok = count > 0
    new_mean, new_var = ref.ema(state["mean"], mean, 0.9, ok), ref.ema(state["var"], var, 0.9, ok)
    if renorm_kind(path):
        y, r, d, _, _ = ref.renorm_train(
            x2, scale, bias, state["mean"], state["var"], r_max=R_MAX, d_max=D_MAX, valid=m2, epsilon=EPS
        )
        dx, dscale, dbias = ref.renorm_grads(x2, scale, cot2, r=r, d=d, valid=m2, epsilon=EPS)
    else:
        y = ref.normalize(x2, mean, var, scale, bias, epsilon=EPS)
        dx, dscale, dbias = ref.batch_norm_grads(x2, scale, cot2, epsilon=EPS, mask=m2)
    return y.reshape(zeros.shape), new_mean, new_var, dx.reshape(zeros.shape), dscale, dbias


@pytest.mark.parametrize("path", PATHS)
@PARALLEL
def test_padding_never_reaches_outputs_statistics_or_gradients(path, parallel):
    """Whatever the padding holds, outputs at valid positions, the running statistics and
    all gradients are bit-identical to the same batch with zeros as padding, which itself
    matches the float64 reference (item 2: NaN gradients on the autodiff paths)."""
    scale, bias = params()
    state = initial_state(path, np.full(C, 0.2, np.float32), np.full(C, 1.7, np.float32))

    shape = (4, 4, C) if parallel else (8, C)

    @prop(5)
    @given(padded_batch(parallel))
    @example((shape, 0, np.nan, True, parallel))  # NaN reached the autodiff paths' gradients
    @example((shape, 5734, 3e38, False, False))  # finite padding whose x_hat overflows (fused backward)
    def check(case):
        hostile, zeros, mask, given, cot = make_padded(*case)
        masks = (jnp.asarray(given), jnp.asarray(mask), jnp.asarray(cot))
        got = run(path, parallel, jnp.asarray(hostile), scale, bias, state, *masks, grad=True)
        base = run(path, parallel, jnp.asarray(zeros), scale, bias, state, *masks, grad=True)
        (dx, dscale, dbias), (y, new) = got
        (dx0, dscale0, dbias0), (y0, new0) = base
        y_ref, mean_ref, var_ref, dx_ref, dscale_ref, dbias_ref = padded_reference(
            path, zeros, mask, cot, scale, bias, state
        )
        # the zero-padded batch against float64
        np.testing.assert_allclose(np.asarray(y0)[mask], y_ref[mask], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(new0["mean"], mean_ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(new0["var"], var_ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(dx0, dx_ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(dscale0, dscale_ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(dbias0, dbias_ref, rtol=1e-4, atol=1e-5)
        # the hostile padding reaches nothing: same bits
        np.testing.assert_array_equal(np.asarray(y)[mask], np.asarray(y0)[mask])
        for name in new0:
            np.testing.assert_array_equal(new[name], new0[name], err_msg=name)
        for got_g, base_g, name in ((dx, dx0, "dx"), (dscale, dscale0, "dscale"), (dbias, dbias0, "dbias")):
            np.testing.assert_array_equal(got_g, base_g, err_msg=name)

    check()


@functools.cache
def compiled_evaluation(path):
    """grad of sum(where(mask, y, 0) * cot) of an evaluation call, jitted once per path:
    ((dx, dscale, dbias), y)."""

    def loss(x, scale, bias, mean, var, mask, full, cot):
        running = jbn.RunningStats(mean, var)
        if path == "renorm":
            y, _ = jbn.batch_renorm(x, scale, bias, running, training=False, mask=mask)
        else:
            y, _ = jbn.batch_norm(x, scale, bias, running, training=False, mask=mask)
        return jnp.sum(jnp.where(full, y, 0) * cot), y

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))


@pytest.mark.parametrize("path", ["bn", "renorm"])
@pytest.mark.parametrize("padding", PADDING)
def test_padding_never_reaches_gradients_in_evaluation(path, padding):
    """Evaluation treats padding as training does: whatever the padding holds, the gradients
    (fine-tuning with frozen statistics on padded batches) are bit-identical to those of the
    same batch padded with zeros, which match the float64 reference."""
    scale, bias = params(2)
    mean, var = np.array([0.3, -1.0, 2.0], np.float32), np.array([0.01, 1.7, 40.0], np.float32)
    for per_example in (True, False):
        hostile, zeros, mask, given, cot = make_padded((8, C), 11, padding, per_example, False)
        grad = compiled_evaluation(path)
        args = (jnp.asarray(mean), jnp.asarray(var), jnp.asarray(given), jnp.asarray(mask), jnp.asarray(cot))
        (dx, dscale, dbias), y = grad(jnp.asarray(hostile), scale, bias, *args)
        (dx0, dscale0, dbias0), y0 = grad(jnp.asarray(zeros), scale, bias, *args)
        cot_valid = np.where(mask, cot, 0).astype(np.float64)
        inv = 1 / np.sqrt(var.astype(np.float64) + EPS)
        x_hat = (zeros - mean.astype(np.float64)) * inv
        np.testing.assert_allclose(np.asarray(y0)[mask], (x_hat * ref.f64(scale) + ref.f64(bias))[mask], rtol=1e-5)
        np.testing.assert_allclose(dx0, cot_valid * inv * ref.f64(scale), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(dscale0, (cot_valid * x_hat).sum(0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dbias0, cot_valid.sum(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(y)[mask], np.asarray(y0)[mask])
        for got_g, base_g, name in ((dx, dx0, "dx"), (dscale, dscale0, "dscale"), (dbias, dbias0, "dbias")):
            np.testing.assert_array_equal(got_g, base_g, err_msg=name)


@pytest.mark.parametrize("path", ["bn-fused", "bn-unfused", "renorm"])
def test_padding_under_shard_map_on_eight_devices(path):
    """shard_map (check_vma on) over the 8 fake devices, device 0 all padding and NaN
    padding elsewhere: gradients from outside shard_map and the replicated running
    statistics equal those of the zero-padded batch, which match float64."""
    mesh = Mesh(np.array(jax.devices()[:8]), ("d",))
    scale, bias = params(1)
    state = initial_state(path, np.full(C, 0.2, np.float32), np.full(C, 1.7, np.float32))
    hostile, zeros, mask, _, cot = make_padded((8, 3, C), 5, np.nan, False, True)

    def total(x, scale, bias, mask, cot):
        def body(x, scale, bias, mask, cot):
            y, new = train(path, x[0], scale, bias, state, mask[0], axis_name="d")
            return jax.lax.psum(jnp.sum(jnp.where(mask[0], y, 0) * cot[0]), "d"), new

        return jax.shard_map(body, mesh=mesh, in_specs=(P("d"), P(), P(), P("d"), P("d")), out_specs=(P(), P()))(
            x, scale, bias, mask, cot
        )

    grads = jax.jit(jax.grad(total, argnums=(0, 1, 2), has_aux=True))
    (dx, dscale, dbias), new = grads(jnp.asarray(hostile), scale, bias, jnp.asarray(mask), jnp.asarray(cot))
    (dx0, dscale0, dbias0), new0 = grads(jnp.asarray(zeros), scale, bias, jnp.asarray(mask), jnp.asarray(cot))
    _, mean_ref, var_ref, dx_ref, dscale_ref, dbias_ref = padded_reference(path, zeros, mask, cot, scale, bias, state)
    np.testing.assert_allclose(dx0, dx_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dscale0, dscale_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dbias0, dbias_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(new0["mean"], mean_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new0["var"], var_ref, rtol=1e-5, atol=1e-6)
    for got_g, base_g, name in ((dx, dx0, "dx"), (dscale, dscale0, "dscale"), (dbias, dbias0, "dbias")):
        np.testing.assert_array_equal(got_g, base_g, err_msg=name)
    np.testing.assert_array_equal(new["mean"], new0["mean"])
    np.testing.assert_array_equal(new["var"], new0["var"])


# ------------------------------------- (1) ghost sub-batches with 0 or 1 valid elements


@st.composite
def ghost_case(draw, parallel):
    groups = 2 if parallel else 3  # sub-batches of 4 rows: (2 participants, 8, C) or (12, C)
    # valid elements per (sub-batch, feature): 1 is the case whose unbiased variance is undefined
    counts = draw(
        st.lists(st.lists(st.sampled_from([0, 1, 1, 2, 4]), min_size=C, max_size=C), min_size=groups, max_size=groups)
    )
    return counts, draw(st.booleans()), draw(st.integers(0, 2**16))


@pytest.mark.parametrize("path", BN_PATHS)
@PARALLEL
def test_ghost_sub_batch_without_a_defined_variance_is_left_out(path, parallel):
    """Item 1: with unbiased_running_var, a sub-batch with one valid element has no variance
    and is left out like an empty one; the other sub-batches still update every feature
    (biased: one element is a defined variance, 0, and counts)."""
    scale, bias = params(2)
    running = (np.full(C, 0.3, np.float32), np.full(C, 1.4, np.float32))
    participants, rows = (2, 8) if parallel else (1, 12)

    @prop(8)
    @given(ghost_case(parallel))
    @example(([[4] * C, [1] * C] if parallel else [[4] * C, [4] * C, [1] * C], True, 0))  # the audit's case
    def check(case):
        counts, unbiased, seed = case
        rng = np.random.default_rng(seed)
        x = (rng.normal(size=(participants, rows, C)) * 2 + 1).astype(np.float32)
        valid = np.zeros(x.shape, bool)
        for g, per_feature in enumerate(counts):
            for c, k in enumerate(per_feature):
                # k valid elements among sub-batch g's 4 * participants positions of feature c
                picks = rng.permutation(4 * participants)[:k]
                for p in picks:
                    valid[p // 4, 4 * g + p % 4, c] = True
        state = initial_state(path, *running)
        xs, ms = (x, valid) if parallel else (x[0], valid[0])
        y, new = run(
            path,
            parallel,
            jnp.asarray(xs),
            scale,
            bias,
            state,
            jnp.asarray(ms),
            virtual_batch_size=4,
            unbiased_running_var=unbiased,
        )
        mean_ref, var_ref = ref.ghost_running(x, valid, 4, *running, momentum=0.9, unbiased=unbiased)
        np.testing.assert_allclose(new["mean"], mean_ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(new["var"], var_ref, rtol=1e-5, atol=1e-6)
        assert np.isfinite(np.asarray(y)[ms]).all()

    check()


# ------------------------------------------------ (3) low-precision running statistics

LOW = {"bfloat16": (jnp.bfloat16, ml_dtypes.bfloat16), "float16": (jnp.float16, np.float16)}
# x = 0, 1, 0, 1, ...: batch mean exactly 0.5 and biased variance exactly 0.25
HALVES = jnp.asarray(np.tile(np.arange(2, dtype=np.float32), 4)[:, None] * np.ones(C, np.float32))


@pytest.mark.parametrize("path", PATHS)
def test_low_precision_update_is_within_one_ulp_of_the_exact_mix(path):
    """Item 3, one update: a bfloat16/float16 state keeps its dtype and the update is the
    exact mix `m * old + (1 - m) * batch` (computed in float32 or wider) brought back to
    that dtype: one rounding, or one step of one ulp where rounding would not move it, so
    within one ulp either way. Mixing in the narrow dtype itself rounds three times (the
    explicit float16 example lands 1.1 ulp away)."""
    scale, bias = params(5)

    @prop(8)
    @given(
        st.sampled_from(sorted(LOW)),
        st.sampled_from([0.5, 0.9, 0.99, 0.999]),
        st.floats(-4, 4),
        st.floats(0.01, 8),
        st.integers(0, 2**16),
    )
    @example("bfloat16", 0.999, 1.0, 1.0, 0)
    @example("float16", 0.99, 0.09088015102583125, 3.4867834293957145, 1634)
    def check(dtype, momentum, old_mean, old_var, seed):
        jdtype, np_dtype = LOW[dtype]
        x = np.random.default_rng(seed).normal(size=(8, C)).astype(np.float32) * 1.5 + 0.7
        state = initial_state(path, jnp.full(C, old_mean, jdtype), jnp.full(C, old_var, jdtype))
        _, new = run(path, False, jnp.asarray(x), scale, bias, state, None, momentum=momentum)
        batch_mean, batch_var, _ = ref.moments(x, -1, np.ones(x.shape, bool))
        for name, batch in (("mean", batch_mean), ("var", batch_var)):
            assert new[name].dtype == jdtype, (name, new[name].dtype)
            old = np.asarray(state[name], np.float64)
            exact = momentum * old + (1 - momentum) * batch
            got = np.asarray(new[name], np.float64)
            ulp = np.array([ref.spacing(max(abs(g), abs(e)), np_dtype) for g, e in zip(got, exact)])
            assert np.all(np.abs(got - exact) <= ulp), (name, got, exact, ulp)

    check()


@functools.cache
def compiled_steps(path, momentum, steps):
    """`steps` training calls on HALVES in one jitted loop (the state keeps its dtype)."""
    scale, bias = jnp.ones(C, jnp.float32), jnp.zeros(C, jnp.float32)

    def body(_, state):
        return train(path, HALVES, scale, bias, state, None, momentum=momentum)[1]

    return jax.jit(lambda state: jax.lax.fori_loop(0, steps, body, state))


def steps_to_converge(start, target, momentum, dtype):
    """Updates after which the float64 EMA is within a quarter ulp of the target."""
    return math.ceil(math.log(ref.spacing(target, dtype) / 4 / abs(start - target)) / math.log(momentum))


@pytest.mark.parametrize("path", ["bn-fused", "renorm", "linen-bn", "nnx-renorm"])
@pytest.mark.parametrize("dtype,momentum", [("bfloat16", 0.99), ("bfloat16", 0.999), ("float16", 0.999)])
def test_low_precision_running_stats_do_not_stall(path, dtype, momentum):
    """Item 3, many updates toward a constant batch (mean 0.5, var 0.25) from (0, 1): once
    the float64 EMA is within a quarter ulp of the target, the state is within one ulp of
    it. Rounding each update to nearest stalls where the step is below half an ulp
    (bfloat16 at 0.99: the mean at 0.40; at 0.999 the variance never leaves 1)."""
    jdtype, np_dtype = LOW[dtype]
    steps = max(steps_to_converge(0.0, 0.5, momentum, np_dtype), steps_to_converge(1.0, 0.25, momentum, np_dtype))
    state = initial_state(path, jnp.zeros(C, jdtype), jnp.ones(C, jdtype))
    state = compiled_steps(path, momentum, steps)(state)
    for name, target in (("mean", 0.5), ("var", 0.25)):
        assert state[name].dtype == jdtype, name
        np.testing.assert_allclose(
            np.asarray(state[name], np.float64),
            target,
            rtol=0,
            atol=ref.spacing(target, np_dtype),
            err_msg=f"{name} after {steps} updates",
        )


# ------------------------------------------------ empty and one-element groups

GROUPS = ((0, 1), (2, 3))  # axis_index_groups over 4 participants


@pytest.mark.parametrize("path", PATHS)
def test_empty_and_one_element_groups(path):
    """Synchronized in axis_index_groups, a group whose members hold no valid element (or
    one) beside a normal group: every participant's running statistics are those of its
    own group (an empty group keeps them; one element is a variance of 0), with NaN as
    padding, and the outputs at valid positions are finite."""
    scale, bias = params(7)
    state = initial_state(path, np.full(C, 0.2, np.float32), np.full(C, 1.7, np.float32))
    f = compiled(path, True, False, (("axis_index_groups", GROUPS),))

    @prop(6)
    @given(st.sampled_from([0, 1]), st.integers(0, 2**16))
    def check(valid_in_first, seed):
        rng = np.random.default_rng(seed)
        x = (rng.normal(size=(4, 4, C)) * 2 + 3).astype(np.float32)
        mask = rng.random((4, 4, C)) < 0.7
        mask[:2] = False
        if valid_in_first:
            mask[rng.integers(2), rng.integers(4), :] = True  # one element per feature in group 0
        y, new = f(jnp.asarray(np.where(mask, x, np.nan)), scale, bias, state, jnp.asarray(mask))
        assert np.isfinite(np.asarray(y)[mask]).all()
        for members in GROUPS:
            rows = list(members)
            mean, var, count = ref.moments(x[rows].reshape(-1, C), -1, mask[rows].reshape(-1, C))
            ok = count > 0
            for p in members:
                np.testing.assert_allclose(new["mean"][p], ref.ema(state["mean"], mean, 0.9, ok), rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(new["var"][p], ref.ema(state["var"], var, 0.9, ok), rtol=1e-5, atol=1e-6)

    check()


# ------------------------------------------------------ (4) order of elements, outliers

BIG = 2**20


@functools.cache
def gaussian_block():
    """2^20 standard normal float32 values, built once."""
    return np.random.default_rng(20).normal(size=(BIG, 1)).astype(np.float32)


def moments_path(path, parallel):
    """Batch statistics read from `path`: `moments` itself, or a training call with
    momentum 0, whose new running statistics ARE the batch statistics."""
    if path == "moments":
        if parallel:
            return jax.jit(jax.vmap(lambda x: tuple(jbn.moments(x, axis_name="d"))[:2], axis_name="d"))
        return jax.jit(lambda x: tuple(jbn.moments(x))[:2])
    state = initial_state(path, jnp.zeros(1), jnp.ones(1))
    scale, bias = jnp.ones(1), jnp.zeros(1)

    def stats(x):
        _, new = compiled(path, parallel, False, (("momentum", 0.0),))(x, scale, bias, state, None)
        return new["mean"], new["var"]

    return stats


STATS_PATHS = ("moments",) + PATHS


@pytest.mark.parametrize("path", STATS_PATHS)
@PARALLEL
def test_variance_accuracy_does_not_depend_on_the_order_of_elements(path, parallel):
    """Item 4: a 300-sigma outlier first among 2^20 elements costs nothing (the shift must
    not be the first element as it is), and |mean|/std = 1e4 is accurate with the default
    call (no `shift=`): relative error of the variance <= 1e-6 against float64, wherever the
    outlier sits (first, second, middle, last; first of another participant)."""
    stats = moments_path(path, parallel)
    base = gaussian_block()
    positions = [0, 1, BIG // 2, BIG - 1] + ([3 * BIG // 8] if parallel else [])  # 3/8: participant 3's first

    @prop(6)
    @given(st.sampled_from(positions), st.sampled_from([30.0, 300.0, 3000.0]), st.sampled_from([0.0, 1e4, -3e3]))
    @example(0, 300.0, 0.0)
    @example(0, 300.0, 1e4)
    def check(position, sigmas, offset):
        x = base + np.float32(offset)
        x[position] = np.float32(offset + sigmas)
        mean_ref, var_ref = f64_stats(x)
        mean, var = stats(jnp.asarray(x.reshape(8, BIG // 8, 1) if parallel else x))
        mean, var = np.asarray(mean).reshape(-1)[:1], np.asarray(var).reshape(-1)[:1]
        assert abs(var[0] / var_ref - 1) <= 1e-6, (var[0], var_ref)
        # the mean to 1e-6 std, plus the rounding of a float32 result near |offset|
        assert abs(mean[0] - mean_ref) <= 1e-6 * np.sqrt(var_ref) + 2.0**-23 * abs(mean_ref), (mean[0], mean_ref)

    check()


def f64_stats(x):
    x = np.asarray(x, np.float64).reshape(-1)
    return x.mean(), x.var()


# ---------------------------------------------------------- (5) extremes of magnitude


@st.composite
def extreme_case(draw):
    # |mean| from 1e18 (squares overflow float32) to 1e22 (the mean's square overflows);
    # std from 1e-4 |mean| down, and at most 1e19 so that the variance (<= 1e38) is representable
    log_mean = draw(st.sampled_from([0.0, 18.0, 19.3, 20.0, 22.0]))
    log_std = draw(st.sampled_from([17.0, 18.0, 18.5, 19.0]))
    if log_mean > 0:
        # |mean| / std within [10, 1e4]: beyond it float32 data (and any method that
        # subtracts a float32 mean) cannot promise 1e-5 on the variance
        log_std = min(max(log_std, log_mean - 4), log_mean - 1)
    sign = draw(st.sampled_from([1.0, -1.0]))
    return sign * 10.0**log_mean if log_mean else 0.0, 10.0**log_std, draw(st.integers(0, 2**16))


@pytest.mark.parametrize("path", STATS_PATHS)
@PARALLEL
def test_extreme_magnitudes_give_finite_correct_statistics(path, parallel):
    """Item 5: values near 1e18-1e19 (float32 squares overflow) and |mean| >= 2e19 with one
    participant holding only padding (Chan's merge multiplied 0 by an infinite square):
    whenever the variance is representable it comes out finite and right (rel 1e-5 of
    float64), and so does the normalized output."""
    rows = 4096
    if path == "moments":
        if parallel:
            stats = jax.jit(
                jax.vmap(lambda x, m: (None,) + tuple(jbn.moments(x, mask=m, axis_name="d"))[:2], axis_name="d")
            )
        else:
            stats = jax.jit(lambda x, m: (None,) + tuple(jbn.moments(x, mask=m))[:2])
    else:
        state = initial_state(path, jnp.zeros(C), jnp.ones(C))
        scale, bias = params(3)

        def stats(x, m):
            y, new = compiled(path, parallel, False, (("momentum", 0.0),))(x, scale, bias, state, m)
            return y, new["mean"], new["var"]

    @prop(8)
    @given(extreme_case())
    @example((2e19, 1e17, 0))
    @example((0.0, 1e18, 0))
    def check(case):
        mean0, std, seed = case
        rng = np.random.default_rng(seed)
        x = (mean0 + std * rng.normal(size=(rows, C))).astype(np.float32)
        valid = np.ones((rows, C), bool)
        if parallel:
            valid[: rows // 4] = False  # participant 0 holds only padding
        else:
            valid[rng.permutation(rows)[: rows // 4]] = False
        x = np.where(valid, x, 0).astype(np.float32)
        mean_ref, var_ref, _ = ref.moments(x, -1, valid)
        shape = (4, rows // 4, C) if parallel else (rows, C)
        y, mean, var = stats(jnp.asarray(x.reshape(shape)), jnp.asarray(valid.reshape(shape)))
        mean, var = np.asarray(mean).reshape(-1, C)[0], np.asarray(var).reshape(-1, C)[0]
        assert np.isfinite(mean).all() and np.isfinite(var).all(), (mean, var)
        np.testing.assert_allclose(mean, mean_ref, rtol=1e-5, atol=1e-5 * std)
        np.testing.assert_allclose(var, var_ref, rtol=1e-5)
        if y is not None and not renorm_kind(path):
            y = np.asarray(y).reshape(rows, C)
            scale, bias = params(3)
            y_ref = ref.normalize(x, mean_ref, var_ref, scale, bias, epsilon=EPS)
            # x - mean in float32 carries the rounding of a float32 mean, ~2^-24 |mean| / std in y
            np.testing.assert_allclose(y[valid], y_ref[valid], rtol=1e-4, atol=1e-4 + 2.0**-23 * abs(mean0) / std)

    check()


# ----------------------------------------------------------- (6) counters saturate


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rule", [dict(momentum=None), dict(momentum=0.9, debias=True)], ids=["cumulative", "debias"])
def test_counters_saturate_at_int32_max(path, rule):
    """Item 6: RunningStats.count (momentum=None, debias) and BatchRenorm's `step` stop at
    2**31 - 1 instead of wrapping to negative; the statistics keep following their rule
    (the float64 cumulative average / debiased EMA at that count)."""
    x = jnp.asarray(np.random.default_rng(6).normal(size=(8, C)).astype(np.float32) + 2)
    scale, bias = params(4)
    start = INT32_MAX - 1
    state = initial_state(
        path, np.full(C, 1.0, np.float32), np.full(C, 2.0, np.float32), count=np.full(C, start), step=start
    )
    mean_b, var_b, _ = ref.moments(np.asarray(x), -1, np.ones(x.shape, bool))
    mean_ref, var_ref = np.full(C, 1.0), np.full(C, 2.0)
    for call in range(3):
        _, state = run(path, False, x, scale, bias, state, None, **rule)
        t = min(start + 1 + call, INT32_MAX)
        np.testing.assert_array_equal(state["count"], np.full(C, INT32_MAX))
        if "step" in state:
            assert int(state["step"]) == INT32_MAX
        m = rule["momentum"]
        keep = (t - 1) / t if m is None else m * (1 - m ** (t - 1)) / (1 - m**t)
        mean_ref, var_ref = keep * mean_ref + (1 - keep) * mean_b, keep * var_ref + (1 - keep) * var_b
        np.testing.assert_allclose(state["mean"], mean_ref, rtol=1e-6)
        np.testing.assert_allclose(state["var"], var_ref, rtol=1e-6)
