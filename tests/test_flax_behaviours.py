"""jbn as a drop-in for flax's BatchNorm, one section per behaviour of flax that jbn matches.

Every number comes from real flax (flax.linen.BatchNorm / flax.nnx.BatchNorm run on the
same variables and data: same numbers within float32 tolerance) or from the float64 NumPy
reference (tests/reference.py, or formulas written out here), never from jbn itself.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jbn
from tests import reference as ref

F32 = dict(rtol=1e-5, atol=1e-5)


def normal(shape, seed=0, dtype=np.float32, loc=0.3, scale=1.7):
    return jnp.asarray(np.random.default_rng(seed).normal(loc, scale, shape).astype(dtype))


def positive(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).uniform(0.5, 2.0, shape).astype(np.float32))


def warning_class():
    cls = getattr(jbn, "OneValuePerFeatureWarning", None)
    assert cls is not None, "jbn.OneValuePerFeatureWarning (a UserWarning subclass) is missing"
    assert issubclass(cls, UserWarning)
    return cls


@contextlib.contextmanager
def recorded():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


@contextlib.contextmanager
def flax_rules():
    """JAX's default promotion rules around a call of flax's own BatchNorm, which promotes
    implicitly (a complex or narrow input with its float32 statistics, float64 with float32
    under x64); jbn's classes keep the strict settings of tests/conftest.py."""
    with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
        yield


def one_value_warnings(caught):
    return [w for w in caught if issubclass(w.category, warning_class())]


def assert_trees_close(a, b, **tol):
    assert jax.tree.structure(a) == jax.tree.structure(b), (jax.tree.structure(a), jax.tree.structure(b))
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert jnp.shape(u) == jnp.shape(v) and jnp.asarray(u).dtype == jnp.asarray(v).dtype, (u, v)
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), **(tol or F32))


def linen_pair(**kw):
    return jbn.BatchNorm(**kw), nn.BatchNorm(**kw)


