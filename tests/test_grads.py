"""Training-mode gradients: numerical checks in float64 and the analytic reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jbn
from tests import reference as ref


@pytest.mark.parametrize("axis,mask_kind", [(-1, None), (1, None), ((1, 2), None), (-1, "reduced"), (-1, "full")])
def test_check_grads_float64(axis, mask_kind):
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        x = rng.normal(1.0, 2.0, (6, 3, 4))
        features = ref.canonical_axes(3, axis)
        fshape = tuple(x.shape[a] for a in features)
        mask = None
        if mask_kind == "reduced":
            mask = rng.random([s for a, s in enumerate(x.shape) if a not in features]) < 0.7
        elif mask_kind == "full":
            mask = rng.random(x.shape) < 0.7
        scale, bias = rng.uniform(0.5, 2, fshape), rng.normal(size=fshape)
        running = jbn.RunningStats(jnp.zeros(fshape), jnp.ones(fshape))
        weights = rng.normal(size=x.shape)

        def f(x, scale, bias):
            y, new = jbn.batch_norm(x, scale, bias, running, training=True, axis=axis, mask=mask)
            return jnp.sum(jnp.tanh(y) * weights) + jnp.sum(new.mean**2) + jnp.sum(jnp.sqrt(new.var))

        check_grads(
            f, (jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias)), order=2, modes=["rev"], atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("mask_kind", [None, "full", "reduced"])
def test_grads_match_analytic_reference(mask_kind):
    rng = np.random.default_rng(1)
    x = rng.normal(-2.0, 3.0, (10, 5, 3)).astype(np.float32)
    mask = None
    if mask_kind == "full":
        mask = rng.random(x.shape) < 0.6
    elif mask_kind == "reduced":
        mask = rng.random((10, 5)) < 0.6
    scale, bias = rng.uniform(0.5, 2, 3).astype(np.float32), rng.normal(size=3).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    running = jbn.RunningStats(np.zeros(3, np.float32), np.ones(3, np.float32))

    def f(x, scale, bias):
        return jbn.batch_norm(x, scale, bias, running, training=True, mask=mask)[0]

    _, vjp = jax.vjp(f, x, scale, bias)
    dx, dscale, dbias = vjp(jnp.asarray(dy))
    dx_ref, dscale_ref, dbias_ref = ref.batch_norm_grads(x, scale, dy, mask=mask)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dscale, dscale_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dbias, dbias_ref, rtol=1e-5, atol=1e-5)


def test_padded_positions_get_zero_gradient_when_loss_ignores_them():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(8, 4)).astype(np.float32)
    mask = np.array([True] * 5 + [False] * 3)
    running = jbn.RunningStats(np.zeros(4, np.float32), np.ones(4, np.float32))

    def loss(x):
        y, _ = jbn.batch_norm(x, None, None, running, training=True, mask=mask)
        return jnp.sum(jnp.where(mask[:, None], y**2 + y, 0))

    g = jax.grad(loss)(x)
    np.testing.assert_array_equal(g[~mask], 0)
    assert np.abs(np.asarray(g[mask])).sum() > 0
