"""Running-average choices: cumulative (momentum=None), debiased EMA, unbiased variance."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbn
from tests import reference as ref

C = 3


def _batches(k=5, seed=0):
    rng = np.random.default_rng(seed)
    # different sizes and far-off means: a cumulative average weighs batches, not examples
    return [
        jnp.asarray(rng.normal(size=(n, C)).astype(np.float32) * (1 + i) + 3 * i)
        for i, n in enumerate([4, 7, 5, 9, 6][:k])
    ]


def _run(batches, momentum, **options):
    running = jbn.RunningStats(jnp.zeros(C), jnp.ones(C), jnp.zeros(C, jnp.int32))
    history = []
    for x in batches:
        _, running = jbn.batch_norm(x, None, None, running, training=True, momentum=momentum, **options)
        history.append(running)
    return history


def test_momentum_none_is_the_cumulative_average_of_batches():
    batches = _batches()
    history = _run(batches, None)
    for t, running in enumerate(history, start=1):
        stats = [ref.moments(x) for x in batches[:t]]
        np.testing.assert_allclose(running.mean, np.mean([s[0] for s in stats], 0), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(running.var, np.mean([s[1] for s in stats], 0), rtol=1e-6)
        np.testing.assert_array_equal(running.count, np.full(C, t))


def test_debiased_ema_is_the_zero_started_ema_divided_by_one_minus_momentum_power():
    batches = _batches(seed=1)
    m = 0.9
    history = _run(batches, m, debias=True)
    raw_mean, raw_var = np.zeros(C), np.zeros(C)
    for t, (x, running) in enumerate(zip(batches, history), start=1):
        mean, var, _ = ref.moments(x)
        raw_mean = m * raw_mean + (1 - m) * mean
        raw_var = m * raw_var + (1 - m) * var
        np.testing.assert_allclose(running.mean, raw_mean / (1 - m**t), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(running.var, raw_var / (1 - m**t), rtol=1e-5)
    # the first batch replaces the initial (0, 1) entirely
    np.testing.assert_allclose(history[0].mean, ref.moments(batches[0])[0], rtol=1e-6, atol=1e-6)


def test_debias_stays_accurate_for_momentum_near_one():
    x = _batches(1)[0]
    (running,) = _run([x], 0.9999, debias=True)
    np.testing.assert_allclose(running.var, ref.moments(x)[1], rtol=1e-5)


def test_unbiased_running_var_tracks_bessel_corrected_variance():
    batches = _batches(seed=2)
    m = 0.9
    history = _run(batches, m, unbiased_running_var=True)
    ref_mean, ref_var = np.zeros(C), np.ones(C)
    for x, running in zip(batches, history):
        ref_mean = m * ref_mean + (1 - m) * ref.f64(x).mean(0)
        ref_var = m * ref_var + (1 - m) * ref.f64(x).var(0, ddof=1)
        np.testing.assert_allclose(running.mean, ref_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(running.var, ref_var, rtol=1e-5)


def test_a_feature_without_valid_elements_keeps_its_statistics_and_count():
    x = _batches(1)[0]
    mask = np.ones(x.shape, bool)
    mask[:, 1] = False
    running = jbn.RunningStats(jnp.array([0.5, 0.5, 0.5]), jnp.array([2.0, 2.0, 2.0]), jnp.array([3, 3, 3], jnp.int32))
    _, new = jbn.batch_norm(x, None, None, running, training=True, momentum=None, mask=jnp.asarray(mask))
    np.testing.assert_array_equal(new.count, [4, 3, 4])
    assert float(new.mean[1]) == 0.5 and float(new.var[1]) == 2.0
    mean, var, _ = ref.moments(x)
    np.testing.assert_allclose(new.mean[0], (3 * 0.5 + mean[0]) / 4, rtol=1e-6)


def test_state_stays_compatible():
    running = jbn.RunningStats(jnp.zeros(C), jnp.ones(C))  # two fields still construct it
    assert running.count is None
    x = _batches(1)[0]
    _, new = jbn.batch_norm(x, None, None, running, training=True, momentum=0.9)
    assert new.count is None
    with pytest.raises(ValueError, match="count"):
        jbn.batch_norm(x, None, None, running, training=True, momentum=None)
    with pytest.raises(ValueError, match="count"):
        jbn.update_running_stats(running, jbn.moments(x), 0.9, debias=True)


def test_linen_variables_are_flax_names_plus_count_only_when_needed():
    x = _batches(1)[0]
    plain = jbn.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
    assert set(plain["batch_stats"]) == {"mean", "var"}
    # a flax checkpoint loads into jbn and back
    flax_vars = nn.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
    assert jax.tree.structure(flax_vars) == jax.tree.structure(plain)
    cumulative = jbn.BatchNorm(use_running_average=False, momentum=None)
    variables = cumulative.init(jax.random.key(0), x)
    assert set(variables["batch_stats"]) == {"mean", "var", "count"}
    apply = jax.jit(lambda v, x: cumulative.apply(v, x, mutable=["batch_stats"]))
    batches = _batches()
    for x in batches:
        _, updates = apply(variables, x)
        variables = {**variables, **updates}
    np.testing.assert_allclose(
        variables["batch_stats"]["mean"], np.mean([ref.moments(b)[0] for b in batches], 0), rtol=1e-6, atol=1e-6
    )
    np.testing.assert_array_equal(variables["batch_stats"]["count"], np.full(C, len(batches)))
    # debias through the module
    debiased = jbn.BatchNorm(use_running_average=False, momentum=0.95, debias=True)
    v = debiased.init(jax.random.key(0), batches[0])
    _, updates = debiased.apply(v, batches[0], mutable=["batch_stats"])
    np.testing.assert_allclose(updates["batch_stats"]["var"], ref.moments(batches[0])[1], rtol=1e-5)


def test_merge_moments_is_exact():
    rng = np.random.default_rng(7)
    a = rng.normal(size=(10, C)) * 0.5 + 100.0
    b = rng.normal(size=(6, C)) * 2.0 + 101.0
    merged = jbn.merge_moments(jbn.moments(jnp.asarray(a, jnp.float32)), jbn.moments(jnp.asarray(b, jnp.float32)))
    both = np.concatenate([a, b])
    np.testing.assert_allclose(merged.mean, both.mean(0), rtol=1e-6)
    np.testing.assert_allclose(merged.var, both.var(0), rtol=1e-4)
    np.testing.assert_array_equal(merged.count, np.full(C, 16.0))
    empty = jbn.Moments(jnp.zeros(C), jnp.zeros(C), jnp.zeros(C))
    same = jbn.merge_moments(empty, jbn.moments(jnp.asarray(b, jnp.float32)))
    np.testing.assert_allclose(same.var, b.var(0), rtol=1e-4)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("path", ["fused", "unfused", "renorm"])
def test_gradients_with_a_narrow_running_state_are_those_of_batch_norm(dtype, path):
    """The one-ulp anti-stall step of a bfloat16 or float16 running state (`nextafter`, which
    has no derivative rule) is outside the differentiated path: `grad` of a training call
    works and gives the float64 reference's gradients."""

    x = _batches(1, seed=3)[0]
    scale = jnp.asarray([0.5, 1.0, 2.0], jnp.float32)
    cot = jnp.asarray(np.random.default_rng(4).normal(size=x.shape).astype(np.float32))
    running = jbn.RunningStats(jnp.zeros(C, dtype), jnp.ones(C, dtype))

    def loss(x, scale):
        if path == "renorm":  # r = 1, d = 0: batch norm's gradients
            y, new = jbn.batch_renorm(x, scale, None, running, training=True, r_max=1.0, d_max=0.0)
        else:
            y, new = jbn.batch_norm(x, scale, None, running, training=True, fused=path == "fused")
        return jnp.sum(y * cot)  # the running statistics are computed (and differentiated) but not used

    dx, dscale = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, scale)
    dx_ref, dscale_ref, _ = ref.batch_norm_grads(x, scale, cot)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dscale, dscale_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rule", [dict(momentum=None), dict(momentum=0.9, debias=True)], ids=["cumulative", "debias"])
