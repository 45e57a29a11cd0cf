"""The pure layer against the float64 NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jbn
from tests import reference as ref

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2, jnp.float16: 2e-3}


@st.composite
def bn_case(draw):
    ndim = draw(st.integers(2, 4))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    n_features = draw(st.integers(1, min(2, ndim - 1)))
    axes = draw(st.permutations(range(ndim)))[:n_features]
    axis = axes[0] - ndim if n_features == 1 and draw(st.booleans()) else tuple(axes)
    if n_features == 1 and draw(st.booleans()):
        axis = axes[0]
    dtype = draw(st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]))
    mask_kind = draw(st.sampled_from([None, "full", "reduced"]))
    seed = draw(st.integers(0, 2**16))
    return shape, axis, dtype, mask_kind, seed


def make_inputs(shape, axis, dtype, mask_kind, seed):
    rng = np.random.default_rng(seed)
    features = ref.canonical_axes(len(shape), axis)
    fshape = tuple(shape[a] for a in features)
    x = (rng.normal(size=shape) * rng.uniform(0.5, 3) + rng.uniform(-3, 3)).astype(np.float32)
    x = np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))  # the values the dtype can hold
    mask = None
    if mask_kind == "full":
        mask = rng.random(shape) < 0.7
    elif mask_kind == "reduced":
        mask = rng.random(tuple(s for a, s in enumerate(shape) if a not in features)) < 0.7
        if ref.mask_is_ambiguous(mask.shape, shape, features):
            # NumPy's broadcasting (flax's reading) also applies and means something else:
            # jbn rejects that mask (tests/test_flax_behaviours.py), so give it the input's rank.
            mask = np.expand_dims(mask, features)
    scale = rng.uniform(0.5, 2, fshape).astype(np.float32)
    bias = rng.normal(size=fshape).astype(np.float32)
    running = (rng.normal(size=fshape).astype(np.float32), rng.uniform(0.5, 2, fshape).astype(np.float32))
    return x, mask, scale, bias, running


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bn_case())
def test_moments_match_reference(case):
    shape, axis, dtype, mask_kind, seed = case
    x, mask, *_ = make_inputs(shape, axis, dtype, mask_kind, seed)
    got = jbn.moments(jnp.asarray(x, dtype), axis=axis, mask=mask)
    mean, var, count = ref.moments(x, axis, mask)
    assert got.mean.dtype == jnp.float32 and got.var.dtype == jnp.float32
    np.testing.assert_allclose(got.mean, mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.var, var, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.broadcast_to(got.count, count.shape), count)
    assert np.all(np.asarray(got.var) >= 0)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bn_case(), st.booleans())
def test_batch_norm_matches_reference(case, training):
    shape, axis, dtype, mask_kind, seed = case
    x, mask, scale, bias, (rm, rv) = make_inputs(shape, axis, dtype, mask_kind, seed)
    features = ref.canonical_axes(len(shape), axis)
    if training and np.prod([s for a, s in enumerate(shape) if a not in features]) == 1:
        return  # one value per feature: an error, tested in test_errors.py
    y, new = jbn.batch_norm(
        jnp.asarray(x, dtype),
        scale,
        bias,
        jbn.RunningStats(rm, rv),
        training=training,
        axis=axis,
        momentum=0.9,
        mask=mask,
    )
    y_ref, m_ref, v_ref = ref.batch_norm(x, scale, bias, rm, rv, training=training, axis=axis, momentum=0.9, mask=mask)
    assert y.dtype == np.result_type(dtype, scale.dtype, bias.dtype) and y.shape == x.shape  # flax's promotion
    tol = TOL[dtype]
    np.testing.assert_allclose(np.asarray(y, np.float32), y_ref, rtol=tol, atol=tol * (1 + np.abs(y_ref).max()))
    np.testing.assert_allclose(new.mean, m_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new.var, v_ref, rtol=1e-4, atol=1e-5)
    assert new.mean.dtype == jnp.float32


@pytest.mark.parametrize("layout,axis", [("NHWC", -1), ("NCHW", 1), ("NHWC-tuple", (2, 3))])
def test_conv_layouts(layout, axis):
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, (8, 4, 5, 6)).astype(np.float32)
    features = ref.canonical_axes(4, axis)
    fshape = tuple(x.shape[a] for a in features)
    scale, bias = rng.uniform(0.5, 2, fshape), rng.normal(size=fshape)
    running = jbn.RunningStats(np.zeros(fshape, np.float32), np.ones(fshape, np.float32))
    y, new = jbn.batch_norm(x, scale, bias, running, training=True, axis=axis)
    y_ref, m_ref, v_ref = ref.batch_norm(x, scale, bias, running.mean, running.var, training=True, axis=axis)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new.mean, m_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.var, v_ref, rtol=1e-5, atol=1e-6)


def test_variance_accurate_when_mean_dominates():
    """|mean|/std = 1e4: jbn's one-pass variance stays accurate; flax's default fast
    variance, E[x^2] - E[x]^2 in float32, loses it."""
    import flax.linen as nn

    rng = np.random.default_rng(1)
    x = (1e4 + rng.normal(size=(256, 8))).astype(np.float32)
    _, var_ref, _ = ref.moments(x, -1)
    got = jbn.moments(x)
    jbn_err = np.abs(np.asarray(got.var) / var_ref - 1).max()

    flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.0)
    variables = flax_bn.init(jax.random.key(0), x)
    _, state = flax_bn.apply(variables, x, mutable=["batch_stats"])
    flax_err = np.abs(np.asarray(state["batch_stats"]["var"]) / var_ref - 1).max()

    assert jbn_err < 1e-4, jbn_err
    assert flax_err > 1e-2, flax_err  # the failure jbn exists to avoid


def test_half_precision_stats_are_float32():
    rng = np.random.default_rng(2)
    x32 = (300 + rng.normal(size=(512, 4))).astype(np.float32)
    for dtype in (jnp.bfloat16, jnp.float16):
        x = jnp.asarray(x32, dtype)
        got = jbn.moments(x)
        mean, var, _ = ref.moments(np.asarray(x.astype(jnp.float32)), -1)
        assert got.mean.dtype == jnp.float32
        np.testing.assert_allclose(got.mean, mean, rtol=1e-6)
        np.testing.assert_allclose(got.var, var, rtol=1e-3)


def test_empty_mask_changes_nothing():
    x = np.random.default_rng(3).normal(size=(4, 6, 3)).astype(np.float32)
    mask = np.zeros((4, 6), bool)
    running = jbn.RunningStats(np.full(3, 0.5, np.float32), np.full(3, 2.0, np.float32))
    scale, bias = np.ones(3, np.float32), np.zeros(3, np.float32)

    def loss(x, scale, bias):
        y, new = jbn.batch_norm(x, scale, bias, running, training=True, mask=mask)
        return jnp.sum(jnp.where(mask[..., None], y, 0)), (new, y)

    (value, (new, y)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, scale, bias)
    np.testing.assert_array_equal(new.mean, running.mean)
    np.testing.assert_array_equal(new.var, running.var)
    assert np.isfinite(value) and np.all(np.isfinite(np.asarray(y)))
    for g in grads:
        np.testing.assert_array_equal(g, 0)


def test_padding_content_never_reaches_statistics():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(4, 6, 3)).astype(np.float32)
    mask = rng.random((4, 6)) < 0.5
    mask[0, 0] = False
    padded = x.copy()
    padded[~mask] = np.nan
    padded[0, 0, 1] = np.inf
    got = jbn.moments(padded, mask=mask)
    mean, var, _ = ref.moments(x, -1, mask)
    np.testing.assert_allclose(got.mean, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.var, var, rtol=1e-5, atol=1e-6)
    none = jbn.moments(padded, mask=np.zeros((4, 6), bool))
    np.testing.assert_array_equal(none.mean, 0)
    np.testing.assert_array_equal(none.var, 0)


def test_nonfinite_batch_keeps_running_stats():
    """A feature whose batch statistics are NaN/inf keeps its running statistics; the
    output still carries the NaN so the loss shows it; other features update."""
    x = np.random.default_rng(4).normal(size=(16, 3)).astype(np.float32)
    x[5, 1] = np.nan
    x[2, 2] = np.inf
    running = jbn.RunningStats(np.full(3, 0.25, np.float32), np.full(3, 3.0, np.float32))
    y, new = jbn.batch_norm(x, None, None, running, training=True, momentum=0.9)
    _, m_ref, v_ref = ref.batch_norm(x[:, :1], None, None, 0.25, 3.0, training=True, momentum=0.9)
    np.testing.assert_allclose(new.mean[0], m_ref[0], rtol=1e-6)
    np.testing.assert_allclose(new.var[0], v_ref[0], rtol=1e-5)
    np.testing.assert_array_equal(new.mean[1:], running.mean[1:])
    np.testing.assert_array_equal(new.var[1:], running.var[1:])
    assert np.isnan(np.asarray(y[:, 1])).all()
    assert np.isfinite(np.asarray(y[:, 0])).all()


def test_update_running_stats_formula():
    running = jbn.RunningStats(np.array([1.0, 2.0], np.float32), np.array([3.0, 4.0], np.float32))
    batch = jbn.Moments(np.array([5.0, -1.0], np.float32), np.array([0.5, 8.0], np.float32), np.float32(10))
    new = jbn.update_running_stats(running, batch, momentum=0.8)
    np.testing.assert_allclose(new.mean, [0.8 * 1 + 0.2 * 5, 0.8 * 2 - 0.2], rtol=1e-6)
    np.testing.assert_allclose(new.var, [0.8 * 3 + 0.2 * 0.5, 0.8 * 4 + 0.2 * 8], rtol=1e-6)


def test_eval_mode_uses_running_stats_unchanged():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(6, 4)).astype(np.float32)
    running = jbn.RunningStats(rng.normal(size=4).astype(np.float32), rng.uniform(1, 2, 4).astype(np.float32))
    y, new = jbn.batch_norm(x, None, None, running, training=False)
    np.testing.assert_allclose(y, ref.normalize(x, running.mean, running.var), rtol=1e-5, atol=1e-6)
    assert new is running or all(np.array_equal(a, b) for a, b in zip(new, running))


def test_normalize_dtype_argument():
    x = jnp.ones((4, 3), jnp.bfloat16)
    y = jbn.normalize(x, jnp.zeros(3), jnp.ones(3), dtype=jnp.float32)
    assert y.dtype == jnp.float32
    assert jbn.normalize(x, jnp.zeros(3), jnp.ones(3)).dtype == jnp.bfloat16


def test_shift_argument_matches():
    rng = np.random.default_rng(6)
    x = (50 + rng.normal(size=(32, 5))).astype(np.float32)
    got = jbn.moments(x, shift=np.full(5, 49.0, np.float32))
    mean, var, _ = ref.moments(x)
    np.testing.assert_allclose(got.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(got.var, var, rtol=1e-4)


def test_same_results_with_and_without_jit():
    rng = np.random.default_rng(7)
    x = rng.normal(1.0, 2.0, (8, 5, 5, 4)).astype(np.float32)
    mask = rng.random((8, 5, 5)) < 0.8
    scale, bias = rng.uniform(0.5, 2, 4).astype(np.float32), rng.normal(size=4).astype(np.float32)
    running = jbn.RunningStats(np.zeros(4, np.float32), np.ones(4, np.float32))

    def f(x, scale, bias, running):
        return jbn.batch_norm(x, scale, bias, running, training=True, mask=mask)

    eager = f(x, scale, bias, running)
    jitted = jax.jit(f)(x, scale, bias, running)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-6)
    g_eager = jax.grad(lambda *a: jnp.sum(f(*a)[0] ** 3), argnums=(0, 1, 2))(x, scale, bias, running)
    g_jit = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a)[0] ** 3), argnums=(0, 1, 2)))(x, scale, bias, running)
    for a, b in zip(g_eager, g_jit):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
