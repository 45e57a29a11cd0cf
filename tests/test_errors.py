"""Every bad input fails at trace time with the right exception naming the argument: a
TypeError for a wrong type, a ValueError for a wrong value, each message naming the argument
and the fix. The arguments that are fine at the edge (an empty batch to `moments`, a NumPy
integer `virtual_batch_size`, a NumPy integer axis, a scalar momentum) give the float64
reference's numbers.
"""

import math
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jbn
from tests import reference as ref

X = jnp.ones((4, 3), jnp.float32) * jnp.arange(4.0)[:, None]
RUNNING = jbn.RunningStats(jnp.zeros(3), jnp.ones(3))
JAX_MOMENTUM = jnp.asarray(-0.5)  # concrete: made outside the trace
X_NORMAL = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32)


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
    tests/test_flax_behaviours.py and the empty-batch test below check their numbers)."""
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


# ------------------------------------------------------------ each argument of the pure layer, renorm and the modules


def bn(**kwargs):
    """batch_norm on X_NORMAL in training mode, with the defaults overridden by `kwargs`."""
    args = dict(scale=None, bias=None, running=RUNNING, training=True)
    args.update(kwargs)
    return lambda: jbn.batch_norm(X_NORMAL, args.pop("scale"), args.pop("bias"), args.pop("running"), **args)


def renorm(**kwargs):
    args = dict(scale=None, bias=None, running=RUNNING, training=True)
    args.update(kwargs)
    return lambda: jbn.batch_renorm(X_NORMAL, args.pop("scale"), args.pop("bias"), args.pop("running"), **args)


def grouped(groups):
    """moments synchronized over a vmap axis of 2 participants with `groups`."""
    return lambda: jax.vmap(lambda x: jbn.moments(x, axis_name="d", axis_index_groups=groups), axis_name="d")(
        jnp.stack([X_NORMAL, X_NORMAL])
    )


CASES = [
    # `running` of the wrong type: an AttributeError from deep inside today
    ("running-tuple", bn(running=(jnp.zeros(3), jnp.ones(3))), TypeError, "`running`"),
    ("running-dict", bn(running={"mean": jnp.zeros(3), "var": jnp.ones(3)}), TypeError, "`running`"),
    ("running-none", bn(running=None), TypeError, "`running`"),
    ("renorm-running-tuple", renorm(running=(jnp.zeros(3), jnp.ones(3))), TypeError, "`running`"),
    (
        "update-running-tuple",
        lambda: jbn.update_running_stats((jnp.zeros(3), jnp.ones(3)), jbn.moments(X_NORMAL)),
        TypeError,
        "`running`",
    ),
    # axis_index_groups that are not groups of int indices
    ("groups-string", grouped("ab"), TypeError, "`axis_index_groups`"),
    ("groups-float", grouped([[0.0], [1.0]]), TypeError, "`axis_index_groups`"),
    # Batch Renorm limits
    ("r_max-nan", renorm(r_max=math.nan), ValueError, "`r_max`"),
    ("d_max-nan", renorm(d_max=math.nan), ValueError, "`d_max`"),
    ("r_max-bool", renorm(r_max=True), TypeError, "`r_max`"),
    ("d_max-bool", renorm(d_max=False), TypeError, "`d_max`"),
    ("r_max-schedule-below-one", renorm(r_max=lambda step: 0.5, step=0), ValueError, "`r_max`"),
    ("d_max-schedule-negative", renorm(d_max=lambda step: -1.0, step=0), ValueError, "`d_max`"),
    # epsilon must be finite
    ("epsilon-inf-batch_norm", bn(epsilon=math.inf), ValueError, "`epsilon`"),
    (
        "epsilon-inf-normalize",
        lambda: jbn.normalize(X_NORMAL, jnp.zeros(3), jnp.ones(3), epsilon=math.inf),
        ValueError,
        "`epsilon`",
    ),
    ("epsilon-inf-renorm", renorm(epsilon=math.inf), ValueError, "`epsilon`"),
    ("negative_slope-nan", bn(activation="leaky_relu", negative_slope=math.nan), ValueError, "`negative_slope`"),
    # output dtype must be floating (or complex)
    ("dtype-int", bn(dtype=jnp.int32), TypeError, "`dtype`"),
    ("dtype-bool", bn(dtype=jnp.bool_), TypeError, "`dtype`"),
    (
        "dtype-int-normalize",
        lambda: jbn.normalize(X_NORMAL, jnp.zeros(3), jnp.ones(3), dtype=jnp.int8),
        TypeError,
        "`dtype`",
    ),
    ("dtype-int-eval", bn(training=False, dtype=jnp.int32), TypeError, "`dtype`"),
    # scale must be real floating for a real input
    ("scale-complex", bn(scale=jnp.ones(3, jnp.complex64)), TypeError, "`scale`"),
    ("scale-int", bn(scale=jnp.ones(3, jnp.int32)), TypeError, "`scale`"),
    ("scale-bool", bn(scale=jnp.ones(3, bool)), TypeError, "`scale`"),
    ("scale-int-renorm", renorm(scale=jnp.ones(3, jnp.int32)), TypeError, "`scale`"),
    # running statistics: floating mean/var (an int would be truncated), an int32 count >= 0
    (
        "running-mean-int",
        bn(running=jbn.RunningStats(jnp.zeros(3, jnp.int32), jnp.ones(3))),
        TypeError,
        "`running.mean`",
    ),
    ("running-var-int", bn(running=jbn.RunningStats(jnp.zeros(3), jnp.ones(3, jnp.int32))), TypeError, "`running.var`"),
    (
        "running-count-negative",
        bn(momentum=None, running=jbn.RunningStats(jnp.zeros(3), jnp.ones(3), jnp.full(3, -1, jnp.int32))),
        ValueError,
        "`running.count`",
    ),
    (
        "running-count-float",
        bn(momentum=None, running=jbn.RunningStats(jnp.zeros(3), jnp.ones(3), jnp.zeros(3, jnp.float32))),
        TypeError,
        "`running.count`",
    ),
    # training is a bool (static)
    ("training-string", bn(training="yes"), TypeError, "`training`"),
    ("training-none", bn(training=None), TypeError, "`training`"),
    ("renorm-training-string", renorm(training="yes"), TypeError, "`training`"),
    # evaluation checks the mask too
    ("eval-mask-shape", bn(training=False, mask=jnp.ones((4, 2), bool)), ValueError, "`mask`"),
    ("renorm-eval-mask-shape", renorm(training=False, mask=jnp.ones((4, 2), bool)), ValueError, "`mask`"),
]


@pytest.mark.parametrize("call,exc,name", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_argument_raises_at_trace_time_naming_it(call, exc, name):
    with pytest.raises(exc, match=name.replace(".", r"\.")):
        traced(call)()


@pytest.mark.parametrize(
    "num_features,exc",
    [(-1, ValueError), ((3, -2), ValueError), (4.0, TypeError), ("4", TypeError)],
    ids=["negative", "tuple-negative", "float", "string"],
)
@pytest.mark.parametrize("cls", [jbn.nnx.BatchNorm, jbn.nnx.BatchRenorm], ids=["BatchNorm", "BatchRenorm"])
def test_nnx_num_features_is_checked(cls, num_features, exc):
    """Today -1 and 4.0 fail deep inside jax's initializers."""
    with pytest.raises(exc, match="`num_features`"):
        cls(num_features, rngs=nnx.Rngs(0))


