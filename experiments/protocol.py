"""The statistics protocol: criteria written in the config, verdicts computed only from them.

Every config has a `criteria:` block, a list of criteria fixed before the run. A criterion
names a per-seed *quantity* the experiment measures (optionally paired, seed by seed, with
a second one), a comparison, a threshold (the minimum effect) and a test:

    - id: acc                       # unique within the config
      part: A                       # optional: a sub-claim with its own verdict
      says: BN ends with a higher test accuracy than the baseline
      quantity: test_acc/BN         # a name the experiment's `quantities` dict holds
      versus: test_acc/baseline     # optional: paired with this one, seed by seed
      op: difference                # difference (a - b), ratio (a / b), log10_ratio
      compare: greater              # greater, less, within (|value| <= threshold)
      threshold: 0.0                # the minimum effect (the margin for `within`)
      test: t95                     # t95, every_seed, mean; or a Holm-corrected test: t, sign, permutation
      reason: "..."                 # why this threshold (the effect size); required for t, sign, permutation
      fixed: "2026-12-01"           # when this criterion was fixed
      history:                      # earlier versions, kept visible in the report
        - {until: "2026-11-23", was: "...", verdict: confirmed, reason: "..."}

Tests. `t95`: the two-sided 95% Student-t confidence interval of the mean (over the n
seeds, sample SD with ddof=1) lies entirely beyond the threshold (for `within`: entirely
inside [-threshold, threshold]); it needs n >= 2 seeds, else the criterion is undecided.
`every_seed`: every seed's value is beyond the threshold. `mean`: the mean is (for a
deterministic quantity or a single measurement).

Tests with a p-value (`experiments/significance.py`): `t` (one-sided Student t-test of the
mean), `sign` (exact sign test, for discrete or heavy-tailed values), `permutation` (exact
paired sign-flip test of the mean). Their null hypothesis is "the effect is not beyond the
threshold" (for `within`: two one-sided tests). The family is every criterion of the
experiment's config with such a test: their p-values are adjusted by Holm's step-down
method and a criterion holds when its adjusted p-value is at most FAMILY_ALPHA, so the
chance that any criterion of the experiment holds by luck alone is at most 5%. Their
threshold is an effect size, and `reason` says why that size.

The verdict of a set of criteria: *confirmed* when every decided one holds, *not
confirmed* when none does, *mixed* otherwise; undecided criteria are listed and left out.
No experiment code holds a threshold: they all come from here, out of the config.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from experiments import significance

OPS = ("difference", "ratio", "log10_ratio")
COMPARES = ("greater", "less", "within")
TESTS = ("t95", "every_seed", "mean", *significance.P_TESTS)
REQUIRED = ("id", "says", "quantity", "compare", "threshold", "test", "fixed")
OPTIONAL = ("part", "versus", "op", "history", "reason")
FAMILY_ALPHA = 0.05  # familywise error rate of an experiment's Holm-corrected criteria
HISTORY_KEYS = ("until", "was", "verdict", "reason")


class CriteriaError(ValueError):
    """A `criteria:` block that does not follow the protocol."""


def _date(value: Any, where: str) -> str:
    text = value.isoformat() if isinstance(value, datetime.date) else str(value)
    try:
        datetime.date.fromisoformat(text)
    except ValueError:
        raise CriteriaError(f"{where}: must be a date YYYY-MM-DD, got {value!r}.") from None
    return text


def validate(criteria: Any, where: str) -> list[dict]:
    """The `criteria:` block checked and normalized (dates as strings, defaults filled).

    Raises CriteriaError naming the criterion, the key and the fix.
    """
    if not isinstance(criteria, list) or not criteria:
        raise CriteriaError(f"{where}: `criteria` must be a non-empty list of criteria (see experiments/protocol.py).")
    out, seen = [], set()
    for i, c in enumerate(criteria):
        at = f"{where}: criteria[{i}]"
        if not isinstance(c, Mapping):
            raise CriteriaError(f"{at} must be a mapping with keys {', '.join(REQUIRED)}.")
        missing = [k for k in REQUIRED if k not in c]
        if missing:
            raise CriteriaError(f"{at} ({c.get('id', '?')}) lacks {', '.join(missing)}: every criterion states them.")
        unknown = sorted(set(c) - set(REQUIRED) - set(OPTIONAL))
        if unknown:
            raise CriteriaError(
                f"{at} ({c['id']}): unknown key(s) {', '.join(unknown)}; known: {', '.join(REQUIRED + OPTIONAL)}."
            )
        c = dict(c)
        c["id"] = str(c["id"])
        if c["id"] in seen:
            raise CriteriaError(f"{at}: id {c['id']!r} is used twice; give each criterion its own id.")
        seen.add(c["id"])
        c.setdefault("part", "")
        c["part"] = str(c["part"])
        c.setdefault("versus", None)
        c.setdefault("op", "difference" if c["versus"] is not None else None)
        if c["versus"] is not None and c["op"] not in OPS:
            raise CriteriaError(f"{at} ({c['id']}): `op` must be one of {', '.join(OPS)}, got {c['op']!r}.")
        if c["versus"] is None and c["op"] is not None:
            raise CriteriaError(f"{at} ({c['id']}): `op` {c['op']!r} needs a `versus` quantity to pair with.")
        if c["compare"] not in COMPARES:
            raise CriteriaError(
                f"{at} ({c['id']}): `compare` must be one of {', '.join(COMPARES)}, got {c['compare']!r}."
            )
        if c["test"] not in TESTS:
            raise CriteriaError(f"{at} ({c['id']}): `test` must be one of {', '.join(TESTS)}, got {c['test']!r}.")
        if (
            isinstance(c["threshold"], bool)
            or not isinstance(c["threshold"], (int, float))
            or not math.isfinite(c["threshold"])
        ):
            raise CriteriaError(f"{at} ({c['id']}): `threshold` must be a finite number, got {c['threshold']!r}.")
        c["threshold"] = float(c["threshold"])
        c.setdefault("reason", "")
        if c["test"] in significance.P_TESTS and not (isinstance(c["reason"], str) and c["reason"].strip()):
            raise CriteriaError(
                f"{at} ({c['id']}): a `{c['test']}` criterion states `reason`: why its threshold is the effect "
                "size that matters (e.g. several times the seed-to-seed SD, or the test set's sampling error)."
            )
        if c["compare"] == "within" and c["threshold"] < 0:
            raise CriteriaError(f"{at} ({c['id']}): a `within` margin must be >= 0, got {c['threshold']}.")
        c["fixed"] = _date(c["fixed"], f"{at} ({c['id']}).fixed")
        history = c.setdefault("history", [])
        if not isinstance(history, list):
            raise CriteriaError(f"{at} ({c['id']}): `history` must be a list of {{until, was, verdict, reason}}.")
        c["history"] = []
        for j, h in enumerate(history):
            if not isinstance(h, Mapping) or set(h) != set(HISTORY_KEYS):
                raise CriteriaError(
                    f"{at} ({c['id']}).history[{j}] must have exactly the keys {', '.join(HISTORY_KEYS)}."
                )
            c["history"].append({**h, "until": _date(h["until"], f"{at}.history[{j}].until")})
        out.append(c)
    return out


# --------------------------------------------------------------------------- statistics


@dataclasses.dataclass
class Summary:
    """Mean, sample SD (ddof=1), 95% t-interval of the mean, and n, of per-seed values."""

    n: int
    mean: float
    sd: float
    low: float
    high: float


def t_quantile(p: float, df: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(p, df))


def summarize(values: Sequence[float]) -> Summary:
    """Summary of the finite values (a non-finite seed is left out and n says so)."""
    v = np.asarray(values, dtype=float).ravel()
    v = v[np.isfinite(v)]
    n = int(v.size)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(v.mean())
    if n == 1:
        return Summary(1, mean, math.nan, math.nan, math.nan)
    sd = float(v.std(ddof=1))
    half = t_quantile(0.975, n - 1) * sd / math.sqrt(n)
    return Summary(n, mean, sd, mean - half, mean + half)


def paired(a: Sequence[float], b: Sequence[float] | None, op: str | None) -> np.ndarray:
    """Per-seed values of the criterion: a alone, or a op b seed by seed."""
    a = np.asarray(a, dtype=float).ravel()
    if b is None:
        return a
    b = np.asarray(b, dtype=float).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired quantities need one value per seed each: {a.size} vs {b.size} values.")
    with np.errstate(all="ignore"):
        if op == "difference":
            return a - b
        if op == "ratio":
            return a / b
        if op == "log10_ratio":
            return np.log10(a / b)
    raise ValueError(f"`op`={op!r}: use one of {', '.join(OPS)}.")


def decide(values: np.ndarray, compare: str, threshold: float, test: str) -> bool | None:
    """Whether `values` (per seed) pass the criterion; None when the test cannot decide."""
    s = summarize(values)
    n_all = np.asarray(values).size
    if test == "t95":
        if s.n < 2 or not np.isfinite(s.sd):
            return None
        low, high = s.low, s.high
    elif test == "every_seed":
        v = np.asarray(values, dtype=float)
        if v.size == 0:
            return None
        if s.n < n_all:  # a seed without a finite value cannot pass
            return False
        low, high = float(v.min()), float(v.max())
    else:
        if s.n == 0:
            return None
        low = high = s.mean
    if compare == "greater":
        return bool(low > threshold)
    if compare == "less":
        return bool(high < threshold)
    return bool(-threshold <= low and high <= threshold)


# --------------------------------------------------------------------------- judging


@dataclasses.dataclass
class Outcome:
    """One criterion as decided on this run's numbers."""

    criterion: dict
    passed: bool | None
    values: np.ndarray
    summary: Summary
    p: float = math.nan  # the test's p-value (p-value tests only)
    p_holm: float = math.nan  # Holm-adjusted over the experiment's family
    family: int = 0  # number of criteria in that family

    @property
    def mark(self) -> str:
        return {True: "yes", False: "no", None: "undecided"}[self.passed]

    @property
    def rule(self) -> str:
        c = self.criterion
        x = (
            c["quantity"]
            if c["versus"] is None
            else {
                "difference": f"{c['quantity']} − {c['versus']}",
                "ratio": f"{c['quantity']} / {c['versus']}",
                "log10_ratio": f"log10({c['quantity']} / {c['versus']})",
            }[c["op"]]
        )
        what = {
            "t95": "95% t-CI of the mean of",
            "every_seed": "every seed's",
            "mean": "the mean of",
            "t": "one-sided t-test: mean of",
            "sign": "exact sign test: median of",
            "permutation": "exact sign-flip permutation test: mean of",
        }[c["test"]]
        paired_word = " (paired by seed)" if c["versus"] is not None else ""
        t = c["threshold"]
        cmp = {"greater": f"> {t:g}", "less": f"< {t:g}", "within": f"within ±{t:g}"}[c["compare"]]
        holm = ""
        if c["test"] in significance.P_TESTS:
            holm = f", Holm-adjusted p <= {FAMILY_ALPHA:g} over the experiment's {self.family} tested criteria"
        return f"{what} {x}{paired_word} {cmp}{holm}"

    @property
    def measured(self) -> str:
        s = self.summary
        if s.n == 0:
            return "no finite value"
        left = np.asarray(self.values).size - s.n
        lost = f", {left} non-finite seed(s) left out" if left else ""
        if s.n == 1:
            return f"{s.mean:+.4g} (n=1{lost})"
        text = f"mean {s.mean:+.4g}, sd {s.sd:.3g}, 95% CI [{s.low:+.4g}, {s.high:+.4g}], n={s.n}{lost}"
        c = self.criterion
        if c["test"] == "sign":
            v = np.asarray(self.values, dtype=float)
            beyond = {"greater": v > c["threshold"], "less": v < c["threshold"]}.get(
                c["compare"], np.abs(v) < c["threshold"]
            )
            text = f"median {float(np.nanmedian(v)):+.4g}, {int(beyond.sum())} of {v.size} seeds beyond; " + text
        if c["test"] in significance.P_TESTS:
            text += f"; p = {self.p:.3g}, Holm p = {self.p_holm:.3g}"
        return text


