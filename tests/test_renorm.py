"""Batch Renormalization: against batch norm (r_max=1, d_max=0) and a float64 NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbn
from tests import reference as ref

EPS = 1e-5


def _data(seed=0, shape=(16, 4)):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape).astype(np.float32) * np.array([1.0, 3.0, 0.2, 1.0], np.float32) + np.array(
        [0.0, 2.0, -1.0, 0.5], np.float32
    )
    gamma = rng.uniform(0.5, 1.5, size=shape[-1:]).astype(np.float32)
    beta = rng.normal(size=shape[-1:]).astype(np.float32)
    # Running statistics far from the batch's on some features, so that r and d clip there.
    running = jbn.RunningStats(jnp.array([0.0, 0.0, 0.0, 0.4]), jnp.array([1.0, 0.5, 4.0, 1.1]))
    cot = rng.normal(size=shape).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(gamma), jnp.asarray(beta), running, jnp.asarray(cot)


def _loss_and_grads(fn, x, gamma, beta, cot):
    def loss(x, gamma, beta):
        y, new = fn(x, gamma, beta)
        return jnp.sum(y * cot), (y, new)

    (_, (y, new)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, gamma, beta)
    return y, new, grads


def test_limits_one_and_zero_are_batch_norm_exactly():
    x, gamma, beta, running, cot = _data()
    renorm = lambda x, g, b: jbn.batch_renorm(x, g, b, running, training=True, r_max=1.0, d_max=0.0, momentum=0.9)  # noqa: E731
    # Bit-exact against batch norm's autodiff path (the fused custom VJP, the default, rounds
    # its gradients differently; it is checked against the textbook backward below).
    bn = lambda x, g, b: jbn.batch_norm(x, g, b, running, training=True, momentum=0.9, fused=False)  # noqa: E731
    y_r, new_r, grads_r = _loss_and_grads(renorm, x, gamma, beta, cot)
    y_b, new_b, grads_b = _loss_and_grads(bn, x, gamma, beta, cot)
    np.testing.assert_array_equal(y_r, y_b)
    for a, b in zip(grads_r, grads_b):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(new_r.mean, new_b.mean)
    np.testing.assert_array_equal(new_r.var, new_b.var)
    # and batch norm itself against the textbook backward, on both training paths
    np.testing.assert_allclose(grads_b[0], ref.batch_norm_grads(x, gamma, cot, epsilon=EPS)[0], rtol=1e-4, atol=1e-5)
    fused = lambda x, g, b: jbn.batch_norm(x, g, b, running, training=True, momentum=0.9)  # noqa: E731
    np.testing.assert_allclose(
        _loss_and_grads(fused, x, gamma, beta, cot)[2][0],
        ref.batch_norm_grads(x, gamma, cot, epsilon=EPS)[0],
        rtol=1e-4,
        atol=1e-5,
    )


def test_clipped_renorm_matches_numpy_reference():
    x, gamma, beta, running, cot = _data(1)
    r_max, d_max = 1.5, 0.5
    y, new, (dx, dgamma, dbeta) = _loss_and_grads(
        lambda x, g, b: jbn.batch_renorm(x, g, b, running, training=True, r_max=r_max, d_max=d_max, momentum=0.9),
        x,
        gamma,
        beta,
        cot,
    )
    xf = ref.f64(x)
    mu_b, var_b = xf.mean(0), xf.var(0)
    sigma_b = np.sqrt(var_b + EPS)
    sigma = np.sqrt(ref.f64(running.var) + EPS)
    r_raw = sigma_b / sigma
    d_raw = (mu_b - ref.f64(running.mean)) / sigma
    r = np.clip(r_raw, 1 / r_max, r_max)
    d = np.clip(d_raw, -d_max, d_max)
    # the data make both limits bite on some features and not on others
    assert ((r_raw > r_max) | (r_raw < 1 / r_max)).any() and ((r_raw <= r_max) & (r_raw >= 1 / r_max)).any()
    assert (np.abs(d_raw) > d_max).any() and (np.abs(d_raw) <= d_max).any()
    xhat = (xf - mu_b) / sigma_b
    y_ref = ref.f64(gamma) * (xhat * r + d) + ref.f64(beta)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    # r and d are constants of the backward pass
    np.testing.assert_allclose(
        dx, ref.batch_norm_grads(x, ref.f64(gamma) * r, cot, epsilon=EPS)[0], rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(dgamma, (ref.f64(cot) * (xhat * r + d)).sum(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dbeta, ref.f64(cot).sum(0), rtol=1e-5, atol=1e-5)
    # the running statistics move like batch norm's (mean and biased variance)
    np.testing.assert_allclose(new.mean, 0.9 * ref.f64(running.mean) + 0.1 * mu_b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.var, 0.9 * ref.f64(running.var) + 0.1 * var_b, rtol=1e-5, atol=1e-6)
    # evaluation is batch norm's evaluation
    y_eval, same = jbn.batch_renorm(x, gamma, beta, running, training=False, r_max=r_max, d_max=d_max)
    np.testing.assert_allclose(
        y_eval, ref.normalize(x, running.mean, running.var, gamma, beta, epsilon=EPS), rtol=1e-5, atol=1e-5
    )
    assert same is not None and np.array_equal(same.mean, running.mean)


def test_schedule_helper_follows_the_paper():
    r_sched, d_sched = jbn.paper_renorm_schedules()
    steps = np.array([0, 4_999, 5_000, 10_000, 25_000, 40_000, 100_000])
    np.testing.assert_allclose(
        [float(r_sched(s)) for s in steps], np.interp(steps, [5_000, 40_000], [1.0, 3.0]), rtol=1e-6
    )
    np.testing.assert_allclose(
        [float(d_sched(s)) for s in steps], np.interp(steps, [5_000, 25_000], [0.0, 5.0]), rtol=1e-6
    )
    with pytest.raises(ValueError, match="end_step"):
        jbn.renorm_schedule(1.0, 3.0, 10, 5)


def test_linen_module_keeps_step_and_reads_schedules():
    x, gamma, beta, running, _ = _data(2, (8, 4))
    r_sched = jbn.renorm_schedule(1.0, 3.0, 1, 3)
    d_sched = jbn.renorm_schedule(0.0, 5.0, 1, 3)
    model = jbn.BatchRenorm(use_running_average=False, momentum=0.9, r_max=r_sched, d_max=d_sched)
    variables = model.init(jax.random.key(0), x)
    assert set(variables["batch_stats"]) == {"mean", "var", "step"}
    assert int(variables["batch_stats"]["step"]) == 0  # init does not count as a step
    variables = {
        "params": {"scale": gamma, "bias": beta},
        "batch_stats": {"mean": running.mean, "var": running.var, "step": jnp.int32(0)},
    }
    apply = jax.jit(lambda v, x: model.apply(v, x, mutable=["batch_stats"]))
    stats = running
    for step in range(3):
        y, updates = apply(variables, x + step)
        y_ref, stats_ref = jbn.batch_renorm(
            x + step,
            gamma,
            beta,
            stats,
            training=True,
            r_max=float(r_sched(step)),
            d_max=float(d_sched(step)),
            momentum=0.9,
        )
        np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(updates["batch_stats"]["mean"], stats_ref.mean, rtol=1e-6, atol=1e-7)
        assert int(updates["batch_stats"]["step"]) == step + 1
        variables = {**variables, "batch_stats": updates["batch_stats"]}
        stats = stats_ref
    # step 0 of the schedules (r_max=1, d_max=0) is batch norm: same output as jbn.BatchNorm
    fresh = {
        "params": {"scale": gamma, "bias": beta},
        "batch_stats": {"mean": running.mean, "var": running.var, "step": jnp.int32(0)},
    }
    y_renorm, _ = apply(fresh, x)
    y_bn, _ = jbn.BatchNorm(use_running_average=False).apply(
        {"params": fresh["params"], "batch_stats": {"mean": running.mean, "var": running.var}},
        x,
        mutable=["batch_stats"],
    )
    np.testing.assert_allclose(y_renorm, y_bn, rtol=1e-6, atol=1e-6)  # jit fuses the two differently


def test_bad_limits_fail_with_a_clear_message():
    x, gamma, beta, running, _ = _data()
    with pytest.raises(ValueError, match="r_max"):
        jbn.batch_renorm(x, gamma, beta, running, training=True, r_max=0.5)
    with pytest.raises(ValueError, match="d_max"):
        jbn.batch_renorm(x, gamma, beta, running, training=True, d_max=-1.0)
    with pytest.raises(ValueError, match="pass `step`"):
        jbn.batch_renorm(x, gamma, beta, running, training=True, r_max=jbn.renorm_schedule(1, 3, 0, 10))


def _renorm_reference(x, gamma, beta, running, r_max, d_max, momentum, valid=None):
    """Float64 batch renorm from the paper's formulas, with the statistics of the elements
    `valid` selects (all by default): (y for every row, new running mean, new running var, r)."""
    mu_b, var_b, _ = ref.moments(x, -1, None if valid is None else np.asarray(valid)[:, None])
    sigma_b = np.sqrt(var_b + EPS)
    sigma = np.sqrt(ref.f64(running.var) + EPS)
    r = np.clip(sigma_b / sigma, 1 / r_max, r_max)
    d = np.clip((mu_b - ref.f64(running.mean)) / sigma, -d_max, d_max)
    y = ref.f64(gamma) * ((ref.f64(x) - mu_b) / sigma_b * r + d) + ref.f64(beta)
    new_mean = momentum * ref.f64(running.mean) + (1 - momentum) * mu_b
    new_var = momentum * ref.f64(running.var) + (1 - momentum) * var_b
    return y, new_mean, new_var, r


def _transformed(fn, transform, name="i"):
    """`fn(x, cot, mask)` mapped over a leading participant axis bound to `name`."""
    if transform == "pmap":
        return jax.pmap(fn, axis_name=name)
    return jax.jit(jax.vmap(fn, axis_name=name))


@pytest.mark.parametrize("transform", ["pmap", "vmap"])
def test_axis_name_is_renorm_of_the_concatenated_batch(transform):
    """8 participants (the 8 fake CPU devices under pmap) of 4 rows each renormalize like one
    batch of 32 rows, in the output, the gradients and the running statistics."""
    devices, rows, r_max, d_max = 8, 4, 1.5, 0.5
    x, gamma, beta, running, cot = _data(3, (devices * rows, 4))

    def step(x, cot):
        def loss(x, gamma, beta):
            y, new = jbn.batch_renorm(
                x, gamma, beta, running, training=True, r_max=r_max, d_max=d_max, momentum=0.9, axis_name="i"
            )
            return jnp.sum(y * cot), (y, new)

        (_, (y, new)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, gamma, beta)
        return y, new, grads

    split = lambda a: a.reshape(devices, rows, -1)  # noqa: E731
    y, new, (dx, dgamma, dbeta) = _transformed(step, transform)(split(x), split(cot))
    y_ref, mean_ref, var_ref, r = _renorm_reference(x, gamma, beta, running, r_max, d_max, 0.9)
    sigma = np.sqrt(ref.f64(running.var) + EPS)
    r_raw = np.sqrt(ref.f64(x).var(0) + EPS) / sigma
    d_raw = (ref.f64(x).mean(0) - ref.f64(running.mean)) / sigma
    assert ((r_raw > r_max) | (r_raw < 1 / r_max)).any() and (np.abs(d_raw) > d_max).any()  # the limits bite
    np.testing.assert_allclose(np.asarray(y).reshape(x.shape), y_ref, rtol=1e-5, atol=1e-5)
    for d in range(devices):  # every participant holds the same, global, running statistics
        np.testing.assert_allclose(new.mean[d], mean_ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(new.var[d], var_ref, rtol=1e-5, atol=1e-6)
    # each participant's gradient of its own loss is its slice of the global batch's gradient
    np.testing.assert_allclose(
        np.asarray(dx).reshape(x.shape),
        ref.batch_norm_grads(x, ref.f64(gamma) * r, cot, epsilon=EPS)[0],
        rtol=1e-4,
        atol=1e-5,
    )
    xhat = (ref.f64(x) - ref.f64(x).mean(0)) / np.sqrt(ref.f64(x).var(0) + EPS)
    d_clip = np.clip(d_raw, -d_max, d_max)
    np.testing.assert_allclose(np.sum(dgamma, 0), (ref.f64(cot) * (xhat * r + d_clip)).sum(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.sum(dbeta, 0), ref.f64(cot).sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("transform", [None, "pmap", "vmap"])
def test_mask_is_renorm_of_the_valid_rows(transform):
    """Padded rows count neither in the statistics nor in the gradient, also when the valid
    rows are spread unevenly over 8 participants (one of them all padding)."""
    devices, rows, r_max, d_max = 8, 4, 1.5, 0.5
    x, gamma, beta, running, cot = _data(4, (devices * rows, 4))
    valid = np.random.default_rng(5).random(devices * rows) < 0.6
    valid[:rows] = False  # participant 0 holds padding only
    valid[rows : rows + 2] = True  # and the others at least two valid rows between them
    cot = jnp.where(jnp.asarray(valid)[:, None], cot, 0.0)  # padded outputs do not enter the loss

    def step(x, cot, mask):
        def loss(x):
            y, new = jbn.batch_renorm(
                x,
                gamma,
                beta,
                running,
                training=True,
                r_max=r_max,
                d_max=d_max,
                momentum=0.9,
                mask=mask,
                axis_name=None if transform is None else "i",
            )
            return jnp.sum(y * cot), (y, new)

        (_, (y, new)), dx = jax.value_and_grad(loss, has_aux=True)(x)
        return y, new, dx

    if transform is None:
        y, new, dx = jax.jit(step)(x, cot, jnp.asarray(valid)[:, None])
    else:
        split = lambda a: a.reshape(devices, rows, *a.shape[1:])  # noqa: E731
        y, new, dx = _transformed(step, transform)(
            split(x), split(cot), split(jnp.asarray(valid)[:, None])
        )  # (rows, 1): a (rows,) mask of a square input is ambiguous
        for d in range(1, devices):  # the same global statistics on every participant
            np.testing.assert_array_equal(new.mean[d], new.mean[0])
            np.testing.assert_array_equal(new.var[d], new.var[0])
        new = jbn.RunningStats(new.mean[0], new.var[0])
    assert np.isfinite(np.asarray(y)).all() and np.isfinite(np.asarray(dx)).all()
    y, dx = np.asarray(y).reshape(x.shape), np.asarray(dx).reshape(x.shape)
    # the reference sees only the valid rows; padded rows go through the same affine map
    y_ref, mean_ref, var_ref, r = _renorm_reference(x, gamma, beta, running, r_max, d_max, 0.9, valid=valid)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    only_valid = _renorm_reference(np.asarray(x)[valid], gamma, beta, running, r_max, d_max, 0.9)
    np.testing.assert_allclose(y[valid], only_valid[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new.mean, mean_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.var, var_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        dx[valid],
        ref.batch_norm_grads(np.asarray(x)[valid], ref.f64(gamma) * r, np.asarray(cot)[valid], epsilon=EPS)[0],
        rtol=1e-4,
        atol=1e-5,
    )
    np.testing.assert_array_equal(dx[~valid], 0.0)