def perturbed(variables, seed=3):
    """flax's initial variables moved off ones/zeros, so equality is not an accident."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda v: v + jnp.asarray(rng.uniform(0.1, 0.5, v.shape), v.dtype), variables)


def train_linen(module, variables, x, **kw):
    return module.apply(variables, x, use_running_average=False, mutable=["batch_stats"], **kw)


# ---------------------------------------------------------------- 1. one value per feature


def test_one_value_pure_layer_follows_flax_and_warns_once():
    x, scale, bias = normal((1, 5)), positive((5,)), normal((5,), seed=2)
    mean, var = normal((5,), seed=4), positive((5,), seed=5)
    with recorded() as caught:
        y, new = jbn.batch_norm(x, scale, bias, jbn.RunningStats(mean, var), training=True, momentum=0.9)
    y_ref, mean_ref, var_ref = ref.batch_norm(x, scale, bias, mean, var, training=True, momentum=0.9)
    np.testing.assert_allclose(y, np.broadcast_to(bias, x.shape), **F32)  # x - mean(x) is 0: the output is the bias
    np.testing.assert_allclose(y, y_ref, **F32)
    np.testing.assert_allclose(new.mean, mean_ref, **F32)
    np.testing.assert_allclose(new.var, var_ref, **F32)
    assert np.all(np.asarray(new.var) < np.asarray(var))  # moves toward the batch variance, 0
    ours = one_value_warnings(caught)
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert "(1, 5)" in str(ours[0].message), "the warning must name the input's shape"


@pytest.mark.parametrize("shape", [(1, 4), (4,), (1, 1, 1, 4)], ids=str)
def test_one_value_linen_like_flax(shape):
    x = normal(shape)
    ours, theirs = linen_pair(momentum=0.8)
    variables = perturbed(theirs.init(jax.random.key(0), x, use_running_average=True))
    with recorded() as flax_caught:
        y2, s2 = train_linen(theirs, variables, x)
    with recorded() as caught:
        y1, s1 = train_linen(ours, variables, x)
    np.testing.assert_allclose(y1, y2, **F32)
    assert_trees_close(s1, s2)
    assert len(one_value_warnings(caught)) == 1, [str(w.message) for w in caught]
    assert not one_value_warnings(flax_caught)


def _nnx_block(bn_cls, din=3, dout=4, *, rngs, **bn_kw):
    class Block(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(din, dout, rngs=rngs)
            self.bn = bn_cls(dout, rngs=rngs, **bn_kw)

        def __call__(self, x):
            return nnx.relu(self.bn(self.linear(x)))

    return Block(rngs)


NNX_CLASSES = pytest.mark.parametrize("bn_cls", [jbn.nnx.BatchNorm, nnx.BatchNorm], ids=["jbn", "flax"])


def test_one_value_nnx_like_flax():
    x = normal((1, 4))
    ours = jbn.nnx.BatchNorm(4, use_running_average=False, momentum=0.7, rngs=nnx.Rngs(0))
    theirs = nnx.BatchNorm(4, use_running_average=False, momentum=0.7, rngs=nnx.Rngs(0))
    with recorded() as caught:
        y1 = ours(x)
    y2 = theirs(x)
    np.testing.assert_allclose(y1, y2, **F32)
    for name in ("mean", "var", "scale", "bias"):
        np.testing.assert_allclose(getattr(ours, name)[...], getattr(theirs, name)[...], **F32)
    assert len(one_value_warnings(caught)) == 1


def test_one_value_nnx_tabulate_same_table_as_flax():
    tables = {}
    for name, cls in (("jbn", jbn.nnx.BatchNorm), ("flax", nnx.BatchNorm)):
        model = _nnx_block(cls, rngs=nnx.Rngs(0))
        tables[name] = nnx.tabulate(model, jnp.ones((1, 3)))
    assert "BatchNorm" in tables["flax"]
    assert tables["jbn"] == tables["flax"]


def test_one_value_linen_tabulate_same_table_as_flax():
    ours, theirs = linen_pair(use_running_average=False)
    x = jnp.ones((1, 3))
    assert ours.tabulate(jax.random.key(0), x) == theirs.tabulate(jax.random.key(0), x)


def _stacked(bn_cls, layers):
    @nnx.split_rngs(splits=layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
        return _nnx_block(bn_cls, 3, 3, rngs=rngs, use_running_average=False)

    return create(nnx.Rngs(0))


def assert_stack_like_flax(layers, forward):
    """`forward(stack)` over a stack of `layers` jbn blocks and of flax's: the same outputs and
    batch statistics."""

    def run(bn_cls):
        stack = _stacked(bn_cls, layers)
        return forward(stack), nnx.state(stack, nnx.BatchStat)

    (y1, s1), (y2, s2) = run(jbn.nnx.BatchNorm), run(nnx.BatchNorm)
    np.testing.assert_allclose(y1, y2, **F32)
    assert_trees_close(nnx.to_pure_dict(s1), nnx.to_pure_dict(s2))


def test_one_value_nnx_vmap_over_layers_like_flax():
    x = normal((5, 1, 3))  # each layer's slice holds one example

    @nnx.vmap(in_axes=(0, 0), out_axes=0)
    def forward(block, x):
        return block(x)

    assert_stack_like_flax(5, lambda stack: forward(stack, x))


def test_one_value_nnx_scan_over_layers_like_flax():
    x = normal((1, 3))

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def forward(x, block):
        return block(x)

    assert_stack_like_flax(4, lambda stack: forward(x, stack))


def test_one_value_linen_bind_like_flax():
    def run(bn_cls):
        class Foo(nn.Module):
            def setup(self):
                self.a = nn.Dense(3)
                self.bn = bn_cls()

        def f(foo, x):
            return foo.bn(foo.a(x), use_running_average=False)

        foo, x = Foo(), normal((4,))
        _, variables = nn.init_with_output(f, foo)(jax.random.key(0), x)
        bound = foo.bind(variables, mutable="batch_stats")
        y = f(bound, x)
        return y, bound.variables["batch_stats"]

    y1, s1 = run(jbn.BatchNorm)
    y2, s2 = run(nn.BatchNorm)
    np.testing.assert_allclose(y1, y2, **F32)
    assert_trees_close(s1, s2)


def test_one_value_per_example_grads_under_vmap_like_flax():
    xs, w = normal((6, 4)), normal((4,), seed=7)

    def per_example(module):
        variables = perturbed(module.init(jax.random.key(0), xs[:1], use_running_average=True))

        def loss(params, x):
            y, _ = train_linen(module, {**variables, "params": params}, x[None])
            return jnp.sum(jnp.sin(y) * w[None])

        return jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(None, 0))(variables["params"], xs)

    ours, theirs = linen_pair()
    with recorded() as caught:
        g1 = per_example(ours)
    with flax_rules():
        g2 = per_example(theirs)
    assert_trees_close(g1, g2)
    assert len(one_value_warnings(caught)) == 1, [str(w.message) for w in caught]


def test_one_value_last_partial_batch_and_recompute_batch_stats():
    """A data set of 9 examples in batches of 4: the last batch holds one example. Training
    steps on it work, and exact population statistics over all batches are the float64
    moments of the 9 examples."""
    data = normal((9, 3), seed=21)
    batches = [data[0:4], data[4:8], data[8:9]]
    module = jbn.BatchNorm()
    variables = module.init(jax.random.key(0), batches[0], use_running_average=True)
    apply_fn = jax.jit(functools.partial(train_linen, module))
    for batch in batches:  # one epoch, the partial batch last, as a data loader gives it
        _, upd = apply_fn(variables, batch)
        variables = {**variables, **upd}
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(variables))
    exact = jbn.recompute_batch_stats(apply_fn, variables, batches, progress=False)
    mean_ref, var_ref, _ = ref.moments(data)
    np.testing.assert_allclose(exact["batch_stats"]["mean"], mean_ref, **F32)
    np.testing.assert_allclose(exact["batch_stats"]["var"], var_ref, **F32)


# ---------------------------------------------------------------- 2. complex inputs


def complex_data(shape, seed=0, dtype=np.complex64):
    rng = np.random.default_rng(seed)
    return jnp.asarray((rng.normal(0.4, 1.3, shape) + 1j * rng.normal(-0.2, 0.7, shape)).astype(dtype))


def complex_reference(x, scale, bias, running_mean, running_var, momentum, epsilon=1e-5):
    """Complex mean, real variance mean(|x - mean|^2), float64/complex128."""
    x = np.asarray(x, np.complex128)
    mean = x.mean(0)
    var = (np.abs(x - mean) ** 2).mean(0)
    y = (x - mean) / np.sqrt(var + epsilon) * np.asarray(scale, np.float64) + np.asarray(bias, np.float64)
    return y, momentum * running_mean + (1 - momentum) * mean, momentum * running_var + (1 - momentum) * var


@pytest.mark.parametrize("dtype", ["complex64", "complex128"])
def test_complex_pure_layer_against_reference(dtype):
    x64 = dtype == "complex128"
    with jax.enable_x64(x64):
        x = complex_data((16, 3), dtype=np.dtype(dtype))
        scale, bias = positive((3,)), normal((3,), seed=2)
        running = jbn.RunningStats(jnp.zeros(3), jnp.ones(3))
        y, new = jbn.batch_norm(x, scale, bias, running, training=True, momentum=0.9)
        y_ref, mean_ref, var_ref = complex_reference(x, scale, bias, 0.0, 1.0, 0.9)
        tol = dict(rtol=1e-10, atol=1e-10) if x64 else dict(rtol=1e-5, atol=1e-5)
        assert y.dtype == jnp.dtype(dtype)
        np.testing.assert_allclose(y, y_ref, **tol)
        assert jnp.iscomplexobj(new.mean) and not jnp.iscomplexobj(new.var)
        np.testing.assert_allclose(new.mean, mean_ref, **tol)
        np.testing.assert_allclose(new.var, var_ref, **tol)
        # Evaluation with the complex running mean, as flax does.
        y_eval, _ = jbn.batch_norm(x, scale, bias, new, training=False)
        expected = (np.asarray(x, np.complex128) - mean_ref) / np.sqrt(var_ref + 1e-5) * np.asarray(scale) + np.asarray(
            bias
        )
        np.testing.assert_allclose(y_eval, expected, **tol)


def test_complex_pure_layer_gradient_finite_differences():
    """Reverse mode on a real loss of a complex input, against central differences in
    complex128: d/dt L(x + t v) = Re(sum(g * v)) for JAX's g = grad(L)(x)."""
    with jax.enable_x64(True):
        x = complex_data((8, 3), dtype=np.complex128)
        scale, bias = jnp.asarray([0.7, 1.3, 2.0]), jnp.asarray([0.1, -0.2, 0.3])
        w = complex_data((8, 3), seed=5, dtype=np.complex128)
        running = jbn.RunningStats(jnp.zeros(3), jnp.ones(3))

        def loss(x, scale, bias):
            y, _ = jbn.batch_norm(x, scale, bias, running, training=True)
            return jnp.sum(jnp.real(y * jnp.conj(w)) + jnp.abs(y) ** 2 * 0.1)

        gx, gs, gb = jax.grad(loss, argnums=(0, 1, 2))(x, scale, bias)
        rng = np.random.default_rng(9)
        h = 1e-6
        for _ in range(3):
            v = jnp.asarray(rng.normal(size=x.shape) + 1j * rng.normal(size=x.shape))
            fd = (loss(x + h * v, scale, bias) - loss(x - h * v, scale, bias)) / (2 * h)
            np.testing.assert_allclose(jnp.real(jnp.sum(gx * v)), fd, rtol=1e-6, atol=1e-7)
        for i in range(3):
            e = jnp.zeros(3).at[i].set(1.0)
            fd_s = (loss(x, scale + h * e, bias) - loss(x, scale - h * e, bias)) / (2 * h)
            fd_b = (loss(x, scale, bias + h * e) - loss(x, scale, bias - h * e)) / (2 * h)
            np.testing.assert_allclose(gs[i], fd_s, rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(gb[i], fd_b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_complex_linen_like_flax(masked):
    x = complex_data((4, 3, 2))
    mask = None
    if masked:  # flax's own complex test: masked positions hold NaN
        mask = jnp.asarray(np.random.default_rng(4).integers(0, 2, (4, 3, 1)).astype(bool))
        x = jnp.where(mask, x, jnp.nan)
    ours, theirs = linen_pair(momentum=0.9, dtype=jnp.complex64)
    with flax_rules():
        variables = perturbed(theirs.init(jax.random.key(0), x, use_running_average=False, mask=mask))
    w = complex_data(x.shape, seed=6)

    def run(module, x):
        def loss(params, x):
            y, upd = train_linen(module, {**variables, "params": params}, x, mask=mask)
            valid = jnp.ones(x.shape, bool) if mask is None else jnp.broadcast_to(mask, x.shape)
            return jnp.sum(jnp.where(valid, jnp.real(y * jnp.conj(w)), 0.0)), (y, upd)

        (_, (y, upd)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(variables["params"], x)
        y_eval = module.apply({**variables, **upd}, x, use_running_average=True)
        return y, upd, grads, y_eval

    y1, u1, g1, e1 = run(ours, x)
    # flax's gradients carry the NaN padding (NaN * 0 in its backward pass); jbn's must not,
    # so flax runs on zero padding, which its statistics and this loss both ignore.
    with flax_rules():
        y2, u2, g2, e2 = run(theirs, x if mask is None else jnp.where(mask, x, 0))
    valid = np.ones(x.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask), x.shape)
    assert y1.dtype == y2.dtype == jnp.complex64
    np.testing.assert_allclose(np.where(valid, y1, 0), np.where(valid, y2, 0), rtol=1e-4, atol=1e-4)
    assert_trees_close(u1, u2, rtol=1e-4, atol=1e-4)
    assert_trees_close(g1[0], g2[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.where(valid, g1[1], 0), np.where(valid, g2[1], 0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.where(valid, e1, 0), np.where(valid, e2, 0), rtol=1e-4, atol=1e-4)


def test_complex_nnx_like_flax():
    x = complex_data((6, 3))
    ours = jbn.nnx.BatchNorm(3, use_running_average=False, dtype=jnp.complex64, rngs=nnx.Rngs(0))
    theirs = nnx.BatchNorm(3, use_running_average=False, dtype=jnp.complex64, rngs=nnx.Rngs(0))
    y1 = ours(x)
    with flax_rules():
        y2 = theirs(x)
    assert y1.dtype == y2.dtype
    np.testing.assert_allclose(y1, y2, rtol=1e-4, atol=1e-4)
    for name in ("mean", "var"):
        a, b = getattr(ours, name)[...], getattr(theirs, name)[...]
        assert a.dtype == b.dtype, (name, a.dtype, b.dtype)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    ours.eval(), theirs.eval()
    with flax_rules():
        y2 = theirs(x)
    np.testing.assert_allclose(ours(x), y2, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- 3. masks


def masked_reference(x, mask, scale, bias, momentum=0.99):
    """Reference statistics with the mask broadcast by NumPy's rules to x's shape."""
    full = np.broadcast_to(np.asarray(mask), x.shape)
    return ref.batch_norm(
        x, scale, bias, np.zeros(x.shape[-1]), np.ones(x.shape[-1]), training=True, momentum=momentum, mask=full
    )


def test_feature_mask_C_for_NC_like_flax_and_finite():
    x, mask = normal((6, 4)), jnp.asarray([True, False, True, True])
    ours, theirs = linen_pair(use_running_average=False)
    variables = perturbed(theirs.init(jax.random.key(0), x))
    y1, s1 = ours.apply(variables, x, mask=mask, mutable=["batch_stats"])
    y2, s2 = theirs.apply(variables, x, mask=mask, mutable=["batch_stats"])
    keep = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(y1)[:, keep], np.asarray(y2)[:, keep], **F32)
    for k in ("mean", "var"):
        np.testing.assert_allclose(
            np.asarray(s1["batch_stats"][k])[keep], np.asarray(s2["batch_stats"][k])[keep], **F32
        )
        # The fully masked feature: flax computes 0/0; jbn leaves the statistic as it was.
        np.testing.assert_array_equal(
            np.asarray(s1["batch_stats"][k])[~keep], np.asarray(variables["batch_stats"][k])[~keep]
        )
    assert np.isnan(np.asarray(y2)[:, ~keep]).all()  # flax's NaN: what jbn improves on
    assert np.isfinite(np.asarray(y1)).all()
    # Pure layer, against the float64 reference on the valid features.
    scale, bias = variables["params"]["scale"], variables["params"]["bias"]
    y, new = jbn.batch_norm(x, scale, bias, jbn.RunningStats(jnp.zeros(4), jnp.ones(4)), training=True, mask=mask)
    y_ref, m_ref, v_ref = masked_reference(x, mask, scale, bias)
    np.testing.assert_allclose(np.asarray(y)[:, keep], y_ref[:, keep], **F32)
    np.testing.assert_allclose(np.asarray(new.mean), m_ref, **F32)
    np.testing.assert_allclose(np.asarray(new.var), v_ref, **F32)
    assert np.isfinite(np.asarray(y)).all()
    # ... and the masked feature's gradients are finite too.
    g = jax.grad(
        lambda x: jnp.sum(
            jbn.batch_norm(x, scale, bias, jbn.RunningStats(jnp.zeros(4), jnp.ones(4)), training=True, mask=mask)[0]
            ** 2
        )
    )(x)
    assert np.isfinite(np.asarray(g)).all()


def test_time_mask_T1_for_NTC_like_flax():
    x = normal((4, 5, 3))
    mask = jnp.asarray([[True], [True], [False], [True], [False]])  # (T, 1): masks time steps
    ours, theirs = linen_pair(use_running_average=False)
    variables = perturbed(theirs.init(jax.random.key(0), x))
    y1, s1 = ours.apply(variables, x, mask=mask, mutable=["batch_stats"])
    y2, s2 = theirs.apply(variables, x, mask=mask, mutable=["batch_stats"])
    np.testing.assert_allclose(y1, y2, **F32)
    assert_trees_close(s1, s2)
    scale, bias = variables["params"]["scale"], variables["params"]["bias"]
    y, new = jbn.batch_norm(x, scale, bias, jbn.RunningStats(jnp.zeros(3), jnp.ones(3)), training=True, mask=mask)
    y_ref, m_ref, v_ref = masked_reference(x, mask, scale, bias)
    np.testing.assert_allclose(y, y_ref, **F32)
    np.testing.assert_allclose(new.mean, m_ref, **F32)
    np.testing.assert_allclose(new.var, v_ref, **F32)


def test_NT_mask_for_NTC_where_numpy_broadcasting_cannot_apply():
    x = normal((4, 5, 3))
    mask = jnp.asarray(np.random.default_rng(2).random((4, 5)) > 0.3)  # (N, T) vs (N, T, C)
    scale, bias = positive((3,)), normal((3,), seed=3)
    y, new = jbn.batch_norm(x, scale, bias, jbn.RunningStats(jnp.zeros(3), jnp.ones(3)), training=True, mask=mask)
    y_ref, m_ref, v_ref = masked_reference(x, np.asarray(mask)[..., None], scale, bias)
    np.testing.assert_allclose(y, y_ref, **F32)
    np.testing.assert_allclose(new.mean, m_ref, **F32)
    np.testing.assert_allclose(new.var, v_ref, **F32)
    module = jbn.BatchNorm(use_running_average=False)
    variables = module.init(jax.random.key(0), x, mask=mask)
    y_lin, s_lin = module.apply(variables, x, mask=mask, mutable=["batch_stats"])
    y_ref, m_ref, v_ref = masked_reference(x, np.asarray(mask)[..., None], np.ones(3), np.zeros(3))
    np.testing.assert_allclose(y_lin, y_ref, **F32)
    np.testing.assert_allclose(s_lin["batch_stats"]["mean"], m_ref, **F32)


@pytest.mark.parametrize("shape,mask_shape", [((4, 4), (4,)), ((3, 3, 3), (3, 3))], ids=["NC-square", "NTC-cube"])
def test_ambiguous_mask_is_a_value_error(shape, mask_shape):
    """Both readings (NumPy broadcasting; the non-feature axes) apply and differ."""
    x = normal(shape)
    mask = jnp.asarray(np.random.default_rng(0).random(mask_shape) > 0.4)
    c = shape[-1]
    with pytest.raises(ValueError, match="mask"):
        jbn.batch_norm(
            x, jnp.ones(c), jnp.zeros(c), jbn.RunningStats(jnp.zeros(c), jnp.ones(c)), training=True, mask=mask
        )
    module = jbn.BatchNorm(use_running_average=False)
    with pytest.raises(ValueError, match="mask"):
        module.init(jax.random.key(0), x, mask=mask)


# ---------------------------------------------------------------- 4. boxed parameters


@pytest.mark.parametrize("kind", ["with_partitioning", "with_logical_partitioning"])
def test_boxed_params_sharded_init_and_apply_like_flax(kind):
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]), ("model",))
    rules = (("embed", "model"),)
    if kind == "with_partitioning":
        box = functools.partial(nn.with_partitioning, names=("model",))
    else:
        box = functools.partial(nn.with_logical_partitioning, names=("embed",))
    kw = dict(scale_init=box(nn.initializers.ones_init()), bias_init=box(nn.initializers.constant(0.25)))
    x = normal((6, 16))

    def run(cls):
        module = cls(**kw)
        init = functools.partial(module.init, use_running_average=False)
        abstract = jax.eval_shape(init, jax.random.key(0), x)
        specs = nn.get_partition_spec(abstract)
        shardings = (
            nn.logical_to_mesh_sharding(specs, mesh, rules)
            if kind != "with_partitioning"
            else jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s), specs)
        )
        variables = jax.jit(init, out_shardings=shardings)(jax.random.key(0), x)
        y, upd = jax.jit(functools.partial(train_linen, module))(variables, x)
        y_eval = jax.jit(lambda v, x: module.apply(v, x, use_running_average=True))({**variables, **upd}, x)
        return variables, y, upd, y_eval

    v1, y1, u1, e1 = run(jbn.BatchNorm)
    v2, y2, u2, e2 = run(nn.BatchNorm)
    is_box = lambda v: isinstance(v, nn.meta.AxisMetadata)  # noqa: E731
    assert jax.tree.structure(v1, is_leaf=is_box) == jax.tree.structure(v2, is_leaf=is_box)
    for a, b in zip(jax.tree.leaves(v1, is_leaf=is_box), jax.tree.leaves(v2, is_leaf=is_box)):
        assert type(a) is type(b)
        if is_box(b):
            assert a.names == b.names
            a, b = a.unbox(), b.unbox()
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (a.sharding, b.sharding)
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(y1, y2, **F32)
    assert_trees_close(u1, u2)
    np.testing.assert_allclose(e1, e2, **F32)


