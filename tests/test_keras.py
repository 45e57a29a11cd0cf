"""jbn.keras.BatchNormalization against keras's own layer (same weights: outputs, moving
statistics, gradients), a float64 NumPy reference, .keras files, keras.distribution on 8
fake CPU devices, ghost batches, keras's Batch Renorm, and recompute_batch_stats."""

import json
import os
import subprocess
import sys
import warnings

os.environ.setdefault("KERAS_BACKEND", "jax")  # tests/conftest.py sets it too; this file may run alone

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jbn
from jbn.keras import BatchNormalization, recompute_batch_stats
from tests import reference as ref

WEIGHTS = ("gamma", "beta", "moving_mean", "moving_variance")


def random_weights(rng, features):
    return [
        rng.normal(1.0, 0.2, features),
        rng.normal(0.0, 0.2, features),
        rng.normal(0.0, 1.0, features),
        rng.uniform(0.5, 2.0, features),
    ]


def pair(rng, shape, **kwargs):
    """keras's layer and jbn's, built for `shape`, holding the same random weights."""
    peer, ours = keras.layers.BatchNormalization(**kwargs), BatchNormalization(**kwargs)
    for layer in (peer, ours):
        layer.build(shape)
    axis = kwargs.get("axis", -1)
    for name, value in zip(WEIGHTS, random_weights(rng, shape[axis])):
        if getattr(peer, name) is not None:
            getattr(peer, name).assign(value)
            getattr(ours, name).assign(value)
    return peer, ours


def keras_mask(rng, shape):
    """A keras mask (every axis but the last), with at least one valid element."""
    mask = rng.uniform(size=shape[:-1]) < 0.7
    mask.flat[0] = True
    return mask


def trained(layer, x, mask):
    """(output, gradients of sum(output * w) by x and the trainable weights, new non-trainable values)."""
    w = jnp.asarray(np.random.default_rng(9).normal(size=x.shape), jnp.float32)
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def loss(x, trainable):
        y, new = layer.stateless_call(trainable, non_trainable, x, training=True, mask=mask)
        return jnp.sum(y * w), (y, new)

    (_, (y, new)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        jnp.asarray(x), [v.value for v in layer.trainable_variables]
    )
    return y, grads, new


