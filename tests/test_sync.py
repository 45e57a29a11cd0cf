"""Synchronized batch norm under every parallel style, against single-device BN in float64.

Each style runs one training step of `jbn.batch_norm` (or `jbn.BatchNorm`) on a batch
split over 8 CPU devices with uneven masks (one device holds only padding, one a single
valid element) and returns the output, the updated running statistics and the gradients of
`sum(where(mask, y, 0) * w)` with respect to x, scale and bias. The reference
(tests/_sync_reference.py) is plain batch norm on the concatenated masked batch.

Gradient conventions (how a user takes them in each style):
- pmap / vmap: `jax.grad` of the participant's loss inside the transform; the parameter
  gradients are then `lax.psum`-ed over the axis (the data-parallel reduction of any
  training step). The input gradient is already that of the global loss, because the
  transpose of the statistics' psum sums the cotangents of all participants.
- shard_map, "inside": `jax.grad` of the participant's loss inside `shard_map` with
  `check_vma=True`; scale and bias enter replicated (`P()`), so JAX sums their cotangents
  over the devices and they leave as `P()`.
- shard_map, "outside": `jax.grad` (outside) of a jitted function whose loss is
  `lax.psum`-ed inside `shard_map`.
- plain jit: `jax.grad` of the global loss over batch-sharded arrays, no axis_name.
"""

from __future__ import annotations

import csv
import functools
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jbn
from tests import reference as ref_module
from tests._sync_reference import EPSILON, MOMENTUM, check, grouped_reference, make_batch, reference

DEVICES = 8
GROUPS = ((0, 1, 2, 3), (4, 5, 6, 7))
BATCH = make_batch(DEVICES)
REF = reference(BATCH)
REF_GROUPS = grouped_reference(BATCH, len(GROUPS))


def per_device(a):
    """(devices * n, ...) -> (devices, n, ...) for pmap and vmap."""
    return a.reshape((DEVICES, -1) + a.shape[1:])


def loss_and_state(x, mask, w, scale, bias, mean, var, *, axis_name=None, groups=None):
    """One participant's loss `sum(where(mask, y, 0) * w)`, with (y, new running stats)."""
    y, new = jbn.batch_norm(
        x,
        scale,
        bias,
        jbn.RunningStats(mean, var),
        training=True,
        momentum=MOMENTUM,
        epsilon=EPSILON,
        mask=mask,
        axis_name=axis_name,
        axis_index_groups=groups,
    )
    return jnp.sum(jnp.where(mask[..., None], y, 0) * w), (y, new)


def step(x, mask, w, scale, bias, mean, var, **kw):
    """(y, new_mean, new_var, dx, dscale, dbias) as one participant sees them."""
    grads, (y, new) = jax.grad(loss_and_state, argnums=(0, 3, 4), has_aux=True)(
        x, mask, w, scale, bias, mean, var, **kw
    )
    return (y, new.mean, new.var) + grads


def step_psum_params(name, **kw):
    """`step` for pmap/vmap: parameter gradients summed over the participants."""

    def f(*args):
        y, mean, var, dx, dscale, dbias = step(*args, axis_name=name, **kw)
        return y, mean, var, dx, lax.psum(dscale, name), lax.psum(dbias, name)

    return f


def args(b=BATCH):
    return (b.x, b.mask, b.w, b.scale, b.bias, b.mean, b.var)


def unstack(out):
    """pmap/vmap outputs (devices, ...) -> global arrays; replicated ones from device 0."""
    y, mean, var, dx, dscale, dbias = (np.asarray(o) for o in out)
    return y.reshape(BATCH.x.shape), mean[0], var[0], dx.reshape(BATCH.x.shape), dscale[0], dbias[0]


def mesh_1d():
    return Mesh(np.array(jax.devices()[:DEVICES]), ("d",))  # Auto axes: shard_map takes host arrays


def mesh_2d():
    # make_mesh gives Explicit axes in this JAX: inputs must be placed with their sharding first.
    return jax.make_mesh((2, 4), ("group", "member"), axis_types=(AxisType.Explicit,) * 2)


