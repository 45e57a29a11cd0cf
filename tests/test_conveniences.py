"""Training conveniences: weight_decay_mask, freezing BN for fine-tuning, zero-initialised residual scale."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jbn
from tests import reference as ref


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(4)(x)
        x = jbn.BatchNorm(use_running_average=not train)(x)
        x = nn.LayerNorm()(x)
        return nn.Dense(2)(x)


def _init():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 3)), jnp.float32)
    return x, Net().init(jax.random.key(0), x, train=False)


def test_weight_decay_mask_leaves_out_norm_scale_and_bias():
    _, variables = _init()
    params = variables["params"]
    mask = jbn.weight_decay_mask(params)
    assert mask["Dense_0"] == {"kernel": True, "bias": True}
    assert mask["BatchNorm_0"] == {"scale": False, "bias": False}
    assert mask["LayerNorm_0"] == {"scale": False, "bias": False}
    only_bn = jbn.weight_decay_mask(params, variables["batch_stats"])
    assert only_bn["BatchNorm_0"] == {"scale": False, "bias": False}
    assert only_bn["LayerNorm_0"] == {"scale": True, "bias": True}


def test_weight_decay_mask_on_nnx_state():
    from flax import nnx

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(3, 4, rngs=rngs)
            self.bn = jbn.nnx.BatchNorm(4, rngs=rngs)

    mask = nnx.to_pure_dict(jbn.weight_decay_mask(nnx.state(Model(nnx.Rngs(0)), nnx.Param)))
    assert mask == {"bn": {"bias": False, "scale": False}, "linear": {"bias": True, "kernel": True}}


@pytest.mark.peer_not_strict("optax.adamw multiplies a Python float by its int32 step count")
def test_weight_decay_mask_in_adamw_decays_only_the_kernels():
    _, variables = _init()
    params = jax.tree.map(lambda p: p + 1.0, variables["params"])  # non-zero everywhere
    lr, wd = 0.1, 0.5
    optimizer = optax.adamw(lr, weight_decay=wd, mask=jbn.weight_decay_mask)  # the mask is a callable of the params
    state = optimizer.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = optimizer.update(zeros, state, params)
    new = optax.apply_updates(params, updates)
    # with zero gradients Adam's step is 0, so only the decay moves parameters: p * (1 - lr * wd)
    np.testing.assert_allclose(
        new["Dense_0"]["kernel"], ref.f64(params["Dense_0"]["kernel"]) * (1 - lr * wd), rtol=1e-6
    )
    np.testing.assert_array_equal(new["BatchNorm_0"]["scale"], params["BatchNorm_0"]["scale"])
    np.testing.assert_array_equal(new["BatchNorm_0"]["bias"], params["BatchNorm_0"]["bias"])


def test_frozen_statistics_still_train_scale_and_bias():
    x, variables = _init()
    rng = np.random.default_rng(1)
    stats = {
        "mean": jnp.asarray(rng.normal(size=4), jnp.float32),
        "var": jnp.asarray(rng.uniform(0.5, 2, 4), jnp.float32),
    }
    variables = {**variables, "batch_stats": {"BatchNorm_0": stats}}
    bn = jbn.BatchNorm(use_running_average=True)  # frozen: eval-mode statistics during fine-tuning
    bn_vars = {"params": variables["params"]["BatchNorm_0"], "batch_stats": stats}
    h = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    cot = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)

    def loss(params):
        y, updates = bn.apply({**bn_vars, "params": params}, h, mutable=["batch_stats"])
        return jnp.sum(y * cot), updates

    grads, updates = jax.grad(loss, has_aux=True)(bn_vars["params"])
    xhat = ref.normalize(h, stats["mean"], stats["var"], epsilon=1e-5)
    np.testing.assert_allclose(grads["scale"], (ref.f64(cot) * xhat).sum(0), rtol=1e-5)
    np.testing.assert_allclose(grads["bias"], ref.f64(cot).sum(0), rtol=1e-5)
    jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"], stats)  # statistics unchanged
    # and inside a whole model, train=False at fine-tuning time changes no statistics either
    _, model_updates = Net().apply(variables, x, train=False, mutable=["batch_stats"])
    jax.tree.map(np.testing.assert_array_equal, model_updates["batch_stats"], variables["batch_stats"])


class ResidualBlock(nn.Module):
    """The README's example: the last BN of the branch starts at scale 0 (Goyal et al. 2017)."""

    features: int

    @nn.compact
    def __call__(self, x, train: bool):
        y = nn.Conv(self.features, (3, 3), use_bias=False)(x)
        y = jbn.BatchNorm(use_running_average=not train)(y)
        y = nn.relu(y)
        y = nn.Conv(self.features, (3, 3), use_bias=False)(y)
        y = jbn.BatchNorm(use_running_average=not train, scale_init=nn.initializers.zeros)(y)
        return nn.relu(x + y)


def test_zero_initialised_last_scale_makes_the_block_start_as_identity():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 5, 5, 4)), jnp.float32)
    block = ResidualBlock(4)

    @jax.jit
    def init_and_train_step(x):  # one compilation instead of many small eager ones
        variables = block.init(jax.random.key(0), x, train=False)
        return block.apply(variables, x, train=True, mutable=["batch_stats"])[0]

    y = init_and_train_step(x)
    np.testing.assert_allclose(y, np.maximum(ref.f64(x), 0), rtol=1e-6, atol=1e-6)
