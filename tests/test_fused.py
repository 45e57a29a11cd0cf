"""The fused training path (jbn._fused): gradients against a float64 NumPy reference
written from the batch-norm backward formulas, against flax, numerical second
derivatives, masks, activations, the memory-saving mode and its saved residuals."""

import io
import re
from contextlib import redirect_stdout

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals
from jax.test_util import check_grads

import jbn
from jbn import RunningStats

MOMENTUM = 0.9
EPS = 1e-3
SLOPE = 0.1


# ------------------------------------------------------------------ float64 reference


def act(z, activation):
    if activation == "relu":
        return np.maximum(z, 0)
    if activation == "leaky_relu":
        return np.where(z >= 0, z, SLOPE * z)
    return z


def act_grad(z, activation):
    if activation == "relu":
        return (z > 0).astype(np.float64)
    if activation == "leaky_relu":
        return np.where(z >= 0, 1.0, SLOPE)
    return np.ones_like(z)


def reference(x, scale, bias, valid, dy, g_mean, g_var, features, activation=None):
    """y, batch mean/var and the gradients of sum(y*dy) + g_mean.mean + g_var.var, by the
    chain rule through mean and var (Ioffe & Szegedy 2015, with a mask)."""
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    reduce = tuple(a for a in range(x.ndim) if a not in features)
    fshape = [x.shape[a] if a in features else 1 for a in range(x.ndim)]

    def feat(v, default):
        return np.full(fshape, default) if v is None else np.asarray(v, np.float64).reshape(fshape)

    g, b = feat(scale, 1.0), feat(bias, 0.0)
    gm, gv = feat(g_mean, 0.0), feat(g_var, 0.0)
    v = np.ones(x.shape) if valid is None else np.broadcast_to(np.asarray(valid, np.float64), x.shape)
    xv = np.where(v > 0, x, 0.0)  # padding takes no part in the statistics
    n = v.sum(reduce, keepdims=True)
    mean = (v * xv).sum(reduce, keepdims=True) / np.maximum(n, 1)
    var = (v * (xv - mean) ** 2).sum(reduce, keepdims=True) / np.maximum(n, 1)
    r = 1 / np.sqrt(var + EPS)
    x_hat = (x - mean) * r  # but every position is normalized
    z = g * x_hat + b
    y = act(z, activation)
    dz = dy * act_grad(z, activation)
    d_bias = dz.sum(reduce)
    d_scale = (dz * x_hat).sum(reduce)
    dx_hat = dz * g
    d_var = (dx_hat * (x - mean)).sum(reduce, keepdims=True) * -0.5 * r**3 + gv
    d_mean = (
        (-dx_hat * r).sum(reduce, keepdims=True)
        + d_var * (v * -2 * (xv - mean)).sum(reduce, keepdims=True) / np.maximum(n, 1)
        + gm
    )
    dx = dx_hat * r + v * (d_var * 2 * (xv - mean) + d_mean) / np.maximum(n, 1)
    squeeze = tuple(x.shape[a] for a in features)
    return {
        "y": y,
        "mean": mean.reshape(squeeze),
        "var": var.reshape(squeeze),
        "dx": dx,
        "d_scale": d_scale.reshape(squeeze),
        "d_bias": d_bias.reshape(squeeze),
    }


def loss_and_grads(x, scale, bias, dy, w_mean, w_var, **kwargs):
    """Gradients of sum(y*dy) + w_mean.new_mean + w_var.new_var through jbn.batch_norm."""
    fshape = w_mean.shape
    running = RunningStats(jnp.zeros(fshape), jnp.ones(fshape))
    kwargs.setdefault("negative_slope", SLOPE)

    def loss(x, scale, bias):
        y, new = jbn.batch_norm(x, scale, bias, running, training=True, momentum=MOMENTUM, epsilon=EPS, **kwargs)
        return jnp.sum(y.astype(jnp.float32) * dy) + jnp.sum(new.mean * w_mean) + jnp.sum(new.var * w_var), y

    argnums = tuple(i for i, a in enumerate((x, scale, bias)) if a is not None)
    grads, y = jax.jit(jax.grad(loss, argnums=argnums, has_aux=True))(x, scale, bias)
    out = dict(zip([("dx", "d_scale", "d_bias")[i] for i in argnums], grads))
    out["y"] = y
    return out


