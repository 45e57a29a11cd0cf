"""How jbn is built, measured: how far one training call walks through jbn's modules, that
options travel as values (no `locals()`, no option names read with `getattr`), and that a
running-average rule of one's own needs no jbn module changed (it is defined here)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbn
from tests import reference

JBN = pathlib.Path(jbn.__file__).parent

# The bounds the module layout is held to, so that one call reads in a few files:
# following one training call of the linen module visits at most this many jbn modules,
# and comes back to a module it had already left at most this many times.
MAX_MODULES = 6
MAX_RETURNS = 3


def module_tour() -> list[str]:
    """The jbn modules one eager training call of `jbn.BatchNorm` (with a mask) enters, in
    the order of the first call of each jbn function, consecutive repeats collapsed."""
    from jbn import linen  # noqa: F401  (imported before the tour: imports are no part of it)

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(8, 4, 3)), jnp.float32)
    mask = jnp.ones((8, 4), bool).at[0, 0].set(False)
    layer = jbn.BatchNorm(use_running_average=False)
    variables = layer.init(jax.random.key(0), x, mask=mask)
    tour: list[str] = []
    seen: set = set()

    def profile(frame, event, arg):
        module = frame.f_globals.get("__name__", "")
        if event == "call" and (module == "jbn" or module.startswith("jbn.")) and frame.f_code not in seen:
            seen.add(frame.f_code)
            if not tour or tour[-1] != module:
                tour.append(module)

    sys.setprofile(profile)
    try:
        layer.apply(variables, x, mask=mask, mutable=["batch_stats"])
    finally:
        sys.setprofile(None)
    return tour


def returns(tour: list[str]) -> int:
    return sum(1 for i, module in enumerate(tour) if module in tour[:i])


def test_module_tour_is_recorded():
    tour = module_tour()
    assert tour[0] == "jbn.linen", tour
    assert "jbn._statistics" in tour, tour  # the statistics were computed on the way


def test_training_call_is_a_short_walk():
    tour = module_tour()
    assert len(set(tour)) <= MAX_MODULES, " -> ".join(tour)
    assert returns(tour) <= MAX_RETURNS, " -> ".join(tour)


def test_returns_counts_modules_left_and_entered_again():
    assert returns(["a", "b", "a", "c", "b"]) == 2
    assert returns(["a", "b", "c"]) == 0


def _wiring_by_name(path: pathlib.Path) -> list[str]:
    """`locals()` calls, and `getattr(obj, name)` where `name` is not a string literal
    (options read from a list of names)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
            continue
        if node.func.id == "locals":
            found.append(f"{path.name}:{node.lineno} locals()")
        named = node.func.id in ("getattr", "setattr") and len(node.args) >= 2
        if named and not isinstance(node.args[1], ast.Constant):
            found.append(f"{path.name}:{node.lineno} {node.func.id} with a computed name")
    return found


# Reading attributes by a computed name is legitimate where the names are variables of
# state (the population and accumulator variables of nnx modules) or a key path, not options.
STATE_BY_NAME = {"nnx.py", "weight_decay.py", "__init__.py"}


def test_options_are_not_wired_by_name():
    found = []
    for path in sorted(JBN.glob("*.py")):
        wiring = _wiring_by_name(path)
        if path.name in STATE_BY_NAME:
            wiring = [w for w in wiring if "locals()" in w]
        found += wiring
    assert not found, found


