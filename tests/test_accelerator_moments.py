"""The per-backend formulations of one participant's statistics (jbn._statistics.FORMULATIONS),
each run here on CPU and checked against float64 NumPy: called directly, and as the formulation
that `jbn.moments` dispatches to (the CPU entry of FORMULATIONS replaced by it) under jit, vmap,
shard_map, pmap and sharded jit, in forward and reverse mode. The accuracy promise is the
library's: relative variance error <= 1e-6 whatever the order of the elements (an outlier
first), with |mean| / std = 1e4, and under masks (padding holding NaN and inf)."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jbn
from jbn import _options, _statistics, _triton_moments

# The GPU kernel runs on CPU through Pallas' interpreter: the same kernel, interpreted.
FORMULATIONS = {
    name: partial(f, interpret=True) if f is _triton_moments.triton_moments else f
    for name, f in ((name, _statistics.formulation(name)) for name in _statistics.FORMULATIONS)
    if name != "cpu"
}
# Their single-participant entries (jbn._statistics.BATCH_FORMULATIONS), likewise interpreted.
BATCH_FORMULATIONS = {"cuda": partial(_triton_moments.triton_batch_moments, interpret=True)}
DEVICES = 8
VAR_RTOL = 1e-6


def hard_batches():
    """(name, float64 data (n, C), mask or None): the cases the promise names."""
    rng = np.random.default_rng(7)
    n, c = 4096, 8
    shifted = rng.normal(size=(n, c)) * 0.5 + 1e4 * 0.5  # |mean| / std = 1e4
    outlier = rng.normal(size=(n, c))
    outlier[0] = 1e3  # an outlier first: a running formulation would start far from the mean
    masked = rng.normal(size=(n, c)) * 3 - 2
    mask = rng.random((n, 1)) < 0.6
    masked[~mask[:, 0]] = np.nan
    masked[~mask[:, 0] & (np.arange(n) % 2 == 0)] = np.inf
    return [
        ("mean 1e4 std", shifted, None),
        ("outlier first", outlier, None),
        ("masked, NaN/inf padding", masked, mask),
    ]


def reference(x, mask):
    """float64 mean and biased variance of the valid rows (x already rounded to float32)."""
    keep = np.ones(x.shape[0], bool) if mask is None else mask[:, 0]
    rows = np.asarray(x, np.float64)[keep]
    return rows.mean(0), rows.var(0)


def check(mean, var, x32, mask):
    ref_mean, ref_var = reference(np.asarray(x32), mask)
    np.testing.assert_array_less(np.abs(np.asarray(var, np.float64) / ref_var - 1), VAR_RTOL)
    np.testing.assert_array_less(np.abs(np.asarray(mean, np.float64) - ref_mean), 1e-6 * np.abs(ref_mean) + 1e-6)


@pytest.mark.parametrize("formulation", FORMULATIONS)
@pytest.mark.parametrize("case", [0, 1, 2], ids=[c[0] for c in hard_batches()])
def test_formulation_called_directly_matches_float64(formulation, case):
    _, x, mask = hard_batches()[case]
    x32 = jnp.asarray(x, jnp.float32)
    layout = _options.resolve(x32, -1, None if mask is None else jnp.asarray(mask))
    local = jax.jit(lambda v: FORMULATIONS[formulation](v, layout, jnp.float32).moments())(x32)
    check(local.mean, local.var, x32, mask)


@pytest.fixture(params=list(FORMULATIONS))
def on_cpu(request, monkeypatch):
    """`jbn.moments` on CPU computing each participant's statistics with one accelerator formulation.

    The formulation is chosen when a program is traced, and JAX reuses a trace of the same function
    on the same shapes: the caches are cleared before (so the formulation under test is traced) and
    after (so no later test, in any order pytest-xdist gives it, reuses a trace made with it)."""
    jax.clear_caches()
    monkeypatch.setitem(_statistics.FORMULATIONS, "cpu", lambda: FORMULATIONS[request.param])
    if request.param in BATCH_FORMULATIONS:  # one participant: the backend's own entry, as on the device
        monkeypatch.setitem(_statistics.BATCH_FORMULATIONS, "cpu", lambda: BATCH_FORMULATIONS[request.param])
    yield request.param
    jax.clear_caches()


def test_moments_under_jit_and_vmap(on_cpu):
    for _, x, mask in hard_batches():
        x32 = jnp.asarray(x, jnp.float32)
        m = None if mask is None else jnp.asarray(mask)
        stats = jax.jit(lambda v, m=m: jbn.moments(v, mask=m))(x32)
        check(stats.mean, stats.var, x32, mask)
    # vmap: eight independent batches, each with its own statistics.
    _, x, _ = hard_batches()[0]
    x32 = jnp.asarray(x, jnp.float32).reshape(8, -1, x.shape[-1])
    stats = jax.jit(jax.vmap(jbn.moments))(x32)
    for i in range(8):
        check(stats.mean[i], stats.var[i], x32[i], None)


def test_moments_across_participants(on_cpu):
    """The global statistics of 8 participants: pmap, vmap and shard_map with axis_name,
    and plain jit of an input split along the batch (Auto mesh axes)."""
    _, x, _ = hard_batches()[1]  # the outlier lands on the first participant
    x32 = jnp.asarray(x, jnp.float32)
    split = x32.reshape(DEVICES, -1, x.shape[-1])
    for transform in (jax.pmap, jax.vmap):
        stats = transform(lambda v: jbn.moments(v, axis_name="i"), axis_name="i")(split)
        check(stats.mean[0], stats.var[0], x32, None)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:DEVICES]), ("d",))
    inside = jax.shard_map(lambda v: jbn.moments(v, axis_name="d"), mesh=mesh, in_specs=P("d"), out_specs=P())
    stats = jax.jit(inside)(x32)
    check(stats.mean, stats.var, x32, None)
    # Sharded jit: the input split along the batch over an Auto mesh (XLA partitions the reduction).
    placed = jax.device_put(x32, NamedSharding(mesh, P("d")))
    stats = jax.jit(jbn.moments)(placed)
    check(stats.mean, stats.var, x32, None)


def derivative_reference(x, mask, a, b):
    """d/dx of sum(a * mean + b * var) over the valid rows, in float64."""
    keep = np.ones(x.shape[0], bool) if mask is None else mask[:, 0]
    x64 = np.asarray(x, np.float64)
    rows = x64[keep]
    n, mean = rows.shape[0], rows.mean(0)
    grad = (a + 2 * b * (x64 - mean)) / n
    return np.where(keep[:, None], grad, 0)


def test_moments_forward_and_reverse_mode(on_cpu):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(512, 4)) * 2 + 5
    mask = rng.random((512, 1)) < 0.7
    x32, m = jnp.asarray(x, jnp.float32), jnp.asarray(mask)
    a, b = jnp.asarray([1.0, -2.0, 0.5, 3.0]), jnp.asarray([0.25, 1.0, -1.0, 2.0])

    def objective(v):
        stats = jbn.moments(v, mask=m)
        return jnp.sum(a * stats.mean + b * stats.var)

    expected = derivative_reference(np.asarray(x32), mask, np.asarray(a), np.asarray(b))
    grad = jax.jit(jax.grad(objective))(x32)
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-4, atol=1e-7)
    direction = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    _, tangent = jax.jit(lambda v, t: jax.jvp(objective, (v,), (t,)))(x32, direction)
    np.testing.assert_allclose(float(tangent), float(np.sum(expected * np.asarray(direction))), rtol=1e-4)
    # Through the pmap collective too: reverse mode of the gathered, merged statistics.
    split = x32.reshape(DEVICES, -1, 4)
    pgrad = jax.pmap(
        jax.grad(lambda v: jnp.sum(a * jbn.moments(v, axis_name="i").mean + b * jbn.moments(v, axis_name="i").var)),
        axis_name="i",
    )(split)
    # Every participant's objective is the same global value, and the transpose of the gather
    # sums the cotangents of all of them: the gradient of DEVICES copies of the objective.
    full = DEVICES * derivative_reference(np.asarray(x32), None, np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(np.asarray(pgrad).reshape(x.shape), full, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", ["mean 80 std", "outlier first"])
def test_low_precision_input_statistics_in_float32(on_cpu, dtype, case):
    """A bfloat16 or float16 x lies on a coarse grid (its low bits zero): a formulation that
    centres it on a base between grid points rounds every x - base the same way, a bias in
    the mean (the GPU kernel's was 1.2e-5 with an outlier first, std 16). |mean| / std = 80
    is as far as bfloat16's 8 bits resolve a spread (1e4 would make every feature constant)."""
    if case == "outlier first":
        x = hard_batches()[1][1]
    else:
        x = np.random.default_rng(8).normal(size=(4096, 8)) * 0.5 + 40
    x16 = jnp.asarray(x, dtype)
    stats = jax.jit(jbn.moments)(x16)
    assert stats.mean.dtype == jnp.float32
    check(stats.mean, stats.var, x16.astype(jnp.float32), None)


def test_gpu_kernel_merges_many_chunks_exactly():
    """The GPU kernel with its second, merging kernel (more rows than one chunk holds), rows
    and features not multiples of its tiles and blocks: |mean| / std = 1e4, an outlier first,
    a constant feature (variance exactly 0), and an input with feature axes after three batch axes."""
    rng = np.random.default_rng(11)
    rows, c = _triton_moments.MAX_CHUNK_ROWS + 1000 + 3, 70
    x = rng.normal(size=(rows, c))
    x[:, :20] = x[:, :20] * 0.5 + 5e3  # |mean| / std = 1e4
    x[0, 20:40] = 1e3  # an outlier first
    x[:, 40] = 3.25  # a constant feature
    x32 = jnp.asarray(x, jnp.float32)
    assert _triton_moments.chunk_partials(x32, interpret=True)[0].shape[0] > 1
    layout = _options.resolve(x32, -1, None)
    local = jax.jit(lambda v: FORMULATIONS["cuda"](v, layout, jnp.float32).moments())(x32)
    ref_mean, ref_var = reference(np.asarray(x32), None)
    constant = np.arange(c) == 40
    np.testing.assert_array_less(
        np.abs(np.asarray(local.var, np.float64)[~constant] / ref_var[~constant] - 1), VAR_RTOL
    )
    assert float(local.var[40]) == 0.0 and float(local.mean[40]) == 3.25
    np.testing.assert_array_less(np.abs(np.asarray(local.mean, np.float64) - ref_mean), 1e-6 * np.abs(ref_mean) + 1e-6)
    # Conv layout (N, H, W, C): the same statistics through the free reshape to (rows, C).
    x4 = x32[: 7 * 6 * 100].reshape(7, 6, 100, c)
    layout4 = _options.resolve(x4, -1, None)
    local4 = jax.jit(lambda v: FORMULATIONS["cuda"](v, layout4, jnp.float32).moments())(x4)
    ref_mean4, ref_var4 = reference(np.asarray(x4).reshape(-1, c), None)
    np.testing.assert_array_less(
        np.abs(np.asarray(local4.var, np.float64)[~constant] / ref_var4[~constant] - 1), VAR_RTOL
    )


@pytest.mark.parametrize(
    "variance",
    [
        pytest.param(lambda v, layout: FORMULATIONS["cuda"](v, layout, jnp.float32).moments().var, id="local"),
        pytest.param(lambda v, layout: BATCH_FORMULATIONS["cuda"](v, layout, jnp.float32).var, id="one_participant"),
    ],
)
def test_gpu_kernel_second_order_derivative(variance):
    """Hessian-vector product of sum(b * var) through the kernel's custom JVP (the `Local`
    entry's, and the single-participant entry's), against the closed form: d2/dx2 of
    b * var applied to t is 2 b (t - mean(t)) / n."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(300, 3)) * 2 + 1, jnp.float32)
    t = jnp.asarray(rng.normal(size=(300, 3)), jnp.float32)
    b = jnp.asarray([1.0, -0.5, 2.0], jnp.float32)
    layout = _options.resolve(x, -1, None)

    def objective(v):
        return jnp.sum(b * variance(v, layout))

    hvp = jax.jit(lambda v, u: jax.jvp(jax.grad(objective), (v,), (u,))[1])(x, t)
    t64 = np.asarray(t, np.float64)
    expected = 2 * np.asarray(b) * (t64 - t64.mean(0)) / 300
    np.testing.assert_allclose(np.asarray(hvp), expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("case", [0, 1], ids=[c[0] for c in hard_batches()[:2]])
@pytest.mark.parametrize("split", ["batch over all devices", "batch over half the devices", "replicated"])
def test_tpu_formulation_under_sharded_jit(case, split):
    """The tpu formulation on an input of an Auto mesh: the batch cut into one group per device
    of the mesh, whatever split XLA holds it in (all devices, a subset, none)."""
    _, x, _ = hard_batches()[case]
    x32 = jnp.asarray(x, jnp.float32)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:DEVICES]).reshape(4, 2), ("a", "b"))
    spec = {"batch over all devices": P(("a", "b")), "batch over half the devices": P("a"), "replicated": P()}[split]
    layout = _options.resolve(x32, -1, None)
    tpu = _statistics.formulation("tpu")
    placed = jax.device_put(x32, NamedSharding(mesh, spec))
    local = jax.jit(lambda v: tpu(v, layout, jnp.float32).moments())(placed)
    check(local.mean, local.var, x32, None)
    # Reverse mode through the same program (the derivative rule sees the grouped statistics).
    a, b = jnp.linspace(-1.0, 2.0, x.shape[1]), jnp.linspace(0.5, -1.5, x.shape[1])
    grad = jax.jit(
        jax.grad(
            lambda v: jnp.sum(
                a * tpu(v, layout, jnp.float32).moments().mean + b * tpu(v, layout, jnp.float32).moments().var
            )
        )
    )(placed)
    expected = derivative_reference(np.asarray(x32), None, np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rows", [300, _triton_moments.MAX_CHUNK_ROWS, _triton_moments.MAX_CHUNK_ROWS + 1000 + 3])
def test_gpu_kernel_rounded_mean_is_that_of_its_parts(rows, dtype):
    """One participant's entry (the kernel writing the mean rounded once, and var) gives
    the var of the `Local` entry's `moments()` bitwise and its mean within one unit in the
    last place (rounded in the kernel rather than after it: TwoSum's rounded sum, where
    compiled code may not keep the pair exact at a tie), in one chunk and merged from several
    (|mean| / std = 1e4, an outlier first), and the same derivatives; a mask falls back to
    the cpu formulation in both."""
    rng = np.random.default_rng(rows)
    x = rng.normal(size=(rows, 70))
    x[:, :20] = x[:, :20] * 0.5 + 5e3
    x[0, 20:40] = 1e3
    xd = jnp.asarray(x, dtype)
    layout = _options.resolve(xd, -1, None)
    whole = jax.jit(lambda v: BATCH_FORMULATIONS["cuda"](v, layout, jnp.float32))(xd)
    parts = jax.jit(lambda v: FORMULATIONS["cuda"](v, layout, jnp.float32).moments())(xd)
    for a, b in ((whole.var, parts.var), (whole.count, parts.count)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    np.testing.assert_array_max_ulp(np.asarray(whole.mean), np.asarray(parts.mean), maxulp=1)
    if dtype == "float32":  # in bfloat16 the features near 5e3 are constant (variance 0)
        check(whole.mean, whole.var, xd, None)
    a, b = jnp.linspace(-1.0, 2.0, 70), jnp.linspace(0.5, -1.5, 70)

    def objective(f, v):
        stats = f(v)
        return jnp.sum(a * stats.mean + b * stats.var)

    grads = [
        jax.jit(jax.grad(partial(objective, f)))(xd.astype(jnp.float32))
        for f in (
            lambda v: BATCH_FORMULATIONS["cuda"](v, layout, jnp.float32),
            lambda v: FORMULATIONS["cuda"](v, layout, jnp.float32).moments(),
        )
    ]
    assert np.asarray(grads[0]).tobytes() == np.asarray(grads[1]).tobytes()
    mask = jnp.asarray(rng.random((rows, 1)) < 0.6)
    masked = _options.resolve(xd, -1, mask)
    whole = jax.jit(lambda v: BATCH_FORMULATIONS["cuda"](v, masked, jnp.float32))(xd)
    parts = jax.jit(lambda v: FORMULATIONS["cuda"](v, masked, jnp.float32).moments())(xd)
    assert np.asarray(whole.var).tobytes() == np.asarray(parts.var).tobytes()