def random_case(shape, features, seed=0, offset=3.0):
    rng = np.random.default_rng(seed)
    fshape = tuple(shape[a] for a in features)
    x = (rng.normal(size=shape) * 2 + offset).astype(np.float32)
    scale = rng.uniform(0.5, 1.5, fshape).astype(np.float32)
    bias = rng.normal(size=fshape).astype(np.float32)
    dy = rng.normal(size=shape).astype(np.float32)
    w_mean = rng.normal(size=fshape).astype(np.float32)
    w_var = rng.normal(size=fshape).astype(np.float32)
    return x, scale, bias, dy, w_mean, w_var


def assert_close(actual, expected, rtol=2e-4, atol=2e-5):
    scale = np.max(np.abs(expected)) + 1e-12
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol * scale)


# ------------------------------------------------------------------ gradients vs reference

CASES = [
    # shape, axis, features, activation, mask kind, affine
    ((6, 5, 3), -1, (2,), None, None, True),
    ((6, 5, 3), -1, (2,), "relu", "rows", True),
    ((6, 5, 3), -1, (2,), "leaky_relu", "full", True),
    ((4, 3, 2, 5), 1, (1,), "relu", None, False),  # NCHW, no scale/bias
    ((4, 3, 2, 5), (1, 3), (1, 3), "leaky_relu", "rows", True),  # two feature axes
]


def make_mask(kind, shape, features, seed=1):
    rng = np.random.default_rng(seed)
    if kind is None:
        return None
    if kind == "rows":  # rank without the feature axes
        m = rng.uniform(size=tuple(s for a, s in enumerate(shape) if a not in features)) > 0.3
    else:  # full rank, varies per feature
        m = rng.uniform(size=shape) > 0.3
    m.flat[0] = True
    return m


def expand_mask(mask, shape, features):
    if mask is None or mask.ndim == len(shape):
        return mask
    return np.expand_dims(mask, features)


@pytest.mark.parametrize("shape,axis,features,activation,mask_kind,affine", CASES)
def test_gradients_match_float64_reference(shape, axis, features, activation, mask_kind, affine):
    x, scale, bias, dy, w_mean, w_var = random_case(shape, features)
    if not affine:
        scale = bias = None
    mask = make_mask(mask_kind, shape, features)
    got = loss_and_grads(x, scale, bias, dy, w_mean, w_var, axis=axis, mask=mask, activation=activation)
    ref = reference(
        x,
        scale,
        bias,
        expand_mask(mask, shape, features),
        dy,
        (1 - MOMENTUM) * w_mean,
        (1 - MOMENTUM) * w_var,
        features,
        activation,
    )
    # Padded outputs are normalized too, so compare y only where it counts.
    valid = np.ones(shape, bool) if mask is None else np.broadcast_to(expand_mask(mask, shape, features), shape)
    assert_close(np.where(valid, got["y"], 0), np.where(valid, ref["y"], 0))
    assert_close(got["dx"], ref["dx"])
    if affine:
        assert_close(got["d_scale"], ref["d_scale"])
        assert_close(got["d_bias"], ref["d_bias"])


def test_save_output_only_matches_reference_and_default_path():
    shape, features = (8, 4, 3), (2,)
    x, scale, bias, dy, w_mean, w_var = random_case(shape, features, seed=3)
    ref = reference(x, scale, bias, None, dy, (1 - MOMENTUM) * w_mean, (1 - MOMENTUM) * w_var, features, "leaky_relu")
    kwargs = dict(activation="leaky_relu", negative_slope=SLOPE)
    saved_y = loss_and_grads(x, scale, bias, dy, w_mean, w_var, save_output_only=True, **kwargs)
    for key in ("dx", "d_scale", "d_bias"):
        assert_close(saved_y[key], ref[key], rtol=1e-3)
    # identity activation, no affine parameters
    ref = reference(x, None, None, None, dy, (1 - MOMENTUM) * w_mean, (1 - MOMENTUM) * w_var, features)
    saved_y = loss_and_grads(x, None, None, dy, w_mean, w_var, save_output_only=True)
    assert_close(saved_y["dx"], ref["dx"], rtol=1e-3)


