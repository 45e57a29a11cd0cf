"""How jbn is built, measured: how far one training call walks through jbn's modules, that
options travel as values (no `locals()`, no option names read with `getattr`), and that a
running-average rule of one's own needs no jbn module changed (it is defined here)."""

from __future__ import annotations

import ast
import dataclasses
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