# ---------------------------------------------------------------- 5. forward-mode autodiff


def _linen_training_fn(module, variables):
    def f(x, params):
        y, upd = module.apply({**variables, "params": params}, x, use_running_average=False, mutable=["batch_stats"])
        return y, upd["batch_stats"]

    return f


def test_jvp_jacfwd_linearize_linen_default_options_like_flax():
    x = normal((5, 3))
    ours, theirs = linen_pair()
    variables = perturbed(theirs.init(jax.random.key(0), x, use_running_average=True))
    params = variables["params"]
    tx = normal(x.shape, seed=11)
    tp = jax.tree.map(lambda p: normal(p.shape, seed=12), params)
    f1, f2 = _linen_training_fn(ours, variables), _linen_training_fn(theirs, variables)

    p1, t1 = jax.jvp(f1, (x, params), (tx, tp))
    p2, t2 = jax.jvp(f2, (x, params), (tx, tp))
    assert_trees_close(p1, p2)
    assert_trees_close(t1, t2, rtol=1e-4, atol=1e-4)

    j1 = jax.jacfwd(lambda x: f1(x, params)[0])(x)
    j2 = jax.jacrev(lambda x: f2(x, params)[0])(x)
    np.testing.assert_allclose(j1, j2, rtol=1e-4, atol=1e-4)

    _, lin = jax.linearize(f1, x, params)
    assert_trees_close(lin(tx, tp), t2, rtol=1e-4, atol=1e-4)
    # The linearization transposes (reverse mode through forward mode), as jax.linear_transpose needs.
    dy = normal(x.shape, seed=13)
    ct = jax.linear_transpose(lambda t: lin(t, jax.tree.map(jnp.zeros_like, params))[0], tx)(dy)[0]
    _, vjp2 = jax.vjp(lambda x: f2(x, params)[0], x)
    np.testing.assert_allclose(ct, vjp2(dy)[0], rtol=1e-4, atol=1e-4)


