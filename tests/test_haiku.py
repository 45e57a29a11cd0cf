"""jbn.haiku.BatchNorm against hk.BatchNorm (same parameters and state: outputs, updated
state, gradients) where haiku is right, and against float64 NumPy where haiku is not
(narrow inputs, a large mean, NaN batches, evaluation before training); the vmapped axis,
pmap/shard_map/sharded jit on 8 fake CPU devices, masks."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jbn.haiku
from tests import reference

MEAN = "batch_norm/~/mean_ema"
VAR = "batch_norm/~/var_ema"
DECAY = 0.9
EPS = 1e-5
F32 = dict(rtol=1e-5, atol=1e-5)  # float32 arithmetic, a few roundings apart


def transformed(cls, *args, **kwargs):
    """hk.transform_with_state of one layer called as `layer(x, is_training, ...)`."""

    def forward(x, is_training, test_local_stats=False, scale=None, offset=None):
        layer = cls(*args, **kwargs)
        return layer(x, is_training, test_local_stats, scale, offset)

    return hk.transform_with_state(forward)


@contextlib.contextmanager
def promotion_rules_of(cls):
    """JAX's default promotion rules around a call of haiku's own class, which promotes
    implicitly (its moving average raises the float32 decay to the int32 counter's power;
    it multiplies a (C, 1, 1) call-time scale by its (1, C, 1, 1) statistics, and an int32
    input by float32 ones); jbn's class keeps the strict settings of tests/conftest.py."""
    if cls is not hk.BatchNorm:
        yield
        return
    with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
        yield


def ema_reference(batches, decay, axis):
    """haiku's debiased moving averages from the formulas, in float64: hidden_t = decay *
    hidden + (1 - decay) * batch from zero, average_t = hidden_t / (1 - decay**t)."""
    hidden_mean = hidden_var = 0.0
    for x in batches:
        mean, var, _ = reference.moments(x, axis)
        hidden_mean = decay * hidden_mean + (1 - decay) * mean
        hidden_var = decay * hidden_var + (1 - decay) * var
    t = len(batches)
    return (hidden_mean, hidden_mean / (1 - decay**t)), (hidden_var, hidden_var / (1 - decay**t))


def random(shape, seed=0, mean=0.5, std=1.5, dtype=np.float32):
    return np.random.RandomState(seed).normal(mean, std, shape).astype(dtype)


LAYOUTS = {
    # name: (constructor keywords, input shape, feature axis of the input)
    "channels_last": (dict(), (4, 3, 3, 5), -1),
    "NCHW": (dict(data_format="NCHW"), (4, 5, 3, 2), 1),
    "reduce_axes_0_2": (dict(axis=[0, 2]), (6, 3, 4), 1),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_parameters_and_state_have_haikus_names_shapes_and_dtypes(layout):
    kwargs, shape, _ = LAYOUTS[layout]
    x = random(shape)
    trees = []
    for cls in (hk.BatchNorm, jbn.haiku.BatchNorm):
        f = transformed(cls, True, True, DECAY, **kwargs)
        params, state = f.init(None, x, True)
        _, state = f.apply(params, state, None, x, True)  # haiku's init leaves `average` at the init batch
        trees.append(jax.tree.map(lambda a: (a.shape, a.dtype), (params, state)))
    assert trees[0] == trees[1]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_training_matches_haiku_outputs_state_and_gradients(layout):
    kwargs, shape, _ = LAYOUTS[layout]
    ours, theirs = (transformed(cls, True, True, DECAY, **kwargs) for cls in (jbn.haiku.BatchNorm, hk.BatchNorm))
    params, state = ours.init(None, random(shape), True)
    params = jax.tree.map(lambda p: p + random(p.shape, seed=7, mean=0.0, std=0.5), params)  # not the identity
    dy = random(shape, seed=9)

    def loss(f, params, state, x):
        y, new_state = f.apply(params, state, None, x, True)
        return jnp.sum(y * dy), (y, new_state)

    grad = {
        f: jax.jit(jax.grad(lambda p, s, x, f=f: loss(f, p, s, x), argnums=(0, 2), has_aux=True))
        for f in (ours, theirs)
    }
    state_ours = state_theirs = state
    for step in range(3):
        x = random(shape, seed=step, mean=step - 1.0, std=1.0 + step)
        (g_ours, (y_ours, state_ours)) = grad[ours](params, state_ours, x)
        with promotion_rules_of(hk.BatchNorm):
            (g_theirs, (y_theirs, state_theirs)) = grad[theirs](params, state_theirs, x)
        np.testing.assert_allclose(y_ours, y_theirs, **F32)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), g_ours, g_theirs)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **F32), state_ours, state_theirs)
    assert int(state_ours[MEAN]["counter"]) == int(state_ours[VAR]["counter"]) == 3
    average = hk.transform_with_state(lambda: jbn.haiku.BatchNorm(True, True, DECAY, **kwargs).mean_ema.average)
    np.testing.assert_array_equal(
        average.apply({}, state_ours, None)[0], state_ours[MEAN]["average"]
    )  # haiku's property
    x = random(shape, seed=5)
    for local in (False, True):
        y_ours, _ = ours.apply(params, state_ours, None, x, False, local)
        with promotion_rules_of(hk.BatchNorm):
            y_theirs, _ = theirs.apply(params, state_theirs, None, x, False, local)
        np.testing.assert_allclose(y_ours, y_theirs, **F32)


