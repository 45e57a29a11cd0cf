"""recompute_batch_stats: exact population statistics of every BN layer's inputs."""

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jbn
from tests import reference as ref

EPS = 1e-5
DEVICES = 8


def _data(sizes, dim, seed=0, offset=50.0):
    rng = np.random.default_rng(seed)
    return [
        rng.normal(size=(n, dim)).astype(np.float32) * rng.uniform(0.5, 2.0, dim).astype(np.float32) + offset
        for n in sizes
    ]


class Single(nn.Module):
    axis_name: Any = None

    @nn.compact
    def __call__(self, x, train: bool):
        return jbn.BatchNorm(use_running_average=not train, momentum=0.9, axis_name=self.axis_name)(x)


class Inner(nn.Module):
    axis_name: Any = None

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(5)(x)
        x = jbn.BatchNorm(use_running_average=not train, axis_name=self.axis_name)(x)
        return nn.relu(x)


class Net(nn.Module):
    axis_name: Any = None

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(6)(x)
        x = jbn.BatchNorm(use_running_average=not train, axis_name=self.axis_name)(x)
        x = nn.relu(x)
        x = Inner(self.axis_name)(x, train)
        x = nn.Dense(4)(x)
        return jbn.BatchNorm(use_running_average=not train, momentum=None, axis_name=self.axis_name)(x)


def _perturbed(variables, seed=1):
    """Non-trivial BN scale/bias and running statistics (so that 'unchanged' means something)."""
    leaves, tree = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [v + 0.3 * jax.random.normal(k, v.shape) if v.dtype == jnp.float32 else v for v, k in zip(leaves, keys)]
    return jax.tree.unflatten(tree, leaves)


def _init(model, x):
    """Perturbed initial variables, in one compilation (eager init compiles op by op)."""
    return jax.jit(lambda x: _perturbed(model.init(jax.random.key(0), x, train=False)))(x)


def _reference_net(params, batches):
    """NumPy float64 forward of Net in training mode; returns each BN layer's population
    mean and biased variance over all batches, keyed like batch_stats."""
    inputs = {"BatchNorm_0": [], ("Inner_0", "BatchNorm_0"): [], "BatchNorm_1": []}

    def dense(p, x):
        return x @ ref.f64(p["kernel"]) + ref.f64(p["bias"])

    def bn(p, key, x):
        inputs[key].append(x)
        return (x - x.mean(0)) / np.sqrt(x.var(0) + EPS) * ref.f64(p["scale"]) + ref.f64(p["bias"])

    for x in batches:
        h = np.maximum(bn(params["BatchNorm_0"], "BatchNorm_0", dense(params["Dense_0"], ref.f64(x))), 0)
        inner = params["Inner_0"]
        h = np.maximum(bn(inner["BatchNorm_0"], ("Inner_0", "BatchNorm_0"), dense(inner["Dense_0"], h)), 0)
        bn(params["BatchNorm_1"], "BatchNorm_1", dense(params["Dense_1"], h))
    return {k: (np.concatenate(v).mean(0), np.concatenate(v).var(0)) for k, v in inputs.items()}


