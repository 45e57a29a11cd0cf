"""Gradients of the fused path with synchronized statistics (pmap, vmap with an axis
name, shard_map with check_vma=True, axis_index_groups), against the float64 NumPy
reference of single-device batch norm on the whole batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jbn
from jbn import RunningStats
from tests.test_fused import EPS, MOMENTUM, SLOPE, assert_close, reference

D = 8  # conftest gives 8 CPU devices
C = 3


def data(seed=0, rows=(3, 2)):
    rng = np.random.default_rng(seed)
    shape = (D, *rows, C)
    x = (rng.normal(size=shape) * 2 + 4).astype(np.float32)
    dy = rng.normal(size=shape).astype(np.float32)
    mask = rng.uniform(size=shape[:-1]) > 0.3
    mask[:, 0, 0] = True
    mask[-1] = False  # one device holds only padding
    scale = rng.uniform(0.5, 1.5, C).astype(np.float32)
    bias = rng.normal(size=C).astype(np.float32)
    w_mean = rng.normal(size=C).astype(np.float32)
    w_var = rng.normal(size=C).astype(np.float32)
    return x, dy, mask, scale, bias, w_mean, w_var


def local_loss(x, dy, mask, scale, bias, w_mean, w_var, axis_name, fused=True, **kwargs):
    running = RunningStats(jnp.zeros(C), jnp.ones(C))
    y, new = jbn.batch_norm(
        x,
        scale,
        bias,
        running,
        training=True,
        momentum=MOMENTUM,
        epsilon=EPS,
        mask=mask,
        axis_name=axis_name,
        fused=fused,
        negative_slope=SLOPE,
        **kwargs,
    )
    with jax.numpy_dtype_promotion("standard"):  # the test's loss mixes dtypes on purpose, also under JBN_STRICT
        return jnp.sum(y * dy) + jnp.sum(new.mean * w_mean) + jnp.sum(new.var * w_var)


def whole_batch_reference(x, dy, mask, scale, bias, w_mean, w_var, activation, devices=D):
    """Single-device batch norm on all rows; each participant's loss counts the
    statistics once, so their cotangents add up over participants."""
    flat = lambda a: a.reshape(-1, *a.shape[2:])  # noqa: E731
    return reference(
        flat(x),
        scale,
        bias,
        flat(mask)[..., None],
        flat(dy),
        devices * (1 - MOMENTUM) * w_mean,
        devices * (1 - MOMENTUM) * w_var,
        (x.ndim - 2,),
        activation,
    )


@pytest.mark.parametrize("transform", ["pmap", "vmap"])
@pytest.mark.parametrize("activation", [None, "leaky_relu"])
def test_pmap_and_vmap_gradients_match_whole_batch_reference(transform, activation):
    x, dy, mask, scale, bias, w_mean, w_var = data(1)

    def grads(x, dy, mask):
        return jax.grad(local_loss, argnums=(0, 3, 4))(
            x, dy, mask, scale, bias, w_mean, w_var, "batch", activation=activation
        )

    mapped = jax.pmap(grads, axis_name="batch") if transform == "pmap" else jax.jit(jax.vmap(grads, axis_name="batch"))
    dx, d_scale, d_bias = mapped(x, dy, mask)
    ref = whole_batch_reference(x, dy, mask, scale, bias, w_mean, w_var, activation)
    assert_close(np.asarray(dx).reshape(ref["dx"].shape), ref["dx"])
    # pmap semantics: each participant gets the gradient of the parameters it holds.
    assert_close(np.sum(d_scale, 0), ref["d_scale"])
    assert_close(np.sum(d_bias, 0), ref["d_bias"])


def test_pmap_axis_index_groups_gradients_match_per_group_reference():
    x, dy, mask, scale, bias, w_mean, w_var = data(2)
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]

    def grads(x, dy, mask):
        return jax.grad(local_loss, argnums=(0, 3))(
            x, dy, mask, scale, bias, w_mean, w_var, "batch", axis_index_groups=groups, activation="relu"
        )

    dx, d_scale = jax.pmap(grads, axis_name="batch")(x, dy, mask)
    for g in groups:
        ref = whole_batch_reference(x[g], dy[g], mask[g], scale, bias, w_mean, w_var, "relu", devices=len(g))
        assert_close(np.asarray(dx)[g].reshape(ref["dx"].shape), ref["dx"])
        assert_close(np.sum(np.asarray(d_scale)[g], 0), ref["d_scale"])


def psum_operand_shapes(jaxpr) -> list[tuple[int, ...]]:
    """Shapes of what every psum-like collective in a jaxpr (inner jaxprs included) sums."""
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name.startswith("psum"):
            shapes += [tuple(v.aval.shape) for v in eqn.invars]
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                shapes += psum_operand_shapes(inner)
    return shapes


@pytest.mark.parametrize("activation", ["relu", "identity"])
def test_shard_map_check_vma_gradients_match_whole_batch_reference(activation):
    x, dy, mask, scale, bias, w_mean, w_var = data(3)
    mesh = jax.make_mesh((D,), ("batch",))
    shard = NamedSharding(mesh, P("batch"))
    replicated = NamedSharding(mesh, P())
    x_s, dy_s, mask_s = (jax.device_put(a, shard) for a in (x, dy, mask))
    scale_r, bias_r = (jax.device_put(a, replicated) for a in (scale, bias))

    def total_loss(x, scale, bias, dy, mask):
        def body(x, scale, bias, dy, mask):
            loss = local_loss(x[0], dy[0], mask[0], scale, bias, w_mean, w_var, "batch", activation=activation)
            return jax.lax.psum(loss, "batch")

        return jax.shard_map(
            body, mesh=mesh, in_specs=(P("batch"), P(), P(), P("batch"), P("batch")), out_specs=P(), check_vma=True
        )(x, scale, bias, dy, mask)

    grad_fn = jax.jit(jax.grad(total_loss, argnums=(0, 1, 2)))
    dx, d_scale, d_bias = grad_fn(x_s, scale_r, bias_r, dy_s, mask_s)
    ref = whole_batch_reference(x, dy, mask, scale, bias, w_mean, w_var, activation)
    assert_close(np.asarray(dx).reshape(ref["dx"].shape), ref["dx"])
    # A replicated (invariant) parameter gets the whole-batch gradient once.
    assert_close(d_scale, ref["d_scale"])
    assert_close(d_bias, ref["d_bias"])

    # Besides the loss's scalars: one psum for the statistics (per-device slots of count,
    # var, and the mean as base + delta), and ONE for the backward pass's two per-feature reductions.
    jaxpr = jax.make_jaxpr(jax.grad(total_loss, argnums=(0, 1, 2)))(x_s, scale_r, bias_r, dy_s, mask_s)
    shapes = sorted(s for s in psum_operand_shapes(jaxpr.jaxpr) if s != ())
    assert shapes == [(2, C), (D, 4, C)]


def test_shard_map_module_running_stats_are_replicated_and_global():
    x, _, mask, _, _, _, _ = data(4)
    mesh = jax.make_mesh((D,), ("batch",))
    x_s = jax.device_put(x, NamedSharding(mesh, P("batch")))
    mask_s = jax.device_put(mask, NamedSharding(mesh, P("batch")))
    module = jbn.BatchNorm(axis_name="batch", momentum=MOMENTUM, epsilon=EPS, activation="relu")
    variables = module.init(jax.random.key(0), x[0], use_running_average=False)

    def body(x, mask, variables):
        y, updates = module.apply(
            variables, x[0], mask=mask[0][..., None], use_running_average=False, mutable=["batch_stats"]
        )
        return y[None], updates["batch_stats"]

    y, stats = jax.jit(
        jax.shard_map(body, mesh=mesh, in_specs=(P("batch"), P("batch"), P()), out_specs=(P("batch"), P()))
    )(x_s, mask_s, variables)
    ref = reference(
        x.reshape(-1, 2, C),
        None,
        None,
        mask.reshape(-1, 2)[..., None],
        np.zeros((D * 3, 2, C)),
        None,
        None,
        (2,),
        "relu",
    )
    assert_close(stats["mean"], (1 - MOMENTUM) * ref["mean"])
    assert_close(stats["var"], MOMENTUM + (1 - MOMENTUM) * ref["var"])
    valid = np.broadcast_to(mask[..., None], x.shape).reshape(-1, 2, C)
    assert_close(np.where(valid, np.asarray(y).reshape(-1, 2, C), 0), np.where(valid, ref["y"], 0))


def bfloat16_data(seed):
    """`data` with x and dy rounded to bfloat16; the reference takes the rounded values."""
    x, dy, mask, scale, bias, w_mean, w_var = data(seed)
    x16, dy16 = jnp.asarray(x, jnp.bfloat16), jnp.asarray(dy, jnp.bfloat16)
    rounded = (np.asarray(x16.astype(jnp.float32)), np.asarray(dy16.astype(jnp.float32)))
    return (x16, dy16, mask, scale, bias, w_mean, w_var), rounded


@pytest.mark.parametrize("transform", ["pmap", "vmap", "shard_map"])
def test_bfloat16_gradients_under_every_parallel_style_match_whole_batch_reference(transform):
    """A bfloat16 input and output: each backward pass casts its own handle on the
    cotangent (jbn._statistics.kept_apart), also where the statistics are global."""
    (x, dy, mask, scale, bias, w_mean, w_var), (x_seen, dy_seen) = bfloat16_data(4)
    kwargs = dict(activation="relu", dtype=jnp.bfloat16)
    argnums = (0, 3, 4)
    if transform == "shard_map":
        mesh = jax.make_mesh((D,), ("batch",))

        def total_loss(x, scale, bias, dy, mask):
            def body(x, scale, bias, dy, mask):
                loss = local_loss(x[0], dy[0], mask[0], scale, bias, w_mean, w_var, "batch", **kwargs)
                return jax.lax.psum(loss, "batch")

            return jax.shard_map(
                body, mesh=mesh, in_specs=(P("batch"), P(), P(), P("batch"), P("batch")), out_specs=P(), check_vma=True
            )(x, scale, bias, dy, mask)

        shard, replicated = NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())
        args = (
            jax.device_put(x, shard),
            jax.device_put(scale, replicated),
            jax.device_put(bias, replicated),
            jax.device_put(dy, shard),
            jax.device_put(mask, shard),
        )
        dx, d_scale, d_bias = jax.jit(jax.grad(total_loss, argnums=(0, 1, 2)))(*args)
        jaxpr = jax.make_jaxpr(jax.grad(total_loss, argnums=(0, 1, 2)))(*args)
        assert sorted(s for s in psum_operand_shapes(jaxpr.jaxpr) if s != ()) == [(2, C), (D, 4, C)]
    else:

        def grads(x, dy, mask):
            return jax.grad(local_loss, argnums=argnums)(x, dy, mask, scale, bias, w_mean, w_var, "batch", **kwargs)

        mapped = (
            jax.pmap(grads, axis_name="batch") if transform == "pmap" else jax.jit(jax.vmap(grads, axis_name="batch"))
        )
        dx, d_scale, d_bias = mapped(x, dy, mask)
        d_scale, d_bias = np.sum(d_scale, 0), np.sum(d_bias, 0)
    assert dx.dtype == jnp.bfloat16
    ref = whole_batch_reference(x_seen, dy_seen, mask, scale, bias, w_mean, w_var, "relu")
    assert_close(np.asarray(dx.astype(jnp.float32)).reshape(ref["dx"].shape), ref["dx"], rtol=1e-2, atol=1e-2)
    assert_close(d_scale, ref["d_scale"])
    assert_close(d_bias, ref["d_bias"])