def test_schedule_limits_are_checked_where_their_value_is_known():
    """A jnp schedule's value is a tracer under jit (no trace-time check possible there), but
    called eagerly with a concrete step it is known: r_max < 1 / d_max < 0 must raise."""
    with pytest.raises(ValueError, match="`r_max`"):
        jbn.batch_renorm(
            X_NORMAL, None, None, RUNNING, training=True, r_max=jbn.renorm_schedule(0.5, 0.5, 0, 10), step=0
        )
    with pytest.raises(ValueError, match="`d_max`"):
        jbn.batch_renorm(
            X_NORMAL, None, None, RUNNING, training=True, d_max=jbn.renorm_schedule(-1.0, -1.0, 0, 10), step=0
        )


def test_module_epsilon_inf_is_rejected():
    with pytest.raises(ValueError, match="`epsilon`"):
        jbn.nnx.BatchNorm(3, epsilon=math.inf, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="`epsilon`"):
        jbn.BatchNorm(use_running_average=False, epsilon=math.inf).init(jax.random.key(0), X_NORMAL)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_empty_reduced_axis_gives_finite_statistics_with_count_zero(jit):
    """A batch without valid elements gives finite output (the README's promise); an empty
    reduced axis is the same case (an IndexError today)."""
    f = jax.jit(jbn.moments) if jit else jbn.moments
    stats = f(jnp.zeros((0, 3), jnp.float32))
    mean, var, count = ref.moments(np.zeros((0, 3)))
    np.testing.assert_array_equal(stats.mean, mean)
    np.testing.assert_array_equal(stats.var, var)
    np.testing.assert_array_equal(np.broadcast_to(stats.count, (3,)), count)
    empty_rows = f(jnp.zeros((2, 0, 3), jnp.float32))
    np.testing.assert_array_equal(np.broadcast_to(empty_rows.count, (3,)), np.zeros(3))
    assert np.isfinite(empty_rows.mean).all() and np.isfinite(empty_rows.var).all()