def test_state_moves_between_jbn_and_haiku_mid_training():
    """Steps alternate between the two layers on one state; the moving averages are those
    of every batch seen (float64 formulas)."""
    ours, theirs = (transformed(cls, False, False, DECAY) for cls in (jbn.haiku.BatchNorm, hk.BatchNorm))
    batches = [random((8, 3), seed=s, mean=s, std=1 + s) for s in range(4)]
    _, state = ours.init(None, batches[0], True)
    for i, x in enumerate(batches):
        _, state = (ours if i % 2 else theirs).apply({}, state, None, x, True)
    (hidden_mean, average_mean), (hidden_var, average_var) = ema_reference(batches, DECAY, -1)
    np.testing.assert_allclose(state[MEAN]["hidden"][0], hidden_mean, **F32)
    np.testing.assert_allclose(state[MEAN]["average"][0], average_mean, **F32)
    np.testing.assert_allclose(state[VAR]["hidden"][0], hidden_var, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state[VAR]["average"][0], average_var, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("per_example", [False, True], ids=["per_feature", "per_example"])
def test_call_time_scale_and_offset_match_haiku(per_example):
    """Conditional normalization: `scale`/`offset` passed at call time, one per feature
    (NCHW, shape (C, 1, 1)) or one per example (shape (N, C, 1, 1))."""
    x = random((4, 3, 2, 2))
    shape = (4, 3, 1, 1) if per_example else (3, 1, 1)
    scale, offset = random(shape, seed=1), random(shape, seed=2)
    outs = []
    for cls in (jbn.haiku.BatchNorm, hk.BatchNorm):
        f = transformed(cls, False, False, DECAY, data_format="channels_first")
        _, state = f.init(None, x, True)
        grad = jax.grad(
            lambda x, s, o, f=f, state=state: jnp.sum(f.apply({}, state, None, x, True, False, s, o)[0] ** 2), (0, 1, 2)
        )
        with promotion_rules_of(cls):
            outs.append((f.apply({}, state, None, x, True, False, scale, offset)[0], grad(x, scale, offset)))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), outs[0], outs[1])


def test_init_returns_the_neutral_state_so_evaluation_before_training_is_safe():
    """haiku's init stores the init batch's statistics as the averages (a dummy batch of
    zeros gives var 0, so evaluation divides by sqrt(eps)); jbn's starts at mean 0, var 1,
    and init works in evaluation mode too."""
    f = transformed(jbn.haiku.BatchNorm, True, True, DECAY)
    dummy = np.zeros((2, 3), np.float32)
    x = random((5, 3), seed=3)
    for is_training in (True, False):
        params, state = f.init(None, dummy, is_training)
        np.testing.assert_array_equal(state[MEAN]["average"], np.zeros((1, 3)))
        np.testing.assert_array_equal(state[VAR]["average"], np.ones((1, 3)))
        assert int(state[MEAN]["counter"]) == 0
        y, _ = f.apply(params, state, None, x, False)
        np.testing.assert_allclose(y, reference.normalize(x, np.zeros(3), np.ones(3), epsilon=EPS), **F32)
    # The first training step replaces the neutral state by the batch's statistics.
    _, state = f.apply(params, state, None, x, True)
    mean, var, _ = reference.moments(x)
    np.testing.assert_allclose(state[MEAN]["average"][0], mean, **F32)
    np.testing.assert_allclose(state[VAR]["average"][0], var, **F32)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_statistics_are_accurate_for_narrow_inputs_with_a_large_mean(dtype):
    """Mean 300, std 1: haiku's E[x^2] - E[x]^2 in the input dtype cancels (NaN or garbage
    in bfloat16); jbn's statistics are float32 and exact to float32 rounding."""
    x = jnp.asarray(random((64, 4), seed=4, mean=300.0, std=1.0), dtype)
    exact = np.asarray(x, np.float64)  # the reference sees the rounded input
    f = transformed(jbn.haiku.BatchNorm, False, False, DECAY)
    _, state = f.init(None, x, True)
    y, state = f.apply({}, state, None, x, True)
    mean, var, _ = reference.moments(exact)
    assert state[MEAN]["average"].dtype == state[VAR]["average"].dtype == jnp.float32
    np.testing.assert_allclose(state[MEAN]["average"][0], mean, rtol=1e-6)
    np.testing.assert_allclose(state[VAR]["average"][0], var, rtol=1e-5)  # accurate however large the mean
    expected = reference.normalize(exact, mean, var, epsilon=EPS)
    assert y.dtype == dtype
    # One rounding of the output to its dtype (at most half a unit in the last place), float32 error on top.
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=float(jnp.finfo(dtype).eps), atol=1e-3)