def test_masked_loss_gives_zero_gradient_on_padding_even_with_nan():
    shape, features = (5, 6, 3), (2,)
    x, scale, bias, dy, w_mean, w_var = random_case(shape, features, seed=4)
    mask = make_mask("rows", shape, features, seed=5)
    valid = np.broadcast_to(mask[..., None], shape)
    x_nan = np.where(valid, x, np.nan).astype(np.float32)
    dy_masked = np.where(valid, dy, 0).astype(np.float32)
    for activation in (None, "relu", "leaky_relu"):
        got = loss_and_grads(x_nan, scale, bias, dy_masked, w_mean, w_var, mask=mask, activation=activation)
        ref = reference(
            x,
            scale,
            bias,
            mask[..., None],
            dy_masked,
            (1 - MOMENTUM) * w_mean,
            (1 - MOMENTUM) * w_var,
            features,
            activation,
        )
        assert np.all(np.asarray(got["dx"])[~valid] == 0)
        for key in ("dx", "d_scale", "d_bias"):
            assert np.all(np.isfinite(got[key])), (activation, key)
            assert_close(got[key], ref[key])


def test_all_padding_batch_gives_finite_zero_gradients():
    shape = (4, 3, 2)
    x, scale, bias, dy, w_mean, w_var = random_case(shape, (2,), seed=6)
    x = np.full(shape, np.nan, np.float32)
    mask = np.zeros(shape[:2], bool)
    got = loss_and_grads(x, scale, bias, np.zeros(shape, np.float32), w_mean, w_var, mask=mask, activation="relu")
    for key in ("dx", "d_scale", "d_bias"):
        np.testing.assert_array_equal(np.asarray(got[key]), 0)


def test_unmasked_loss_gradients_match_flax_with_mask():
    """Exact gradients also when the loss looks at padded outputs (as flax computes them)."""
    shape = (6, 5, 4)
    x, _, _, dy, _, _ = random_case(shape, (2,), seed=7)
    mask = make_mask("rows", shape, (2,), seed=8)

    def grads(module):
        variables = module.init(jax.random.key(0), x, use_running_average=False)

        def loss(x, params):
            y, _ = module.apply(
                {"params": params, "batch_stats": variables["batch_stats"]},
                x,
                use_running_average=False,
                mask=mask[..., None],
                mutable=["batch_stats"],
            )
            return jnp.sum(y * dy)

        return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, variables["params"])

    ours = grads(jbn.BatchNorm(momentum=MOMENTUM, epsilon=EPS))
    theirs = grads(nn.BatchNorm(momentum=MOMENTUM, epsilon=EPS))
    assert_close(ours[0], np.asarray(theirs[0], np.float64), rtol=1e-3)
    for name in ("scale", "bias"):
        assert_close(ours[1][name], np.asarray(theirs[1][name], np.float64), rtol=1e-3)


def test_fused_relu_module_matches_flax_batchnorm_then_relu():
    shape = (8, 3, 3, 4)
    x, _, _, dy, _, _ = random_case(shape, (3,), seed=9)

    def run(module, after):
        variables = module.init(jax.random.key(0), x, use_running_average=False)

        def loss(x, params):
            y, updates = module.apply(
                {"params": params, "batch_stats": variables["batch_stats"]},
                x,
                use_running_average=False,
                mutable=["batch_stats"],
            )
            return jnp.sum(after(y) * dy), updates

        (_, updates), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, variables["params"])
        return g, updates["batch_stats"]

    (g_ours, s_ours) = run(jbn.BatchNorm(activation="relu"), lambda y: y)
    (g_flax, s_flax) = run(nn.BatchNorm(), jax.nn.relu)
    assert_close(g_ours[0], np.asarray(g_flax[0], np.float64), rtol=1e-3)
    for name in ("scale", "bias"):
        assert_close(g_ours[1][name], np.asarray(g_flax[1][name], np.float64), rtol=1e-3)
    for name in ("mean", "var"):
        assert_close(s_ours[name], np.asarray(s_flax[name], np.float64))