def place(mesh, batch_spec, b=BATCH):
    """Per-example arrays sharded along the batch, parameters replicated."""
    shard = NamedSharding(mesh, batch_spec)
    rep = NamedSharding(mesh, P())
    return tuple(jax.device_put(a, shard if i < 3 else rep) for i, a in enumerate(args(b)))


# ----------------------------------------------------------------------------- styles


def test_pmap_matches_single_device_bn():
    f = jax.pmap(step_psum_params("i"), axis_name="i", in_axes=(0, 0, 0, None, None, None, None))
    out = f(*(per_device(a) if i < 3 else a for i, a in enumerate(args())))
    got = unstack(out)
    # Every device holds the same statistics, including the all-padding device 0.
    np.testing.assert_array_equal(np.asarray(out[1]), np.broadcast_to(got[1], (DEVICES,) + got[1].shape))
    check(got, REF, BATCH.mask)


def test_pmap_axis_index_groups_matches_per_group_bn():
    f = jax.pmap(step_psum_params("i", groups=GROUPS), axis_name="i", in_axes=(0, 0, 0, None, None, None, None))
    y, mean, var, dx, dscale, dbias = (
        np.asarray(o) for o in f(*(per_device(a) if i < 3 else a for i, a in enumerate(args())))
    )
    # Running statistics are those of each group: device 0 and 4 represent the two groups.
    got = (y.reshape(BATCH.x.shape), mean[[0, 4]], var[[0, 4]], dx.reshape(BATCH.x.shape), dscale[0], dbias[0])
    check(got, REF_GROUPS, BATCH.mask)
    np.testing.assert_array_equal(mean[:4], np.broadcast_to(mean[0], mean[:4].shape))


def test_vmap_axis_name_matches_single_device_bn():
    f = jax.jit(jax.vmap(step_psum_params("v"), axis_name="v", in_axes=(0, 0, 0, None, None, None, None)))
    check(unstack(f(*(per_device(a) if i < 3 else a for i, a in enumerate(args())))), REF, BATCH.mask)


def test_vmap_axis_index_groups_matches_per_group_bn():
    # lax.psum(..., axis_index_groups=) raises NotImplementedError under vmap; jbn gathers instead.
    f = jax.jit(
        jax.vmap(step_psum_params("v", groups=GROUPS), axis_name="v", in_axes=(0, 0, 0, None, None, None, None))
    )
    y, mean, var, dx, dscale, dbias = (
        np.asarray(o) for o in f(*(per_device(a) if i < 3 else a for i, a in enumerate(args())))
    )
    check(
        (y.reshape(BATCH.x.shape), mean[[0, 4]], var[[0, 4]], dx.reshape(BATCH.x.shape), dscale[0], dbias[0]),
        REF_GROUPS,
        BATCH.mask,
    )


def sharded_step(**options):
    """`step` under jit(shard_map) over the 1-D mesh: the batch split, the parameters and
    running statistics replicated in and out (`options`: shard_map's)."""
    return jax.jit(
        jax.shard_map(
            functools.partial(step, axis_name="d"),
            mesh=mesh_1d(),
            in_specs=(P("d"), P("d"), P("d"), P(), P(), P(), P()),
            out_specs=(P("d"), P(), P(), P("d"), P(), P()),
            **options,
        )
    )


def test_shard_map_1d_grad_inside_leaves_replicated():
    """Running statistics and parameter gradients leave shard_map as P() with check_vma=True."""
    check(sharded_step(check_vma=True)(*args()), REF, BATCH.mask)


def test_shard_map_1d_grad_outside():
    mesh = mesh_1d()

    def global_loss(x, scale, bias, mask, w, mean, var):
        def body(x, mask, w, scale, bias, mean, var):
            loss, (y, new) = loss_and_state(x, mask, w, scale, bias, mean, var, axis_name="d")
            return lax.psum(loss, "d"), y, new.mean, new.var

        specs = (P("d"), P("d"), P("d"), P(), P(), P(), P())
        loss, y, new_mean, new_var = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=(P(), P("d"), P(), P()))(
            x, mask, w, scale, bias, mean, var
        )
        return loss, (y, new_mean, new_var)

    f = jax.jit(jax.grad(global_loss, argnums=(0, 1, 2), has_aux=True))
    b = BATCH
    (dx, dscale, dbias), (y, mean, var) = f(b.x, b.scale, b.bias, b.mask, b.w, b.mean, b.var)
    check((y, mean, var, dx, dscale, dbias), REF, BATCH.mask)


