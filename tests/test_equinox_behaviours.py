"""The behaviours that equinox's own test suite checks of `equinox.nn.BatchNorm`
(equinox 0.13.8: its tests of Sequential, stateful layers, serialisation and BatchNorm),
checked here of `jbn.equinox.BatchNorm`, in our own words, under the settings of
equinox's test configuration: rank promotion raises, dtype promotion is strict."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import jbn.equinox as je


@pytest.fixture(autouse=True)
def equinox_test_settings():
    with jax.numpy_rank_promotion("raise"), jax.numpy_dtype_promotion("strict"):
        yield


def keys(n, seed=0):
    return list(jr.split(jr.key(seed), n))


def per_example(layer, axis_name="batch"):
    return jax.vmap(layer, axis_name=axis_name, in_axes=(0, None), out_axes=(0, None))


def stored(layer, state, mode):
    """The running (mean, var) read through equinox's attribute for `mode`."""
    index = layer.ema_state_index if mode == "ema" else layer.batch_state_index
    assert index is not None
    other = layer.batch_state_index if mode == "ema" else layer.ema_state_index
    assert other is None
    mean, var = state.get(index)
    return mean, var


def test_sequential_carries_state_and_slices_share_it():
    k = keys(4)
    seq = eqx.nn.Sequential(
        [
            eqx.nn.Linear(2, 4, key=k[0]),
            eqx.nn.Linear(4, 1, key=k[1]),
            je.BatchNorm(1, axis_name="batch", mode="ema"),
            eqx.nn.Linear(1, 3, key=k[2]),
        ]
    )
    state = eqx.nn.State(seq)
    y, state = per_example(seq)(jr.normal(k[3], (1, 2)), state)
    assert y.shape == (1, 3)
    assert isinstance(seq[1:], eqx.nn.Sequential) and isinstance(seq[0], eqx.nn.Linear)
    # The tail of the model shares the layer, hence its state.
    y, state = per_example(seq[1:])(jr.normal(k[3], (1, 4)), state)
    assert y.shape == (1, 3)
    assert eqx.nn.Sequential(list(seq)) == seq


@pytest.mark.parametrize("inner", [False, True])
@pytest.mark.parametrize("outer", [False, True])
def test_nested_sequential_with_and_without_state(inner, outer):
    k = keys(5, seed=1)

    def build():
        inner_seq = eqx.nn.Sequential(
            [
                eqx.nn.Linear(2, 4, key=k[0]),
                je.BatchNorm(4, axis_name="batch", mode="ema") if inner else eqx.nn.Identity(),
                eqx.nn.Linear(4, 3, key=k[1]),
            ]
        )
        norm = je.BatchNorm(3, axis_name="batch", mode="ema") if outer else eqx.nn.Identity()
        return eqx.nn.Sequential([eqx.nn.Linear(5, 2, key=k[2]), inner_seq, norm, eqx.nn.Linear(3, 6, key=k[3])])

    x = jr.normal(k[4], (1, 5))
    if inner or outer:
        model, state = eqx.nn.make_with_state(build)()
        y, state = per_example(model)(x, state)
        assert isinstance(state, eqx.nn.State)
    else:
        y = jax.vmap(build(), axis_name="batch")(x)
    assert isinstance(y, jax.Array) and y.shape == (1, 6)