@pytest.mark.parametrize("size", [np.int64(4), np.int32(4)], ids=["int64", "int32"])
def test_numpy_integer_virtual_batch_size_is_accepted(size):
    """A NumPy integer (what `x.shape[0] // k` gives on an ndarray's fields) is an int."""
    x = np.random.default_rng(1).normal(size=(12, 3)).astype(np.float32) + 2
    y, new = jbn.batch_norm(jnp.asarray(x), None, None, RUNNING, training=True, momentum=0.9, virtual_batch_size=size)
    for g in range(3):
        part = x[4 * g : 4 * g + 4]
        mean, var, _ = ref.moments(part)
        np.testing.assert_allclose(y[4 * g : 4 * g + 4], ref.normalize(part, mean, var), rtol=1e-5, atol=1e-5)
    mean_ref, var_ref = ref.ghost_running(
        x[None], np.ones((1, 12, 3), bool), 4, np.zeros(3), np.ones(3), momentum=0.9, unbiased=False
    )
    np.testing.assert_allclose(new.mean, mean_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.var, var_ref, rtol=1e-5)


# ------------------------------------------------------------ recompute_batch_stats


def test_recompute_first_batch_all_padding_works_or_says_so():
    """Today the error blames training mode or a non-jbn layer. Either the all-padding
    batch simply contributes nothing (the result is the statistics of the valid elements
    of all batches), or the error says that the batch was all padding."""
    model = jbn.BatchNorm(use_running_average=False)
    variables = model.init(jax.random.key(0), X_NORMAL)

    def apply(v, batch):
        x, mask = batch
        return model.apply(v, x, mask=mask, mutable=["batch_stats"])

    second = X_NORMAL * 2 + 1
    batches = [(X_NORMAL, jnp.zeros(4, bool)), (second, jnp.asarray([True, True, False, True]))]
    try:
        result = jbn.recompute_batch_stats(apply, variables, batches, progress=False)
    except ValueError as e:
        message = str(e)
    else:
        message = None
    if message is not None:
        assert re.search(r"(?i)padding|no valid element", message) and "mask" in message, message
        return
    valid = np.asarray(second, np.float64)[[0, 1, 3]]
    np.testing.assert_allclose(result["batch_stats"]["mean"], valid.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result["batch_stats"]["var"], valid.var(0), rtol=1e-4)


def test_recompute_given_model_apply_works_or_says_what_to_pass():
    """flax users write `model.apply`; without mutable=['batch_stats'] flax raised its own
    ModifyScopeVariableError. Either jbn makes batch_stats mutable itself (then the result is
    the population statistics) or it raises naming exactly what to pass."""
    model = jbn.BatchNorm(use_running_average=False, momentum=0.9)
    rng = np.random.default_rng(2)
    batches = [jnp.asarray(rng.normal(size=(n, 3)).astype(np.float32) * 2 + 5) for n in (4, 6, 5)]
    variables = model.init(jax.random.key(0), batches[0])
    try:
        result = jbn.recompute_batch_stats(model.apply, variables, batches, progress=False)
    except (TypeError, ValueError) as e:
        message = str(e)
    else:
        message = None
    if message is not None:
        assert "mutable" in message and "batch_stats" in message, message
        return
    population = np.concatenate([np.asarray(b, np.float64) for b in batches])
    np.testing.assert_allclose(result["batch_stats"]["mean"], population.mean(0), rtol=1e-5)
    np.testing.assert_allclose(result["batch_stats"]["var"], population.var(0), rtol=1e-4)