# ------------------------------------------------------------------ derivatives of derivatives


@pytest.mark.parametrize(
    "kwargs",
    [dict(activation="leaky_relu", negative_slope=SLOPE), dict(save_output_only=True), dict(mask="rows")],
)
def test_second_derivatives_numerically_float64(kwargs):
    """Reverse-over-reverse through the fused path, against finite differences."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(10)
        x = jnp.asarray(rng.normal(size=(5, 4, 3)) * 2 + 1)
        scale = jnp.asarray(rng.uniform(0.5, 1.5, 3))
        bias = jnp.asarray(rng.normal(size=3))
        running = RunningStats(jnp.zeros(3), jnp.ones(3))
        kwargs = dict(kwargs)
        if kwargs.get("mask") == "rows":
            kwargs["mask"] = jnp.asarray(rng.uniform(size=(5, 4)) > 0.3)

        def f(x, scale, bias):
            y, new = jbn.batch_norm(x, scale, bias, running, training=True, momentum=MOMENTUM, **kwargs)
            return jnp.sum(jnp.sin(y)) + jnp.sum(new.var * jnp.arange(3.0)) + jnp.sum(new.mean)

        check_grads(jax.jit(f), (x, scale, bias), order=2, modes=["rev"], atol=1e-5, rtol=1e-5)
    assert jnp.ones(1).dtype == jnp.float32  # x64 is off again for the other tests


def test_forward_mode_with_fused_false_agrees_with_fused_reverse_mode():
    """<jvp(v), u> == <v, vjp(u)>: forward mode (autodiff path) against the custom VJP."""
    shape = (6, 4, 3)
    x, scale, bias, dy, _, _ = random_case(shape, (2,), seed=11)
    v = np.random.default_rng(12).normal(size=shape).astype(np.float32)
    running = RunningStats(jnp.zeros(3), jnp.ones(3))

    def f(fused):
        return lambda x: jbn.batch_norm(x, scale, bias, running, training=True, activation="leaky_relu", fused=fused)[0]

    tangent = jax.jit(lambda x, v: jax.jvp(f(False), (x,), (v,))[1])(x, v)
    cotangent = jax.jit(lambda x, dy: jax.vjp(f(True), x)[1](dy)[0])(x, dy)
    np.testing.assert_allclose(np.vdot(tangent, dy), np.vdot(v, cotangent), rtol=1e-4)


# ------------------------------------------------------------------ transformations


def test_vmap_of_grad_matches_reference_per_slice():
    shape, features = (3, 6, 4, 2), (2,)  # a leading ensemble axis of 3 independent batches
    x, _, _, dy, _, _ = random_case(shape, (0, 3), seed=13)
    scale, bias = np.float32([0.5, 1.5]), np.float32([0.1, -0.2])
    running = RunningStats(jnp.zeros(2), jnp.ones(2))

    def grad_one(x, dy):
        def loss(x, scale, bias):
            y, _ = jbn.batch_norm(x, scale, bias, running, training=True, epsilon=EPS, activation="relu")
            return jnp.sum(y * dy)

        return jax.grad(loss, argnums=(0, 1, 2))(x, scale, bias)

    dx, d_scale, d_bias = jax.jit(jax.vmap(grad_one))(x, dy)
    for i in range(3):
        ref = reference(x[i], scale, bias, None, dy[i], None, None, features, "relu")
        assert_close(dx[i], ref["dx"])
        assert_close(d_scale[i], ref["d_scale"])
        assert_close(d_bias[i], ref["d_bias"])


# ------------------------------------------------------------------ memory-saving mode


def residuals(f, *args):
    out = io.StringIO()
    with redirect_stdout(out):
        print_saved_residuals(f, *args)
    found = []
    for line in out.getvalue().splitlines():
        m = re.match(r"^\s*(\w+)\[([\d,]*)\]\s*(.*)$", line)
        if m:
            found.append((m.group(1), tuple(int(d) for d in m.group(2).split(",") if d), m.group(3)))
    return found


@pytest.mark.parametrize("dtype,short", [(jnp.float32, "f32"), (jnp.bfloat16, "bf16")])
def test_saved_residuals_are_x_or_only_y(dtype, short):
    shape = (8, 4, 4, 6)
    x = jnp.asarray(np.random.default_rng(0).normal(size=shape).astype(np.float32)).astype(dtype)
    # Parameters in x's dtype, so that flax's promotion keeps y in it too.
    scale, bias = jnp.linspace(0.5, 1.5, 6).astype(dtype), jnp.zeros(6, dtype)
    running = RunningStats(jnp.zeros(6), jnp.ones(6))

    def layer(**kwargs):
        return lambda x, scale, bias: jbn.batch_norm(x, scale, bias, running, training=True, **kwargs)[0]

    big = [r for r in residuals(layer(activation="relu"), x, scale, bias) if r[1] == shape]
    assert [r[0] for r in big] == [short] and "argument x" in big[0][2]  # only x, in its own dtype

    for kwargs in (dict(activation="leaky_relu", save_output_only=True), dict(save_output_only=True)):
        found = residuals(layer(**kwargs), x, scale, bias)
        big = [r for r in found if r[1] == shape]
        assert [r[0] for r in big] == [short] and "argument" not in big[0][2]  # only y
        assert all(r[1] in (shape, (6,), ()) for r in found)  # everything else is per feature

    # The autodiff path keeps more (for comparison, and to show what the fused path saves).
    assert len([r for r in residuals(layer(fused=False), x, scale, bias) if r[1] == shape]) >= 2


def test_save_output_only_argument_checks():
    x = jnp.ones((4, 3))
    running = RunningStats(jnp.zeros(3), jnp.ones(3))
    with pytest.raises(ValueError, match="invertible"):
        jbn.batch_norm(x, None, None, running, training=True, activation="relu", save_output_only=True)
    with pytest.raises(ValueError, match="negative_slope"):
        jbn.batch_norm(
            x, None, None, running, training=True, activation="leaky_relu", negative_slope=0.0, save_output_only=True
        )
    with pytest.raises(ValueError, match="zeros"):
        jbn.batch_norm(x, jnp.float32([1, 0, 1]), None, running, training=True, save_output_only=True)
    with pytest.raises(ValueError, match="fused"):
        jbn.batch_norm(x, None, None, running, training=True, save_output_only=True, fused=False)
    with pytest.raises(ValueError, match="activation"):
        jbn.batch_norm(x, None, None, running, training=True, activation="gelu")


def test_save_output_only_traced_zero_scale_gives_nan_gradient_not_a_wrong_one():
    x, scale, bias, dy, _, _ = random_case((6, 3), (1,), seed=14)
    scale[1] = 0
    running = RunningStats(jnp.zeros(3), jnp.ones(3))

    def loss(x, scale, bias):
        y, _ = jbn.batch_norm(x, scale, bias, running, training=True, save_output_only=True)
        return jnp.sum(y * dy)

    _, d_scale, _ = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, scale, bias)
    assert np.isnan(d_scale[1]) and np.all(np.isfinite(np.asarray(d_scale)[[0, 2]]))


def test_eval_mode_applies_the_activation():
    x = jnp.float32([[-2.0, 1.0], [3.0, -4.0]])
    running = RunningStats(jnp.zeros(2), jnp.ones(2))
    y, same = jbn.batch_norm(
        x, None, None, running, training=False, epsilon=1e-12, activation="leaky_relu", negative_slope=0.5
    )
    np.testing.assert_allclose(y, [[-1.0, 1.0], [3.0, -2.0]], rtol=1e-6)
    np.testing.assert_array_equal(same.mean, running.mean)
    np.testing.assert_array_equal(same.var, running.var)


def test_deep_net_training_step_needs_less_temporary_memory_than_flax():
    """XLA's temporary buffers for a 3-block conv-BN-ReLU training step (the benchmark's
    net, small): the fused path keeps fewer activation-sized buffers than flax.linen."""
    from benchmarks import memory

    def temp(label):
        variant = next(v for v in memory.VARIANTS if v.label.startswith(label))
        return memory.deep_net_temp_bytes(variant, (8, 16, 16, 16), jnp.float32, layers=3)

    flax = temp("flax.linen")
    assert temp("jbn, activation='relu'") < 0.8 * flax
    assert temp("jbn, leaky_relu(0.01), save_output_only") < 0.8 * flax


def test_bfloat16_input_with_float32_output_keeps_each_dtype():
    shape, features = (16, 4, 3), (2,)
    x, scale, bias, dy, w_mean, w_var = random_case(shape, features, seed=15)
    x16 = jnp.asarray(x).astype(jnp.bfloat16)
    got = loss_and_grads(x16, scale, bias, dy, w_mean, w_var, activation="relu", dtype=jnp.float32)
    assert got["y"].dtype == jnp.float32 and got["dx"].dtype == jnp.bfloat16 and got["d_scale"].dtype == jnp.float32
    ref = reference(
        np.asarray(x16.astype(jnp.float32)),
        scale,
        bias,
        None,
        dy,
        (1 - MOMENTUM) * w_mean,
        (1 - MOMENTUM) * w_var,
        features,
        "relu",
    )
    assert_close(got["y"], ref["y"])  # computed in float32 from the bfloat16 input
    assert_close(got["d_scale"], ref["d_scale"])
    assert_close(got["dx"], ref["dx"], rtol=1e-2, atol=1e-2)  # rounded to bfloat16


def test_save_output_only_rejects_a_concrete_zero_scale_also_under_jit():
    """A zero scale cannot be inverted; a concrete one is caught at trace time, also when
    the trace is jit's (the scale is then a constant of the program, not a tracer)."""
    x = jnp.ones((4, 3)) * jnp.arange(4.0)[:, None]
    scale = jnp.asarray([1.0, 0.0, 2.0])
    running = RunningStats(jnp.zeros(3), jnp.ones(3))

    def f(x):
        return jbn.batch_norm(x, scale, None, running, training=True, save_output_only=True)[0]

    for transform in (lambda g: g, jax.jit):
        with pytest.raises(ValueError, match="`scale` has zeros"):
            transform(f)(x)


