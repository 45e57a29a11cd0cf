"""Every module (pure, linen, NNX, equinox) under every JAX transform users put it in,
against a reference written from the formulas in plain jnp (batch mean, biased variance,
normalize, one EMA step from mean 0 and var 1), plus the batch-norm reports of flax and
equinox users, each in its own words, showing jbn's modules handle them."""

import equinox as eqx
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import export

import jbn
import jbn.equinox as je
from tests import reference as reference_f64

C, N, MOMENTUM, EPS = 3, 8, 0.9, 1e-5
TOL = dict(rtol=2e-4, atol=2e-4)
RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.normal(1.0, 2.0, (N, C)), jnp.float32)
W = jnp.asarray(RNG.normal(size=(N, C)), jnp.float32)  # weights of the loss
PARAMS = (jnp.asarray(RNG.uniform(0.5, 2.0, C), jnp.float32), jnp.asarray(RNG.normal(size=C), jnp.float32))


def reference(params, x):
    """The training step from the formulas: output, new running mean and variance."""
    scale, bias = params
    mean = jnp.mean(x, axis=0)
    var = jnp.mean((x - mean[None]) ** 2, axis=0)
    y = (x - mean[None]) / jnp.sqrt(var[None] + EPS) * scale[None] + bias[None]
    return y, (1 - MOMENTUM) * mean, MOMENTUM + (1 - MOMENTUM) * var


# Each builder: axis_name -> f(params, x) -> (y, new mean, new var), one training step.


def pure(axis_name=None):
    def f(params, x):
        running = jbn.RunningStats(jnp.zeros(C), jnp.ones(C))
        y, new = jbn.batch_norm(x, *params, running, training=True, momentum=MOMENTUM, axis_name=axis_name)
        return y, new.mean, new.var

    return f


def linen(axis_name=None, cls=jbn.BatchNorm):
    model = cls(use_running_average=False, momentum=MOMENTUM, epsilon=EPS, axis_name=axis_name)
    stats = {"mean": jnp.zeros(C), "var": jnp.ones(C)}

    def f(params, x):
        variables = {"params": {"scale": params[0], "bias": params[1]}, "batch_stats": stats}
        y, mutated = model.apply(variables, x, mutable=["batch_stats"])
        return y, mutated["batch_stats"]["mean"], mutated["batch_stats"]["var"]

    return f


def nnx_module(axis_name=None, cls=jbn.nnx.BatchNorm):
    def f(params, x):
        bn = cls(C, momentum=MOMENTUM, epsilon=EPS, axis_name=axis_name, rngs=nnx.Rngs(0))
        bn.scale[...], bn.bias[...] = params
        y = bn(x)
        return y, bn.mean[...], bn.var[...]

    return f


def equinox(axis_name=None, cls=je.BatchNorm):
    names = ("batch",) if axis_name is None else (axis_name, "batch")
    # equinox's mode "batch" keeps the plain EMA from mean 0, var 1 in its state (and
    # divides by 1 - momentum**t when it reads it): jbn's debias=False keeps the same.
    options = dict(debias=False) if cls is je.BatchNorm else {}
    bn, state = eqx.nn.make_with_state(cls)(C, names, eps=EPS, mode="batch", momentum=MOMENTUM, **options)

    def f(params, x):
        layer = eqx.tree_at(lambda m: (m.weight, m.bias), bn, params)
        traced = jax.tree.map(lambda a: a + 0, state)  # as a state passed in: a value of this trace
        y, new = jax.vmap(layer, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, traced)
        mean, var = new.get(layer.batch_state_index)
        return y, mean, var

    return f


def flax_linen(axis_name=None):
    return linen(axis_name, nn.BatchNorm)


def flax_nnx(axis_name=None):
    return nnx_module(axis_name, nnx.BatchNorm)


def equinox_peer(axis_name=None):
    return equinox(axis_name, eqx.nn.BatchNorm)


def no_peer(axis_name=None):
    return reference