def test_nan_batch_leaves_the_moving_averages_of_its_features_unchanged():
    f = transformed(jbn.haiku.BatchNorm, False, False, DECAY)
    first = random((6, 3), seed=1)
    _, state = f.init(None, first, True)
    _, state = f.apply({}, state, None, first, True)
    second = random((6, 3), seed=2)
    second[2, 1] = np.nan
    y, after = f.apply({}, state, None, second, True)
    assert np.isnan(np.asarray(y)[:, 1]).all() and np.isfinite(np.asarray(y)[:, [0, 2]]).all()
    for name in (MEAN, VAR):
        for key in ("hidden", "average"):
            np.testing.assert_array_equal(after[name][key][0, 1], state[name][key][0, 1])
    (_, average_mean), (_, average_var) = ema_reference([first, second], DECAY, -1)
    np.testing.assert_allclose(after[MEAN]["average"][0, [0, 2]], average_mean[[0, 2]], **F32)
    np.testing.assert_allclose(after[VAR]["average"][0, [0, 2]], average_var[[0, 2]], **F32)


def test_mask_counts_only_valid_elements():
    x = random((4, 6, 3), seed=5)
    mask = np.arange(6)[None, :] < np.array([6, 2, 4, 1])[:, None]  # (N, T): valid steps per sequence
    x_padded = np.where(mask[..., None], x, 1e6).astype(np.float32)  # padding must not reach anything
    f = hk.transform_with_state(lambda x, m: jbn.haiku.BatchNorm(False, False, DECAY)(x, True, mask=m))
    _, state = f.init(None, x_padded, mask)
    y, state = f.apply({}, state, None, x_padded, mask)
    mean, var, _ = reference.moments(x, -1, mask)
    np.testing.assert_allclose(state[MEAN]["average"][0, 0], mean, **F32)
    np.testing.assert_allclose(state[VAR]["average"][0, 0], var, **F32)
    np.testing.assert_allclose(np.asarray(y)[mask], reference.normalize(x, mean, var, epsilon=EPS)[mask], **F32)
    dx = jax.grad(lambda x: jnp.sum(f.apply({}, state, None, x, mask)[0][mask] ** 2))(x_padded)
    np.testing.assert_array_equal(np.asarray(dx)[~mask], 0.0)


@pytest.mark.parametrize(
    "cls",
    [
        pytest.param(jbn.haiku.BatchNorm, id="jbn"),
        pytest.param(
            hk.BatchNorm,
            id="haiku",
            marks=pytest.mark.peer_not_strict("haiku's moving average raises a float32 decay to an int32 power"),
        ),
    ],
)
def test_cross_replica_axis_over_an_hk_vmap_axis_normalizes_the_whole_batch(cls):
    """Per-example calls under hk.vmap(axis_name=...): statistics of the whole batch, one
    unbatched state. (haiku's docstring says it does not support this; with
    `cross_replica_axis` naming the vmap axis, haiku 0.0.17 gets it right too.)"""
    x = random((12, 4), seed=6)

    def forward(xs, is_training):
        layer = cls(True, True, DECAY, cross_replica_axis="batch")
        return hk.vmap(lambda e: layer(e, is_training), split_rng=False, axis_name="batch")(xs)

    f = hk.transform_with_state(forward)
    params, state = f.init(None, x, True)
    y, state = jax.jit(f.apply, static_argnums=4)(params, state, None, x, True)
    mean, var, _ = reference.moments(x)
    np.testing.assert_allclose(y, reference.normalize(x, mean, var, epsilon=EPS), rtol=1e-5, atol=1e-5)
    assert state[MEAN]["average"].shape == (4,)
    np.testing.assert_allclose(state[VAR]["average"], var, rtol=1e-5, atol=1e-5)
    dy = random(x.shape, seed=8)
    expected_dx = reference.batch_norm_grads(x, None, dy, epsilon=EPS)[0]
    # The ways users differentiate: plain, through a jitted apply, and through lax.scan over steps.
    apply = jax.jit(f.apply, static_argnums=4)
    for loss in (
        lambda x: jnp.sum(f.apply(params, state, None, x, True)[0] * dy),
        lambda x: jnp.sum(apply(params, state, None, x, True)[0] * dy),
        lambda x: (
            jax.lax.scan(lambda c, _: (c + jnp.sum(apply(params, state, None, x, True)[0] * dy), None), 0.0, length=2)[
                0
            ]
            / 2
        ),
    ):
        np.testing.assert_allclose(jax.grad(loss)(x), expected_dx, rtol=1e-4, atol=1e-4)