def judge(criteria: Sequence[Mapping], quantities: Mapping[str, Sequence[float]]) -> list[Outcome]:
    """Decide every criterion on the per-seed `quantities` the experiment measured.

    A criterion whose quantity the experiment did not measure (e.g. an arm the config
    leaves out) is undecided, never silently true or false.
    """
    out = []
    for c in criteria:
        names = [c["quantity"]] + ([c["versus"]] if c["versus"] is not None else [])
        if any(n not in quantities for n in names):
            out.append(Outcome(dict(c), None, np.asarray([]), summarize([])))
            continue
        values = paired(quantities[c["quantity"]], quantities.get(c["versus"]) if c["versus"] else None, c["op"])
        if c["test"] in significance.P_TESTS:
            p = significance.p_value(values, c["compare"], c["threshold"], c["test"])
            out.append(Outcome(dict(c), None, values, summarize(values), p=p))
        else:
            out.append(
                Outcome(dict(c), decide(values, c["compare"], c["threshold"], c["test"]), values, summarize(values))
            )
    return _holm_decisions(out)


def _holm_decisions(outcomes: list[Outcome]) -> list[Outcome]:
    """The p-value criteria decided together: Holm-adjusted over the experiment's family.

    The family is every criterion with a p-value test, measured or not; a criterion whose
    quantity is missing or whose p-value cannot be computed counts with p = 1 (it can only
    make the others harder to pass) and is itself undecided."""
    family = [o for o in outcomes if o.criterion["test"] in significance.P_TESTS]
    p = [o.p if np.isfinite(o.p) else 1.0 for o in family]
    adjusted = significance.holm(p) if family else []
    for o, q in zip(family, adjusted):
        o.p_holm, o.family = float(q), len(family)
        o.passed = bool(q <= FAMILY_ALPHA) if np.isfinite(o.p) else None
    return outcomes


