"""Gradient accumulation: K micro-batches give ONE update of the running statistics, equal
to the update with the whole batch's statistics (float64 NumPy reference, masks included),
while each micro-batch is normalized by its own statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import jbn

C, K, M = 3, 4, 6  # features, micro-batches, examples per micro-batch
MOMENTUM = 0.9
TOL = dict(rtol=2e-5, atol=2e-5)


def micro_batches(seed=0, devices=None):
    rng = np.random.default_rng(seed)
    lead = (K,) if devices is None else (devices, K)
    x = rng.normal(3.0, 2.0, (*lead, M, C)) * rng.uniform(0.5, 3.0, (*lead, 1, 1))  # micro-batches differ
    mask = rng.random((*lead, M)) > 0.3
    return x.astype(np.float32), mask


def reference_update(x, mask, old_mean=0.0, old_var=1.0):
    """float64: the running statistics after one update with the whole (masked) batch."""
    flat = np.asarray(x, np.float64).reshape(-1, C)[np.asarray(mask).reshape(-1)]
    mean, var = flat.mean(0), flat.var(0)
    return MOMENTUM * old_mean + (1 - MOMENTUM) * mean, MOMENTUM * old_var + (1 - MOMENTUM) * var


def own_statistics_output(x, mask):
    """float64: a micro-batch normalized by its own (masked) statistics."""
    x64 = np.asarray(x, np.float64)
    valid = x64[np.asarray(mask)]
    return (x64 - valid.mean(0)) / np.sqrt(valid.var(0) + 1e-5)


def test_pure_accumulation_is_one_update_with_the_whole_batch():
    x, mask = micro_batches()
    running = jbn.RunningStats(jnp.zeros(C), jnp.ones(C))
    acc = jbn.empty_accumulator(running.mean)
    for k in range(K):
        acc = jbn.accumulate(acc, jbn.moments(x[k], mask=mask[k][:, None]))
    new = jbn.apply_accumulated(running, acc, MOMENTUM)
    ref_mean, ref_var = reference_update(x, mask)
    np.testing.assert_allclose(new.mean, ref_mean, **TOL)
    np.testing.assert_allclose(new.var, ref_var, **TOL)


class Net(nn.Module):
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, mask):
        return jbn.BatchNorm(use_running_average=False, momentum=MOMENTUM, axis_name=self.axis_name)(x, mask=mask)


def linen_scan_over_micro_batches(model, variables, x, mask):
    """Under jit: start, a lax.scan over the K micro-batches, apply once, stop."""
    stats = jbn.start_accumulation(variables["batch_stats"])

    def body(stats, xm):
        y, mutated = model.apply({**variables, "batch_stats": stats}, xm[0], xm[1][:, None], mutable=["batch_stats"])
        return mutated["batch_stats"], y

    stats, ys = jax.lax.scan(body, stats, (x, mask))
    return jbn.stop_accumulation(jbn.apply_accumulation(stats, MOMENTUM)), ys


def test_linen_lax_scan_over_micro_batches_under_jit():
    x, mask = micro_batches(seed=1)
    model = Net()
    variables = model.init(jax.random.key(0), x[0], mask[0][:, None])
    stats, ys = jax.jit(lambda v, x, m: linen_scan_over_micro_batches(model, v, x, m))(variables, x, mask)
    ref_mean, ref_var = reference_update(x, mask)
    np.testing.assert_allclose(stats["BatchNorm_0"]["mean"], ref_mean, **TOL)
    np.testing.assert_allclose(stats["BatchNorm_0"]["var"], ref_var, **TOL)
    assert set(stats["BatchNorm_0"]) == {"mean", "var"}
    for k in range(K):  # ghost-batch semantics: each micro-batch by its own statistics
        valid = mask[k]
        np.testing.assert_allclose(np.asarray(ys[k])[valid], own_statistics_output(x[k], valid)[valid], **TOL)


def test_linen_across_devices_under_pmap():
    devices = 4
    x, mask = micro_batches(seed=2, devices=devices)
    model = Net(axis_name="device")
    variables = model.init(jax.random.key(0), x[0, 0], mask[0, 0][:, None])
    stats, _ = jax.pmap(lambda x, m: linen_scan_over_micro_batches(model, variables, x, m), axis_name="device")(x, mask)
    # The whole batch: every device's micro-batches together.
    ref_mean, ref_var = reference_update(x, mask)
    np.testing.assert_allclose(stats["BatchNorm_0"]["mean"][0], ref_mean, **TOL)
    np.testing.assert_allclose(stats["BatchNorm_0"]["var"][0], ref_var, **TOL)


@pytest.mark.peer_not_strict("optax.MultiSteps mixes its int32 step counter with float32")
def test_linen_with_optax_multisteps():
    """optax.MultiSteps updates the parameters every K steps; the running statistics get
    their one update at the same step (`jnp.where` on MultiSteps' own step counter)."""
    x, mask = micro_batches(seed=3)
    model = Net()
    variables = model.init(jax.random.key(0), x[0], mask[0][:, None])
    optimizer = optax.MultiSteps(optax.sgd(0.1), every_k_schedule=K)
    opt_state = optimizer.init(variables["params"])
    params, stats = variables["params"], jbn.start_accumulation(variables["batch_stats"])

    @jax.jit
    def step(params, stats, opt_state, x, mask):
        def loss(params):
            y, mutated = model.apply({"params": params, "batch_stats": stats}, x, mask, mutable=["batch_stats"])
            return jnp.sum(y[:, 0] * x[:, 1]), mutated["batch_stats"]

        grads, stats = jax.grad(loss, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        applied = jbn.apply_accumulation(stats, MOMENTUM)
        emit = opt_state.mini_step == 0  # MultiSteps just applied the accumulated gradient
        stats = jax.tree.map(lambda a, b: jnp.where(emit, a, b), applied, stats)
        return optax.apply_updates(params, updates), stats, opt_state

    for k in range(K):
        params, stats, opt_state = step(params, stats, opt_state, x[k], mask[k][:, None])
        if k < K - 1:  # nothing moves before the K-th micro-batch
            np.testing.assert_array_equal(stats["BatchNorm_0"]["mean"], 0.0)
    ref_mean, ref_var = reference_update(x, mask)
    np.testing.assert_allclose(stats["BatchNorm_0"]["mean"], ref_mean, **TOL)
    np.testing.assert_allclose(stats["BatchNorm_0"]["var"], ref_var, **TOL)
    assert not np.allclose(params["BatchNorm_0"]["scale"], 1.0)  # the parameters moved once


def test_nnx_accumulation_in_place():
    x, mask = micro_batches(seed=4)
    bn = jbn.nnx.BatchNorm(C, momentum=MOMENTUM, rngs=nnx.Rngs(0))
    jbn.nnx.start_accumulation(bn)
    run = nnx.jit(lambda bn, x, m: bn(x, mask=m))
    for k in range(K):
        y = run(bn, x[k], mask[k][:, None])
        np.testing.assert_allclose(np.asarray(y)[mask[k]], own_statistics_output(x[k], mask[k])[mask[k]], **TOL)
    np.testing.assert_array_equal(bn.mean[...], 0.0)  # untouched while accumulating
    jbn.nnx.stop_accumulation(jbn.nnx.apply_accumulation(bn))
    ref_mean, ref_var = reference_update(x, mask)
    np.testing.assert_allclose(bn.mean[...], ref_mean, **TOL)
    np.testing.assert_allclose(bn.var[...], ref_var, **TOL)
    assert not hasattr(bn, "population_count")


def test_equinox_accumulation_with_a_scan_over_micro_batches():
    import equinox as eqx

    import jbn.equinox as je

    x, mask = micro_batches(seed=5)
    bn, state = eqx.nn.make_with_state(je.BatchNorm)(C, "batch", mode="batch", momentum=MOMENTUM, accumulation=True)
    per_example = jax.vmap(
        lambda x, state, m: bn(x, state, mask=m), axis_name="batch", in_axes=(0, None, 0), out_axes=(0, None)
    )

    @jax.jit
    def accumulate_step(state, x, mask):
        def body(state, xm):
            y, state = per_example(xm[0], state, xm[1])
            return state, y

        state, ys = jax.lax.scan(body, state, (x, mask))
        return je.apply_accumulation(bn, state), ys

    state, ys = accumulate_step(state, x, mask)
    for k in range(K):
        np.testing.assert_allclose(np.asarray(ys[k])[mask[k]], own_statistics_output(x[k], mask[k])[mask[k]], **TOL)
    # mode "batch" debiases by default: after ONE update the running statistics are the batch's.
    flat = np.asarray(x, np.float64).reshape(-1, C)[mask.reshape(-1)]
    running = bn.running_stats(state)
    np.testing.assert_allclose(running.mean, flat.mean(0), **TOL)
    np.testing.assert_allclose(running.var, flat.var(0), **TOL)
    np.testing.assert_array_equal(running.count, 1)
