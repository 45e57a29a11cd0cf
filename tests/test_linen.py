"""jbn.BatchNorm as a drop-in for flax.linen.BatchNorm: same variables, outputs,
updated statistics and gradients; checkpoints move both ways."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

import jbn
from tests import reference as ref

CONFIGS = [
    dict(),
    dict(axis=1, momentum=0.9),
    dict(axis=(1, 2), epsilon=1e-3),
    dict(use_bias=False, momentum=0.5),
    dict(use_scale=False),
    dict(use_scale=False, use_bias=False),
    dict(scale_init=nn.initializers.constant(0.5), bias_init=nn.initializers.constant(0.1)),
]


def data(seed=0, shape=(8, 5, 6, 4)):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(0.5, 1.5, shape).astype(np.float32))


def config_id(config: dict) -> str:
    """A test id that is the same in every process (pytest-xdist compares them): a function by its name."""
    text = (f"{k}={getattr(v, '__qualname__', v)}" for k, v in config.items())
    return ",".join(text) or "default"


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
@pytest.mark.parametrize("flax_fast_variance", [False, True], ids=["flax-two-pass-var", "flax-default-var"])
def test_same_variables_outputs_stats_and_grads(config, flax_fast_variance):
    """Against flax as configured by default (its fast E[x^2]-E[x]^2 variance is accurate
    on this well-conditioned data) and with its two-pass variance."""
    x = data()
    ours, theirs = jbn.BatchNorm(**config), nn.BatchNorm(use_fast_variance=flax_fast_variance, **config)
    v_ours = ours.init(jax.random.key(0), x, use_running_average=False)
    v_theirs = theirs.init(jax.random.key(0), x, use_running_average=False)
    assert jax.tree.structure(v_ours) == jax.tree.structure(v_theirs)
    for a, b in zip(jax.tree.leaves(v_ours), jax.tree.leaves(v_theirs)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)

    # Perturb the variables so equality is not an accident of ones and zeros.
    rng = np.random.default_rng(1)
    variables = jax.tree.map(lambda v: v + jnp.asarray(rng.uniform(0.1, 0.5, v.shape), v.dtype), v_theirs)
    dy = jnp.asarray(rng.normal(size=x.shape).astype(np.float32))

    def run(module, variables, x, training):
        def f(params, x):
            y, state = module.apply(
                {**variables, "params": params}, x, use_running_average=not training, mutable=["batch_stats"]
            )
            return jnp.vdot(y, dy), (y, state)

        (_, (y, state)), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(variables.get("params", {}), x)
        return y, state, grads

    for training in (True, False):
        y1, s1, g1 = run(ours, variables, x, training)
        y2, s2, g2 = run(theirs, variables, x, training)
        np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-5)
        for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
        for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_mask_matches_flax():
    x = data(2, (6, 7, 3))
    mask = jnp.asarray(np.random.default_rng(3).random((6, 7, 3)) < 0.6)
    v = nn.BatchNorm().init(jax.random.key(0), x, use_running_average=False)
    y1, s1 = jbn.BatchNorm(use_running_average=False).apply(v, x, mask=mask, mutable=["batch_stats"])
    y2, s2 = nn.BatchNorm(use_running_average=False, use_fast_variance=False).apply(
        v, x, mask=mask, mutable=["batch_stats"]
    )
    np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_reduced_rank_mask():
    x = data(4, (6, 7, 3))
    mask = np.random.default_rng(5).random((6, 7)) < 0.6
    module = jbn.BatchNorm(use_running_average=False, momentum=0.0)
    v = module.init(jax.random.key(0), x)
    y, s = module.apply(v, x, mask=mask, mutable=["batch_stats"])
    mean, var, _ = ref.moments(np.asarray(x), -1, mask)
    np.testing.assert_allclose(s["batch_stats"]["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s["batch_stats"]["var"], var, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y, ref.normalize(x, mean, var), rtol=1e-4, atol=1e-4)


def test_init_does_not_update_running_stats():
    x = data(6) * 10 + 3
    v = jbn.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
    np.testing.assert_array_equal(v["batch_stats"]["mean"], 0)
    np.testing.assert_array_equal(v["batch_stats"]["var"], 1)


@pytest.mark.parametrize(
    "module_fields", [dict(), dict(axis_name="batch"), dict(virtual_batch_size=16)], ids=["plain", "axis_name", "ghost"]
)
def test_init_on_one_example_in_training_mode_is_flaxs(module_fields):
    """flax code often initializes with a dummy example and use_running_average=False:
    same variables and output as flax, and no warning (init trains nothing)."""
    x = data(11, (1, 4))
    flax_fields = {k: v for k, v in module_fields.items() if k != "virtual_batch_size"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", jbn.OneValuePerFeatureWarning)
        y_ours, v_ours = jbn.BatchNorm(use_running_average=False, **module_fields).init_with_output(
            jax.random.key(0), x
        )
    y_flax, v_flax = nn.BatchNorm(use_running_average=False, **flax_fields).init_with_output(jax.random.key(0), x)
    assert jax.tree.structure(v_ours) == jax.tree.structure(v_flax)
    for a, b in zip(jax.tree.leaves(v_ours), jax.tree.leaves(v_flax)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(y_ours, y_flax, atol=1e-6)
    with pytest.warns(jbn.OneValuePerFeatureWarning):  # training on it computes as flax does, and warns
        y, s = jbn.BatchNorm(use_running_average=False).apply(v_ours, x, mutable=["batch_stats"])
    y_f, s_f = nn.BatchNorm(use_running_average=False).apply(v_flax, x, mutable=["batch_stats"])
    np.testing.assert_allclose(y, y_f, atol=1e-6)
    np.testing.assert_allclose(s["batch_stats"]["var"], s_f["batch_stats"]["var"], rtol=1e-6)
    v = jbn.BatchRenorm(use_running_average=False).init(jax.random.key(0), x)
    assert int(v["batch_stats"]["step"]) == 0


def test_init_ignores_axis_name():
    """As in flax, the named axis need not exist at init."""
    x = data(7)
    v = jbn.BatchNorm(use_running_average=False, axis_name="batch").init(jax.random.key(0), x)
    assert v["batch_stats"]["mean"].shape == (4,)


class FlaxNet(nn.Module):
    norm: type = nn.BatchNorm

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(8, (3, 3))(x)
        x = self.norm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
        x = nn.Conv(8, (3, 3))(x)
        x = self.norm(use_running_average=not train, momentum=0.9, axis=-1)(x)
        x = nn.relu(x).mean((1, 2))
        return nn.Dense(3)(x)


def test_replaces_flax_in_a_model_with_its_checkpoint():
    """Train a flax model a few steps, save, restore into the same model built with
    jbn.BatchNorm (and back): identical outputs in eval and training mode."""
    x = data(8, (16, 6, 6, 2))
    flax_net, jbn_net = FlaxNet(nn.BatchNorm), FlaxNet(jbn.BatchNorm)
    variables = flax_net.init(jax.random.key(0), x, train=False)
    for _ in range(3):
        _, state = flax_net.apply(variables, x, train=True, mutable=["batch_stats"])
        variables = {**variables, **state}
    blob = serialization.to_bytes(variables)

    template = jbn_net.init(jax.random.key(1), x, train=False)
    restored = serialization.from_bytes(template, blob)
    np.testing.assert_allclose(
        jbn_net.apply(restored, x, train=False), flax_net.apply(variables, x, train=False), rtol=1e-5, atol=1e-5
    )
    y1, s1 = jbn_net.apply(restored, x, train=True, mutable=["batch_stats"])
    y2, s2 = flax_net.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(y1, y2, rtol=1e-4, atol=1e-4)
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

    back = serialization.from_bytes(
        flax_net.init(jax.random.key(2), x, train=False), serialization.to_bytes({**restored, **s1})
    )
    np.testing.assert_allclose(
        flax_net.apply(back, x, train=False), jbn_net.apply({**restored, **s1}, x, train=False), rtol=1e-5, atol=1e-5
    )


@pytest.mark.peer_not_strict("optax multiplies a Python float by its int32 step count")
def test_training_step_under_jit():
    import optax

    x = data(9, (16, 6, 6, 2))
    labels = jnp.arange(16) % 3
    net = FlaxNet(jbn.BatchNorm)
    variables = net.init(jax.random.key(0), x, train=False)
    opt = optax.adam(0.03)
    opt_state = opt.init(variables["params"])

    @jax.jit
    def step(params, batch_stats, opt_state):
        def loss(params):
            logits, state = net.apply(
                {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), state

        (value, state), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state)
        return optax.apply_updates(params, updates), state["batch_stats"], opt_state, value

    params, stats = variables["params"], variables["batch_stats"]
    losses = []
    for _ in range(30):
        params, stats, opt_state, value = step(params, stats, opt_state)
        losses.append(float(value))
    assert losses[-1] < losses[0] * 0.5, losses
    assert not np.allclose(stats["BatchNorm_0"]["mean"], 0)


def test_bfloat16_input_promotes_like_flax_and_keeps_float32_stats():
    x = data(10).astype(jnp.bfloat16)
    module = jbn.BatchNorm(use_running_average=False)
    v = module.init(jax.random.key(0), x)
    y, s = module.apply(v, x, mutable=["batch_stats"])
    assert y.dtype == jnp.float32  # flax's promotion of the bfloat16 input with float32 parameters
    assert (
        jbn.BatchNorm(use_running_average=False, dtype=jnp.bfloat16).apply(v, x, mutable=["batch_stats"])[0].dtype
        == jnp.bfloat16
    )
    assert s["batch_stats"]["mean"].dtype == jnp.float32
    y32 = jbn.BatchNorm(use_running_average=False, dtype=jnp.float32).apply(v, x, mutable=["batch_stats"])[0]
    assert y32.dtype == jnp.float32


@pytest.mark.peer_not_strict("flax.linen.BatchNorm mixes a bfloat16 input with float32 parameters")
def test_bfloat16_input_with_float32_output_matches_flaxs_default():
    """flax promotes a bfloat16 input with float32 parameters to a float32 output; so does
    jbn, by default and with dtype=float32."""
    x = data(12).astype(jnp.bfloat16)
    v = nn.BatchNorm().init(jax.random.key(0), x, use_running_average=False)
    for training in (True, False):
        y_flax, s_flax = nn.BatchNorm(use_running_average=not training).apply(v, x, mutable=["batch_stats"])
        y_ours, s_ours = jbn.BatchNorm(use_running_average=not training).apply(v, x, mutable=["batch_stats"])
        assert y_flax.dtype == y_ours.dtype == jnp.float32
        np.testing.assert_allclose(y_ours, y_flax, rtol=1e-5, atol=1e-5)
        for a, b in zip(jax.tree.leaves(s_ours), jax.tree.leaves(s_flax)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("training", [True, False])
def test_module_same_results_with_and_without_jit(training):
    x = data(13)
    module = jbn.BatchNorm(use_running_average=not training, momentum=0.9)
    v = module.init(jax.random.key(0), x)
    v = jax.tree.map(lambda a: a + 0.25, v)

    def f(v, x):
        y, state = module.apply(v, x, mutable=["batch_stats"])
        return y, state

    def loss(params, x):
        return jnp.sum(f({**v, "params": params}, x)[0] ** 3)

    for a, b in zip(jax.tree.leaves(f(v, x)), jax.tree.leaves(jax.jit(f)(v, x))):
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-6)
    grads = jax.grad(loss, argnums=(0, 1))(v["params"], x)
    grads_jit = jax.jit(jax.grad(loss, argnums=(0, 1)))(v["params"], x)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_jit)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