@pytest.mark.parametrize(
    "shape, axis, masked, kwargs",
    [
        ((16, 5), -1, False, {}),
        ((6, 4, 3), -1, True, {}),
        ((4, 3, 3, 5), -1, True, {"momentum": 0.9, "epsilon": 1e-5}),
        ((4, 5, 3, 3), 1, False, {"center": False}),
        ((6, 4, 3), 1, True, {"scale": False}),
    ],
)
def test_outputs_moving_statistics_and_gradients_match_keras(shape, axis, masked, kwargs):
    rng = np.random.default_rng(0)
    peer, ours = pair(rng, shape, axis=axis, **kwargs)
    x = rng.normal(3.0, 2.0, shape).astype(np.float32)
    mask = keras_mask(rng, shape) if masked else None
    y_peer, grads_peer, new_peer = trained(peer, x, mask)
    y_ours, grads_ours, new_ours = trained(ours, x, mask)
    np.testing.assert_allclose(y_ours, y_peer, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(new_ours, new_peer, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(grads_ours[0], grads_peer[0], atol=2e-5, rtol=2e-4)
    for ours_grad, peer_grad in zip(grads_ours[1], grads_peer[1]):
        np.testing.assert_allclose(ours_grad, peer_grad, atol=2e-5, rtol=2e-5)
    # Inference with the same weights.
    np.testing.assert_allclose(ours(x, training=False), peer(x, training=False), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_training_call_against_float64_reference(masked):
    rng = np.random.default_rng(1)
    shape = (8, 6, 4)
    layer = BatchNormalization(momentum=0.8)
    layer.build(shape)
    gamma, beta, moving_mean, moving_var = random_weights(rng, 4)
    layer.set_weights([gamma, beta, moving_mean, moving_var])
    x = rng.normal(-2.0, 3.0, shape).astype(np.float32)
    mask = keras_mask(rng, shape) if masked else None
    y = layer(x, training=True, mask=mask)
    full = None if mask is None else mask[..., None]
    mean, var, _ = ref.moments(x, axis=-1, mask=full)
    np.testing.assert_allclose(y, ref.normalize(x, mean, var, gamma, beta, epsilon=1e-3), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(layer.moving_mean.numpy(), 0.8 * moving_mean + 0.2 * mean, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), 0.8 * moving_var + 0.2 * var, atol=1e-6, rtol=1e-6)


def test_fully_masked_feature_keeps_its_moving_statistics():
    """keras moves them towards 0 (its mean is 0 / (0 + 1e-7)); jbn leaves them as they were."""
    layer = BatchNormalization(momentum=0.5)
    x = np.random.default_rng(2).normal(size=(4, 3, 2)).astype(np.float32)
    layer(x, training=False)  # builds
    before = [w.copy() for w in layer.get_weights()]
    y = layer(x, training=True, mask=np.zeros((4, 3), bool))
    assert np.isfinite(np.asarray(y)).all()
    for after, old in zip(layer.get_weights(), before):
        np.testing.assert_array_equal(after, old)


def test_full_rank_mask_broadcasts_against_inputs():
    """jbn's extension: a mask of the inputs' rank, here one per (example, feature)."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(10, 3)).astype(np.float32)
    mask = rng.uniform(size=(10, 3)) < 0.6
    mask[0] = True
    layer = BatchNormalization(momentum=0.0)
    layer(x, training=True, mask=mask)
    mean, var, _ = ref.moments(x, axis=-1, mask=mask)
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), var, atol=1e-6)
    with pytest.raises(ValueError, match="one axis less"):
        layer(x, training=True, mask=np.ones((10, 3, 1, 1), bool))


@pytest.mark.parametrize("loc, n", [(1e4, 256), (1e6, 64)])
def test_accuracy_when_the_mean_is_large_against_the_spread(loc, n):
    """|mean| / std = loc. The variance: float32-accurate. The output: within the rounding of
    the input itself (half an ulp of |mean|, in units of std) plus float32 rounding."""
    x = (loc + np.random.default_rng(4).normal(0.0, 1.0, (n, 8))).astype(np.float32)
    layer = BatchNormalization(momentum=0.0, epsilon=1e-6)
    y = np.asarray(layer(x, training=True), np.float64)
    mean, var, _ = ref.moments(x)
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=2 * np.finfo(np.float32).eps)
    np.testing.assert_allclose(layer.moving_variance.numpy(), var, rtol=1e-5)
    input_rounding = 0.5 * np.spacing(np.float32(loc)) / np.sqrt(var.min())
    np.testing.assert_allclose(y, ref.normalize(x, mean, var, epsilon=1e-6), atol=input_rounding + 1e-5, rtol=0)


def test_mixed_precision_output_dtype_and_float32_statistics():
    rng = np.random.default_rng(5)
    x = rng.normal(100.0, 1.0, (64, 4)).astype(np.float32)
    layer = BatchNormalization(momentum=0.0, dtype="mixed_bfloat16")
    y = layer(x, training=True)
    assert y.dtype == jnp.bfloat16 and layer.moving_mean.dtype == "float32"
    # The statistics are those of the bfloat16 inputs (keras casts them first), in float32.
    mean, var, _ = ref.moments(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64))
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), var, rtol=1e-5)


def test_trainable_false_normalizes_with_the_moving_statistics():
    rng = np.random.default_rng(6)
    layer = BatchNormalization()
    layer.build((5, 3))
    weights = random_weights(rng, 3)
    layer.set_weights(weights)
    layer.trainable = False
    x = rng.normal(size=(5, 3)).astype(np.float32)
    y = layer(x, training=True)
    np.testing.assert_allclose(y, ref.normalize(x, weights[2], weights[3], *weights[:2], epsilon=1e-3), atol=1e-5)
    for after, before in zip(layer.get_weights(), weights):
        np.testing.assert_allclose(after, before, rtol=1e-7)


def test_weights_names_order_and_config_as_keras():
    peer, ours = keras.layers.BatchNormalization(renorm=True), BatchNormalization(renorm=True)
    for layer in (peer, ours):
        layer.build((None, 3))
    assert [v.name for v in ours.weights] == [v.name for v in peer.weights]
    assert [v.shape for v in ours.weights] == [v.shape for v in peer.weights]
    assert isinstance(ours, keras.layers.BatchNormalization)
    config = ours.get_config()
    jbn_only = ("virtual_batch_size", "axis_name")
    assert {k: v for k, v in config.items() if k not in ("name", *jbn_only)} == {
        k: v for k, v in peer.get_config().items() if k != "name"
    }
    assert [config[k] for k in jbn_only] == [None, None]
    assert BatchNormalization.from_config(config).get_config() == config


def small_model(layer_kwargs=None, features=3):
    inputs = keras.Input((4, features))
    h = keras.layers.Masking(0.0)(inputs)
    h = BatchNormalization(**(layer_kwargs or {}))(h)
    h = keras.layers.Dense(2)(h)
    h = BatchNormalization(momentum=0.5)(h)
    return keras.Model(inputs, h)


@pytest.mark.peer_not_strict(
    "keras.layers.Dense adds its (units,) bias to its (batch, ..., units) output by implicit rank promotion"
)
def test_keras_file_round_trip(tmp_path):
    rng = np.random.default_rng(7)
    model = small_model({"synchronized": True, "virtual_batch_size": 4})
    x = rng.normal(size=(8, 4, 3)).astype(np.float32)
    x[:, -1] = 0.0  # padding the Masking layer masks
    model.compile("sgd", "mse")
    model.fit(x, rng.normal(size=(8, 4, 2)), batch_size=8, epochs=2, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)  # registered: no custom_objects needed
    assert [type(layer) for layer in loaded.layers] == [type(layer) for layer in model.layers]
    assert loaded.layers[2].get_config() == model.layers[2].get_config()
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded(x, training=False), model(x, training=False))


@pytest.mark.peer_not_strict(
    "keras.layers.Dense adds its (units,) bias to its (batch, ..., units) output by implicit rank promotion"
)
def test_fit_updates_moving_statistics_as_keras_does():
    """keras's jitted training step (a StatelessScope) with jbn's layer and with keras's."""
    rng = np.random.default_rng(8)
    x = rng.normal(1.0, 2.0, (16, 4, 3)).astype(np.float32)
    x[:3, -2:] = 0.0
    target = rng.normal(size=(16, 4, 3)).astype(np.float32)
    results = []
    for cls in (keras.layers.BatchNormalization, BatchNormalization):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((4, 3))
        h = keras.layers.Masking(0.0)(inputs)
        model = keras.Model(inputs, cls(momentum=0.9)(keras.layers.Dense(3)(h)))
        model.compile("sgd", "mse")
        model.fit(x, target, batch_size=8, epochs=2, verbose=0, shuffle=False)
        results.append(model.get_weights())
    for ours, peer in zip(*results):
        np.testing.assert_allclose(ours, peer, atol=1e-5, rtol=1e-5)


def test_other_backend_is_refused_at_construction(monkeypatch):
    monkeypatch.setattr(keras.backend, "backend", lambda: "torch")
    with pytest.raises(ValueError, match="backend is 'torch'"):
        BatchNormalization()


@pytest.mark.parametrize("bad", [0, -2, 2.0, True])
def test_bad_virtual_batch_size_is_refused(bad):
    with pytest.raises(ValueError, match="virtual_batch_size"):
        BatchNormalization(virtual_batch_size=bad)
    with pytest.raises(ValueError, match="renorm"):
        BatchNormalization(virtual_batch_size=2, renorm=True)


def test_ghost_batches_against_float64_reference():
    rng = np.random.default_rng(10)
    x = rng.normal(size=(12, 5, 3)).astype(np.float32)
    x[4:8] += 3.0  # sub-batches with different statistics
    layer = BatchNormalization(momentum=0.0, virtual_batch_size=4, center=False, scale=False)
    y = layer(x, training=True)
    expected, means, variances = [], [], []
    for part in np.split(x, 3):
        mean, var, _ = ref.moments(part)
        expected.append(ref.normalize(part, mean, var, epsilon=1e-3))
        means.append(mean)
        variances.append(var)
    np.testing.assert_allclose(y, np.concatenate(expected), atol=1e-5)
    np.testing.assert_allclose(layer.moving_mean.numpy(), np.mean(means, 0), atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), np.mean(variances, 0), atol=1e-5)


@pytest.mark.parametrize("clipping", [None, {"rmax": 1.5, "rmin": 0.9, "dmax": 0.5}, {"rmax": 1.2}])
@pytest.mark.parametrize("masked", [False, True])
def test_renorm_matches_keras(clipping, masked):
    rng = np.random.default_rng(11)
    shape = (12, 3, 4)
    kwargs = dict(renorm=True, renorm_clipping=clipping, renorm_momentum=0.8, momentum=0.9)
    peer, ours = pair(rng, shape, **kwargs)
    # Against a batch of mean ~0.5 and std ~2: r ~ (4, 1.3, 0.5, 0.25) and d ~ (0, 2.3, 0, -1.2),
    # so every clipping bound binds for some feature and not for another.
    state = {"moving_stddev": [0.8, 1.1, 1.3, 0.9], "renorm_mean": [0.5, -3.0, 0.4, 10.0]}
    state["renorm_stddev"] = [0.5, 1.5, 4.0, 8.0]
    for name, value in state.items():
        getattr(peer, name).assign(value)
        getattr(ours, name).assign(value)
    x = rng.normal(0.5, 2.0, shape).astype(np.float32)
    mask = keras_mask(rng, shape) if masked else None
    y_peer, grads_peer, new_peer = trained(peer, x, mask)
    y_ours, grads_ours, new_ours = trained(ours, x, mask)
    np.testing.assert_allclose(y_ours, y_peer, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(new_ours, new_peer, atol=1e-5, rtol=1e-5)
    for ours_grad, peer_grad in zip(jax.tree.leaves(grads_ours), jax.tree.leaves(grads_peer)):
        np.testing.assert_allclose(ours_grad, peer_grad, atol=2e-5, rtol=2e-4)


def _two_bn_models():
    """The same functional model with keras's BN layers and with jbn's, same weights."""
    built = []
    for cls in (keras.layers.BatchNormalization, BatchNormalization):
        keras.utils.set_random_seed(1)
        inputs = keras.Input((3,))
        h = cls(name="bn1")(inputs)
        h = keras.layers.Dense(4, activation="tanh", name="dense")(h)
        h = cls(name="bn2")(h)
        built.append(keras.Model(inputs, h))
    return built


@pytest.mark.peer_not_strict(
    "keras.layers.Dense adds its (units,) bias to its (batch, ..., units) output by implicit rank promotion"
)
def test_recompute_batch_stats_gives_the_population_statistics():
    rng = np.random.default_rng(12)
    batches = [rng.normal(2.0, 3.0, (8, 3)).astype(np.float32) + i for i in range(4)]
    peer, ours = _two_bn_models()
    recompute_batch_stats(ours, [(b, np.zeros(len(b))) for b in batches], progress=True)
    # bn1 sees the inputs; bn2 the Dense output of bn1's TRAINING output on each batch,
    # taken from keras's own layers (a functional sub-model) as the independent reference.
    inner = keras.Model(peer.input, peer.get_layer("dense").output)
    seen = {"bn1": np.concatenate(batches), "bn2": np.concatenate([inner(b, training=True) for b in batches])}
    for name, data in seen.items():
        mean, var, _ = ref.moments(data)
        np.testing.assert_allclose(ours.get_layer(name).moving_mean.numpy(), mean, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(ours.get_layer(name).moving_variance.numpy(), var, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(ours.get_layer("bn1").gamma.numpy(), peer.get_layer("bn1").gamma.numpy())


@pytest.mark.peer_not_strict(
    "keras.layers.Dense adds its (units,) bias to its (batch, ..., units) output by implicit rank promotion"
)
def test_recompute_batch_stats_errors():
    plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match=r"no jbn\.keras\.BatchNormalization"):
        recompute_batch_stats(plain, [np.zeros((2, 3))], progress=False)
    _, ours = _two_bn_models()
    with pytest.raises(ValueError, match="no batch"):
        recompute_batch_stats(ours, [], progress=False)
    before = ours.get_weights()
    ours.get_layer("bn2").trainable = False  # runs in inference: records nothing
    with pytest.raises(ValueError, match="bn2 saw no valid element"):
        recompute_batch_stats(ours, [np.ones((4, 3), np.float32)], progress=False)
    for after, old in zip(ours.get_weights(), before):
        np.testing.assert_array_equal(after, old)
    assert all(layer._population is None for layer in (ours.get_layer("bn1"), ours.get_layer("bn2")))


# keras.distribution on the 8 fake CPU devices of tests/conftest.py.


def _sharded_batch(rng, n=32, t=4, c=6):
    """Every eighth of the batch (one device's shard) has its own mean, and the mask
    leaves the shards different numbers of valid steps: per-shard statistics differ from
    the global ones."""
    x = rng.normal(0.0, 1.0, (n, t, c)).astype(np.float32)
    x += np.repeat(np.arange(8, dtype=np.float32) * 2.0, n // 8)[:, None, None]
    valid = rng.uniform(size=(n, t)) < np.repeat(np.linspace(0.2, 1.0, 8), n // 8)[:, None]
    valid[:, 0] = True
    x[~valid] = 0.0  # what keras.layers.Masking(0.0) masks
    return x, valid


def _data_parallel():
    return keras.distribution.DataParallel(devices=keras.distribution.list_devices())


def _model_parallel():
    mesh = keras.distribution.DeviceMesh((4, 2), ("batch", "model"), devices=keras.distribution.list_devices())
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*dense.*kernel"] = (None, "model")  # the BN input is sharded on its features too
    layout_map[".*batch_normalization.*"] = ("model",)
    return keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")


@pytest.mark.parametrize("make_distribution", [_data_parallel, _model_parallel], ids=["DataParallel", "ModelParallel"])
@pytest.mark.parametrize("masked", [False, True])
def test_synchronized_statistics_are_global_under_keras_distribution(make_distribution, masked):
    assert len(jax.devices()) == 8
    rng = np.random.default_rng(13)
    x, valid = _sharded_batch(rng)
    distribution = make_distribution()
    layout = distribution.get_data_layout(x.shape)
    assert layout.axes[0] == distribution.batch_dim_name  # keras splits the batch across devices
    with distribution.scope():
        inputs = keras.Input(x.shape[1:])
        h = keras.layers.Masking(0.0)(inputs) if masked else inputs
        dense = keras.layers.Dense(6, kernel_initializer="identity", use_bias=False)
        bn = BatchNormalization(momentum=0.0, synchronized=True)
        model = keras.Model(inputs, bn(dense(h)))
        model.compile("sgd", "mse")
        model.fit(x, np.zeros_like(x), batch_size=len(x), epochs=1, verbose=0, shuffle=False)
    # One step at momentum 0: the moving statistics are the batch's; the identity kernel
    # (before the step) made the BN input the data itself.
    mean, var, _ = ref.moments(x, mask=valid[..., None] if masked else None)
    np.testing.assert_allclose(bn.moving_mean.numpy(), mean, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), var, atol=1e-5, rtol=1e-5)
    # The test data would show per-device statistics: their mean variance is far from the global one.
    shards = [
        ref.moments(s, mask=v[..., None] if masked else None)[1] for s, v in zip(np.split(x, 8), np.split(valid, 8))
    ]
    assert np.all(np.abs(np.mean(shards, 0) - var) > 1.0)


@pytest.mark.peer_not_strict(
    "keras.layers.Dense adds its (units,) bias to its (batch, ..., units) output by implicit rank promotion"
)
def test_recompute_batch_stats_feeds_later_layers_the_ghost_batch_training_output():
    """PreciseBN: each layer sees what it sees in training, here bn1's ghost-batch output."""
    rng = np.random.default_rng(14)
    batches = [rng.normal(1.0, 2.0, (8, 3)).astype(np.float32) * (i + 1) for i in range(3)]
    inputs = keras.Input((3,))
    h = BatchNormalization(virtual_batch_size=4, name="bn1")(inputs)
    h = keras.layers.Dense(4, activation="tanh", name="dense")(h)
    model = keras.Model(inputs, BatchNormalization(name="bn2")(h))
    kernel, bias = (np.asarray(w, np.float64) for w in model.get_layer("dense").get_weights())
    recompute_batch_stats(model, batches, progress=False)
    dense_inputs = []
    for batch in batches:
        for part in np.split(batch, 2):  # bn1's training output: each half with its own statistics
            mean, var, _ = ref.moments(part)
            dense_inputs.append(np.tanh(ref.normalize(part, mean, var, epsilon=1e-3) @ kernel + bias))
    for name, data in (("bn1", np.concatenate(batches)), ("bn2", np.concatenate(dense_inputs))):
        mean, var, _ = ref.moments(data)
        np.testing.assert_allclose(model.get_layer(name).moving_mean.numpy(), mean, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(model.get_layer(name).moving_variance.numpy(), var, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_axis_name_synchronizes_a_custom_training_loop_under_shard_map(masked):
    """Each device's call sees an eighth of the batch; `axis_name` makes the statistics global."""
    from jax.sharding import PartitionSpec

    rng = np.random.default_rng(15)
    x, valid = _sharded_batch(rng)
    layer = BatchNormalization(momentum=0.0, axis_name="batch")
    layer.build(x.shape)
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def step(trainable, non_trainable, x, mask):
        return layer.stateless_call(trainable, non_trainable, x, training=True, mask=mask if masked else None)

    mesh = jax.make_mesh((8,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
    batch, replicated = PartitionSpec("batch"), PartitionSpec()
    sharded_step = jax.shard_map(
        step, mesh=mesh, in_specs=(replicated, replicated, batch, batch), out_specs=(batch, replicated)
    )
    y, (moving_mean, moving_var) = jax.jit(sharded_step)(trainable, non_trainable, x, valid)
    mean, var, _ = ref.moments(x, mask=valid[..., None] if masked else None)
    np.testing.assert_allclose(moving_mean, mean, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(moving_var, var, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(y, ref.normalize(x, mean, var, epsilon=1e-3), atol=1e-4, rtol=1e-4)


def test_jbn_options_survive_a_json_config_round_trip():
    layer = BatchNormalization(virtual_batch_size=4, axis_name=("hosts", "devices"), synchronized=True)
    serialized = json.dumps(keras.saving.serialize_keras_object(layer))
    restored = keras.saving.deserialize_keras_object(json.loads(serialized))
    assert type(restored) is BatchNormalization
    assert (restored.virtual_batch_size, restored.axis_name, restored.synchronized) == (4, ("hosts", "devices"), True)


def test_import_jbn_loads_keras_only_on_first_use_of_jbn_keras():
    code = (
        "import sys, jbn\n"
        "assert 'keras' not in sys.modules, 'import jbn loaded keras'\n"
        "jbn.keras.BatchNormalization\n"
        "assert 'keras' in sys.modules\n"
    )
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr


def test_renorm_in_mixed_precision_matches_keras():
    """bfloat16 inputs and outputs; the statistics and the correction in float32, as keras."""
    x = np.random.default_rng(16).normal(3.0, 2.0, (64, 4)).astype(np.float32)
    results = []
    for cls in (keras.layers.BatchNormalization, BatchNormalization):
        layer = cls(renorm=True, dtype="mixed_bfloat16", renorm_clipping={"rmax": 2.0, "dmax": 1.0})
        layer.build(x.shape)
        layer.renorm_stddev.assign([0.5, 1.0, 2.0, 4.0])
        layer.renorm_mean.assign([0.0, 3.0, 5.0, -1.0])
        y = layer(x, training=True)
        assert y.dtype == jnp.bfloat16
        results.append((np.asarray(y, np.float32), [w.numpy() for w in layer.weights]))
    (y_peer, w_peer), (y_ours, w_ours) = results
    np.testing.assert_allclose(y_ours, y_peer, rtol=2.0**-7, atol=1e-5)  # at most one bfloat16 ulp apart
    for ours, peer in zip(w_ours, w_peer):
        np.testing.assert_allclose(ours, peer, rtol=1e-6, atol=1e-6)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.lists(st.integers(1, 4), min_size=2, max_size=4),
    axis_choice=st.integers(0, 3),
    momentum=st.floats(0.0, 1.0),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_any_shape_axis_momentum_and_mask_match_keras(shape, axis_choice, momentum, masked, seed):
    """Training output and updated moving statistics equal keras's, whatever the rank, the
    feature axis, the momentum and the mask (keras's: all axes but the last), except for a
    feature the mask leaves empty: jbn keeps its moving statistics (keras moves them to 0)."""
    rng = np.random.default_rng(seed)
    shape = tuple(shape)
    axis = (axis_choice % len(shape)) - len(shape) * (axis_choice % 2)  # negative or positive
    if masked and shape[axis] == 1:
        shape = shape[: axis % len(shape)] + (2,) + shape[axis % len(shape) + 1 :]  # keras fails there (next test)
    peer, ours = pair(rng, shape, axis=axis, momentum=momentum)
    before = {name: getattr(ours, name).numpy() for name in ("moving_mean", "moving_variance")}
    x = rng.normal(1.0, 2.0, shape).astype(np.float32)
    mask = keras_mask(rng, shape) if masked else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jbn.OneValuePerFeatureWarning)  # keras computes silently
        y_ours = np.asarray(ours(x, training=True, mask=mask))
    y_peer = np.asarray(peer(x, training=True, mask=mask))
    count = ref.moments(x, axis=axis, mask=None if mask is None else mask[..., None])[2]
    seen = count > 0
    features = [1] * len(shape)
    features[axis] = shape[axis]
    in_seen = np.broadcast_to(seen.reshape(features), shape)
    np.testing.assert_allclose(y_ours[in_seen], y_peer[in_seen], atol=5e-5, rtol=5e-5)
    for name in ("moving_mean", "moving_variance"):
        ours_value, peer_value = getattr(ours, name).numpy(), getattr(peer, name).numpy()
        np.testing.assert_allclose(ours_value[seen], peer_value[seen], atol=1e-5, rtol=1e-5)
        np.testing.assert_array_equal(ours_value[~seen], before[name][~seen])


def test_mask_with_one_feature_where_keras_fails():
    """keras 3.15's masked statistics squeeze every axis of a one-feature mean, and its call
    raises an IndexError; jbn normalizes as the float64 reference does."""
    rng = np.random.default_rng(17)
    x = rng.normal(size=(6, 1)).astype(np.float32)
    mask = np.arange(6) < 4
    with pytest.raises(IndexError):
        keras.layers.BatchNormalization()(x, training=True, mask=mask)
    layer = BatchNormalization(momentum=0.0)
    y = layer(x, training=True, mask=mask)
    mean, var, _ = ref.moments(x, mask=mask[:, None])
    np.testing.assert_allclose(y, ref.normalize(x, mean, var, epsilon=1e-3), atol=1e-5)
    np.testing.assert_allclose(layer.moving_variance.numpy(), var, atol=1e-6)