def test_jvp_pure_layer_against_finite_differences():
    with jax.enable_x64(True):
        x = normal((7, 4), dtype=np.float64)
        scale, bias = jnp.asarray([0.5, 1.0, 1.5, 2.0]), jnp.asarray([0.1, 0.2, -0.3, 0.0])
        running = jbn.RunningStats(jnp.zeros(4), jnp.ones(4))

        def f(x, scale, bias):
            y, new = jbn.batch_norm(x, scale, bias, running, training=True, momentum=0.9)
            return y, new.mean, new.var

        rng = np.random.default_rng(5)
        t = (jnp.asarray(rng.normal(size=x.shape)), jnp.asarray(rng.normal(size=4)), jnp.asarray(rng.normal(size=4)))
        _, tangent = jax.jvp(f, (x, scale, bias), t)
        h = 1e-6
        plus = f(*(a + h * b for a, b in zip((x, scale, bias), t)))
        minus = f(*(a - h * b for a, b in zip((x, scale, bias), t)))
        for got, p, m in zip(tangent, plus, minus):
            np.testing.assert_allclose(got, (p - m) / (2 * h), rtol=1e-6, atol=1e-7)
        jac = jax.jacfwd(lambda x: f(x, scale, bias)[0])(x)
        np.testing.assert_allclose(jac, jax.jacrev(lambda x: f(x, scale, bias)[0])(x), rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- 6. jax.export, symbolic batch


def test_export_training_step_symbolic_batch_like_flax():
    c = 3
    (b,) = jax.export.symbolic_shape("b")
    w = normal((c,), seed=8)

    def step_for(module):
        def step(variables, x):
            def loss(params):
                y, upd = module.apply(
                    {**variables, "params": params}, x, use_running_average=False, mutable=["batch_stats"]
                )
                return jnp.mean(jnp.sin(y) * w[None]), upd

            (value, upd), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
            return value, grads, upd["batch_stats"]

        return step

    ours, theirs = linen_pair()
    variables = perturbed(theirs.init(jax.random.key(0), jnp.ones((2, c)), use_running_average=True))
    spec = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), variables)
    exported = jax.export.export(jax.jit(step_for(ours)))(spec, jax.ShapeDtypeStruct((b, c), jnp.float32))
    for n in (2, 7):
        x = normal((n, c), seed=n)
        with flax_rules():
            want = jax.jit(step_for(theirs))(variables, x)
        assert_trees_close(exported.call(variables, x), want, rtol=1e-4, atol=1e-5)