DEVICES = 8


def global_reference(x, mask=None):
    """Whole-batch statistics and output, float64, for a batch split on its leading axis."""
    flat_x = x.reshape(-1, x.shape[-1])
    flat_mask = None if mask is None else mask.reshape(-1, 1)
    mean, var, _ = reference.moments(flat_x, -1, flat_mask)
    return mean, var, reference.normalize(flat_x, mean, var, epsilon=EPS).reshape(x.shape)


def test_pmap_synchronizes_count_weighted_statistics_with_masks():
    """Devices with different numbers of valid rows: the statistics are those of the valid
    rows of the whole batch, each device weighted by its count (haiku has no mask)."""
    x = random((DEVICES, 4, 3), seed=10, mean=2.0)
    mask = np.arange(4)[None, :] < (np.arange(DEVICES) % 4 + 1)[:, None]  # 1 to 4 valid rows per device
    f = hk.transform_with_state(
        lambda x, m: jbn.haiku.BatchNorm(False, False, DECAY, cross_replica_axis="i")(x, True, mask=m[:, None])
    )
    _, state = jax.pmap(f.init, axis_name="i", in_axes=(None, 0, 0))(None, x, mask)
    y, state = jax.pmap(f.apply, axis_name="i", in_axes=(None, 0, None, 0, 0))({}, state, None, x, mask)
    mean, var, expected = global_reference(x, mask)
    np.testing.assert_allclose(np.asarray(y)[mask], expected[mask], **F32)
    for device in range(DEVICES):
        np.testing.assert_allclose(state[MEAN]["average"][device, 0], mean, **F32)
        np.testing.assert_allclose(state[VAR]["average"][device, 0], var, **F32)


def test_pmap_with_axis_index_groups_normalizes_each_group():
    x = random((DEVICES, 2, 3), seed=11)
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    f = transformed(
        jbn.haiku.BatchNorm, False, False, DECAY, cross_replica_axis="i", cross_replica_axis_index_groups=groups
    )
    _, state = jax.pmap(lambda x: f.init(None, x, True), axis_name="i")(x)
    y, _ = jax.pmap(lambda s, x: f.apply({}, s, None, x, True), axis_name="i")(state, x)
    for group in groups:
        np.testing.assert_allclose(y[np.array(group)], global_reference(x[np.array(group)])[2], **F32)


def test_shard_map_and_sharded_jit_give_whole_batch_statistics():
    x = random((DEVICES * 2, 3), seed=12, mean=-1.0)
    mean, var, expected = global_reference(x)
    mesh = jax.make_mesh((DEVICES,), ("i",))
    sharded = jax.device_put(x, NamedSharding(mesh, P("i")))
    synced = transformed(jbn.haiku.BatchNorm, True, True, DECAY, cross_replica_axis="i")
    params, state = synced.init(None, x, True)  # outside the map: init does not synchronize

    def step(params, state, x):
        return synced.apply(params, state, None, x, True)

    mapped = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P("i")), out_specs=(P("i"), P())))
    plain = transformed(jbn.haiku.BatchNorm, True, True, DECAY)  # no axis name: XLA makes the reductions global
    by_jit = jax.jit(lambda p, s, x: plain.apply(p, s, None, x, True))
    for y, new_state in (mapped(params, state, sharded), by_jit(params, state, sharded)):
        np.testing.assert_allclose(y, expected, **F32)
        np.testing.assert_allclose(new_state[MEAN]["average"][0], mean, **F32)
        np.testing.assert_allclose(new_state[VAR]["average"][0], var, **F32)


