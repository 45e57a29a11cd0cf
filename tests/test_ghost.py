"""Ghost batch norm (`virtual_batch_size`): each sub-batch normalized on its own."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbn
from tests import reference as ref

EPS = 1e-5
M = 0.9


def _data(shape=(12, 3, 2), seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape).astype(np.float32) * 2 + 3
    gamma = rng.uniform(0.5, 1.5, size=shape[-1:]).astype(np.float32)
    beta = rng.normal(size=shape[-1:]).astype(np.float32)
    running = jbn.RunningStats(jnp.full(shape[-1:], 0.1), jnp.full(shape[-1:], 1.3))
    return jnp.asarray(x), jnp.asarray(gamma), jnp.asarray(beta), running


def test_equals_batch_norm_on_each_sub_batch():
    x, gamma, beta, running = _data()
    y, new = jbn.batch_norm(x, gamma, beta, running, training=True, momentum=M, virtual_batch_size=4)
    means, variances = [], []
    for g in range(3):
        y_ref, mean, var, _ = ref.batch_norm_training(x[4 * g : 4 * g + 4], gamma, beta, epsilon=EPS)
        np.testing.assert_allclose(y[4 * g : 4 * g + 4], y_ref, rtol=1e-5, atol=1e-5)
        means.append(mean)
        variances.append(var)
    # running statistics: updated once, from the mean of sub-batch means and of sub-batch variances
    np.testing.assert_allclose(new.mean, M * ref.f64(running.mean) + (1 - M) * np.mean(means, 0), rtol=1e-6)
    np.testing.assert_allclose(new.var, M * ref.f64(running.var) + (1 - M) * np.mean(variances, 0), rtol=1e-6)


def test_gradients_equal_separate_sub_batches():
    x, gamma, beta, running = _data(seed=1)
    cot = jnp.asarray(np.random.default_rng(2).normal(size=x.shape), jnp.float32)

    def ghost(x, g, b):
        return jnp.sum(jbn.batch_norm(x, g, b, running, training=True, virtual_batch_size=6)[0] * cot)

    def separate(x, g, b):
        parts = [jbn.batch_norm(x[i : i + 6], g, b, running, training=True)[0] for i in (0, 6)]
        return jnp.sum(jnp.concatenate(parts) * cot)

    for a, b in zip(jax.grad(ghost, (0, 1, 2))(x, gamma, beta), jax.grad(separate, (0, 1, 2))(x, gamma, beta)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_composes_with_masks_and_leaves_out_empty_sub_batches():
    x, gamma, beta, running = _data(seed=3)
    valid = np.ones((12, 3), bool)
    valid[0, :2] = False
    valid[5, 1] = False
    valid[8:12] = False  # the third sub-batch has no valid element
    y, new = jbn.batch_norm(
        x, gamma, beta, running, training=True, momentum=M, virtual_batch_size=4, mask=jnp.asarray(valid)
    )
    means, variances = [], []
    for g in range(2):
        sl = slice(4 * g, 4 * g + 4)
        y_ref, mean, var, _ = ref.batch_norm_training(x[sl], gamma, beta, epsilon=EPS, mask=valid[sl])
        np.testing.assert_allclose(np.asarray(y[sl])[valid[sl]], y_ref[valid[sl]], rtol=1e-5, atol=1e-5)
        means.append(mean)
        variances.append(var)
    assert np.isfinite(np.asarray(y)).all()
    np.testing.assert_allclose(new.mean, M * ref.f64(running.mean) + (1 - M) * np.mean(means, 0), rtol=1e-6)
    np.testing.assert_allclose(new.var, M * ref.f64(running.var) + (1 - M) * np.mean(variances, 0), rtol=1e-6)


def test_unbiased_correction_per_sub_batch():
    x, gamma, beta, running = _data(seed=4)
    _, new = jbn.batch_norm(
        x, gamma, beta, running, training=True, momentum=M, virtual_batch_size=6, unbiased_running_var=True
    )
    per_sub = [ref.f64(x[i : i + 6]).reshape(-1, 2).var(0, ddof=1) for i in (0, 6)]
    np.testing.assert_allclose(new.var, M * ref.f64(running.var) + (1 - M) * np.mean(per_sub, 0), rtol=1e-6)


def test_with_axis_name_sub_batch_g_spans_participants():
    x, gamma, beta, running = _data((2, 8, 3), seed=5)  # 2 participants, 8 examples each

    def per_device(x):
        return jbn.batch_norm(x, gamma, beta, running, training=True, momentum=M, virtual_batch_size=4, axis_name="d")

    y, new = jax.vmap(per_device, axis_name="d")(x)
    for g in range(2):
        sub = np.concatenate([x[0, 4 * g : 4 * g + 4], x[1, 4 * g : 4 * g + 4]])
        y_ref, *_ = ref.batch_norm_training(sub, gamma, beta, epsilon=EPS)
        got = np.concatenate([y[0, 4 * g : 4 * g + 4], y[1, 4 * g : 4 * g + 4]])
        np.testing.assert_allclose(got, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new.mean[0], new.mean[1])


def test_linen_module_and_variables_unchanged():
    x, gamma, beta, running = _data((8, 3))
    model = jbn.BatchNorm(use_running_average=False, momentum=M, virtual_batch_size=2)
    variables = model.init(jax.random.key(0), x)
    assert set(variables["batch_stats"]) == {"mean", "var"}  # flax's names, nothing added
    y, updates = model.apply(variables, x, mutable=["batch_stats"])
    means = []
    for g in range(4):
        y_ref, mean, _, _ = ref.batch_norm_training(x[2 * g : 2 * g + 2], None, None, epsilon=EPS)
        np.testing.assert_allclose(y[2 * g : 2 * g + 2], y_ref, rtol=1e-4, atol=1e-4)
        means.append(mean)
    np.testing.assert_allclose(updates["batch_stats"]["mean"], (1 - M) * np.mean(means, 0), rtol=1e-5, atol=1e-7)


def test_bad_virtual_batch_sizes_fail_clearly():
    x, gamma, beta, running = _data()
    with pytest.raises(ValueError, match="does not divide the batch size 12"):
        jbn.batch_norm(x, gamma, beta, running, training=True, virtual_batch_size=5)
    with pytest.raises(ValueError, match="positive int"):
        jbn.batch_norm(x, gamma, beta, running, training=True, virtual_batch_size=0)
    with pytest.raises(ValueError, match="axis 0 is a feature axis"):
        jbn.batch_norm(
            jnp.swapaxes(x, 0, 2),
            jnp.ones(2),
            None,
            jbn.RunningStats(jnp.zeros(2), jnp.ones(2)),
            training=True,
            axis=0,
            virtual_batch_size=1,
        )
    x2 = x[:, 0, :]
    with pytest.warns(jbn.OneValuePerFeatureWarning, match="one value per feature along axis=-1 in each sub-batch"):
        y, _ = jbn.batch_norm(x2, gamma, beta, running, training=True, virtual_batch_size=1)
    np.testing.assert_allclose(y, np.broadcast_to(beta, y.shape))  # flax's numbers: variance 0, output = bias


@pytest.mark.parametrize("size", [16, 4], ids=["sub-batch-spans-shards", "shard-holds-sub-batches"])
def test_plain_jit_over_an_explicitly_sharded_batch(size):
    """jax.make_mesh's default (Explicit axes): the batch's split is part of its type, and
    the sub-batches cut across the shards (16 rows over 8-row shards) or within them;
    outputs, running statistics and gradients are those of each sub-batch alone."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    x, gamma, beta, running = _data(shape=(64, 3, 2), seed=3)
    cot = np.random.default_rng(4).normal(size=x.shape).astype(np.float32)
    rows = NamedSharding(jax.make_mesh((8,), ("d",)), P("d"))

    def loss(x, g, b):
        y, new = jbn.batch_norm(x, g, b, running, training=True, momentum=M, virtual_batch_size=size)
        return jnp.sum(y * cot), (y, new)

    (dx, dgamma, dbeta), (y, new) = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(
        jax.device_put(x, rows), gamma, beta
    )
    assert y.sharding.is_equivalent_to(rows, y.ndim)
    y, dx = np.asarray(y), np.asarray(dx)
    means, variances, dgammas, dbetas = [], [], [], []
    for g in range(64 // size):
        part = slice(size * g, size * (g + 1))
        y_ref, mean, var, _ = ref.batch_norm_training(x[part], gamma, beta, epsilon=EPS)
        np.testing.assert_allclose(y[part], y_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            dx[part], ref.batch_norm_grads(x[part], gamma, cot[part], epsilon=EPS)[0], rtol=1e-4, atol=1e-4
        )
        x_hat = (ref.f64(x[part]) - mean) / np.sqrt(var + EPS)
        dgammas.append(np.sum(ref.f64(cot[part]) * x_hat, axis=(0, 1)))  # d/dgamma of sum(cot * y)
        dbetas.append(np.sum(ref.f64(cot[part]), axis=(0, 1)))
        means.append(mean), variances.append(var)
    np.testing.assert_allclose(dgamma, np.sum(dgammas, 0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dbeta, np.sum(dbetas, 0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(new.mean, M * ref.f64(running.mean) + (1 - M) * np.mean(means, 0), rtol=1e-6)
    np.testing.assert_allclose(new.var, M * ref.f64(running.var) + (1 - M) * np.mean(variances, 0), rtol=1e-6)