CONFIRMED, NOT_CONFIRMED, MIXED = "confirmed", "not confirmed", "mixed"


def verdict(outcomes: Sequence[Outcome]) -> str:
    """confirmed / not confirmed / mixed from the decided outcomes."""
    decided = [o.passed for o in outcomes if o.passed is not None]
    if not decided:
        return "undecided"
    result = CONFIRMED if all(decided) else NOT_CONFIRMED if not any(decided) else MIXED
    left = len(outcomes) - len(decided)
    if left:
        result += f" ({left} of {len(outcomes)} criteria undecided)"
    return result


def verdicts_by_part(outcomes: Sequence[Outcome]) -> dict[str, str]:
    parts = list(dict.fromkeys(o.criterion["part"] for o in outcomes if o.criterion["part"]))
    return {p: verdict([o for o in outcomes if o.criterion["part"] == p]) for p in parts}


def quantity_rows(quantities: Mapping[str, Sequence[float]], seeds: Sequence[int] | None = None) -> list[dict]:
    """Rows (quantity, seed index, seed, value) of every per-seed quantity, for quantities.csv."""
    rows = []
    for name, values in quantities.items():
        v = np.asarray(values, dtype=float).ravel()
        for i, x in enumerate(v):
            seed = seeds[i] if seeds is not None and len(seeds) == v.size else ""
            rows.append({"quantity": name, "index": i, "seed": seed, "value": float(x)})
    return rows