def test_export_pure_layer_symbolic_batch_against_reference():
    (b,) = jax.export.symbolic_shape("b")
    running = jbn.RunningStats(jnp.zeros(3), jnp.ones(3))

    def f(x):
        y, new = jbn.batch_norm(x, jnp.ones(3), jnp.zeros(3), running, training=True, momentum=0.9)
        return y, new.mean, new.var

    exported = jax.export.export(jax.jit(f))(jax.ShapeDtypeStruct((b, 3), jnp.float32))
    for n in (3, 10):
        x = normal((n, 3), seed=n)
        y, m, v = exported.call(x)
        y_ref, m_ref, v_ref = ref.batch_norm(
            x, np.ones(3), np.zeros(3), np.zeros(3), np.ones(3), training=True, momentum=0.9
        )
        np.testing.assert_allclose(y, y_ref, **F32)
        np.testing.assert_allclose(m, m_ref, **F32)
        np.testing.assert_allclose(v, v_ref, **F32)


# ---------------------------------------------------------------- 7. default output dtype


@pytest.mark.parametrize("in_dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("dtype", [None, "bfloat16"], ids=["dtype=None", "dtype=bf16"])
def test_output_dtype_like_flax_linen(in_dtype, dtype):
    x = normal((8, 3)).astype(in_dtype)
    ours, theirs = linen_pair(dtype=dtype)
    with flax_rules():
        variables = perturbed(theirs.init(jax.random.key(0), x, use_running_average=True))
        y2, s2 = train_linen(theirs, variables, x)
        y2e = theirs.apply({**variables, **s2}, x, use_running_average=True)
    y1, s1 = train_linen(ours, variables, x)
    assert y1.dtype == y2.dtype, (y1.dtype, y2.dtype)
    tol = 1e-5 if y2.dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(y1, np.float32), np.asarray(y2, np.float32), rtol=tol, atol=tol)
    assert_trees_close(s1, s2, rtol=1e-5, atol=1e-5)
    y1e = ours.apply({**variables, **s1}, x, use_running_average=True)
    assert y1e.dtype == y2e.dtype


