"""jbn.nnx: same outputs and state as flax.nnx.BatchNorm, and as jbn's linen module."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jbn
import jbn.nnx as jnnx
from tests import reference as ref

C = 3


def _inputs(k=3, shape=(4, 5, C), seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(size=shape).astype(np.float32) * (i + 1) + i) for i in range(k)]


def _randomize(module, seed=1):
    rng = np.random.default_rng(seed)
    module.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, C), jnp.float32)
    module.bias[...] = jnp.asarray(rng.normal(size=C), jnp.float32)


@pytest.mark.parametrize("axis", [-1, 1])
def test_same_outputs_and_state_as_flax_nnx(axis):
    xs = _inputs()
    if axis == 1:
        xs = [jnp.moveaxis(x, -1, 1) for x in xs]
    ours = jnnx.BatchNorm(C, axis=axis, momentum=0.9, rngs=nnx.Rngs(0))
    theirs = nnx.BatchNorm(C, axis=axis, momentum=0.9, rngs=nnx.Rngs(0))
    _randomize(ours)
    _randomize(theirs)
    assert jax.tree.structure(nnx.state(ours, nnx.Param)) == jax.tree.structure(nnx.state(theirs, nnx.Param))
    for module in (ours, theirs):
        module.train()
    for x in xs:
        np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ours.mean[...], theirs.mean[...], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ours.var[...], theirs.var[...], rtol=1e-5, atol=1e-6)
    for module in (ours, theirs):
        module.eval()
    assert ours.use_running_average and theirs.use_running_average
    before = np.asarray(ours.mean[...])
    np.testing.assert_allclose(ours(xs[0]), theirs(xs[0]), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ours.mean[...], before)  # eval leaves the state alone
    # and the training output against the float64 formula
    ours.train()
    x = xs[1] if axis == -1 else jnp.moveaxis(xs[1], 1, -1)
    y_ref, *_ = ref.batch_norm_training(x, ours.scale[...], ours.bias[...], epsilon=1e-5)
    y = ours(xs[1])
    np.testing.assert_allclose(y if axis == -1 else jnp.moveaxis(y, 1, -1), y_ref, rtol=1e-4, atol=1e-4)


def test_same_as_linen_module_under_nnx_jit():
    xs = _inputs(seed=2)
    module = jnnx.BatchNorm(C, momentum=0.8, rngs=nnx.Rngs(0))
    _randomize(module, 3)
    linen = jbn.BatchNorm(use_running_average=False, momentum=0.8)
    variables = {
        "params": {"scale": module.scale[...], "bias": module.bias[...]},
        "batch_stats": {"mean": module.mean[...], "var": module.var[...]},
    }

    @nnx.jit
    def step(module, x):
        return module(x)

    for x in xs:
        y = step(module, x)
        y_linen, updates = linen.apply(variables, x, mutable=["batch_stats"])
        variables = {**variables, **updates}
        np.testing.assert_allclose(y, y_linen, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(module.mean[...], variables["batch_stats"]["mean"], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(module.var[...], variables["batch_stats"]["var"], rtol=1e-6)
    module.eval()
    y_eval = jbn.BatchNorm(use_running_average=True, momentum=0.8).apply(variables, xs[0])
    np.testing.assert_allclose(module(xs[0]), y_eval, rtol=1e-6, atol=1e-6)


def test_constructor_mirrors_flax_and_gradients_flow():
    import inspect

    flax_args = set(inspect.signature(nnx.BatchNorm.__init__).parameters)
    ours_args = set(inspect.signature(jnnx.BatchNorm.__init__).parameters)
    assert flax_args <= ours_args, flax_args - ours_args
    module = jnnx.BatchNorm(C, use_scale=False, momentum=None, rngs=nnx.Rngs(0))
    assert module.scale is None and module.count is not None
    x = _inputs(1)[0]

    def loss(module, x):
        return jnp.sum(module(x) ** 3)

    grads = nnx.grad(loss)(module, x)
    assert set(nnx.to_pure_dict(grads)) == {"bias"}
    np.testing.assert_array_equal(module.count[...], np.ones(C))
    with pytest.raises(ValueError, match="use_running_average"):
        jnnx.BatchNorm(C, use_running_average=None, rngs=nnx.Rngs(0))(x)
    # nnx.view switches a copy
    viewed = nnx.view(module, use_running_average=True)
    assert viewed.use_running_average and not module.use_running_average


def test_nnx_batch_renorm():
    xs = _inputs(seed=4)
    renorm = jnnx.BatchRenorm(C, r_max=1.0, d_max=0.0, momentum=0.9, rngs=nnx.Rngs(0))
    bn = jnnx.BatchNorm(C, momentum=0.9, rngs=nnx.Rngs(0))
    for x in xs:
        np.testing.assert_array_equal(renorm(x), bn(x))  # r_max=1, d_max=0 is batch norm
        np.testing.assert_array_equal(renorm.mean[...], bn.mean[...])
    assert int(renorm.step[...]) == len(xs)
    clipped = jnnx.BatchRenorm(C, r_max=1.2, d_max=0.1, momentum=0.9, rngs=nnx.Rngs(0))
    y = clipped(xs[2])
    running = jbn.RunningStats(jnp.zeros(C), jnp.ones(C))
    y_ref, _ = jbn.batch_renorm(xs[2], jnp.ones(C), jnp.zeros(C), running, training=True, r_max=1.2, d_max=0.1)
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    clipped.eval()
    clipped(xs[0])
    assert int(clipped.step[...]) == 1


def test_nnx_options_match_linen():
    xs = _inputs(2, shape=(8, C), seed=5)
    options = dict(momentum=None, virtual_batch_size=4, unbiased_running_var=True)
    module = jnnx.BatchNorm(C, rngs=nnx.Rngs(0), **options)
    linen = jbn.BatchNorm(use_running_average=False, **options)
    variables = linen.init(jax.random.key(0), xs[0])
    for x in xs:
        y_linen, updates = linen.apply(variables, x, mutable=["batch_stats"])
        variables = {**variables, **updates}
        np.testing.assert_allclose(module(x), y_linen, rtol=1e-6, atol=1e-6)
    for name in ("mean", "var", "count"):
        np.testing.assert_allclose(getattr(module, name)[...], variables["batch_stats"][name], rtol=1e-6)


def test_nnx_recompute_batch_stats():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(C, 4, rngs=rngs)
            self.bn1 = jnnx.BatchNorm(4, rngs=rngs)
            self.bn2 = jnnx.BatchRenorm(4, rngs=rngs)

        def __call__(self, x):
            h = self.bn1(self.linear(x))
            return self.bn2(h * 2.0 + 1.0)

    model = Net(nnx.Rngs(0))
    model.eval()
    batches = [np.asarray(x).reshape(-1, C) + 10 for x in _inputs(3, seed=6)]
    params_before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    jnnx.recompute_batch_stats(model, batches, progress=False)
    data = np.concatenate(batches).astype(np.float64)
    kernel, bias = (np.asarray(v, np.float64) for v in (model.linear.kernel[...], model.linear.bias[...]))
    h = data @ kernel + bias
    np.testing.assert_allclose(model.bn1.mean[...], h.mean(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(model.bn1.var[...], h.var(0), rtol=1e-4)
    # bn2 sees bn1's training output (normalized per batch), as PreciseBN defines
    per_batch = [(b @ kernel + bias) for b in batches]
    h2 = np.concatenate([((p - p.mean(0)) / np.sqrt(p.var(0) + 1e-5)) * 2.0 + 1.0 for p in per_batch])
    np.testing.assert_allclose(model.bn2.mean[...], h2.mean(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(model.bn2.var[...], h2.var(0), rtol=1e-4)
    assert int(model.bn2.step[...]) == 0 and model.bn1.use_running_average  # state and mode as before
    assert not hasattr(model.bn1, "population_count")
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Param), params_before)