# Each of jbn's modules and its peer with the same variables: the peer's outputs, gradients and updated
# statistics are what jbn's must equal. The pure layer has no peer of its call: the formulas' reference.
MODULES = {"pure": (pure, no_peer), "linen": (linen, flax_linen), "nnx": (nnx_module, flax_nnx)}
MODULES["equinox"] = (equinox, equinox_peer)
module = pytest.mark.parametrize("build, peer", list(MODULES.values()), ids=list(MODULES))


def as_peer(g):
    """`g` run under JAX's default promotion rules: the peers mix dtypes (flax and equinox
    an int32 counter or a bfloat16 input with float32 state), and only jbn's side must pass
    under the strict settings that tests/conftest.py sets."""

    def run(*args):
        with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
            return g(*args)

    return run


def loss(f):
    return lambda params, x: jnp.sum(jnp.sin(f(params, x)[0]) * W)


def assert_close(got, want):
    jax.tree.map(lambda g, w: np.testing.assert_allclose(np.asarray(g), np.asarray(w), **TOL), got, want)


@module
def test_jit_and_donation(build, peer):
    f, want = build(), as_peer(peer())(PARAMS, X)
    assert_close(jax.jit(f)(PARAMS, X), want)
    x = jnp.array(X)  # a buffer of its own to give away
    assert_close(jax.jit(f, donate_argnums=1)(PARAMS, x), want)


@module
def test_grad_hessian_and_linearize(build, peer):
    f, g = build(), peer()
    want = as_peer(lambda p, x: jax.grad(loss(g), argnums=(0, 1))(p, x))(PARAMS, X)
    assert_close(jax.grad(loss(f), argnums=(0, 1))(PARAMS, X), want)
    assert_close(jax.hessian(loss(f))(PARAMS, X), as_peer(jax.hessian(loss(g)))(PARAMS, X))
    _, lin = jax.linearize(lambda x: f(PARAMS, x)[0], X)
    _, lin_peer = as_peer(lambda x: jax.linearize(lambda x: g(PARAMS, x)[0], x))(X)
    assert_close(lin(W), as_peer(lin_peer)(W))


@module
def test_ensembles_and_nested_vmap(build, peer):
    f, g = build(), peer()
    params2 = jax.tree.map(lambda p: jnp.stack([p, 2 * p]), PARAMS)
    xs = jnp.stack([X, X[::-1] * 3])
    assert_close(jax.vmap(f)(params2, xs), as_peer(jax.vmap(g))(params2, xs))
    params4 = jax.tree.map(lambda p: jnp.stack([p, p + 1]), params2)
    xs4 = jnp.stack([xs, xs + 1])
    assert_close(jax.vmap(jax.vmap(f))(params4, xs4), as_peer(jax.vmap(jax.vmap(g)))(params4, xs4))


@module
def test_scan_remat_cond_and_eval_shape(build, peer):
    f, g = build(), peer()
    steps = jnp.stack([X, 2 * X + 1, X**2])

    def through_scan(h):
        def run(params):
            def body(total, x):
                return total + loss(h)(params, x), None

            return jax.lax.scan(body, 0.0, steps)[0]

        return jax.grad(run)(PARAMS)

    assert_close(through_scan(f), as_peer(through_scan)(g))
    assert_close(jax.grad(loss(jax.checkpoint(f)))(PARAMS, X), as_peer(jax.grad(loss(jax.checkpoint(g))))(PARAMS, X))
    for flag in (True, False):
        got = jax.jit(lambda p, x, flag: jax.lax.cond(flag, f, lambda p, x: reference(p, 2 * x), p, x))(PARAMS, X, flag)
        assert_close(got, as_peer(g)(PARAMS, X if flag else 2 * X))
    shapes = jax.eval_shape(f, PARAMS, X)
    assert [(s.shape, s.dtype) for s in shapes] == [(s.shape, s.dtype) for s in as_peer(jax.eval_shape)(g, PARAMS, X)]