# ------------------------------------------------------------------ narrow dtypes

NARROW_OPTIONS = [
    dict(),
    dict(activation="relu"),
    dict(activation="leaky_relu", save_output_only=True),
]


@pytest.mark.parametrize("kwargs", NARROW_OPTIONS, ids=["identity", "relu", "leaky_relu-save_output_only"])
def test_bfloat16_training_step_keeps_no_activation_sized_float32_buffer(kwargs):
    """The backward pass casts the bfloat16 cotangent to float32 inside each of its fused
    passes: XLA's temporary buffers hold less than one bfloat16 copy of the input (one
    shared float32 cast of the cotangent would be twice that; flax keeps about four)."""
    if jax.default_backend() != "cpu":
        pytest.skip("the buffer layout checked here is XLA:CPU's")
    shape = (64, 8, 8, 32)
    x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.bfloat16)
    ct = jnp.asarray(np.random.default_rng(1).normal(size=shape), jnp.bfloat16)
    scale, bias = jnp.ones(32), jnp.zeros(32)
    running = RunningStats(jnp.zeros(32), jnp.ones(32))

    def step(x, scale, bias, ct):
        def f(x, scale, bias):
            return jbn.batch_norm(x, scale, bias, running, training=True, dtype=jnp.bfloat16, **kwargs)[0]

        y, vjp = jax.vjp(f, x, scale, bias)
        return y, vjp(ct)

    temp = jax.jit(step).lower(x, scale, bias, ct).compile().memory_analysis().temp_size_in_bytes
    assert temp < x.nbytes, (temp, x.nbytes)


