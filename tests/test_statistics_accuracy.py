"""Batch statistics are as accurate compiled as eagerly, and synchronized as on one device.

XLA rewrites what it compiles: it folds constant factors together, copies a cheap producer
into every fusion that uses it and contracts a product feeding a sum into a fused
multiply-add. Each is exact in real arithmetic and can cost a float32 computation its
accuracy; these tests check the statistics of every compiled and synchronized path against
the float64 reference (tests/reference.py) where such rewrites used to show.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jbn
from tests import reference as ref

EPS32 = float(np.finfo(np.float32).eps)
# A float32 statistic of well-conditioned data: a few roundings per element, summed.
VAR_RTOL = 32 * EPS32


def assert_within(got, want, tol, what):
    """|got - want| <= tol elementwise (tol may vary per feature)."""
    error = np.abs(np.asarray(got, np.float64) - want)
    assert np.all(error <= tol), f"{what}: error {error} > tolerance {tol}"


def float32_data(shape, seed, loc, scale):
    rng = np.random.default_rng(seed)
    return (loc + rng.standard_normal(shape) * scale).astype(np.float32)


@pytest.mark.parametrize("n", [8, 24, 96, 128, 1000])
@pytest.mark.parametrize("features", [1, 3])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "jit"])
def test_variance_of_values_near_1e18_is_right_compiled(n, features, compiled):
    """A representable variance near 1e37 comes out right (not 0) under jit, whatever the
    batch size; the normalized output is then O(1)."""
    x = float32_data((n, features), n, 0.0, 3e18)
    mean_ref, var_ref, _ = ref.moments(x)
    stats = (jax.jit(jbn.moments) if compiled else jbn.moments)(jnp.asarray(x))
    np.testing.assert_allclose(stats.var, var_ref, rtol=VAR_RTOL)
    assert_within(stats.mean, mean_ref, VAR_RTOL * np.sqrt(var_ref), "mean")

    def train(x):
        return jbn.batch_norm(x, None, None, jbn.RunningStats(jnp.zeros(features), jnp.ones(features)), training=True)

    y, _ = (jax.jit(train) if compiled else train)(jnp.asarray(x))
    np.testing.assert_allclose(y, ref.normalize(x, mean_ref, var_ref), rtol=0, atol=1e-4)


PARTICIPANTS, PER_PARTICIPANT = 4, 48


def synchronized(transform):
    """moments over PARTICIPANTS participants of (PER_PARTICIPANT, 3) each, synchronized."""

    def local(x):
        return jbn.moments(x, axis_name="b")

    if transform == "vmap":
        return jax.vmap(local, axis_name="b")
    if transform == "jit-vmap":
        return jax.jit(jax.vmap(local, axis_name="b"))
    if transform == "pmap":
        return jax.pmap(local, axis_name="b", devices=jax.devices()[:PARTICIPANTS])
    mesh = Mesh(np.array(jax.devices()[:PARTICIPANTS]), ("b",))
    inner = jax.shard_map(
        lambda x: jax.tree.map(lambda v: v[None], local(x[0])), mesh=mesh, in_specs=P("b"), out_specs=P("b")
    )
    return jax.jit(inner)


@pytest.mark.parametrize("transform", ["vmap", "jit-vmap", "pmap", "shard_map"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_synchronized_statistics_are_as_accurate_as_on_one_device(transform, seed):
    """|mean| / std = 1e4: the merged variance keeps float32's relative accuracy under
    every transform that binds the axis name, compiled or not."""
    x = float32_data((PARTICIPANTS, PER_PARTICIPANT, 3), seed, 1e4, 1.0)
    mean_ref, var_ref, _ = ref.moments(x.reshape(-1, 3))
    stats = synchronized(transform)(jnp.asarray(x))
    for p in range(PARTICIPANTS):
        np.testing.assert_allclose(stats.var[p], var_ref, rtol=VAR_RTOL, err_msg=f"participant {p}")
        # the mean: within an ulp of |mean| plus the statistical rounding of the deviations
        tol = 2 * EPS32 * np.abs(mean_ref) + VAR_RTOL * np.sqrt(var_ref)
        assert_within(stats.mean[p], mean_ref, tol, f"mean of participant {p}")


# Open defect: the fix (a base anchored on the first element) cost one more read of x in the H100 bfloat16
# training step (tests/test_accelerator_plans.py: 1.11-1.16x flax's bytes, was 1.00), and the contract says
# exactness may not cost bytes; it was taken back until an anchor that costs no read is found. Not strict:
# at some sizes and magnitudes the sampled base already lands on the value.
@pytest.mark.xfail(reason="a base one rounding away from a constant value gives its ulp squared (2e6 at 4e13)")
@pytest.mark.parametrize("value", [3.3e7, 4e13, 1e22, 4e13 + 2e13j])
@pytest.mark.parametrize("n", [6, 24, 96, 1000])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "jit"])
def test_a_constant_feature_has_variance_zero_whatever_its_magnitude(value, n, compiled):
    """Every element equal: the variance is exactly 0 and the mean is the value (the
    statistics are taken around a base that is a value of the data; a base one rounding
    away from it gave a variance of its ulp squared, 2e6 at 4e13)."""
    dtype = np.complex64 if isinstance(value, complex) else np.float32
    x = np.full((n, 2), value, dtype)
    stats = (jax.jit(jbn.moments) if compiled else jbn.moments)(jnp.asarray(x))
    mean_ref, var_ref, _ = ref.moments(x)
    np.testing.assert_array_equal(stats.var, var_ref)  # 0: the float32 value's own mean and variance
    np.testing.assert_array_equal(stats.mean, mean_ref)


@pytest.mark.parametrize("mask_shape", [None, (64, 3), (64, 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.complex64])
def test_moments_of_a_batch_sharded_input_inside_an_explicit_mesh_context(mask_shape, dtype):
    """jit(moments) of an input split along the batch over a 1-D Explicit mesh, called
    inside `jax.set_mesh` (the broadcast count was replicated and the statistics split: a
    ShardingTypeError), against the float64 reference."""
    mesh = jax.make_mesh((8,), ("b",), axis_types=(jax.sharding.AxisType.Explicit,))
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(64, 3)) * 3 + 10).astype(dtype)
    mask = None if mask_shape is None else rng.random(mask_shape) < 0.7
    split = jax.sharding.NamedSharding(mesh, P("b"))
    args = [jax.device_put(jnp.asarray(x), split)] + (
        [] if mask is None else [jax.device_put(jnp.asarray(mask), split)]
    )
    with jax.set_mesh(mesh):
        stats = jax.jit(lambda x, *m: jbn.moments(x, mask=m[0] if m else None))(*args)
    mean_ref, var_ref, count_ref = ref.moments(x, -1, mask)
    np.testing.assert_allclose(stats.mean, mean_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(stats.var, var_ref, rtol=1e-5)
    np.testing.assert_array_equal(np.broadcast_to(stats.count, (3,)), count_ref)
