"""Every bad input fails at trace time with the right exception naming the argument."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbn

X = jnp.ones((4, 3), jnp.float32) * jnp.arange(4.0)[:, None]
RUNNING = jbn.RunningStats(jnp.zeros(3), jnp.ones(3))
JAX_MOMENTUM = jnp.asarray(-0.5)  # concrete: made outside the trace


def traced(fn):
    """Lower under jit: the error must come from tracing alone, before anything runs."""
    return jax.jit(fn).lower


@pytest.mark.parametrize(
    "call,exc,names",
    [
        (lambda: jbn.batch_norm(X, jnp.ones(5), None, RUNNING, training=True), ValueError, "`scale`"),
        (lambda: jbn.batch_norm(X, None, jnp.ones(2), RUNNING, training=True), ValueError, "`bias`"),
        (
            lambda: jbn.batch_norm(X, None, None, jbn.RunningStats(jnp.zeros(4), jnp.ones(3)), training=True),
            ValueError,
            "`running.mean`",
        ),
        (lambda: jbn.batch_norm(X, None, None, RUNNING, training=True, axis=2), ValueError, "`axis`"),
        (lambda: jbn.moments(X, axis=(0, -2)), ValueError, "`axis`"),
        (lambda: jbn.moments(jnp.ones((4, 3), jnp.int32)), TypeError, "`x`"),
        (lambda: jbn.batch_norm(X, None, None, RUNNING, training=True, momentum=1.5), ValueError, "`momentum`"),
        (lambda: jbn.batch_norm(X, None, None, RUNNING, training=True, momentum=-0.1), ValueError, "`momentum`"),
        (lambda: jbn.batch_norm(X, None, None, RUNNING, training=True, epsilon=0.0), ValueError, "`epsilon`"),
        (lambda: jbn.normalize(X, jnp.zeros(3), jnp.ones(3), epsilon=-1e-5), ValueError, "`epsilon`"),
        (lambda: jbn.moments(X, mask=jnp.ones((4, 2), bool)), ValueError, "`mask`"),
        (lambda: jbn.moments(X, mask=jnp.ones((4, 3, 1), bool)), ValueError, "`mask`"),
        (lambda: jbn.moments(X, axis_name="batch"), ValueError, "`axis_name`"),
        (lambda: jbn.moments(X, axis_index_groups=[[0]]), ValueError, "`axis_index_groups`"),
        (
            lambda: jbn.batch_norm(X, None, None, RUNNING, training=True, momentum=np.float32(1.5)),
            ValueError,
            "`momentum`",
        ),
        (
            lambda: jbn.batch_norm(X, None, None, RUNNING, training=True, momentum=JAX_MOMENTUM),
            ValueError,
            "`momentum`",
        ),
        (lambda: jbn.batch_norm(X, None, None, RUNNING, training=True, momentum="0.9"), TypeError, "`momentum`"),
        (lambda: jbn.batch_norm(X, None, None, RUNNING, training=True, epsilon=np.float32(0)), ValueError, "`epsilon`"),
        (lambda: jbn.moments(X, axis=1.0), TypeError, "`axis`"),
        (lambda: jbn.moments(X, axis=True), TypeError, "`axis`"),
        (lambda: jbn.moments(jnp.ones(())), ValueError, "`axis`"),
    ],
    ids=[
        "scale-size",
        "bias-size",
        "running-size",
        "axis-range",
        "axis-duplicate",
        "integer-x",
        "momentum-high",
        "momentum-low",
        "epsilon-zero",
        "epsilon-negative",
        "mask-shape",
        "mask-rank",
        "unbound-axis-name",
        "groups-without-name",
        "momentum-numpy-scalar",
        "momentum-jax-scalar",
        "momentum-string",
        "epsilon-numpy-scalar",
        "axis-float",
        "axis-bool",
        "scalar-input",
    ],
)
def test_bad_input_raises_at_trace_time(call, exc, names):
    with pytest.raises(exc, match=names.replace(".", r"\.")):
        traced(call)()


def test_unbound_axis_name_explains_the_fix():
    with pytest.raises(ValueError) as info:
        jax.jit(lambda x: jbn.moments(x, axis_name="devices")).lower(X)
    message = str(info.value)
    assert "pmap" in message and "shard_map" in message and "jax.jit" in message
    assert "no axis_name is needed" in message  # plain jit over sharded arrays needs none


def test_numpy_integer_axis_and_scalar_momentum_are_accepted():
    y, running = jbn.batch_norm(
        X, None, None, RUNNING, training=True, axis=np.int64(1), momentum=np.float32(0.5), epsilon=np.float64(1e-3)
    )
    x = np.asarray(X, np.float64)
    np.testing.assert_allclose(y, (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-3), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(running.mean, 0.5 * x.mean(0), rtol=1e-6)


def test_eval_with_one_example_is_fine():
    y, _ = jbn.batch_norm(X[:1], None, None, RUNNING, training=False)
    np.testing.assert_allclose(y, X[:1] / np.sqrt(1 + 1e-5), rtol=1e-6)


def test_module_feature_size_mismatch_names_the_variable():
    module = jbn.BatchNorm(use_running_average=False)
    variables = module.init(jax.random.key(0), jnp.ones((4, 3)))
    with pytest.raises(ValueError, match="params/scale") as info:
        module.apply(variables, jnp.ones((4, 5)), mutable=["batch_stats"])
    assert "`x`" in str(info.value) and "axis" in str(info.value)


def test_module_bad_fields():
    x = jnp.arange(12.0).reshape(4, 3)
    with pytest.raises(ValueError, match="`momentum`"):
        jbn.BatchNorm(use_running_average=False, momentum=2.0).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="`momentum`"):
        jbn.BatchNorm(use_running_average=False, momentum=np.float32(1.5)).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="`epsilon`"):
        jbn.BatchNorm(use_running_average=False, epsilon=np.float32(0)).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="`axis`"):
        jbn.BatchNorm(use_running_average=False, axis=3).init(jax.random.key(0), x)
    with pytest.raises(TypeError, match="`x`"):
        jbn.BatchNorm(use_running_average=False).init(jax.random.key(0), x.astype(jnp.int32))


def test_one_value_per_feature_counts_the_group_not_the_axis():
    """pmap over 8 devices in groups of 1: each group sees one value per feature, which
    computes as flax does and warns (a one-value batch and an empty one no longer raise:
    tests/test_flax_dropin.py and tests/test_hostile_errors.py check their numbers)."""
    x = jnp.ones((8, 1, 3))
    running = jbn.RunningStats(jnp.zeros(3), jnp.ones(3))

    def step(x):
        return jbn.batch_norm(
            x, None, None, running, training=True, axis_name="i", axis_index_groups=[[i] for i in range(8)]
        )[0]

    with pytest.warns(jbn.OneValuePerFeatureWarning, match="one value per feature"):
        jax.pmap(step, axis_name="i")(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", jbn.OneValuePerFeatureWarning)  # groups of 4 values: no warning
        jax.pmap(
            lambda x: jbn.batch_norm(
                x, None, None, running, training=True, axis_name="i", axis_index_groups=[[0, 1, 2, 3], [4, 5, 6, 7]]
            )[0],
            axis_name="i",
        )(x)
