"""The protocol's hypothesis tests and Holm's correction, against scipy and against the
textbook formulations written out here."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from experiments import protocol, significance

SAMPLES = [
    np.array([0.031, 0.012, 0.044, -0.005, 0.027, 0.019, 0.038, 0.008, 0.022, 0.015]),
    np.array([3.0, -1.0, 2.0, 2.0, 5.0, 1.0, 0.0]),  # discrete, a tie at 0
    np.array([1.3, 1.1, 9.0, 1.2, 0.9, 1.25, 1.4, 30.0, 1.05]),  # heavy-tailed ratios
    np.array([-0.2, 0.1, -0.3, 0.05, -0.1]),
]


@pytest.mark.parametrize("values", SAMPLES)
@pytest.mark.parametrize("threshold", [0.0, 0.01, 1.2])
@pytest.mark.parametrize("alternative", ["greater", "less"])
def test_t_sign_and_permutation_p_values_match_scipy(values, threshold, alternative):
    greater = alternative == "greater"
    assert significance.t_p(values, threshold, greater) == pytest.approx(
        stats.ttest_1samp(values, threshold, alternative=alternative).pvalue, rel=1e-9
    )
    d = values - threshold
    d = d[d != 0]
    k = int(np.sum(d > 0 if greater else d < 0))
    assert significance.sign_p(values, threshold, greater) == pytest.approx(
        stats.binomtest(k, d.size, 0.5, alternative="greater").pvalue, rel=1e-12
    )
    # scipy's one-sample "samples" permutation test flips the sign of each observation.
    reference = stats.permutation_test(
        (values - threshold,), np.mean, permutation_type="samples", alternative=alternative, n_resamples=np.inf
    ).pvalue
    assert significance.permutation_p(values, threshold, greater) == pytest.approx(reference, rel=1e-12)


def test_within_is_two_one_sided_tests():
    v = SAMPLES[0]
    for test in significance.P_TESTS:
        expected = max(significance.p_value(v, "greater", -0.05, test), significance.p_value(v, "less", 0.05, test))
        assert significance.p_value(v, "within", 0.05, test) == expected
    # TOST with a t-test: p below 5% exactly when the 90% t-interval lies inside the margin.
    mean, half = v.mean(), stats.t.ppf(0.95, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size)
    for margin in (0.03, 0.04, 0.05):
        inside = -margin < mean - half and mean + half < margin
        assert (significance.p_value(v, "within", margin, "t") < 0.05) == inside


def test_permutation_beyond_exact_size_is_a_monte_carlo_estimate_of_the_exact_p():
    rng = np.random.default_rng(3)
    v = rng.normal(0.3, 1.0, size=significance.EXACT_MAX + 2)
    exact = stats.permutation_test(
        (v,), np.mean, permutation_type="samples", alternative="greater", n_resamples=np.inf
    ).pvalue
    estimate = significance.permutation_p(v, 0.0, True)
    assert abs(estimate - exact) < 4 * math.sqrt(exact * (1 - exact) / significance.MONTE_CARLO_DRAWS) + 1e-5


def holm_rejections(p, alpha):
    """Holm (1979) in words: sort ascending; reject while p_(i) <= alpha / (m - i + 1); stop at the first that is not."""
    order = sorted(range(len(p)), key=lambda i: p[i])
    rejected = set()
    for rank, i in enumerate(order):
        if p[i] > alpha / (len(p) - rank):
            break
        rejected.add(i)
    return rejected


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=12), st.sampled_from([0.01, 0.05, 0.1, 0.2]))
def test_holm_adjusted_p_values_reject_what_holms_procedure_rejects(p, alpha):
    adjusted = significance.holm(p)
    assert np.all((adjusted >= np.asarray(p)) & (adjusted <= 1))
    assert {i for i, q in enumerate(adjusted) if q <= alpha} == holm_rejections(p, alpha)


def test_holm_leaves_nan_out_of_the_family():
    adjusted = significance.holm([0.01, math.nan, 0.04])
    assert math.isnan(adjusted[1]) and adjusted[0] == pytest.approx(0.02) and adjusted[2] == pytest.approx(0.04)


def criterion(id, test="t", threshold=0.0, **kw):
    return {
        "id": id,
        "says": id,
        "quantity": id,
        "compare": "greater",
        "threshold": threshold,
        "test": test,
        "fixed": "2026-12-04",
        "reason": "a stated effect size",
        **kw,
    }


def test_judge_decides_the_p_value_criteria_by_holm_over_the_experiment():
    rng = np.random.default_rng(0)
    quantities = {
        "strong": rng.normal(1.0, 0.5, 10),
        "weak": np.array([0.35, -0.2, 0.5, 0.1, 0.3, -0.1, 0.4, 0.2, 0.05, 0.25]),  # t-test p about 0.02
        "counts": np.array([3, 1, 2, 4, 1, 2, 0, 3, 2, 1.0]),
        "seed_values": np.ones(10),
    }
    criteria = protocol.validate(
        [
            criterion("strong"),
            criterion("weak"),
            criterion("counts", test="sign"),
            criterion("seed_values", test="every_seed"),  # not a p-value test: not in the family
            criterion("unmeasured", test="permutation"),  # in the family with p = 1, undecided
        ],
        "test",
    )
    outcomes = protocol.judge(criteria, quantities)
    p = [
        significance.p_value(quantities[k], "greater", 0.0, t)
        for k, t in [("strong", "t"), ("weak", "t"), ("counts", "sign")]
    ]
    p.append(1.0)
    assert p[1] < 0.05  # alone it would hold
    rejected = holm_rejections(p, protocol.FAMILY_ALPHA)
    by_id = {o.criterion["id"]: o for o in outcomes}
    for i, name in enumerate(["strong", "weak", "counts"]):
        assert by_id[name].passed == (i in rejected) and by_id[name].family == 4
        assert by_id[name].p == pytest.approx(p[i])
    assert by_id["unmeasured"].passed is None and by_id["seed_values"].passed is True
    assert by_id["seed_values"].family == 0
    assert "Holm" in by_id["weak"].rule and "Holm p" in by_id["weak"].measured
    assert "of 10 seeds beyond" in by_id["counts"].measured


def test_a_p_value_criterion_must_say_why_its_threshold():
    c = criterion("x")
    del c["reason"]
    with pytest.raises(protocol.CriteriaError, match="reason"):
        protocol.validate([c], "cfg.yaml")
    protocol.validate([{**c, "test": "t95"}], "cfg.yaml")  # the older tests do not need one