@pytest.mark.parametrize("in_dtype", ["bfloat16", "float16"])
def test_output_dtype_like_flax_nnx_and_pure(in_dtype):
    x = normal((8, 3)).astype(in_dtype)
    ours = jbn.nnx.BatchNorm(3, use_running_average=False, rngs=nnx.Rngs(0))
    theirs = nnx.BatchNorm(3, use_running_average=False, rngs=nnx.Rngs(0))
    y1 = ours(x)
    with flax_rules():
        y2 = theirs(x)
    assert y1.dtype == y2.dtype, (y1.dtype, y2.dtype)
    np.testing.assert_allclose(np.asarray(y1, np.float32), np.asarray(y2, np.float32), rtol=1e-5, atol=1e-5)
    # The pure layer: the promoted type of the input and the parameters (float32 here).
    y, _ = jbn.batch_norm(x, jnp.ones(3), jnp.zeros(3), jbn.RunningStats(jnp.zeros(3), jnp.ones(3)), training=True)
    assert y.dtype == jnp.float32  # the promoted type of a bfloat16 or float16 input and float32 parameters


# ---------------------------------------------------------------- 8. x64


def test_x64_float64_inputs_give_float64_stats_like_flax():
    before = jax.config.jax_enable_x64
    try:
        with jax.enable_x64(True):
            # |mean| >> std: float32 statistics would lose most digits, float64 keeps them.
            x = normal((32, 3), dtype=np.float64, loc=1e4, scale=1e-3)
            ours, theirs = linen_pair(use_running_average=False, momentum=0.9)
            with flax_rules():
                variables = theirs.init(jax.random.key(0), x)
                y2, s2 = theirs.apply(variables, x, mutable=["batch_stats"])
            y1, s1 = ours.apply(variables, x, mutable=["batch_stats"])
            assert y1.dtype == y2.dtype == jnp.float64
            for k in ("mean", "var"):
                assert s1["batch_stats"][k].dtype == s2["batch_stats"][k].dtype == jnp.float64, k
            y_ref, m_ref, v_ref = ref.batch_norm(
                x, np.ones(3), np.zeros(3), np.zeros(3), np.ones(3), training=True, momentum=0.9
            )
            np.testing.assert_allclose(s1["batch_stats"]["mean"], m_ref, rtol=1e-12)
            np.testing.assert_allclose(s1["batch_stats"]["var"], v_ref, rtol=1e-9)
            np.testing.assert_allclose(y1, y_ref, rtol=1e-7, atol=1e-7)

            m = jbn.moments(x, axis=-1)
            mean_ref, var_ref, _ = ref.moments(x)
            assert m.mean.dtype == m.var.dtype == jnp.float64
            np.testing.assert_allclose(m.mean, mean_ref, rtol=1e-13)
            np.testing.assert_allclose(m.var, var_ref, rtol=1e-8)

            bn1 = jbn.nnx.BatchNorm(3, use_running_average=False, rngs=nnx.Rngs(0))
            bn2 = nnx.BatchNorm(3, use_running_average=False, rngs=nnx.Rngs(0))
            bn1(x)
            with flax_rules():
                bn2(x)
            for k in ("mean", "var"):
                assert getattr(bn1, k)[...].dtype == getattr(bn2, k)[...].dtype, k
                np.testing.assert_allclose(getattr(bn1, k)[...], getattr(bn2, k)[...], rtol=1e-9)
    finally:
        # The context restores the flag; check, so that x64 never leaks into other tests.
        assert jax.config.jax_enable_x64 == before
        assert before or jnp.zeros(1).dtype == jnp.float32


