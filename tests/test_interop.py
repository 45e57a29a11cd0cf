"""jbn.interop against real torch.nn.BatchNorm1d/2d and Keras 3 BatchNormalization."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")  # conftest sets it too; keras reads it once, at import

import flax.linen as nn
import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
import torch

import jbn
from jbn import interop

C = 3


def _randomize_torch(bn, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(C, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(C, generator=g))
        bn.running_mean.copy_(torch.randn(C, generator=g))
        bn.running_var.copy_(torch.rand(C, generator=g) + 0.5)


def _batches(shape, k, seed):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=shape).astype(np.float32) * (1 + i) + i for i in range(k)]


def test_momentum_conversions():
    assert interop.momentum_from_torch(0.1) == pytest.approx(0.9)
    assert interop.momentum_to_torch(0.9) == pytest.approx(0.1)
    assert interop.momentum_from_torch(None) is None and interop.momentum_to_torch(None) is None


def test_torch_batchnorm2d_eval_outputs_nchw_and_nhwc():
    bn = torch.nn.BatchNorm2d(C).eval()
    _randomize_torch(bn, 0)
    x = _batches((4, C, 5, 5), 1, 0)[0]
    with torch.no_grad():
        expected = bn(torch.from_numpy(x)).numpy()
    variables = interop.from_torch(bn)
    # num_batches_tracked comes along by default (a float-momentum layer carries it unread)
    assert set(variables["batch_stats"]) == {"mean", "var", "count"}
    np.testing.assert_array_equal(variables["batch_stats"]["count"], np.zeros(C, np.int32))
    y = jbn.BatchNorm(use_running_average=True, axis=1, epsilon=bn.eps).apply(variables, jnp.asarray(x))
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    y_nhwc = jbn.BatchNorm(use_running_average=True).apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(y_nhwc, expected.transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
    # count=False: exactly the tree of flax's BatchNorm, which evaluates the same
    flax_bn = nn.BatchNorm(use_running_average=True, axis=1, epsilon=bn.eps)
    exact = interop.from_torch(bn.state_dict(), count=False)
    assert jax.tree.structure(exact) == jax.tree.structure(flax_bn.init(jax.random.key(0), jnp.asarray(x)))
    np.testing.assert_allclose(flax_bn.apply(exact, jnp.asarray(x)), expected, rtol=1e-5, atol=1e-5)


_TORCH_KINDS = {
    "1d": (torch.nn.BatchNorm1d, (6, C)),
    "1d-ncl": (torch.nn.BatchNorm1d, (4, C, 5)),
    "2d": (torch.nn.BatchNorm2d, (2, C, 3, 3)),
}


def _train_side_by_side(bn, variables, shape, steps, seed):
    """`steps` training steps on the torch layer and on jbn (PyTorch's conventions) from the
    converted variables: same outputs and running statistics after every step."""
    jbn_bn = jbn.BatchNorm(
        use_running_average=False,
        axis=1,
        momentum=interop.momentum_from_torch(bn.momentum),
        epsilon=bn.eps,
        unbiased_running_var=True,
    )
    bn.train()
    for x in _batches(shape, steps, seed):
        with torch.no_grad():
            y_torch = bn(torch.from_numpy(x)).numpy()
        y, updates = jbn_bn.apply(variables, jnp.asarray(x), mutable=["batch_stats"])
        variables = {**variables, **updates}
        np.testing.assert_allclose(y, y_torch, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(variables["batch_stats"]["mean"], bn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(variables["batch_stats"]["var"], bn.running_var.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(variables["batch_stats"]["count"], np.full(C, int(bn.num_batches_tracked)))
    return variables


@pytest.mark.parametrize(
    "kind, momentum, source",
    [
        ("1d", 0.1, "module"),
        ("1d", None, "module"),
        ("1d", None, "state_dict"),
        ("2d", 0.1, "module"),
        ("2d", 0.1, "state_dict"),
        ("1d-ncl", 0.1, "module"),
        ("1d-ncl", None, "state_dict"),
    ],
)
def test_torch_training_steps_give_the_same_running_statistics(kind, momentum, source):
    layer_cls, shape = _TORCH_KINDS[kind]
    model = torch.nn.Sequential(torch.nn.Identity(), layer_cls(C, momentum=momentum))
    bn = model[1]
    _randomize_torch(bn, 1)
    bn.num_batches_tracked.fill_(2)  # a state that has trained before
    # the default keeps num_batches_tracked, from a module as from its state dict
    variables = interop.from_torch(model if source == "module" else model.state_dict(), prefix="1")
    np.testing.assert_array_equal(variables["batch_stats"]["count"], np.full(C, 2))
    variables = _train_side_by_side(bn, variables, shape, 4, 2)
    # back to torch: num_batches_tracked survives the round trip, and it evaluates like jbn and
    # like the torch layer that trained
    fresh = layer_cls(C, momentum=momentum)
    fresh.load_state_dict(interop.to_torch(variables))
    assert int(fresh.num_batches_tracked) == int(bn.num_batches_tracked) == 6
    fresh.eval(), bn.eval()
    x = _batches(shape, 1, 3)[0]
    with torch.no_grad():
        expected = fresh(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(bn(torch.from_numpy(x)).numpy(), expected, rtol=1e-5, atol=1e-5)
    y = jbn.BatchNorm(
        use_running_average=True, axis=1, momentum=interop.momentum_from_torch(momentum), epsilon=bn.eps
    ).apply(variables, jnp.asarray(x))
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_torch_cumulative_average_from_a_state_dict_continues_like_torch():
    """A `momentum=None` layer that has seen 10 batches (running_mean 5): converted from its
    state dict, jbn continues the cumulative average with weight 1/11, 1/12, ... as torch does
    (restarting it would replace the running mean with the first batch's)."""
    bn = torch.nn.BatchNorm1d(C, momentum=None)
    _randomize_torch(bn, 7)
    with torch.no_grad():
        bn.running_mean.fill_(5.0)
    bn.num_batches_tracked.fill_(10)
    state = {k: v.clone() for k, v in bn.state_dict().items()}  # as torch.load gives it
    variables = interop.from_torch(state)
    np.testing.assert_array_equal(variables["batch_stats"]["count"], np.full(C, 10))
    variables = _train_side_by_side(bn, variables, (5, C, 4), 3, 8)
    # the running mean moved by about 1/11 of the way, not to the batch's mean
    assert np.all(np.asarray(variables["batch_stats"]["mean"]) > 3.5)
    assert int(interop.to_torch(variables)["num_batches_tracked"]) == 13
    with torch.no_grad():
        expected = bn.eval()(torch.from_numpy(_batches((5, C, 4), 1, 9)[0])).numpy()
    y = jbn.BatchNorm(use_running_average=True, axis=1, momentum=None, epsilon=bn.eps).apply(
        variables, jnp.asarray(_batches((5, C, 4), 1, 9)[0])
    )
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_torch_state_dict_with_prefix_and_errors():
    model = torch.nn.Sequential(torch.nn.Conv2d(2, C, 1), torch.nn.BatchNorm2d(C, affine=False))
    variables = interop.from_torch(model.state_dict(), prefix="1.")
    assert "params" not in variables
    state = interop.to_torch(variables, prefix="1.")
    assert set(state) == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    # a state dict without num_batches_tracked (PyTorch < 0.4.1) gives no count unless asked
    old = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert set(interop.from_torch(old, prefix="1.")["batch_stats"]) == {"mean", "var"}
    np.testing.assert_array_equal(interop.from_torch(old, prefix="1.", count=True)["batch_stats"]["count"], np.zeros(C))
    with pytest.raises(ValueError, match="count=False"):
        interop.from_torch({**old, "1.num_batches_tracked": torch.tensor(2**31)}, prefix="1.")
    with pytest.raises(ValueError, match=r"found: \['1\.'\]"):
        interop.from_torch(model.state_dict(), prefix="0")


def test_keras_batch_normalization_eval_and_training():
    layer = keras.layers.BatchNormalization(momentum=0.9)
    layer.build((None, 4, 4, C))
    rng = np.random.default_rng(4)
    layer.set_weights([rng.uniform(0.5, 1.5, C), rng.normal(size=C), rng.normal(size=C), rng.uniform(0.5, 2, C)])
    variables = interop.from_keras(layer)
    x = _batches((2, 4, 4, C), 1, 5)[0]
    jbn_eval = jbn.BatchNorm(use_running_average=True, epsilon=layer.epsilon)
    np.testing.assert_allclose(
        jbn_eval.apply(variables, jnp.asarray(x)), np.asarray(layer(x, training=False)), rtol=1e-5, atol=1e-5
    )
    jbn_train = jbn.BatchNorm(use_running_average=False, momentum=layer.momentum, epsilon=layer.epsilon)
    for x in _batches((2, 4, 4, C), 3, 6):
        y_keras = np.asarray(layer(x, training=True))
        y, updates = jbn_train.apply(variables, jnp.asarray(x), mutable=["batch_stats"])
        variables = {**variables, **updates}
        np.testing.assert_allclose(y, y_keras, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            variables["batch_stats"]["mean"], np.asarray(layer.moving_mean), rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(variables["batch_stats"]["var"], np.asarray(layer.moving_variance), rtol=1e-5)
    # to Keras: a fresh layer evaluates like jbn
    fresh = keras.layers.BatchNormalization(center=True, scale=True)
    fresh.build((None, 4, 4, C))
    fresh.set_weights(interop.to_keras(variables))
    np.testing.assert_allclose(
        np.asarray(fresh(x, training=False)), jbn_eval.apply(variables, jnp.asarray(x)), rtol=1e-5, atol=1e-5
    )
    # the weight list alone converts too
    no_gamma = interop.from_keras([np.zeros(C), np.ones(C), np.full(C, 2.0)], scale=False)
    assert set(no_gamma["params"]) == {"bias"} and float(no_gamma["batch_stats"]["var"][0]) == 2.0
    with pytest.raises(ValueError, match="scale=True, center=True means 4"):
        interop.from_keras([np.zeros(C), np.ones(C), np.full(C, 2.0)])