def test_shard_map_2d_tuple_axis_name_is_global():
    mesh = mesh_2d()
    batch = P(("group", "member"))
    f = jax.jit(
        jax.shard_map(
            functools.partial(step, axis_name=("group", "member")),
            mesh=mesh,
            in_specs=(batch, batch, batch, P(), P(), P(), P()),
            out_specs=(batch, P(), P(), batch, P(), P()),
        )
    )
    check(f(*place(mesh, batch)), REF, BATCH.mask)


def test_shard_map_2d_member_axis_normalizes_within_groups():
    """The shard_map way to get axis_index_groups: a ('group', 'member') mesh, axis_name='member'."""
    mesh = mesh_2d()
    batch = P(("group", "member"))

    def f(*a):
        y, mean, var, dx, dscale, dbias = step(*a, axis_name="member")
        return y, mean[None], var[None], dx, dscale, dbias  # statistics differ per group

    g = jax.jit(
        jax.shard_map(
            f,
            mesh=mesh,
            in_specs=(batch, batch, batch, P(), P(), P(), P()),
            out_specs=(batch, P("group"), P("group"), batch, P(), P()),
        )
    )
    check(g(*place(mesh, batch)), REF_GROUPS, BATCH.mask)


def test_shard_map_axis_index_groups_matches_2d_mesh():
    """`lax.psum(..., axis_index_groups=)` raises NotImplementedError under shard_map with
    check_vma=True; jbn's statistics still honour the groups (one psum of every slot)."""

    def f(*a):
        y, mean, var, dx, dscale, dbias = step(*a, axis_name="d", groups=GROUPS)
        return y, mean[None], var[None], dx, dscale, dbias

    g = jax.jit(
        jax.shard_map(
            f,
            mesh=mesh_1d(),
            in_specs=(P("d"), P("d"), P("d"), P(), P(), P(), P()),
            out_specs=(P("d"), P("d"), P("d"), P("d"), P(), P()),
        )
    )
    y, mean, var, dx, dscale, dbias = g(*args())
    check((y, np.asarray(mean)[[0, 4]], np.asarray(var)[[0, 4]], dx, dscale, dbias), REF_GROUPS, BATCH.mask)


def test_jax_psum_with_groups_under_shard_map_is_unsupported():
    """Documents the JAX limitation that jbn works around (jax 0.10.2)."""
    g = jax.jit(
        jax.shard_map(
            lambda v: lax.psum(v, "d", axis_index_groups=[list(GROUPS[0]), list(GROUPS[1])]),
            mesh=mesh_1d(),
            in_specs=P("d"),
            out_specs=P("d"),
        )
    )
    with pytest.raises(NotImplementedError):
        g(np.ones((DEVICES, 2), np.float32))


@pytest.mark.parametrize("axis_type", ["auto", "explicit"])
def test_sharded_jit_without_axis_name_is_global(axis_type):
    """Auto: GSPMD (a `Mesh` built by hand). Explicit: the sharding is part of the array's
    type (`jax.make_mesh`'s default), where indexing into the batch axis is an error."""
    mesh = mesh_1d() if axis_type == "auto" else jax.make_mesh((DEVICES,), ("d",), axis_types=(AxisType.Explicit,))
    batch = NamedSharding(mesh, P("d"))

    def global_loss(x, scale, bias, mask, w, mean, var):
        return loss_and_state(x, mask, w, scale, bias, mean, var)

    f = jax.jit(jax.grad(global_loss, argnums=(0, 1, 2), has_aux=True))
    b = BATCH
    inputs = (
        jax.device_put(b.x, batch),
        b.scale,
        b.bias,
        jax.device_put(b.mask, batch),
        jax.device_put(b.w, batch),
        b.mean,
        b.var,
    )
    (dx, dscale, dbias), (y, new) = f(*inputs)
    check((y, new.mean, new.var, dx, dscale, dbias), REF, BATCH.mask)
    assert y.sharding.is_equivalent_to(batch, y.ndim), "the output stays batch-sharded"
    # The compiled program reduces over all 8 devices: an all-reduce whose groups span them.
    ops = collectives(f.lower(*inputs).compile().as_text())
    assert ("all-reduce", DEVICES) in ops, ops


