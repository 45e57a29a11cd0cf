"""jbn.equinox.BatchNorm: side by side with equinox.nn.BatchNorm, and jbn's advantages
against the float64 reference (tests/reference.py)."""

from __future__ import annotations

import inspect
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

eqx = pytest.importorskip("equinox")
import jbn.equinox as je  # noqa: E402
from tests import reference as ref  # noqa: E402

C = 3
MOMENTUM = 0.9  # far from 1, so that a few steps move the running statistics visibly
# float32 arithmetic on O(1) values through a handful of operations: errors of a few
# ulps (1.2e-7 each); 1e-5 leaves room for the sums over ~100 elements.
TOL = dict(rtol=1e-5, atol=1e-5)


def make(cls, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the mode="legacy" warning, tested apart
        return eqx.nn.make_with_state(cls)(*args, **kwargs)


def per_example(model, name="batch"):
    """The equinox convention: the layer sees one example; vmap binds the batch axis."""
    return jax.vmap(model, axis_name=name, in_axes=(0, None), out_axes=(0, None))


@eqx.filter_jit
def run(model, state, x):
    return per_example(model)(x, state)


def masked_call(model, state, x, mask):
    f = jax.vmap(lambda x, m, s: model(x, s, mask=m), axis_name="batch", in_axes=(0, 0, None), out_axes=(0, None))
    return f(x, mask, state)


run_masked = eqx.filter_jit(masked_call)


def batches(steps, shape, seed=0, loc=2.0, spread=3.0):
    rng = np.random.default_rng(seed)
    # Each step has its own per-channel offset, so the running average has something to follow.
    return [
        (rng.normal(size=shape) * spread + loc + rng.normal(size=(1, shape[1]) + (1,) * (len(shape) - 2))).astype(
            np.float32
        )
        for _ in range(steps)
    ]


def ref_stats(x, mask=None):
    """float64 (mean, var, count) per channel of a batch (N, C, *spatial)."""
    return ref.moments(x, axis=1, mask=mask)


def ref_normalize(x, mean, var, weight=None, bias=None, eps=1e-5):
    return ref.normalize(x, mean, var, weight, bias, axis=1, epsilon=eps)


def ema_fill_in(stats, momentum):
    """equinox's mode="ema" running statistics: the first batch, then the plain EMA."""
    mean, var = stats[0]
    for m, v in stats[1:]:
        mean, var = momentum * mean + (1 - momentum) * m, momentum * var + (1 - momentum) * v
    return mean, var


def debiased_ema(stats, momentum):
    """ema_t / (1 - momentum**t) with the EMA started at zero."""
    mean, var = np.zeros(C), np.zeros(C)
    for m, v in stats:
        mean, var = momentum * mean + (1 - momentum) * m, momentum * var + (1 - momentum) * v
    t = len(stats)
    return mean / (1 - momentum**t), var / (1 - momentum**t)


# ------------------------------------------------------------------------------ the API


def test_import_jbn_does_not_load_equinox():
    code = (
        "import sys, jbn, jbn.functional; assert 'equinox' not in sys.modules, 'import jbn loaded equinox'; "
        "jbn.equinox.BatchNorm; assert 'equinox' in sys.modules"  # loaded on first use
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_constructor_mirrors_equinox():
    ours = inspect.signature(je.BatchNorm.__init__).parameters
    theirs = inspect.signature(eqx.nn.BatchNorm.__init__).parameters
    assert list(ours)[: len(theirs)] == list(theirs)  # same names, same positional order
    for name, p in theirs.items():
        assert ours[name].default == p.default, name
        assert ours[name].kind == p.kind, name


def test_legacy_mode_warns_and_is_ema():
    with pytest.warns(UserWarning, match="mode"):
        bn = je.BatchNorm(C, "batch")
    assert bn.mode == "ema"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        je.BatchNorm(C, "batch", mode="batch")  # an explicit mode is silent


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(input_size=0, axis_name="b", mode="batch"), "input_size"),
        (dict(input_size=C, axis_name="b", mode="moving"), "mode"),
        (dict(input_size=C, axis_name="b", mode="batch", debias="yes"), "debias"),
    ],
)
def test_constructor_errors_name_the_argument(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        je.BatchNorm(**kwargs)


def test_call_errors():
    bn, state = make(je.BatchNorm, C, "batch", mode="batch")
    with pytest.raises(ValueError, match="input_size"):
        per_example(bn)(jnp.ones((4, C + 1, 2)), state)
    with pytest.raises(ValueError, match="axis_name"):
        bn(jnp.ones((C, 2)), state)  # no vmap binds "batch"


def test_parameters_and_state_layout():
    bn, state = make(je.BatchNorm, C, "batch", mode="batch", dtype=jnp.bfloat16)
    assert bn.weight.shape == bn.bias.shape == (C,) and bn.weight.dtype == jnp.bfloat16
    running = bn.running_stats(state)
    assert running.mean.dtype == running.var.dtype == jnp.bfloat16 and running.count.dtype == jnp.int32
    bare, _ = make(je.BatchNorm, C, "batch", channelwise_affine=False, mode="batch")
    assert bare.weight is None and bare.bias is None
    # Only arrays and the inference flag are leaves: no string for jit/device_put to trip on.
    assert all(isinstance(leaf, (jax.Array, bool)) for leaf in jax.tree.leaves(bn))


# --------------------------------------------------------------- side by side with equinox


@pytest.mark.parametrize("mode", ["batch", "ema"])
@pytest.mark.parametrize("spatial", [(), (4,), (2, 3)])
def test_training_and_inference_match_equinox(mode, spatial):
    xs = batches(3, (8, C) + spatial, seed=len(spatial))
    ours, s_ours = make(je.BatchNorm, C, "batch", momentum=MOMENTUM, mode=mode)
    theirs, s_theirs = make(eqx.nn.BatchNorm, C, "batch", momentum=MOMENTUM, mode=mode)
    for t, x in enumerate(xs, 1):
        y, s_ours = run(ours, s_ours, x)
        y_eqx, s_theirs = run(theirs, s_theirs, x)
        np.testing.assert_allclose(y, y_eqx, **TOL)
        stats = [ref_stats(b)[:2] for b in xs[:t]]
        if mode == "batch":
            np.testing.assert_allclose(y, ref_normalize(x, *ref_stats(x)[:2]), **TOL)
        else:  # training batches are normalized with the just-updated running statistics
            np.testing.assert_allclose(y, ref_normalize(x, *ema_fill_in(stats, MOMENTUM)), **TOL)
    running = ours.running_stats(s_ours)
    np.testing.assert_array_equal(running.count, len(xs))
    x_test = xs[0] - 1.0
    y_inf, _ = run(eqx.nn.inference_mode(ours), s_ours, x_test)
    y_inf_eqx, _ = run(eqx.nn.inference_mode(theirs), s_theirs, x_test)
    if mode == "ema":
        mean_eqx, var_eqx = s_theirs.get(theirs.ema_state_index)
        np.testing.assert_allclose(running.mean, mean_eqx, **TOL)
        np.testing.assert_allclose(running.var, var_eqx, **TOL)
        np.testing.assert_allclose(y_inf, y_inf_eqx, **TOL)
        np.testing.assert_allclose(y_inf, ref_normalize(x_test, *ema_fill_in(stats, MOMENTUM)), **TOL)
    else:
        # equinox keeps EMAs started at mean 0, var 1 and divides both by 1 - m**t at
        # inference: right for the mean, but its variance keeps m**t / (1 - m**t) of the
        # initial 1. jbn stores the debiased EMAs themselves.
        t = len(xs)
        hidden_mean, hidden_var = s_theirs.get(theirs.batch_state_index)
        mean, var = debiased_ema(stats, MOMENTUM)
        np.testing.assert_allclose(running.mean, mean, **TOL)
        np.testing.assert_allclose(running.var, var, **TOL)
        np.testing.assert_allclose(running.mean, np.asarray(hidden_mean) / (1 - MOMENTUM**t), **TOL)
        np.testing.assert_allclose(running.var, (np.asarray(hidden_var) - MOMENTUM**t) / (1 - MOMENTUM**t), **TOL)
        np.testing.assert_allclose(y_inf, ref_normalize(x_test, mean, var), **TOL)
        excess = MOMENTUM**t / (1 - MOMENTUM**t)
        np.testing.assert_allclose(y_inf_eqx, ref_normalize(x_test, mean, var + excess), **TOL)


@pytest.mark.parametrize("mode, fused", [("batch", False), ("batch", True), ("ema", False)])
def test_gradients_match_equinox(mode, fused):
    x, x2 = batches(2, (6, C, 5), seed=7)
    ct = np.random.default_rng(8).normal(size=x.shape).astype(np.float32)

    def grads(cls):
        options = dict(fused=fused) if cls is je.BatchNorm else {}
        model, state = make(cls, C, "batch", momentum=MOMENTUM, mode=mode, **options)
        _, state = run(model, state, x)  # second step: in mode "ema" the EMA is then in play
        params, static = eqx.partition((model, x2), eqx.is_inexact_array)

        @eqx.filter_jit
        @eqx.filter_grad
        def grad(params, state):
            model_, x_ = eqx.combine(params, static)  # gradients for the parameters and the input
            y, _ = per_example(model_)(x_, state)
            return jnp.sum(y * ct)

        return grad(params, state)

    (m_ours, x_ours), (m_eqx, x_eqx) = grads(je.BatchNorm), grads(eqx.nn.BatchNorm)
    np.testing.assert_allclose(x_ours, x_eqx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(m_ours.weight, m_eqx.weight, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(m_ours.bias, m_eqx.bias, rtol=1e-4, atol=1e-5)
    if mode == "batch":
        dx, dw, db = ref.batch_norm_grads(x2, np.ones(C), ct, axis=1)
        np.testing.assert_allclose(x_ours, dx, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(m_ours.weight, dw, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(m_ours.bias, db, rtol=1e-4, atol=1e-4)


def test_inference_switches_and_call_override():
    x = batches(1, (8, C, 4), seed=3)[0]
    bn, state = make(je.BatchNorm, C, "batch", mode="batch")
    before = bn.running_stats(state)
    _, state = per_example(bn)(x, state)  # training: state moves
    assert int(bn.running_stats(state).count[0]) == 1
    inf = eqx.nn.inference_mode(bn)
    assert inf.inference is True and eqx.nn.inference_mode(inf, value=False).inference is False
    y_inf, state2 = per_example(inf)(x, state)
    np.testing.assert_array_equal(bn.running_stats(state2).count, 1)  # unchanged
    running = bn.running_stats(state2)
    np.testing.assert_allclose(y_inf, ref_normalize(x, running.mean, running.var), **TOL)
    f = jax.vmap(lambda x, s: bn(x, s, inference=True), axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    y_call, _ = f(x, state2)
    np.testing.assert_allclose(y_call, y_inf, **TOL)
    assert not np.allclose(before.mean, running.mean)


@pytest.mark.peer_not_strict("equinox's BatchNorm mixes a bfloat16 input with its float32 state")
def test_in_sequential_and_dtype_follows_equinox():
    key = jax.random.key(0)
    model, state = make(
        lambda: eqx.nn.Sequential([eqx.nn.Linear(4, C, key=key), je.BatchNorm(C, "batch", mode="batch")])
    )
    x = jnp.asarray(batches(1, (8, 4), seed=4)[0])
    y, state = per_example(model)(x, state)
    h = np.asarray(jax.vmap(model.layers[0])(x), np.float64)
    np.testing.assert_allclose(y, ref.normalize(h, *ref.moments(h, axis=1)[:2], axis=1), **TOL)
    xb = jnp.asarray(batches(1, (8, C, 4))[0], jnp.bfloat16)
    for cls in (je.BatchNorm, eqx.nn.BatchNorm):
        bn, s = make(cls, C, "batch", mode="batch")
        assert run(bn, s, xb)[0].dtype == jnp.float32  # the wider of x and the float32 state


# ------------------------------------------------------------------ jbn's advantages


@pytest.mark.parametrize("mode", ["batch", "ema"])
def test_variance_accurate_when_mean_dwarfs_std(mode):
    # |mean| / std = 1e4 in float32: E[x^2] - E[x]^2 would lose every digit (1e8 * 1.2e-7 ~ 10x var).
    rng = np.random.default_rng(11)
    x = (1e4 + rng.normal(size=(16, C, 8))).astype(np.float32)
    bn, state = make(je.BatchNorm, C, "batch", mode=mode, momentum=0.0)  # momentum 0: state = this batch
    y, state = run(bn, state, x)
    mean, var, _ = ref_stats(x)
    running = bn.running_stats(state)
    # x - shift is exact in float32 (Sterbenz) with the shift a sample of the data, so only
    # the sums of O(1) values round: ~sqrt(128) ulps, far below 1e-4.
    np.testing.assert_allclose(running.var, var, rtol=1e-4)
    np.testing.assert_allclose(running.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(y, ref_normalize(x, mean, var), atol=1e-3)  # ulp(1e4) / std = 1e-3 in x itself


@pytest.mark.parametrize("mode", ["batch", "ema"])
def test_mask_padding_examples_and_positions(mode):
    rng = np.random.default_rng(5)
    x = batches(1, (8, C, 6), seed=5)[0]
    valid = np.ones((8, 6), bool)
    valid[6:] = False  # two padded examples
    valid[:3, 4:] = False  # and padded time steps of three others
    x = np.where(valid[:, None, :], x, np.float32(1e6) * rng.choice([-1, 1], size=x.shape)).astype(np.float32)
    bn, state = make(je.BatchNorm, C, "batch", mode=mode, momentum=0.0)
    y, state = run_masked(bn, state, x, valid)  # per example: a (T,) mask broadcasting against (C, T)
    w = valid[:, None, :]
    mean, var, _ = ref_stats(x, mask=w)
    running = bn.running_stats(state)
    np.testing.assert_allclose(running.mean, mean, **TOL)
    np.testing.assert_allclose(running.var, var, **TOL)
    np.testing.assert_allclose(np.where(w, y, 0), np.where(w, ref_normalize(x, mean, var), 0), **TOL)
    # A scalar mask per example drops whole examples.
    _, state2 = run_masked(bn, make(je.BatchNorm, C, "batch", mode=mode, momentum=0.0)[1], x, valid.all(axis=1))
    m2, v2, _ = ref_stats(x[3:6])
    np.testing.assert_allclose(bn.running_stats(state2).mean, m2, **TOL)
    np.testing.assert_allclose(bn.running_stats(state2).var, v2, **TOL)


def test_mask_gradients_against_reference():
    x = batches(1, (6, C, 4), seed=9)[0]
    valid = np.ones((6, 4), bool)
    valid[4:] = False
    valid[0, 2:] = False
    x = np.where(valid[:, None, :], x, np.float32(-3e5)).astype(np.float32)
    ct = np.random.default_rng(10).normal(size=x.shape).astype(np.float32) * valid[:, None, :]
    bn, state = make(je.BatchNorm, C, "batch", mode="batch")

    @eqx.filter_jit
    @eqx.filter_grad
    def grad(params, state, x):
        y, _ = masked_call(eqx.combine(params, static), state, x, valid)
        return jnp.sum(y * ct)

    params, static = eqx.partition(bn, eqx.is_inexact_array)
    g = grad(params, state, x)
    _, dw, db = ref.batch_norm_grads(x, np.ones(C), ct, axis=1, mask=valid[:, None, :])
    np.testing.assert_allclose(g.weight, dw, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(g.bias, db, rtol=1e-4, atol=1e-4)


def test_running_average_options_against_reference():
    xs = batches(4, (8, C, 3), seed=12)
    stats = [ref_stats(b)[:2] for b in xs]
    cases = {
        # name: (constructor options, expected (mean, var) after the 4 batches)
        "batch-default-debiased": (dict(mode="batch"), debiased_ema(stats, MOMENTUM)),
        "batch-plain-ema": (dict(mode="batch", debias=False), None),
        "cumulative": (
            dict(mode="batch", momentum=None),
            tuple(np.mean([s[i] for s in stats], axis=0) for i in (0, 1)),
        ),
        "ema-debiased": (dict(mode="ema", debias=True), debiased_ema(stats, MOMENTUM)),
    }
    n = 8 * 3  # elements per channel in a batch: PyTorch's running_var tracks var * n / (n - 1)
    unbiased = debiased_ema([(m, v * n / (n - 1)) for m, v in stats], MOMENTUM)
    cases["batch-unbiased-var"] = (dict(mode="batch", unbiased_running_var=True), unbiased)
    mean0, var0 = np.zeros(C), np.ones(C)  # flax's start for the plain EMA
    for m, v in stats:
        mean0, var0 = MOMENTUM * mean0 + (1 - MOMENTUM) * m, MOMENTUM * var0 + (1 - MOMENTUM) * v
    cases["batch-plain-ema"] = (cases["batch-plain-ema"][0], (mean0, var0))
    for name, (options, (mean, var)) in cases.items():
        options.setdefault("momentum", MOMENTUM)
        bn, state = make(je.BatchNorm, C, "batch", **options)
        for x in xs:
            _, state = run(bn, state, x)
        running = bn.running_stats(state)
        np.testing.assert_allclose(running.mean, mean, err_msg=name, **TOL)
        np.testing.assert_allclose(running.var, var, err_msg=name, **TOL)
        y_inf, _ = run(eqx.nn.inference_mode(bn), state, xs[0])
        np.testing.assert_allclose(y_inf, ref_normalize(xs[0], mean, var), err_msg=name, **TOL)
    # One batch is enough for a usable estimate with debias (equinox mode="batch" would
    # normalize with a variance too large by m / (1 - m) = 9 here).
    bn, state = make(je.BatchNorm, C, "batch", mode="batch", momentum=MOMENTUM)
    _, state = run(bn, state, xs[0])
    np.testing.assert_allclose(bn.running_stats(state).var, stats[0][1], **TOL)


DEVICES = 8


def test_count_weighted_across_devices_pmap():
    """pmap over 8 devices x vmap over 4 examples, tuple axis name; devices hold 4, 3, 2,
    1 and 0 valid examples (one holds only padding): the statistics are those of the
    valid examples, weighted by count, and nothing turns NaN."""
    n = 4
    x = batches(1, (DEVICES * n, C, 5), seed=13)[0].reshape(DEVICES, n, C, 5)
    per_device = np.array([4, 3, 2, 1, 0, 4, 2, 4])
    valid = np.arange(n)[None, :] < per_device[:, None]  # (devices, n)
    x = np.where(valid[:, :, None, None], x, np.float32(5e4)).astype(np.float32)
    x[4] = np.nan  # device 4 holds only padding, and NaN at that
    ct = np.random.default_rng(14).normal(size=x.shape).astype(np.float32) * valid[:, :, None, None]
    bn, state = make(je.BatchNorm, C, ("device", "batch"), mode="batch", momentum=0.0)
    params, static = eqx.partition(bn, eqx.is_inexact_array)

    def local(params, state, x, valid, ct):
        def loss(params):
            y, new = masked_call(eqx.combine(params, static), state, x, valid)
            return jnp.sum(y * ct), (y, new)

        g, (y, new) = jax.grad(loss, has_aux=True)(params)
        return y, new, jax.lax.psum(g, ("device",))

    y, new, g = jax.pmap(local, axis_name="device", in_axes=(None, None, 0, 0, 0))(params, state, x, valid, ct)
    flat, w = x.reshape(-1, C, 5), np.broadcast_to(valid.reshape(-1, 1, 1), (DEVICES * n, C, 5))
    mean, var, _ = ref_stats(flat, mask=w)
    running = bn.running_stats(jax.tree.map(lambda a: a[0], new))
    assert np.all(np.isfinite(running.mean)) and np.all(np.isfinite(running.var))
    assert np.all(np.isfinite(np.asarray(y)[valid])) and np.all(np.isfinite(g.weight)) and np.all(np.isfinite(g.bias))
    np.testing.assert_allclose(running.mean, mean, **TOL)
    np.testing.assert_allclose(running.var, var, **TOL)
    yf = np.asarray(y).reshape(flat.shape)
    np.testing.assert_allclose(np.where(w, yf, 0), np.where(w, ref_normalize(flat, mean, var), 0), **TOL)
    clean = np.where(w, flat, 0)  # the reference multiplies its zero cotangent by the padding; keep that finite
    _, dw, db = ref.batch_norm_grads(clean, np.ones(C), ct.reshape(flat.shape), axis=1, mask=w)
    np.testing.assert_allclose(g.weight[0], dw, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(g.bias[0], db, rtol=1e-4, atol=1e-4)


def test_axis_index_groups_normalize_within_groups():
    # Indices run over every participant of ("device", "batch"): device d, example b is 2 d + b.
    groups = [list(range(8)), list(range(8, 16))]
    x = batches(1, (DEVICES * 2, C, 3), seed=17)[0].reshape(DEVICES, 2, C, 3)
    x[4:] += 5.0  # the second group has other statistics
    bn, state = make(je.BatchNorm, C, ("device", "batch"), mode="batch", momentum=0.0, axis_index_groups=groups)
    # The state differs between groups, so it leaves vmap per example, too.
    f = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, 0))
    y, new = jax.pmap(f, axis_name="device", in_axes=(0, None))(x, state)
    for members in ([0, 1, 2, 3], [4, 5, 6, 7]):  # the devices of each group
        part = x[members].reshape(-1, C, 3)
        mean, var, _ = ref_stats(part)
        np.testing.assert_allclose(np.asarray(y)[members].reshape(part.shape), ref_normalize(part, mean, var), **TOL)
        for d in members:
            np.testing.assert_allclose(bn.running_stats(new).mean[d], np.broadcast_to(mean, (2, C)), **TOL)


def test_replicated_model_under_filter_jit_and_shard_map():
    """equinox #1074: `jax.device_put` of the whole model fails on equinox's string
    `axis_name` leaf. jbn's is static, so the replicated model runs as it is: under
    `eqx.filter_jit` + `shard_map` + `vmap` with a tuple axis name, and with the
    inference flag (an array after device_put, traced by jit) chosen at run time."""
    mesh = jax.make_mesh((DEVICES,), ("device",))
    replicated = NamedSharding(mesh, P())
    theirs, _ = make(eqx.nn.BatchNorm, C, ("device", "batch"), mode="batch")
    with pytest.raises(TypeError, match="not a valid JAX type"):
        jax.device_put(theirs, replicated)
    bn, state = make(je.BatchNorm, C, ("device", "batch"), mode="batch", momentum=0.0)
    bn, state = jax.device_put((bn, state), replicated)
    x = batches(1, (DEVICES * 2, C, 3), seed=15)[0]
    xs = jax.device_put(x, NamedSharding(mesh, P("device")))

    @eqx.filter_jit
    def step(model, state, x):
        # check_vma=False: a psum over a shard_map axis and a vmap axis together is
        # rejected by jax's type checks (for equinox's pmean too).
        return jax.shard_map(
            lambda m, s, x: per_example(m)(x, s),
            mesh=mesh,
            in_specs=(P(), P(), P("device")),
            out_specs=(P("device"), P()),
            check_vma=False,
        )(model, state, x)

    y, state = step(bn, state, xs)
    mean, var, _ = ref_stats(x)
    np.testing.assert_allclose(y, ref_normalize(x, mean, var), **TOL)
    np.testing.assert_allclose(bn.running_stats(state).var, var, **TOL)
    assert isinstance(bn.inference, jax.Array)  # traced inside step: the layer picks the branch at run time
    y_inf, state_inf = step(eqx.tree_at(lambda m: m.inference, bn, jnp.asarray(True)), state, xs + 1.0)
    np.testing.assert_allclose(y_inf, ref_normalize(x + 1.0, mean, var), **TOL)
    np.testing.assert_array_equal(bn.running_stats(state_inf).count, 1)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("where", ["grad of jit", "scan"])
def test_gradient_through_jit_and_scan(where, fused):
    """Two patterns that equinox's layer survives: differentiating a jitted call from
    outside, and a layer inside `lax.scan` (over time steps or stacked layers)."""
    xs = np.stack(batches(2, (6, C, 4), seed=16))
    bn, state = make(je.BatchNorm, C, "batch", mode="batch", fused=fused)
    params, static = eqx.partition(bn, eqx.is_inexact_array)
    if where == "grad of jit":
        xs = xs[:1]

        def loss(params):
            return jnp.sum(run(eqx.combine(params, static), state, xs[0])[0] * xs[0])

    else:

        def loss(params):
            def body(state, x):
                y, state = per_example(eqx.combine(params, static))(x, state)
                return state, jnp.sum(y * x)

            return jnp.sum(jax.lax.scan(body, state, xs)[1])

    g = jax.grad(loss)(params)
    per_step = [ref.batch_norm_grads(x, np.ones(C), x, axis=1) for x in xs]
    np.testing.assert_allclose(g.weight, sum(dw for _, dw, _ in per_step), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(g.bias, sum(db for _, _, db in per_step), rtol=1e-4, atol=1e-4)


def test_vmap_memory_grows_linearly_with_batch():
    """Under vmap the all-gather of the statistics is a broadcast (jbn._statistics.gather),
    not a psum of one-hot slots: memory grows linearly with the batch, as equinox's pmean."""

    def temp_bytes(n):
        bn, state = make(je.BatchNorm, 16, "batch", mode="batch")
        params, static = eqx.partition(bn, eqx.is_inexact_array)
        x = jax.ShapeDtypeStruct((n, 16, 4), jnp.float32)

        def loss(params, x):
            return jnp.sum(per_example(eqx.combine(params, static))(x, state)[0] * x)

        return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile().memory_analysis().temp_size_in_bytes

    # 4x the batch: 4x the memory if linear, 16x if quadratic; 8x is the midpoint (geometric).
    assert temp_bytes(128) < 8 * temp_bytes(32)