@module
def test_pmap_and_shard_map_give_the_whole_batch_statistics(build, peer):
    f = build("device")
    per_device = X.reshape(4, N // 4, C)
    y, mean, var = jax.pmap(f, axis_name="device", in_axes=(None, 0))(PARAMS, per_device)
    if peer is no_peer:  # the formulas over the whole batch
        y_peer, mean_peer, var_peer = jax.tree.map(lambda a: jnp.stack([a] * 4), reference(PARAMS, X))
        y_peer = y_peer[0].reshape(per_device.shape)
    else:
        pmapped = jax.pmap(peer("device"), axis_name="device", in_axes=(None, 0))
        y_peer, mean_peer, var_peer = as_peer(pmapped)(PARAMS, per_device)
    assert_close((y, mean, var), (y_peer, mean_peer, var_peer))
    # The peers' shard_map arm is not compared: the same whole-batch numbers are the pmap's above.
    mesh = jax.make_mesh((4,), ("device",), axis_types=(jax.sharding.AxisType.Explicit,))
    sharded = jax.shard_map(
        f,
        mesh=mesh,
        in_specs=(jax.P(), jax.P("device")),
        out_specs=(jax.P("device"), jax.P(), jax.P()),
        check_vma=build is not equinox,  # a psum over a checked mesh axis and a vmap axis together is rejected
    )
    x = jax.device_put(X, jax.NamedSharding(mesh, jax.P("device")))
    assert_close(jax.jit(sharded)(PARAMS, x), (y_peer.reshape(N, C), mean_peer[0], var_peer[0]))


def float64_step(x):
    """One training step from mean 0, var 1 in float64 (tests/reference.py): output, new mean, new var."""
    return reference_f64.batch_norm(x, *PARAMS, np.zeros(C), np.ones(C), training=True, momentum=MOMENTUM, epsilon=EPS)


@pytest.mark.parametrize("build, peer", [MODULES[k] for k in ("pure", "linen", "nnx")], ids=["pure", "linen", "nnx"])
def test_export_with_a_symbolic_batch(build, peer):
    f, g = build(), as_peer(peer())
    (batch,) = export.symbolic_shape("b")
    exported = export.export(jax.jit(f))(PARAMS, jax.ShapeDtypeStruct((batch, C), jnp.float32))
    for x in (X, X[:5]):
        assert_close(exported.call(PARAMS, x), g(PARAMS, x))
        assert_close(exported.call(PARAMS, x), float64_step(np.asarray(x)))


def test_export_of_the_equinox_layer_with_a_symbolic_batch():
    """equinox's layer with `axis_name=None` takes the whole batch in one call, channels
    first (C, batch): exported with a symbolic batch, against the float64 formulas.
    (Its per-example form under `jax.vmap(..., axis_name=...)` does not export with a
    symbolic batch in jax 0.10: every collective over a vmapped axis, `lax.psum`,
    `lax.all_gather`, `lax.axis_size`, needs the axis size as a constant, for
    `equinox.nn.BatchNorm`'s `lax.pmean` as for jbn's statistics.)"""
    bn, state = eqx.nn.make_with_state(je.BatchNorm)(C, None, eps=EPS, mode="batch", momentum=MOMENTUM, debias=False)

    def f(params, x):
        layer = eqx.tree_at(lambda m: (m.weight, m.bias), bn, params)
        y, new = layer(x, state)
        return (y, *new.get(layer.batch_state_index))

    (batch,) = export.symbolic_shape("b")
    exported = export.export(jax.jit(f))(PARAMS, jax.ShapeDtypeStruct((C, batch), jnp.float32))
    for x in (X, X[:5]):
        y, mean, var = exported.call(PARAMS, x.T)
        assert_close((y.T, mean, var), float64_step(np.asarray(x)))


def test_per_example_export_with_a_symbolic_batch_names_the_fix_at_trace_time():
    """The per-example form over a symbolic batch (see above): a ValueError at trace time that
    names `axis_name` and the two ways out, not JAX's message about a symbolic dimension."""
    (batch,) = export.symbolic_shape("b")
    with pytest.raises(ValueError, match=r"`axis_name`='batch' names a vmapped axis of symbolic size.*axis_name=None"):
        export.export(jax.jit(equinox()))(PARAMS, jax.ShapeDtypeStruct((batch, C), jnp.float32))


@module
@pytest.mark.parametrize("x64", [False, True], ids=["x32", "x64"])
def test_strict_settings(build, peer, x64):
    """A bfloat16 batch under the strict settings, x64 off and on. The peers mix the bfloat16
    input with their float32 state there, so the reference is the formulas' in float32."""
    with jax.enable_x64(x64), jax.numpy_rank_promotion("raise"), jax.numpy_dtype_promotion("strict"):
        f = build()
        x = jnp.asarray(X, jnp.bfloat16)
        y, mean, var = jax.jit(f)(PARAMS, x)
        assert_close((y.astype(jnp.float32), mean, var), reference(PARAMS, jnp.asarray(x, jnp.float32)))
        jax.grad(lambda p: jnp.sum(f(p, x)[0].astype(jnp.float32)))(PARAMS)


# ------------------------------------------------------------- reports of flax and equinox users


def test_nested_linen_vmap_with_statistics_over_both_axes():
    """flax #3319: a per-example linen module under two nested `nn.vmap`s, each with an
    axis name, the statistics over both, one shared `batch_stats`."""

    class PerExample(nn.Module):
        @nn.compact
        def __call__(self, x):
            return jbn.BatchNorm(use_running_average=False, momentum=MOMENTUM, axis_name=("outer", "inner"))(x)

    def vmapped(name, target):
        return nn.vmap(
            target,
            variable_axes={"params": None, "batch_stats": None},
            split_rngs={"params": False},
            in_axes=0,
            axis_name=name,
        )

    model = vmapped("outer", vmapped("inner", PerExample))()
    x = X.reshape(2, 4, C)
    variables = model.init(jax.random.key(0), x)
    y, mutated = model.apply(variables, x, mutable=["batch_stats"])
    y_ref, mean_ref, var_ref = reference((jnp.ones(C), jnp.zeros(C)), X)
    assert_close((y.reshape(N, C), mutated["batch_stats"]["BatchNorm_0"]["mean"]), (y_ref, mean_ref))
    assert_close(mutated["batch_stats"]["BatchNorm_0"]["var"], var_ref)


def test_nnx_eval_shape_builds_the_layer_abstractly():
    """flax #4734: `nnx.eval_shape` of a constructor with a BatchNorm inside, then real
    weights loaded into the abstract model."""
    abstract = nnx.eval_shape(lambda: jbn.nnx.BatchNorm(C, rngs=nnx.Rngs(0)))
    assert abstract.mean.shape == (C,) and isinstance(abstract.mean.get_value(), jax.ShapeDtypeStruct)
    graphdef, abstract_state = nnx.split(abstract)
    real_state = nnx.state(jbn.nnx.BatchNorm(C, rngs=nnx.Rngs(0)))
    bn = nnx.merge(graphdef, real_state)
    bn.momentum = MOMENTUM
    assert_close(bn(X), reference((jnp.ones(C), jnp.zeros(C)), X)[0])


def test_linen_scan_carries_batch_stats_across_layers():
    """flax #3602 and #2052: BatchNorm inside `nn.scan` over stacked layers, each layer's
    statistics its own (batch_stats scanned along the layer axis)."""

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return 2.0 * jbn.BatchNorm(use_running_average=False, momentum=MOMENTUM)(x) + 1.0, None

    stack = nn.scan(
        Block,
        variable_axes={"params": 0, "batch_stats": 0},
        split_rngs={"params": True},
        length=3,
    )()
    variables = stack.init(jax.random.key(0), X, None)
    (y, _), mutated = stack.apply(variables, X, None, mutable=["batch_stats"])
    ones = (jnp.ones(C), jnp.zeros(C))
    h, means = X, []
    for _ in range(3):
        out, mean, _ = reference(ones, h)
        means.append(mean)
        h = 2.0 * out + 1.0
    assert_close((y, mutated["batch_stats"]["BatchNorm_0"]["mean"]), (h, jnp.stack(means)))


def test_nnx_vmap_of_a_model_with_batch_norm_called_twice():
    """flax #4760: `nnx.vmap` of BatchNorm over a leading ensemble axis, called twice: the
    statistics stay per member, the second call works and moves them again."""
    state_axes = nnx.StateAxes({nnx.BatchStat: 0, ...: None})
    members = nnx.vmap(lambda _: jbn.nnx.BatchNorm(C, momentum=MOMENTUM, rngs=nnx.Rngs(0)), out_axes=state_axes)(
        jnp.arange(2)
    )
    run = nnx.vmap(lambda bn, x: bn(x), in_axes=(state_axes, 0))
    xs = jnp.stack([X, 3 * X])
    first, second = run(members, xs), run(members, xs)
    ones = (jnp.ones(C), jnp.zeros(C))
    assert_close(first, jax.vmap(lambda x: reference(ones, x)[0])(xs))
    assert_close(second, first)
    batch_mean = jnp.mean(xs, axis=1)
    assert_close(members.mean[...], (1 - MOMENTUM**2) * batch_mean)  # two EMA steps from 0


def test_equinox_twice_vmapped_with_samples_and_higher_rank():
    """equinox #707 and #592: a per-example layer under an inner named vmap and an outer
    unnamed one over samples ([samples, batch, channels, ...], any rank): per-sample
    statistics and one running state per sample."""
    bn, state = eqx.nn.make_with_state(je.BatchNorm)(C, "batch", mode="batch", momentum=MOMENTUM, debias=False)
    x = jnp.stack([X, 2 * X - 1])[..., None, None] * jnp.ones((1, 1, 1, 2, 2))  # (samples, batch, C, 2, 2)
    inner = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    y, new = jax.vmap(inner, in_axes=(0, None))(x, state)
    ones = (jnp.ones(C), jnp.zeros(C))
    for s in range(2):
        y_ref, mean_ref, var_ref = reference(ones, x[s, :, :, 0, 0])
        assert_close(y[s, :, :, 1, 1], y_ref)
        running = bn.running_stats(jax.tree.map(lambda a, s=s: a[s], new))
        assert_close((running.mean, running.var), (mean_ref, var_ref))


@pytest.mark.parametrize(
    "cls",
    [
        pytest.param(jbn.haiku.BatchNorm, id="jbn"),
        pytest.param(
            hk.BatchNorm,
            id="haiku",
            marks=pytest.mark.peer_not_strict(
                "haiku's zero-debiased moving average raises a float32 to an int32 power"
            ),
        ),
    ],
)
def test_haiku_model_under_jax_vmap_per_example_and_per_member(cls):
    """haiku #786: a transformed haiku model with a BatchNorm, put under `jax.vmap` (not
    `hk.vmap`) by the user. Per example, with `cross_replica_axis` naming the vmapped axis:
    the whole batch's statistics and one shared state. Per ensemble member (an unnamed vmap
    over params, state and data): each member its own statistics and state. haiku's own
    class does the same here, and jbn's matches it."""

    def forward(x):
        return cls(True, True, MOMENTUM, cross_replica_axis="batch", eps=EPS)(x, is_training=True)

    model = hk.transform_with_state(forward)
    params, state = jax.vmap(model.init, in_axes=(None, 0), axis_name="batch", out_axes=None)(jax.random.key(0), X)
    params = {k: {"scale": PARAMS[0], "offset": PARAMS[1]} for k in params}
    per_example = jax.vmap(model.apply, in_axes=(None, None, None, 0), axis_name="batch", out_axes=(0, None))
    y, new = jax.jit(per_example)(params, state, None, X)
    y_ref, mean_ref, var_ref = reference(PARAMS, X)
    (mean_state,) = (v["average"] for k, v in new.items() if k.endswith("mean_ema"))
    (var_state,) = (v["average"] for k, v in new.items() if k.endswith("var_ema"))
    # haiku's moving averages are zero-debiased: after one step they hold the batch's statistics.
    batch_mean, batch_var = mean_ref / (1 - MOMENTUM), (var_ref - MOMENTUM) / (1 - MOMENTUM)
    assert_close((y, mean_state.reshape(C), var_state.reshape(C)), (y_ref, batch_mean, batch_var))
    members = jax.tree.map(lambda a: jnp.stack([a, a]), (params, state))
    xs = jnp.stack([X, 3 * X - 1])
    ys, _ = jax.vmap(lambda p, s, x: per_example(p, s, None, x))(*members, xs)
    assert_close(ys, jax.vmap(lambda x: reference(PARAMS, x)[0])(xs))