def test_every_axis_reduced_and_integer_inputs_follow_haiku():
    """`axis` naming every axis (one mean for the whole input), a channel index past the
    input's rank (likewise), and integer inputs (normalized as floats), as haiku computes them."""
    x = random((5, 4), seed=13)
    ints = np.arange(20, dtype=np.int32).reshape(5, 4)
    cases = ((x, dict(axis=[0, 1])), (x[:, 0], dict(data_format="channels_first")), (ints, dict()))
    for inputs, kwargs in cases:
        outs = []
        for cls in (jbn.haiku.BatchNorm, hk.BatchNorm):
            f = transformed(cls, True, True, DECAY, **kwargs)
            with promotion_rules_of(cls):
                params, state = f.init(None, inputs, True)
                y, state = f.apply(params, state, None, inputs, True)
            outs.append((y, jax.tree.map(jnp.shape, (params, state))))
        np.testing.assert_allclose(outs[0][0], outs[1][0], **F32)
        assert outs[0][1] == outs[1][1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(create_scale=False, scale_init=jnp.ones), "Cannot set `scale_init`"),
        (dict(create_offset=False, offset_init=jnp.zeros), "Cannot set `offset_init`"),
        (dict(cross_replica_axis_index_groups=[[0, 1]]), "`cross_replica_axis` name must be specified"),
        (dict(decay_rate=1.5), "`decay_rate`=1.5 must be a float in \\[0, 1\\]"),
        (dict(eps=0.0), "`eps`=0.0 must be a finite float > 0"),
        (dict(data_format="HWC?"), "data format"),
    ],
)
def test_bad_constructor_arguments_raise_naming_them(kwargs, message):
    arguments = dict(create_scale=True, create_offset=True, decay_rate=DECAY) | kwargs
    f = hk.transform_with_state(lambda x: jbn.haiku.BatchNorm(**arguments)(x, True))
    with pytest.raises(ValueError, match=message):
        f.init(None, np.ones((2, 3), np.float32))


def test_import_jbn_loads_no_haiku_until_jbn_haiku_is_used():
    code = (
        "import sys, jax.numpy as jnp, jbn\n"
        "jbn.moments(jnp.ones((4, 3)))\n"
        "assert 'haiku' not in sys.modules, 'import jbn loaded haiku'\n"
        "assert jbn.haiku.BatchNorm.__module__ == 'jbn.haiku' and 'haiku' in sys.modules\n"
    )
    repo = Path(__file__).resolve().parent.parent  # `python -c` puts the working folder first on sys.path
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=repo)
    assert result.returncode == 0, result.stderr


def test_bad_call_arguments_raise_naming_them():
    x = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match="Cannot pass `scale` at call time"):
        transformed(jbn.haiku.BatchNorm, True, True, DECAY).init(None, x, True, False, np.ones(3))
    with pytest.raises(ValueError, match="`axis`=\\[0, 2\\] names axis 2, out of range"):
        transformed(jbn.haiku.BatchNorm, True, True, DECAY, axis=[0, 2]).init(None, x, True)


def test_fused_default_under_hk_vmap_differentiated_through_scan_and_jit_matches_plain():
    """The fused rule (the default) under a vmapped cross_replica_axis, differentiated from outside the
    vmap (through a jitted apply and through lax.scan), gives the plain computation's gradients."""
    x = jnp.asarray(np.random.default_rng(3).normal(size=(8, 3)), jnp.float32)
    grads = {}
    for fused in (True, False):

        def forward(x, fused=fused):
            return jbn.haiku.BatchNorm(True, True, 0.9, cross_replica_axis="i", fused=fused)(x, is_training=True)

        model = hk.transform_with_state(forward)
        params, state = jax.vmap(model.init, in_axes=(None, 0), axis_name="i", out_axes=None)(jax.random.key(0), x)

        def loss(params, x, model=model, state=state):
            apply = jax.vmap(model.apply, in_axes=(None, None, None, 0), axis_name="i", out_axes=(0, None))
            return jnp.sum(apply(params, state, None, x)[0] ** 3)

        def over_scan(params, loss=loss):
            return jax.lax.scan(lambda c, xb: (c + loss(params, xb), None), 0.0, jnp.stack([x, 2 * x]))[0]

        grads[fused] = (jax.grad(jax.jit(loss))(params, x), jax.grad(over_scan)(params))
    for fused_leaf, plain_leaf in zip(jax.tree.leaves(grads[True]), jax.tree.leaves(grads[False])):
        np.testing.assert_allclose(fused_leaf, plain_leaf, rtol=1e-5, atol=1e-5)