def test_linen_batchnorm_under_shard_map():
    """jbn.BatchNorm passes axis_name through: batch_stats and parameter gradients."""
    module = jbn.BatchNorm(momentum=MOMENTUM, epsilon=EPSILON, axis_name="d")
    b = BATCH
    variables = {
        "params": {"scale": jnp.asarray(b.scale), "bias": jnp.asarray(b.bias)},
        "batch_stats": {"mean": jnp.asarray(b.mean), "var": jnp.asarray(b.var)},
    }

    def step_linen(x, mask, w, variables):
        def loss(x, params):
            y, updates = module.apply(
                {**variables, "params": params}, x, use_running_average=False, mask=mask, mutable=["batch_stats"]
            )
            return jnp.sum(jnp.where(mask[..., None], y, 0) * w), (y, updates["batch_stats"])

        (dx, grads), (y, stats) = jax.grad(loss, argnums=(0, 1), has_aux=True)(x, variables["params"])
        return y, stats["mean"], stats["var"], dx, grads["scale"], grads["bias"]

    g = jax.jit(
        jax.shard_map(
            step_linen,
            mesh=mesh_1d(),
            in_specs=(P("d"), P("d"), P("d"), P()),
            out_specs=(P("d"), P(), P(), P("d"), P(), P()),
        )
    )
    check(g(b.x, b.mask, b.w, variables), REF, BATCH.mask)


# ------------------------------------------------------------------ collectives in HLO

COLLECTIVE = re.compile(
    r"\b(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute|collective-broadcast)(?:-start)?\("
)


def group_size(line: str) -> int:
    """Participants per replica group of one HLO collective, from any of XLA's spellings."""
    if m := re.search(r"replica_groups=\{\{([0-9,]*)\}", line):  # {{0,1,2,3},{...}}
        return len(m.group(1).split(","))
    if m := re.search(r"replica_groups=\[[0-9,]*?(\d+)\]<=", line):  # iota: [groups,size]<=[...]
        return int(m.group(1))
    if m := re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line):  # mesh['a'=8,...] {'a'}
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
        return int(np.prod([int(sizes[a]) for a in re.findall(r"'([^']+)'", m.group(2))]))
    raise AssertionError(f"cannot read the replica groups of: {line}")


def collectives(hlo: str) -> list[tuple[str, int]]:
    """(op, participants per group) for each collective in compiled HLO text (async pairs once)."""
    return [(m.group(1), group_size(line)) for line in hlo.splitlines() if (m := COLLECTIVE.search(line))]


def bn_layers(x, mask, scale, bias, mean, var, *, layers, **kw):
    """`layers` BN layers with tanh in between: each layer's statistics depend on the
    previous layer's output, so XLA cannot merge their collectives."""
    running = jbn.RunningStats(mean, var)
    h = x
    for i in range(layers):
        h, _ = jbn.batch_norm(jnp.tanh(h) if i else h, scale, bias, running, training=True, mask=mask, **kw)
    return jnp.sum(jnp.where(mask[..., None], h, 0))


GRAD_ARGNUMS = (0, 2, 3)  # x, scale, bias