@pytest.mark.parametrize("kwargs", NARROW_OPTIONS + [dict(mask="rows")], ids=lambda k: "-".join(k) or "identity")
def test_parameter_gradients_of_a_bfloat16_cotangent_are_float32_sums(kwargs):
    """d_scale and d_bias sum a bfloat16 cotangent over 2**14 elements per feature: summed
    in float32 they match the float64 reference to float32 accuracy, where a bfloat16
    accumulation would be off by percents."""
    shape, features = (2**14, 3), (1,)
    x, scale, bias, dy, w_mean, w_var = random_case(shape, features, seed=16)
    x16, dy16 = jnp.asarray(x).astype(jnp.bfloat16), jnp.asarray(dy).astype(jnp.bfloat16)
    kwargs = dict(kwargs)
    valid = None
    if kwargs.get("mask") == "rows":
        valid = make_mask("rows", shape, features, seed=17)
        kwargs["mask"] = jnp.asarray(valid)
    zeros = np.zeros(3, np.float32)
    got = loss_and_grads(x16, scale, bias, dy16.astype(jnp.float32), zeros, zeros, dtype=jnp.bfloat16, **kwargs)
    # The reference takes the rounded input and output: what the layer saw and produced.
    x_seen = np.asarray(x16.astype(jnp.float32), np.float64)
    ref = reference(
        x_seen,
        scale,
        bias,
        expand_mask(valid, shape, features),
        np.asarray(dy16.astype(jnp.float32)),
        zeros,
        zeros,
        features,
        kwargs.get("activation"),
    )
    # Error bounds: float32 sums of 2**14 terms (1e-4 of the sum of magnitudes is ample);
    # recovering x_hat from the bfloat16 output rounds it by up to 2**-8 relative.
    g = np.abs(np.asarray(dy16.astype(jnp.float32), np.float64))
    x_hat = np.abs((x_seen - ref["mean"]) / np.sqrt(ref["var"] + EPS))
    rounding = 2**-8 if kwargs.get("save_output_only") else 0
    bias_bound = 1e-4 * g.sum(0)
    scale_bound = (1e-4 + rounding) * (g * x_hat).sum(0)
    assert np.all(np.abs(np.asarray(got["d_bias"], np.float64) - ref["d_bias"]) <= bias_bound)
    assert np.all(np.abs(np.asarray(got["d_scale"], np.float64) - ref["d_scale"]) <= scale_bound)