@pytest.mark.parametrize("mode", ["ema", "batch"])
def test_batch_norm_shapes_names_statistics_and_gradient(mode):
    k = keys(5, seed=2)
    x1, x2, x3 = (jr.uniform(k[i], s) for i, s in enumerate([(10, 5), (10, 5, 6), (10, 5, 7, 8)]))
    bn = je.BatchNorm(5, "batch", mode=mode)
    state = eqx.nn.State(bn)
    for x in (x1, x2, x3):  # any number of spatial axes
        y, state = per_example(bn)(x, state)
        assert y.shape == x.shape
        assert all(s.shape == (5,) for s in stored(bn, state, mode))

    # An axis name that nothing binds: a NameError, as equinox (and jax) raise.
    with pytest.raises(NameError):
        jax.vmap(bn, in_axes=(0, None), out_axes=(0, None))(x1, state)
    with pytest.raises(NameError):
        bn(x1[0], state)

    # Inside another vmap without a name: one running statistic per outer index.
    state = eqx.nn.State(bn)
    inner = jax.vmap(bn, axis_name="batch", in_axes=(1, None), out_axes=(1, None))
    y, state = jax.vmap(inner, in_axes=(0, None))(x2, state)
    assert y.shape == x2.shape
    assert all(s.shape == (10, 5) for s in stored(bn, state, mode))

    # Two names, two vmaps: statistics over both.
    two = je.BatchNorm(6, ("batch1", "batch2"), mode=mode)
    two_state = eqx.nn.State(two)
    call = two
    for name in ("batch1", "batch2"):
        call = jax.vmap(call, axis_name=name, in_axes=(0, None), out_axes=(0, None))
    y, two_state = call(x2, two_state)
    assert y.shape == x2.shape
    assert all(s.shape == (6,) for s in stored(two, two_state, mode))
    flat = np.asarray(x2, np.float64).transpose(2, 0, 1).reshape(6, -1)
    ref = (flat - flat.mean(1, keepdims=True)) / np.sqrt(flat.var(1, keepdims=True) + 1e-5)
    if mode == "batch":
        np.testing.assert_allclose(np.asarray(y).transpose(2, 0, 1).reshape(6, -1), ref, rtol=1e-4, atol=1e-4)

    # It normalizes: the first training batch (either mode) against float64 NumPy.
    bn = je.BatchNorm(5, "batch", channelwise_affine=False, mode=mode)
    state = eqx.nn.State(bn)
    x = jr.normal(jr.key(5678), (10, 5))
    y, state = per_example(bn)(x, state)
    xn = np.asarray(x, np.float64)
    np.testing.assert_allclose(y, (xn - xn.mean(0)) / np.sqrt(xn.var(0) + 1e-5), rtol=1e-5, atol=1e-5)

    # Training moves the statistics; inference leaves them as they are.
    _, state = per_example(bn)(x1, state)
    before = stored(bn, state, mode)
    _, state = per_example(bn)(3 * x1 + 10, state)
    after = stored(bn, state, mode)
    assert not np.allclose(before[0], after[0]) and not np.allclose(before[1], after[1])
    _, state = per_example(eqx.nn.inference_mode(bn, value=True))(4 * x1 + 20, state)
    for a, b in zip(after, stored(bn, state, mode)):
        np.testing.assert_array_equal(a, b)

    # Differentiable through the vmapped call.
    g = jax.grad(lambda x: jnp.sum(per_example(bn)(x, state)[0] ** 2))(jr.normal(k[4], (4, 5)))
    assert g.shape == (4, 5) and np.all(np.isfinite(g))


def test_inference_before_any_training_step_is_the_identity():
    bn, state = eqx.nn.make_with_state(je.BatchNorm)(input_size=3, axis_name="foo", mode="batch", inference=True)
    x = jr.normal(jr.key(3), (5, 3))
    y, _ = jax.vmap(bn, in_axes=(0, None), axis_name="foo")(x, state)
    np.testing.assert_allclose(y, np.asarray(x) / np.sqrt(1 + 1e-5), rtol=1e-6)


def test_delete_init_state_drops_the_three_state_arrays():
    model = je.BatchNorm(3, "batch", mode="ema")
    eqx.nn.State(model)
    emptied = eqx.nn.delete_init_state(model)
    eqx.nn.State(model)  # the original still builds its state
    with pytest.raises(ValueError):
        eqx.nn.State(emptied)
    arrays = [leaf for leaf in jax.tree.leaves(model) if eqx.is_array(leaf)]
    left = [leaf for leaf in jax.tree.leaves(emptied) if eqx.is_array(leaf)]
    assert len(arrays) == len(left) + 3  # mean, var, count


def test_model_and_state_serialise_and_load_into_a_fresh_model(tmp_path):
    class Model(eqx.Module):
        norm1: je.BatchNorm
        norm2: je.BatchNorm

    def build():
        return Model(je.BatchNorm(3, "hi", mode="ema"), je.BatchNorm(4, "bye", mode="ema"))

    model = build()
    state = eqx.nn.State(model)
    x = jr.normal(jr.key(4), (6, 3))
    _, state = jax.vmap(model.norm1, axis_name="hi", in_axes=(0, None), out_axes=(0, None))(x, state)
    path = tmp_path / "model.eqx"
    eqx.tree_serialise_leaves(path, (model, state))
    fresh = build()
    loaded_model, loaded_state = eqx.tree_deserialise_leaves(path, (fresh, eqx.nn.State(fresh)))
    for a, b in zip(stored(model.norm1, state, "ema"), stored(loaded_model.norm1, loaded_state, "ema")):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded_model.norm1.running_stats(loaded_state).count, 1)
    np.testing.assert_array_equal(loaded_model.norm2.running_stats(loaded_state).count, 0)