def forward_and_grad(style, layers):
    """Jitted programs of `bn_layers` in `style`: the forward, and the gradients w.r.t. x,
    scale and bias (which run the forward too)."""
    b = BATCH
    groups = GROUPS if style.endswith("groups") else None
    if style.startswith("pmap"):
        fn = functools.partial(bn_layers, axis_name="i", axis_index_groups=groups, layers=layers)
        in_axes = (0, 0, None, None, None, None)
        inputs = (per_device(b.x), per_device(b.mask), b.scale, b.bias, b.mean, b.var)
        grad = jax.pmap(jax.grad(fn, argnums=GRAD_ARGNUMS), axis_name="i", in_axes=in_axes)
        return jax.pmap(fn, axis_name="i", in_axes=in_axes), grad, inputs
    name, mesh, batch = {
        "shard_map": ("d", mesh_1d(), P("d")),
        "shard_map-groups": ("d", mesh_1d(), P("d")),
        "shard_map-2d-member": ("member", mesh_2d(), P(("group", "member"))),
        "shard_map-2d-tuple": (("group", "member"), mesh_2d(), P(("group", "member"))),
    }[style]
    fn = functools.partial(bn_layers, axis_name=name, axis_index_groups=groups, layers=layers)
    in_specs = (batch, batch, P(), P(), P(), P())
    # The loss is each device's own sum: it leaves as one value per device. The replicated
    # scale and bias get the gradient of the sum over devices and leave replicated.
    fwd = jax.jit(jax.shard_map(lambda *a: fn(*a)[None], mesh=mesh, in_specs=in_specs, out_specs=batch))
    grad = jax.jit(
        jax.shard_map(jax.grad(fn, argnums=GRAD_ARGNUMS), mesh=mesh, in_specs=in_specs, out_specs=(batch, P(), P()))
    )
    inputs = tuple(
        jax.device_put(a, NamedSharding(mesh, s))
        for a, s in zip((b.x, b.mask, b.scale, b.bias, b.mean, b.var), in_specs)
    )
    return fwd, grad, inputs


STYLES = ["pmap", "pmap-groups", "shard_map", "shard_map-groups", "shard_map-2d-member", "shard_map-2d-tuple"]


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("style", STYLES)
def test_one_collective_per_layer_forward_at_most_one_more_backward(style, layers):
    fwd, grad, inputs = forward_and_grad(style, layers)
    forward_ops = collectives(fwd.lower(*inputs).compile().as_text())
    grad_ops = collectives(grad.lower(*inputs).compile().as_text())
    # Participants of BN's psums: a group of 4 on the ('group', 'member') mesh; with
    # axis_index_groups either the group or the whole axis (one psum of every slot).
    bn_sizes = {4} if style.endswith("member") else {4, DEVICES} if style.endswith("groups") else {DEVICES}
    # One collective per layer: an all-reduce, or (pmap: unchecked axis names) an all-gather.
    assert all(op in ("all-reduce", "all-gather") for op, _ in forward_ops), forward_ops
    assert len(forward_ops) == layers and {n for _, n in forward_ops} <= bn_sizes, forward_ops
    bn_grad_ops = [(op, n) for op, n in grad_ops if n in bn_sizes]
    # The gradient program runs the forward (one per layer) and at most one more per layer.
    assert all(op in ("all-reduce", "all-gather") for op, _ in grad_ops), grad_ops
    assert layers <= len(bn_grad_ops) <= 2 * layers, grad_ops
    if style.endswith("member"):
        # The only other collective: the data-parallel sum of the replicated scale and bias
        # gradients over the 2 groups (not batch norm's: its statistics stay per group).
        assert [n for _, n in grad_ops if n not in bn_sizes] in ([], [2]), grad_ops
    else:
        assert bn_grad_ops == grad_ops, grad_ops