def test_float64_state_with_a_count_based_rule_is_float64_accurate(rule):
    """The count-based coefficients (cumulative average, debiased EMA) are computed in the
    state's dtype: a float64 state follows the float64 formula to float64's accuracy."""
    batches = [ref.f64(x) for x in _batches(seed=5)]
    with jax.enable_x64(True):
        running = jbn.RunningStats(jnp.zeros(C, jnp.float64), jnp.ones(C, jnp.float64), jnp.zeros(C, jnp.int32))
        history = []
        for x in batches:
            _, running = jbn.batch_norm(jnp.asarray(x), None, None, running, training=True, **rule)
            history.append(running)
    m = rule["momentum"]
    raw_mean, raw_var, weight = np.zeros(C), np.zeros(C), 0.0
    for t, (x, running) in enumerate(zip(batches, history), start=1):
        mean, var = x.mean(0), x.var(0)
        if m is None:  # the average of the t batches' statistics
            raw_mean, raw_var, weight = raw_mean + mean, raw_var + var, float(t)
        else:  # the zero-started EMA divided by 1 - m^t
            raw_mean, raw_var, weight = m * raw_mean + (1 - m) * mean, m * raw_var + (1 - m) * var, 1 - m**t
        assert running.mean.dtype == jnp.float64
        np.testing.assert_allclose(running.mean, raw_mean / weight, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(running.var, raw_var / weight, rtol=1e-13)


@pytest.mark.parametrize("virtual_batch_size", [None, 6])
def test_representable_variances_near_the_float32_limit_update_the_running_statistics(virtual_batch_size):
    """A batch (or sub-batch) variance near float32's largest value: the unbiased variance
    (times n / (n - 1)) and the mean over sub-batches are representable, so the running
    statistics take them (intermediate products and sums must not overflow to inf, which
    would leave the statistics unchanged as after a bad batch)."""
    rng = np.random.default_rng(8)
    x = (rng.choice([-1.0, 1.0], size=(12, C)) * 1.2e19 + rng.normal(size=(12, C)) * 1e17).astype(np.float32)
    running = jbn.RunningStats(jnp.zeros(C), jnp.ones(C))
    _, new = jbn.batch_norm(
        jnp.asarray(x),
        None,
        None,
        running,
        training=True,
        momentum=0.5,
        unbiased_running_var=True,
        virtual_batch_size=virtual_batch_size,
    )
    groups = [ref.f64(x)] if virtual_batch_size is None else [ref.f64(x[:6]), ref.f64(x[6:])]
    mean = np.mean([g.mean(0) for g in groups], 0)
    var = np.mean([g.var(0, ddof=1) for g in groups], 0)
    assert np.all(var < np.finfo(np.float32).max)  # the case: representable, near the limit
    np.testing.assert_allclose(new.mean, 0.5 * mean, rtol=1e-5, atol=1e12)
    np.testing.assert_allclose(new.var, 0.5 + 0.5 * var, rtol=1e-5)