def _check_net(result, variables, reference):
    stats = result["batch_stats"]
    for key, (mean, var) in reference.items():
        layer = stats[key] if isinstance(key, str) else stats[key[0]][key[1]]
        np.testing.assert_allclose(layer["mean"], mean, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(layer["var"], var, rtol=1e-4, atol=1e-5)
        assert not any(name.startswith("population") for name in layer)
    jax.tree.map(np.testing.assert_array_equal, result["params"], variables["params"])
    # the counter of the cumulative layer is untouched by the recomputation
    np.testing.assert_array_equal(stats["BatchNorm_1"]["count"], variables["batch_stats"]["BatchNorm_1"]["count"])


def test_single_layer_gives_mean_and_biased_variance_of_the_data():
    batches = _data([7, 16, 3, 10], 4)  # uneven batches, |mean| >> std
    model = Single()
    variables = _init(model, batches[0])
    apply = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    result = jbn.recompute_batch_stats(apply, variables, iter(batches), progress=False)
    data = ref.f64(np.concatenate(batches))
    np.testing.assert_allclose(result["batch_stats"]["BatchNorm_0"]["mean"], data.mean(0), rtol=1e-6)
    np.testing.assert_allclose(result["batch_stats"]["BatchNorm_0"]["var"], data.var(0), rtol=1e-4)
    np.testing.assert_array_equal(result["params"]["BatchNorm_0"]["scale"], variables["params"]["BatchNorm_0"]["scale"])
    # an average of per-batch variances (fvcore's PreciseBN) misses the spread of the batch means
    shifted = [b + 3.0 * i for i, b in enumerate(batches)]
    result = jbn.recompute_batch_stats(apply, variables, shifted, num_batches=3, progress=False)
    data = ref.f64(np.concatenate(shifted[:3]))
    np.testing.assert_allclose(result["batch_stats"]["BatchNorm_0"]["var"], data.var(0), rtol=1e-4)
    assert (data.var(0) > 1.5 * np.mean([ref.f64(b).var(0) for b in shifted[:3]], 0)).all()


def test_renorm_layer_records_without_moving_its_state():
    batches = _data([8, 12], 3, seed=6)

    class Renorm(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            return jbn.BatchRenorm(use_running_average=not train, r_max=1.5, d_max=1.0)(x)

    model = Renorm()
    variables = _init(model, batches[0])
    variables = {
        **variables,
        "batch_stats": {"BatchRenorm_0": {**variables["batch_stats"]["BatchRenorm_0"], "step": jnp.int32(7)}},
    }
    result = jbn.recompute_batch_stats(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables, batches, progress=False
    )
    data = ref.f64(np.concatenate(batches))
    stats = result["batch_stats"]["BatchRenorm_0"]
    np.testing.assert_allclose(stats["mean"], data.mean(0), rtol=1e-5)
    np.testing.assert_allclose(stats["var"], data.var(0), rtol=1e-4)
    assert set(stats) == {"mean", "var", "step"} and int(stats["step"]) == 7


def test_nested_model_with_several_layers():
    batches = _data([16] * 4, 3, seed=2, offset=1.0)
    model = Net()
    variables = _init(model, batches[0])
    apply = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    result = jbn.recompute_batch_stats(apply, variables, batches, progress=False)
    _check_net(result, variables, _reference_net(variables["params"], batches))


def test_pmap_with_axis_name_on_eight_devices():
    assert jax.device_count() == DEVICES
    batches = _data([16] * 3, 3, seed=3, offset=1.0)
    model = Net(axis_name="batch")
    variables = _init(Net(), batches[0])
    replicated = jax.tree.map(lambda a: jnp.broadcast_to(a, (DEVICES,) + a.shape), variables)
    apply = jax.pmap(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), axis_name="batch")
    sharded = [b.reshape(DEVICES, -1, 3) for b in batches]
    result = jbn.recompute_batch_stats(apply, replicated, sharded, device_axis=True, progress=False)
    first = jax.tree.map(lambda a: a[0], result)
    jax.tree.map(lambda a: np.testing.assert_array_equal(a, jnp.broadcast_to(a[0], a.shape)), result)
    # synchronized statistics: the same as one device on the whole batches
    _check_net(first, variables, _reference_net(variables["params"], batches))


def test_pmap_without_axis_name_merges_the_devices():
    batches = _data([16, 24], 2, seed=4)
    model = Single()
    variables = _init(model, batches[0])
    replicated = jax.tree.map(lambda a: jnp.broadcast_to(a, (DEVICES,) + a.shape), variables)
    apply = jax.pmap(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    result = jbn.recompute_batch_stats(
        apply, replicated, [b.reshape(DEVICES, -1, 2) for b in batches], device_axis=True, progress=False
    )
    data = ref.f64(np.concatenate(batches))
    for d in range(DEVICES):
        np.testing.assert_allclose(result["batch_stats"]["BatchNorm_0"]["mean"][d], data.mean(0), rtol=1e-6)
        np.testing.assert_allclose(result["batch_stats"]["BatchNorm_0"]["var"][d], data.var(0), rtol=1e-4)


def test_shard_map_apply():
    batches = _data([16, 32], 3, seed=5)
    model = Single(axis_name="b")
    variables = _init(Single(), batches[0])
    mesh = Mesh(np.array(jax.devices()), ("b",))

    @jax.jit
    @partial(jax.shard_map, mesh=mesh, in_specs=(P(), P("b")), out_specs=(P("b"), P()))
    def apply(v, x):
        return model.apply(v, x, train=True, mutable=["batch_stats"])

    result = jbn.recompute_batch_stats(apply, variables, batches, progress=True)
    data = ref.f64(np.concatenate(batches))
    np.testing.assert_allclose(result["batch_stats"]["BatchNorm_0"]["mean"], data.mean(0), rtol=1e-6)
    np.testing.assert_allclose(result["batch_stats"]["BatchNorm_0"]["var"], data.var(0), rtol=1e-4)


def test_layers_that_cannot_record_are_reported():
    x = _data([8], 3)[0]

    class FlaxBN(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            return nn.BatchNorm(use_running_average=not train)(x)

    model = FlaxBN()
    variables = model.init(jax.random.key(0), x, train=False)
    with pytest.raises(ValueError, match="BatchNorm_0 recorded no statistics"):
        jbn.recompute_batch_stats(
            lambda v, b: model.apply(v, b, train=True, mutable=["batch_stats"]), variables, [x], progress=False
        )
    single = Single()
    variables = single.init(jax.random.key(0), x, train=False)
    with pytest.raises(ValueError, match="training mode"):  # eval-mode apply records nothing
        jbn.recompute_batch_stats(
            lambda v, b: single.apply(v, b, train=False, mutable=["batch_stats"]), variables, [x], progress=False
        )
    with pytest.raises(ValueError, match="no batch"):
        jbn.recompute_batch_stats(
            lambda v, b: single.apply(v, b, train=True, mutable=["batch_stats"]), variables, [], progress=False
        )