def test_the_wiring_check_finds_wiring(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f(a):\n    g(**locals())\n    return getattr(a, NAMES[0])\n")
    assert len(_wiring_by_name(bad)) == 2


@dataclasses.dataclass(frozen=True)
class KeepMaxVariance:
    """A rule defined here, not in jbn: the EMA of the mean, and the largest batch
    variance seen so far (a conservative variance for evaluation)."""

    momentum: float = 0.9
    needs_count = False

    def update(self, running: jbn.RunningStats, batch: jbn.Moments) -> jbn.RunningStats:
        mean = self.momentum * running.mean + (1 - self.momentum) * batch.mean
        return jbn.RunningStats(mean, jnp.maximum(running.var, batch.var), running.count)


def _reference(x, mask, old_mean, old_var, momentum):
    mean, var, _ = reference.moments(np.asarray(x, np.float64), axis=-1, mask=mask)
    return momentum * old_mean + (1 - momentum) * mean, np.maximum(old_var, var)


def _batch(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(2.0, rng.uniform(0.5, 3.0, size=5), size=(12, 7, 5)).astype(np.float32)
    mask = rng.random((12, 7)) > 0.25
    return x, mask


def test_own_running_average_rule_through_batch_norm():
    rule = KeepMaxVariance(0.8)
    running = jbn.RunningStats(jnp.zeros(5), jnp.full(5, 2.0))
    ref_mean, ref_var = np.zeros(5), np.full(5, 2.0)
    for seed in range(3):
        x, mask = _batch(seed)
        _, running = jbn.batch_norm(x, None, None, running, training=True, mask=mask, running_average=rule)
        ref_mean, ref_var = _reference(x, mask, ref_mean, ref_var, 0.8)
        np.testing.assert_allclose(running.mean, ref_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(running.var, ref_var, rtol=1e-5, atol=1e-6)


def test_own_running_average_rule_through_the_linen_module():
    from jbn import linen  # noqa: F401

    layer = jbn.BatchNorm(use_running_average=False, running_average=KeepMaxVariance(0.7))
    x, mask = _batch(10)
    variables = layer.init(jax.random.key(0), x, mask=mask)
    assert set(variables["batch_stats"]) == {"mean", "var"}  # the rule keeps no count
    ref_mean, ref_var = np.zeros(5), np.ones(5)
    for seed in (11, 12):
        x, mask = _batch(seed)
        _, updates = layer.apply(variables, x, mask=mask, mutable=["batch_stats"])
        variables = {**variables, **updates}
        ref_mean, ref_var = _reference(x, mask, ref_mean, ref_var, 0.7)
        np.testing.assert_allclose(variables["batch_stats"]["mean"], ref_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(variables["batch_stats"]["var"], ref_var, rtol=1e-5, atol=1e-6)


def test_a_rule_without_update_is_refused():
    with pytest.raises(TypeError, match="running_average"):
        jbn.batch_norm(jnp.ones((4, 2)), None, None, jbn.RunningStats(jnp.zeros(2), jnp.ones(2)),
                       training=True, running_average=0.9)  # fmt: skip


def test_built_in_rules_are_hashable_values():
    assert jbn.running_average_rule(0.9) == jbn.EMA(0.9)
    assert jbn.running_average_rule(None, unbiased_running_var=True) == jbn.UnbiasedVariance(jbn.CumulativeAverage())
    assert hash(jbn.DebiasedEMA(0.9)) == hash(jbn.running_average_rule(0.9, debias=True))
    assert jbn.UnbiasedVariance(jbn.DebiasedEMA(0.9)).needs_count and not jbn.EMA(0.5).needs_count


# Renamed public names keep their old name for one release, with a DeprecationWarning.


def test_unbiased_moments_is_a_deprecated_alias_of_bessel_corrected():
    batch = jbn.Moments(jnp.array([1.0, 2.0]), jnp.array([3.0, 4.0]), jnp.array(4))
    with pytest.warns(DeprecationWarning, match="bessel_corrected"):
        old = jbn.unbiased_moments(batch)
    np.testing.assert_allclose(old.var, np.array([3.0, 4.0]) * 4 / 3, rtol=1e-6)
    np.testing.assert_array_equal(old.mean, batch.mean)


def test_needs_batch_count_is_a_deprecated_alias():
    with pytest.warns(DeprecationWarning, match="needs_count"):
        assert jbn.needs_batch_count(None, False) and not jbn.needs_batch_count(0.9, False)


def test_optax_mask_is_a_deprecated_alias_of_weight_decay_mask():
    params = {"Dense_0": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, "BN": {"scale": jnp.ones(2)}}
    with pytest.warns(DeprecationWarning, match="weight_decay_mask"):
        old = jbn.optax_mask(params)
    assert old == {"Dense_0": {"kernel": True, "bias": True}, "BN": {"scale": False}}


# Check once: a wrapper's call checks `x`, its axes and epsilon once each (it builds the
# records of `jbn._options.checked_arguments` in one place and calls the trusting cores);
# a wrapper that called jbn's public functions again, or two of them in a row, would check
# them twice. Counted per run of the wrapper's own call method, with a profiler (as
# `module_tour`), so that a check reached by any import path is seen.

CHECKS = ("check_input", "feature_axes", "check_epsilon")


def checks_per_call(run, entry, checks=CHECKS) -> dict[str, float]:
    """How many times each check of `jbn._options` named in `checks` runs per run of
    `entry` (a wrapper's call method) while `run()` runs; `run` must reach `entry`."""
    from jbn import _options

    codes = {getattr(_options, name).__code__: name for name in checks}
    entry_code = inspect.unwrap(entry).__code__  # haiku wraps every method of a module
    counts = dict.fromkeys(checks, 0)
    entries = 0

    def profile(frame, event, arg):
        nonlocal entries
        if event != "call":
            return
        if frame.f_code in codes:
            counts[codes[frame.f_code]] += 1
        elif frame.f_code is entry_code:
            entries += 1

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    assert entries, f"{entry.__qualname__} was not called"
    return {name: count / entries for name, count in counts.items()}


def _x():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(1.0, 2.0, size=(6, 3, 4)), jnp.float32)
    return x, jnp.asarray(rng.random((6, 3)) > 0.3)


def _equinox(mode, inference):
    import equinox as eqx

    from jbn.equinox import BatchNorm

    x, mask = _x()
    bn, state = eqx.nn.make_with_state(BatchNorm)(4, "batch", mode=mode, inference=inference)
    xe = jnp.moveaxis(x, -1, 1)  # per example (C, T)
    call = jax.vmap(lambda e, m: bn(e, state, mask=m), axis_name="batch", out_axes=(0, None))
    return lambda: call(xe, mask), BatchNorm.__call__


def _keras(renorm, training):
    from jbn.keras import BatchNormalization

    x, mask = _x()
    layer = BatchNormalization(renorm=renorm)
    layer.build(x.shape)
    return lambda: layer(x, training=training, mask=mask), BatchNormalization.call


def _haiku(is_training, test_local_stats):
    import haiku as hk

    from jbn.haiku import BatchNorm

    x, mask = _x()
    f = hk.transform_with_state(lambda x, m: BatchNorm(True, True, 0.9)(x, is_training, test_local_stats, mask=m))
    params, state = f.init(jax.random.key(0), x, mask[..., None])
    return lambda: f.apply(params, state, None, x, mask[..., None]), BatchNorm.__call__


def _nnx(renorm, use_running_average):
    from flax import nnx

    from jbn.nnx import BatchNorm, BatchRenorm

    x, mask = _x()
    layer = (BatchRenorm if renorm else BatchNorm)(4, rngs=nnx.Rngs(0), use_running_average=use_running_average)
    return lambda: layer(x, mask=mask), type(layer).__call__


def _linen(renorm, use_running_average):
    from jbn.linen import BatchNorm, BatchRenorm

    x, mask = _x()
    layer = (BatchRenorm if renorm else BatchNorm)(use_running_average=use_running_average)
    variables = layer.init(jax.random.key(0), x, mask=mask)
    return lambda: layer.apply(variables, x, mask=mask, mutable=["batch_stats"]), type(layer).__call__


WRAPPER_CALLS = {
    "linen training": lambda: _linen(False, False),
    "linen renorm training": lambda: _linen(True, False),
    "linen evaluation": lambda: _linen(False, True),
    "equinox batch training": lambda: _equinox("batch", False),
    "equinox ema training": lambda: _equinox("ema", False),
    "equinox inference": lambda: _equinox("batch", True),
    "keras training": lambda: _keras(False, True),
    "keras renorm training": lambda: _keras(True, True),
    "keras inference": lambda: _keras(False, False),
    "haiku training": lambda: _haiku(True, False),
    "haiku local statistics": lambda: _haiku(False, True),
    "haiku evaluation": lambda: _haiku(False, False),
    "nnx training": lambda: _nnx(False, False),
    "nnx renorm training": lambda: _nnx(True, False),
    "nnx evaluation": lambda: _nnx(False, True),
}


@pytest.mark.parametrize("case", WRAPPER_CALLS)
def test_a_wrapper_call_checks_x_its_axes_and_epsilon_once(case):
    run, entry = WRAPPER_CALLS[case]()
    assert checks_per_call(run, entry) == dict.fromkeys(CHECKS, 1), case


# The momentum: once per call for each running average the call updates, none where the
# layer built its rules at construction (haiku's decay rate, NNX's options).
MOMENTUM_CHECKS = {
    "equinox batch training": 1,
    "equinox ema training": 1,  # equinox's start: the filling rule (momentum 0) needs no check
    "keras training": 1,
    "keras renorm training": 2,  # keras's renorm_momentum and momentum
    "haiku training": 0,
    "nnx training": 0,
    "nnx renorm training": 0,
}


@pytest.mark.parametrize("case", MOMENTUM_CHECKS)
def test_a_wrapper_call_checks_each_momentum_once(case):
    run, entry = WRAPPER_CALLS[case]()
    assert checks_per_call(run, entry, ("check_momentum",)) == {"check_momentum": MOMENTUM_CHECKS[case]}, case


def test_the_check_counter_sees_a_second_check():
    """Two public functions in a row (the training output, then the normalization with
    the batch's statistics), as a wrapper that checks twice would call them, count two of each."""
    x, mask = _x()

    def twice(x):
        _, stats = jbn.normalize_with_batch_stats(x, None, None, mask=mask)
        return jbn.normalize(x, stats.mean, stats.var)

    assert checks_per_call(lambda: twice(x), twice) == dict.fromkeys(CHECKS, 2)