@pytest.mark.parametrize("axis_type", ["auto", "explicit"])
def test_sharded_jit_forward_reduces_over_every_device(axis_type):
    """Plain jit, no axis_name, forward only (no parameter gradients whose batch sums would
    need an all-reduce of their own): the output can only be right if the compiled
    program reduces the statistics over all 8 devices. With Explicit axes the type says
    how the batch is split, and jbn gathers per-shard statistics in ONE collective (and
    the gradient program adds one more); with Auto axes XLA chooses (measured with jax
    0.10 on CPU: 2 without a mask, 3 or 4 with one; README)."""
    mesh = mesh_1d() if axis_type == "auto" else jax.make_mesh((DEVICES,), ("d",), axis_types=(AxisType.Explicit,))
    batch = NamedSharding(mesh, P("d"))
    b = BATCH

    def forward(x, mask, scale, bias, mean, var):
        return jbn.batch_norm(
            x, scale, bias, jbn.RunningStats(mean, var), training=True, mask=mask, momentum=MOMENTUM, epsilon=EPSILON
        )

    f = jax.jit(forward)
    inputs = (jax.device_put(b.x, batch), jax.device_put(b.mask, batch), b.scale, b.bias, b.mean, b.var)
    y, new = f(*inputs)
    valid = b.mask[..., None]
    np.testing.assert_allclose(np.where(valid, y, 0), np.where(valid, REF.y, 0), rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(new.mean, REF.mean, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(new.var, REF.var, rtol=2e-5, atol=2e-5)
    ops = collectives(f.lower(*inputs).compile().as_text())
    assert ops and all(n == DEVICES for _, n in ops), ops
    if axis_type == "auto":
        assert any(op == "all-reduce" for op, _ in ops), ops
        return
    assert ops == [("all-gather", DEVICES)], ops

    def loss(x, scale, bias):
        return jnp.sum(jnp.where(b.mask[..., None], forward(x, b.mask, scale, bias, b.mean, b.var)[0], 0) * b.w)

    grad_ops = collectives(
        jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(inputs[0], b.scale, b.bias).compile().as_text()
    )
    assert sorted(grad_ops) == [("all-gather", DEVICES), ("all-reduce", DEVICES)], grad_ops


# --------------------------------------------------------------- accuracy and edge cases


def test_variance_across_devices_is_accurate_when_mean_is_1e4_times_std():
    """|mean| / std = 1e4 (std 0.5 .. 2 around 1e4), uneven masks, device 0 all padding."""
    b = make_batch(DEVICES, per_device=16, offset=1e4, seed=1)
    valid = b.x.astype(np.float64)[b.mask]
    mean, var = valid.mean(0), valid.var(0)
    # A raw E[x^2] - E[x]^2 in float32 is off by far more than the tolerance used below.
    x32 = b.x[b.mask]
    raw = np.mean(x32 * x32, axis=0, dtype=np.float32) - np.square(np.mean(x32, axis=0, dtype=np.float32))
    assert np.max(np.abs(raw / var - 1)) > 1e-2

    mesh = mesh_1d()
    shift = jnp.asarray(b.mean + np.float32(1e4))  # a common shift near the data, e.g. a running mean

    def stats(x, mask):
        own = jbn.moments(x, mask=mask, axis_name="d")
        shifted = jbn.moments(x, mask=mask, axis_name="d", shift=shift)
        return own.mean, own.var, shifted.mean, shifted.var

    f = jax.jit(jax.shard_map(stats, mesh=mesh, in_specs=(P("d"), P("d")), out_specs=P()))
    p = jax.pmap(stats, axis_name="d")
    # Plain jit over arrays sharded on a mesh with Explicit axes (no axis_name, no shift).
    rows = NamedSharding(jax.make_mesh((DEVICES,), ("d",), axis_types=(AxisType.Explicit,)), P("d"))
    plain = jax.jit(lambda x, m: jbn.moments(x, mask=m))(jax.device_put(b.x, rows), jax.device_put(b.mask, rows))
    np.testing.assert_allclose(plain.mean, mean, rtol=1e-7)
    np.testing.assert_allclose(plain.var, var, rtol=2e-5)
    for got in (f(b.x, b.mask), tuple(np.asarray(a)[0] for a in p(per_device(b.x), per_device(b.mask)))):
        for m, v in zip(got[::2], got[1::2]):
            np.testing.assert_allclose(m, mean, rtol=1e-7)
            np.testing.assert_allclose(v, var, rtol=2e-5)


def test_all_padding_everywhere_keeps_running_stats_and_stays_finite():
    b = BATCH._replace(mask=np.zeros_like(BATCH.mask))
    y, mean, var, dx, dscale, dbias = (np.asarray(a) for a in sharded_step()(*args(b)))
    assert all(np.all(np.isfinite(a)) for a in (y, mean, var, dx, dscale, dbias))
    np.testing.assert_array_equal(mean, b.mean)
    np.testing.assert_array_equal(var, b.var)
    np.testing.assert_array_equal(dx, 0.0)


def test_unbound_axis_name_is_a_clear_error():
    with pytest.raises(ValueError, match=r"not bound.*shard_map"):
        jax.jit(lambda x: jbn.moments(x, axis_name="batch"))(BATCH.x)


# ---------------------------------------------------------------------- example script


@pytest.mark.peer_not_strict("the experiment's optax optimizer multiplies a Python float by its int32 step count")
def test_sync_bn_example_runs_at_tiny_size(tmp_path):
    import yaml

    from experiments import sync_bn

    with open(pathlib.Path(__file__).resolve().parents[1] / "configs" / "sync_bn.yaml") as f:
        assert set(yaml.safe_load(f)) - {"criteria"} == set(sync_bn.DEFAULTS)  # criteria: the protocol's block
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "devices: 4\nper_device_batch: 2\nwidths: [4]\nseeds: [0, 1]\nlearning_rates: [0.005, 0.01]\ntuning_seeds: [100]\n"
    )
    summary = sync_bn.main(["--config", str(config), "--steps", "3", "--out", str(tmp_path / "out")])

    runs = ("shard_map_sync", "shard_map_local", "pmap_sync", "pmap_local")
    assert summary["devices"] == 4 and summary["global_batch"] == 8
    for name in runs:
        assert np.isfinite(summary[f"{name}_final_loss"])
        assert 0.0 <= summary[f"{name}_test_accuracy"] <= 1.0
    # The two styles compute the same thing: equal losses on the first step, before any
    # reduction-order difference has been amplified by training.
    with open(tmp_path / "out" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    for sync in ("sync", "local"):
        np.testing.assert_allclose(
            float(rows[0][f"shard_map_{sync}_loss"]), float(rows[0][f"pmap_{sync}_loss"]), rtol=1e-5
        )
    assert (tmp_path / "out" / "sync_bn.png").stat().st_size > 0
    # Each run's rate is the best mean validation accuracy of its tuning runs (ties: the smaller).
    with open(tmp_path / "out" / "tuning.csv") as f:
        tuning = list(csv.DictReader(f))
    assert len(tuning) == 4 * 2 * 1
    for name in runs:
        scores = {float(r["learning_rate"]): float(r["val_accuracy"]) for r in tuning if r["run"] == name}
        best = max(sorted(scores), key=lambda lr: (scores[lr], -lr))
        assert summary["rates"][2][name] == best
        assert [float(r["learning_rate"]) for r in tuning if r["run"] == name and r["chosen"] == "1"] == [best]


def test_flax_pmean_is_wrong_with_uneven_masks_where_jbn_is_exact():
    """The same pmapped step through flax.linen.BatchNorm and jbn.BatchNorm (same variables,
    same uneven masks, one device holding only padding). flax averages per-device means with
    pmean: wrong weights and NaN from the all-padding device. jbn matches the reference."""
    import flax.linen as nn

    b = make_batch(DEVICES)
    b = b._replace(x=np.where(b.mask[..., None], b.x, 0.0).astype(np.float32))  # plain zero padding
    y_ref, mean_ref, var_ref = ref_module.batch_norm(
        b.x, None, None, np.zeros(3), np.ones(3), training=True, momentum=0.0, mask=b.mask
    )

    def run(module):
        variables = module.init(jax.random.key(0), b.x[:2], mask=b.mask[:2, :, None])

        def f(x, mask):
            return module.apply(variables, x, mask=mask[..., None], mutable=["batch_stats"])

        return jax.pmap(f, axis_name="batch")(per_device(b.x), per_device(b.mask))

    kw = dict(use_running_average=False, momentum=0.0, axis_name="batch", use_scale=False, use_bias=False)
    y_jbn, s_jbn = run(jbn.BatchNorm(**kw))
    y_flax, s_flax = run(nn.BatchNorm(use_fast_variance=False, **kw))

    np.testing.assert_allclose(s_jbn["batch_stats"]["mean"][0], mean_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s_jbn["batch_stats"]["var"][0], var_ref, rtol=1e-5, atol=1e-5)
    valid = b.mask
    np.testing.assert_allclose(np.asarray(y_jbn).reshape(b.x.shape)[valid], y_ref[valid], rtol=1e-4, atol=1e-4)
    flax_mean = np.asarray(s_flax["batch_stats"]["mean"][0])
    assert not np.all(np.isfinite(flax_mean)) or np.abs(flax_mean - mean_ref).max() > 1e-2