# ---------------------------------------------------------------- 9. NNX module utilities


def _pair_nnx(**kw):
    return (_nnx_block(jbn.nnx.BatchNorm, rngs=nnx.Rngs(0), **kw), _nnx_block(nnx.BatchNorm, rngs=nnx.Rngs(0), **kw))


def test_nnx_view_info_and_view_like_flax():
    ours, theirs = _pair_nnx()
    # The same classes and `set_view` signatures ("Class:" and "  name: type = default"
    # lines); the explanatory prose under each may be worded differently.
    signature = lambda text: [ln for ln in text.splitlines() if not ln.startswith("    ")]  # noqa: E731
    assert "use_running_average" in nnx.view_info(theirs)
    assert signature(nnx.view_info(ours)) == signature(nnx.view_info(theirs))
    x = normal((6, 3))
    v1, v2 = nnx.view(ours, use_running_average=True), nnx.view(theirs, use_running_average=True)
    assert v1.bn.use_running_average is True and ours.bn.use_running_average is False
    np.testing.assert_allclose(v1(x), v2(x), **F32)
    np.testing.assert_array_equal(ours.bn.mean[...], theirs.bn.mean[...])  # eval did not move them


def test_nnx_tabulate_and_display_like_flax(capsys):
    ours, theirs = _pair_nnx()
    x = jnp.ones((4, 3))
    assert nnx.tabulate(ours, x) == nnx.tabulate(theirs, x)
    nnx.display(ours)
    assert "BatchNorm" in capsys.readouterr().out


