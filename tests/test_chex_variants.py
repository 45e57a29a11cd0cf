"""The pure layer under chex's test variants (with and without jit, and with pmap on the
fake devices), checked with chex's assertions against the float64 reference."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

import jbn
from tests import reference as ref

C = 3


def _batch(seed, shape=(16, C)):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) * rng.uniform(0.5, 2, shape[-1]) + rng.uniform(-3, 3, shape[-1])).astype(np.float32)


class PureLayerVariants(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(True, False)
    def test_batch_norm_matches_reference(self, fused):
        x = _batch(0)
        scale, bias = np.linspace(0.5, 1.5, C).astype(np.float32), np.linspace(-1, 1, C).astype(np.float32)
        running = jbn.RunningStats(jnp.zeros(C), jnp.ones(C))

        @self.variant
        def step(x, scale, bias):
            return jbn.batch_norm(x, scale, bias, running, training=True, momentum=0.9, fused=fused)

        y, new = step(x, scale, bias)
        y_ref, mean_ref, var_ref = ref.batch_norm(x, scale, bias, np.zeros(C), np.ones(C), training=True, momentum=0.9)
        chex.assert_shape(y, x.shape)
        chex.assert_type(y, jnp.float32)
        chex.assert_trees_all_close((y, new.mean, new.var), (y_ref, mean_ref, var_ref), rtol=1e-5, atol=1e-5)

    @chex.variants(with_pmap=True)
    def test_moments_over_devices_match_the_whole_batch(self):
        devices = jax.device_count()
        x = _batch(1, (devices * 4, C))

        # Each device its own 4 rows (no broadcast), every device's output kept.
        @self.variant(broadcast_args_to_devices=False, reduce_fn=None, axis_name="i")
        def stats(x):
            return jbn.moments(x, axis_name="i")

        got = stats(x.reshape(devices, 4, C))
        mean, var, _ = ref.moments(x)
        chex.assert_shape((got.mean, got.var), (devices, C))
        chex.assert_trees_all_close((got.mean[0], got.var[0]), (mean, var), rtol=1e-5, atol=1e-6)
        for d in range(1, devices):  # the same global statistics on every device
            chex.assert_trees_all_equal((got.mean[d], got.var[d]), (got.mean[0], got.var[0]))