@pytest.mark.parametrize("kwargs", NARROW_OPTIONS, ids=["identity", "relu", "leaky_relu-save_output_only"])
def test_forward_mode_bfloat16_tangent_within_rounding_of_finite_differences(kwargs):
    """jax.jvp through the fused path with a bfloat16 output: its three terms are each
    rounded to bfloat16 before they are added, so the tangent is within a few bfloat16
    roundings (unit 2**-8) of the largest of them. Per feature the three terms are
    bounded by |k| max|v| (2 + max|x_hat|**2); the bound below takes 8 roundings of that. Reference: central
    differences of the float64 NumPy forward, in float64."""
    shape, features = (32, 4), (1,)
    x, scale, bias, _, _, _ = random_case(shape, features, seed=18)
    x16 = jnp.asarray(x).astype(jnp.bfloat16)
    v = np.random.default_rng(19).normal(size=shape)
    v16 = jnp.asarray(v).astype(jnp.bfloat16)
    running = RunningStats(jnp.zeros(4), jnp.ones(4))
    activation = kwargs.get("activation")

    def f(x):
        return jbn.batch_norm(
            x, scale, bias, running, training=True, epsilon=EPS, negative_slope=SLOPE, dtype=jnp.bfloat16, **kwargs
        )[0]

    _, tangent = jax.jit(lambda x, v: jax.jvp(f, (x,), (v,)))(x16, v16)
    assert tangent.dtype == jnp.bfloat16

    x64 = np.asarray(x16.astype(jnp.float32), np.float64)
    v64 = np.asarray(v16.astype(jnp.float32), np.float64)
    zeros = np.zeros(4)

    def y(x):
        return reference(x, scale, bias, None, np.zeros(shape), zeros, zeros, features, activation)["y"]

    h = 1e-6
    expected = (y(x64 + h * v64) - y(x64 - h * v64)) / (2 * h)
    ref = reference(x64, scale, bias, None, np.zeros(shape), zeros, zeros, features, activation)
    x_hat = (x64 - ref["mean"]) / np.sqrt(ref["var"] + EPS)
    k = np.abs(np.asarray(scale, np.float64)) / np.sqrt(ref["var"] + EPS)
    terms = k * np.abs(v64).max(0) * (2 + np.abs(x_hat).max(0) ** 2)
    error = np.abs(np.asarray(tangent.astype(jnp.float32), np.float64) - expected)
    assert np.all(error <= 8 * 2**-8 * terms), (error.max(0), terms)