def test_nnx_state_split_merge_update_clone_like_flax():
    ours, theirs = _pair_nnx()
    for f in (nnx.Param, nnx.BatchStat):
        s1, s2 = nnx.to_pure_dict(nnx.state(ours, f)), nnx.to_pure_dict(nnx.state(theirs, f))
        assert_trees_close(s1, s2)
    x = normal((6, 3))
    # flax's state loads into jbn's module (a checkpoint moves over) and gives flax's numbers.
    theirs(x)
    nnx.update(ours, nnx.state(theirs))
    ours.eval(), theirs.eval()
    np.testing.assert_allclose(ours(x), theirs(x), **F32)
    ours.train(), theirs.train()
    assert ours.bn.use_running_average is False
    graphdef, state = nnx.split(ours)
    merged = nnx.merge(graphdef, state)
    clone = nnx.clone(ours)
    np.testing.assert_allclose(merged(x), theirs(x), **F32)
    np.testing.assert_allclose(clone(x), nnx.clone(theirs)(x), **F32)
    # The same variables at the same paths (static attributes may differ: jbn has more options).
    paths = [
        sorted((str(p), type(n).__name__) for p, n in nnx.iter_graph(m) if isinstance(n, nnx.Variable))
        for m in (ours, theirs)
    ]
    assert paths[0] == paths[1] and paths[1]


def test_nnx_attributes_jit_and_grad_like_flax():
    ours, theirs = _pair_nnx()
    x = normal((6, 3))
    for model in (ours, theirs):
        model.set_attributes(use_running_average=True)
    assert ours.bn.use_running_average is True
    w1 = nnx.with_attributes(ours, use_running_average=False)
    w2 = nnx.with_attributes(theirs, use_running_average=False)
    assert w1.bn.use_running_average is False and ours.bn.use_running_average is True

    @nnx.jit
    def loss_grad(model, x):
        return nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))))(model)

    g1, g2 = loss_grad(w1, x), loss_grad(w2, x)
    assert_trees_close(nnx.to_pure_dict(g1), nnx.to_pure_dict(g2), rtol=1e-4, atol=1e-5)
    assert_trees_close(nnx.to_pure_dict(nnx.state(w1, nnx.BatchStat)), nnx.to_pure_dict(nnx.state(w2, nnx.BatchStat)))


def test_linen_tabulate_rows_and_flops_like_flax():
    """flax's summary lists every intercepted module method (show_repeated) and, for flops,
    re-runs each one alone: a layer defined in `setup` must show only its `__call__`, as
    flax's, and survive that re-run."""

    def block(bn_cls):
        class Block(nn.Module):
            def setup(self):
                self.dense = nn.Dense(4)
                self.bn = bn_cls()

            def __call__(self, x, training):
                return self.bn(self.dense(x), use_running_average=not training)

        return Block()

    x, rngs = jnp.ones((8, 3)), {"params": jax.random.key(1)}
    tables = [
        nn.tabulate(block(cls), rngs, show_repeated=True)(x, training=True) for cls in (jbn.BatchNorm, nn.BatchNorm)
    ]
    assert tables[0] == tables[1]
    with_flops = [
        nn.tabulate(block(cls), rngs, show_repeated=True, compute_flops=True, compute_vjp_flops=True)(x, training=True)
        for cls in (jbn.BatchNorm, nn.BatchNorm)
    ]
    assert [ln.split("│")[1:3] for ln in with_flops[0].splitlines() if "│" in ln] == [
        ln.split("│")[1:3] for ln in with_flops[1].splitlines() if "│" in ln
    ]  # same path and module columns


# ---------------------------------------------------------------- 10. debias with a traced momentum


def debiased_reference(batches, momentum):
    """ema_t / (1 - m^t) with ema_0 = 0, for the mean and the biased variance, float64."""
    ema_m = ema_v = 0.0
    for x in batches:
        mean, var, _ = ref.moments(x)
        ema_m = momentum * ema_m + (1 - momentum) * mean
        ema_v = momentum * ema_v + (1 - momentum) * var
    t = len(batches)
    return ema_m / (1 - momentum**t), ema_v / (1 - momentum**t)


def test_debias_with_traced_momentum_under_jit():
    batches = [normal((9, 4), seed=s, loc=s) for s in range(3)]

    @jax.jit
    def run(momentum):
        running = jbn.RunningStats(jnp.zeros(4), jnp.ones(4), jnp.zeros(4, jnp.int32))
        for x in batches:
            _, running = jbn.batch_norm(
                x, jnp.ones(4), jnp.zeros(4), running, training=True, momentum=momentum, debias=True
            )
        return running

    @jax.jit
    def run_linen(momentum):
        module = jbn.BatchNorm(use_running_average=False, momentum=momentum, debias=True)
        variables = module.init(jax.random.key(0), batches[0])
        for x in batches:
            _, upd = module.apply(variables, x, mutable=["batch_stats"])
            variables = {**variables, **upd}
        return variables["batch_stats"]

    for momentum in (0.9, 0.5):
        mean_ref, var_ref = debiased_reference(batches, momentum)
        got = run(jnp.float32(momentum))
        np.testing.assert_allclose(got.mean, mean_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got.var, var_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(got.count, np.full(4, len(batches)))
        stats = run_linen(jnp.float32(momentum))
        np.testing.assert_allclose(stats["mean"], mean_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(stats["var"], var_ref, rtol=1e-5, atol=1e-5)
