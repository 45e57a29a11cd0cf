"""The experiment suite: every experiment end to end at a tiny size, config validation,
the CLI, the offline data loaders, batch orders, the training loop and the verdict rule."""

from __future__ import annotations

import csv
import random
import re

import numpy as np
import pytest
import yaml

from experiments import cli, data, external, features, protocol, registry, report, significance
from experiments import config as cfg

NAMES = [e.name for e in registry.EXPERIMENTS]


# ------------------------------------------------------------------ end to end, tiny


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(
            n, marks=pytest.mark.peer_not_strict("optax's optimizer multiplies a Python float by its int32 step")
        )
        if n == "sync_bn"
        else n
        for n in NAMES
    ],
)
def test_experiment_runs_end_to_end_at_tiny_size(name, tmp_path):
    result = cli.run_experiment(registry.config_path(name), tiny=True, runs_dir=tmp_path)
    out = tmp_path / name
    # config.yaml is the resolved config: the file's values with the tiny settings applied.
    module = registry.load_module(name)
    tiny = getattr(module, "TINY", None) or external.TINY[name]
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert set(resolved) == set(module.DEFAULTS) | {"criteria"}
    for key, value in tiny.items():
        assert resolved[key] == value
    # metrics.csv has a header and rows; every PNG is a real PNG; summary.md has a verdict.
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert len(rows) > 1 and len(rows[0]) > 1
    pngs = sorted(out.glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    summary = (out / "summary.md").read_text()
    assert "## Verdict: " in summary and "| id | criterion | rule | fixed | measured | holds |" in summary
    assert result["verdict"].split(" (")[0] in summary
    assert result["figures"] and result["summary"] == str(out / "summary.md")
    # Every criterion of the config is in the summary, and the per-seed values it was decided on in quantities.csv.
    criteria = resolved["criteria"]
    assert criteria and len(result["checks"]) == len(criteria)
    for c in criteria:
        assert f"| {c['part'] + ': ' if c['part'] else ''}{c['id']} |" in summary
    with open(out / "quantities.csv", newline="") as f:
        quantities = {r["quantity"] for r in csv.DictReader(f)}
    assert quantities


def test_waiting_arm_reports_a_marker_never_a_number(tmp_path, monkeypatch):
    """An arm whose jbn feature is missing is not run: metrics.csv says so, and its criteria are undecided."""
    label, _ = features.FEATURES["renorm"]
    monkeypatch.setitem(features.FEATURES, "renorm", (label, lambda: False))
    cli.run_experiment(
        registry.config_path("small_batches"), ["norms=[bn, renorm]", "ghost_seeds=[0]"], tiny=True, runs_dir=tmp_path
    )
    out = tmp_path / "small_batches"
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    waiting = [r for r in rows if r.get("norm") == "renorm"]
    assert waiting and all(r["status"] == "waiting for jbn.BatchRenorm" and r["value"] == "" for r in waiting)
    assert all(r["status"] == "ok" for r in rows if r.get("norm") == "bn")
    summary = (out / "summary.md").read_text()
    line = next(row for row in summary.splitlines() if row.startswith("| A: renorm_less |"))
    assert line.endswith("| no finite value | undecided |")


# ---------------------------------------------------------------- config validation


@pytest.fixture
def defaults():
    return {"steps": 100, "learning_rate": 0.1, "seeds": [0, 1], "name": "bn", "progress": True, "nested": {"depth": 2}}


def write(tmp_path, text):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_config_fills_defaults_and_accepts_ints_and_exponents_for_floats(tmp_path, defaults):
    path = write(tmp_path, "steps: 5\nlearning_rate: 1e-3\nnested: {depth: 4}\n")
    c = cfg.load(path, defaults)
    assert c == {
        "steps": 5,
        "learning_rate": 0.001,
        "seeds": [0, 1],
        "name": "bn",
        "progress": True,
        "nested": {"depth": 4},
    }
    assert cfg.load(write(tmp_path, "learning_rate: 1\n"), defaults)["learning_rate"] == 1.0
    assert cfg.load(write(tmp_path, ""), defaults) == defaults


@pytest.mark.parametrize(
    "text, key",
    [
        ("stepz: 5\n", "stepz"),
        ("nested: {dept: 3}\n", "nested.dept"),
    ],
)
def test_unknown_key_names_the_key_and_the_file(tmp_path, defaults, text, key):
    path = write(tmp_path, text)
    with pytest.raises(cfg.ConfigError) as e:
        cfg.load(path, defaults)
    assert f"unknown key '{key}'" in str(e.value) and str(path) in str(e.value)


def test_unknown_key_suggests_the_close_one(tmp_path, defaults):
    with pytest.raises(cfg.ConfigError, match="Did you mean 'steps'"):
        cfg.load(write(tmp_path, "stepz: 5\n"), defaults)


@pytest.mark.parametrize(
    "text, key",
    [
        ("steps: many\n", "steps"),
        ("steps: 2.5\n", "steps"),
        ("steps: true\n", "steps"),
        ("learning_rate: fast\n", "learning_rate"),
        ("seeds: 3\n", "seeds"),
        ("seeds: [0, x]\n", "seeds[1]"),
        ("name: 3\n", "name"),
        ("progress: 1\n", "progress"),
        ("nested: 3\n", "nested"),
        ("nested: {depth: deep}\n", "nested.depth"),
    ],
)
def test_wrong_type_names_the_key_and_the_file(tmp_path, defaults, text, key):
    path = write(tmp_path, text)
    with pytest.raises(cfg.ConfigError) as e:
        cfg.load(path, defaults)
    message = str(e.value)
    assert f"key '{key}' must be" in message and str(path) in message


def test_a_config_that_is_not_a_mapping_is_rejected(tmp_path, defaults):
    path = write(tmp_path, "- steps\n- 5\n")
    with pytest.raises(cfg.ConfigError, match="must be a mapping") as e:
        cfg.load(path, defaults)
    assert str(path) in str(e.value)


def test_invalid_yaml_and_missing_file_name_the_file(tmp_path, defaults):
    path = write(tmp_path, "steps: [1, 2\n")
    with pytest.raises(cfg.ConfigError, match="not valid YAML") as e:
        cfg.load(path, defaults)
    assert str(path) in str(e.value)
    with pytest.raises(cfg.ConfigError, match="cannot read"):
        cfg.load(tmp_path / "missing.yaml", defaults)


def test_overrides_are_checked_like_the_file(tmp_path, defaults):
    path = write(tmp_path, "steps: 5\n")
    c = cfg.load(path, defaults, ["steps=7", "seeds=[3]", "nested.depth=9", "learning_rate=2e-2"])
    assert c["steps"] == 7 and c["seeds"] == [3] and c["nested"] == {"depth": 9} and c["learning_rate"] == 0.02
    with pytest.raises(cfg.ConfigError, match=r"--override stepz=3: unknown key 'stepz'"):
        cfg.load(path, defaults, ["stepz=3"])
    with pytest.raises(cfg.ConfigError, match=r"--override steps=lots: key 'steps' must be an integer"):
        cfg.load(path, defaults, ["steps=lots"])
    with pytest.raises(cfg.ConfigError, match="key=value"):
        cfg.load(path, defaults, ["steps"])


def test_cli_reports_a_bad_config_with_exit_code_2(tmp_path, capsys):
    bad = tmp_path / "ioffe_fig1.yaml"  # the file name picks the experiment
    bad.write_text("steps: 10\nlearning_rat: 0.1\n")
    assert cli.main(["run", str(bad), "--runs-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'learning_rat'" in err and str(bad) in err and "Did you mean 'learning_rate'" in err
    assert cli.main(["run", str(tmp_path / "no_such_experiment.yaml")]) == 2
    assert "no experiment 'no_such_experiment'" in capsys.readouterr().err


@pytest.mark.parametrize("name", NAMES)
def test_committed_configs_are_the_defaults(name):
    """Each configs/NAME.yaml is valid, spells out its experiment's default config, and has criteria."""
    module = registry.load_module(name)
    loaded = cfg.load(registry.config_path(name), module.DEFAULTS)
    criteria = loaded.pop("criteria")
    assert loaded == module.DEFAULTS
    assert criteria and all(c["fixed"] for c in criteria)


def test_list_shows_every_experiment(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for e in registry.EXPERIMENTS:
        assert f"{e.number:>2}  {e.name}" in out and f"configs/{e.name}.yaml" in out


# ------------------------------------------------------------------------------ data


def test_mnist1d_is_generated_offline_and_leaves_global_random_state(monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("the MNIST-1D loader tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr("requests.get", no_network)
    data._mnist1d_arrays.cache_clear()
    np.random.seed(123)
    random.seed(123)
    np_before, py_before = np.random.get_state()[1].copy(), random.getstate()
    d = data.mnist1d()
    assert np.array_equal(np.random.get_state()[1], np_before) and random.getstate() == py_before
    assert d.x_train.shape == (4000, 40) and d.x_test.shape == (1000, 40) and d.x_train.dtype == np.float32
    assert set(np.unique(d.y_train)) == set(range(10))
    assert data.mnist1d("sequence").x_train.shape == (4000, 40, 1)


def test_mnist1d_splits_are_make_datasets_examples_disjoint_and_cached(tmp_path, monkeypatch):
    from mnist1d.data import get_dataset_args, make_dataset

    monkeypatch.setattr(data, "CACHE_DIR", tmp_path)
    np.random.seed(5)
    np_before = np.random.get_state()[1].copy()
    splits = data.mnist1d_splits(200, 50, 50, seed=3)
    assert np.array_equal(np.random.get_state()[1], np_before)
    args = get_dataset_args()
    args.num_samples, args.seed = 300, 3
    made = make_dataset(args)
    x, y = np.concatenate([made["x"], made["x_test"]]), np.concatenate([made["y"], made["y_test"]])
    tuning, final = splits
    np.testing.assert_array_equal(tuning.x_train, x[:200].astype(np.float32))
    np.testing.assert_array_equal(tuning.x_test, x[200:250].astype(np.float32))
    np.testing.assert_array_equal(final.x_test, x[250:].astype(np.float32))
    np.testing.assert_array_equal(final.y_test, y[250:])
    np.testing.assert_array_equal(final.x_train, tuning.x_train)  # the test split trains on the same examples
    # Disjoint: no validation or test example is a training example.
    seen = {row.tobytes() for row in tuning.x_train}
    assert not any(row.tobytes() in seen for row in np.concatenate([tuning.x_test, final.x_test]))
    # The second call reads the cached file instead of generating again.
    assert list(tmp_path.glob("*.npz"))
    monkeypatch.setattr("mnist1d.data.make_dataset", lambda *a, **k: pytest.fail("generated twice"))
    again = data.mnist1d_splits(200, 50, 50, seed=3, layout="sequence")
    np.testing.assert_array_equal(again.final.x_test[..., 0], final.x_test)
    with pytest.raises(ValueError, match="every split needs"):
        data.mnist1d_splits(200, 0, 50)


def test_digits_flat_and_image_layouts_hold_sklearns_pixels():
    from sklearn.datasets import load_digits

    ref = load_digits()
    flat, image = data.digits("flat"), data.digits("image")
    assert flat.x_train.shape == (1438, 64) and flat.x_test.shape == (359, 64)
    assert image.x_train.shape == (1438, 8, 8, 1)
    np.testing.assert_array_equal(flat.x_train, image.x_train.reshape(1438, 64))
    # Every split example is one of sklearn's images scaled to [0, 1], with its label.
    lookup = {row.tobytes(): label for row, label in zip((ref.data / 16.0).astype(np.float32), ref.target)}
    for x, y in zip(flat.x_test, flat.y_test):
        assert lookup[x.tobytes()] == y


def test_batch_orders():
    labels = np.repeat(np.arange(5), 8)  # 40 examples, 5 classes
    shuffled = data.batch_indices(labels, 4, 20, seed=0, order="shuffle")  # 2 epochs
    assert shuffled.shape == (20, 4)
    first, second = shuffled[:10].ravel(), shuffled[10:].ravel()
    assert sorted(first) == list(range(40)) and sorted(second) == list(range(40)) and not np.array_equal(first, second)
    fixed = data.batch_indices(labels, 4, 20, seed=0, order="fixed")
    np.testing.assert_array_equal(fixed[:10], fixed[10:])
    assert not np.array_equal(data.batch_indices(labels, 4, 20, seed=1, order="shuffle"), shuffled)
    grouped = data.batch_indices(labels, 4, 30, seed=0, order="class_grouped", classes_per_batch=2)
    assert all(len(set(labels[b])) == 2 and np.bincount(labels[b]).max() == 2 for b in grouped)
    with pytest.raises(ValueError, match="classes_per_batch"):
        data.batch_indices(labels, 5, 3, seed=0, order="class_grouped", classes_per_batch=2)


# --------------------------------------------------------------------- training loop


def test_fit_is_deterministic_and_the_same_vmapped_or_one_by_one():
    from experiments.models import MLP, NormSpec
    from experiments.training import fit, make_optimizer

    d = data.synthetic(num_train=64, num_test=32, dim=8, num_classes=3)
    model = MLP((8,), 3, norm=NormSpec("bn"))
    kw = dict(seeds=[0, 1], steps=6, batch_size=8, eval_every=3, progress=False)
    a = fit(model, make_optimizer("momentum", 0.1), d, **kw)
    b = fit(model, make_optimizer("momentum", 0.1), d, **kw)
    c = fit(model, make_optimizer("momentum", 0.1), d, vmap_seeds=False, scan_steps=False, **kw)
    for name in ("train_loss", "test_loss", "test_accuracy"):
        np.testing.assert_array_equal(a.series[name], b.series[name])
        np.testing.assert_allclose(a.series[name], c.series[name], rtol=1e-4, atol=1e-5)
    assert list(a.steps) == [0, 3, 6] and a.seeds == c.seeds == [0, 1]
    assert not np.allclose(a.series["test_loss"][-1, 0], a.series["test_loss"][-1, 1])  # seeds differ


# --------------------------------------------------------------------- verdict rule


def test_fmt_seeds_says_which_seeds_are_left_out():
    nan = float("nan")
    assert report.fmt_seeds([0.5, 0.7]) == "0.600 ± 0.141"  # sample SD (ddof=1): 0.2 / sqrt(2)
    assert report.fmt_seeds([600, nan, 600], 0, missing="never reached") == "600 ± 0 (2 of 3 seeds; 1 never reached)"
    assert report.fmt_seeds([600, nan, nan], 0, missing="never reached") == "600 (1 of 3 seeds; 2 never reached)"
    assert report.fmt_seeds([nan, nan], 0, missing="never reached") == "none of 2 seeds (2 never reached)"
    assert report.fmt_seeds([nan, 1.0]) == "1.000 (1 of 2 seeds; 1 non-finite)"


def test_sync_bn_report_judges_the_configs_criteria_paired_by_seed(tmp_path):
    """Experiment 10's report: sync vs local, seed by seed, by the committed config's criteria."""
    numbers = {"global_batch": 16}
    for style in ("shard_map", "pmap"):
        # test accuracy: sync - local = +0.01, -0.01, +0.03 per seed: mean +0.01, CI straddles 0
        numbers[f"{style}_sync_test_accuracy"] = [0.96, 0.97, 0.98]
        numbers[f"{style}_local_test_accuracy"] = [0.95, 0.98, 0.95]
        numbers[f"{style}_sync_late_loss"] = [0.10, 0.11, 0.12]
        numbers[f"{style}_local_late_loss"] = [0.50, 0.52, 0.51]  # local - sync = 0.40, 0.41, 0.39
        for sync in ("sync", "local"):
            numbers[f"{style}_{sync}_final_loss"] = [0.1, 0.1, 0.1]
    runs = [f"{style}_{sync}" for style in ("shard_map", "pmap") for sync in ("sync", "local")]
    result = {
        "devices": 8,
        "seeds": [0, 1, 2],
        "per_device_batch": [2],
        "by_batch": {2: numbers},
        "rates": {2: dict.fromkeys(runs, 0.01)},
        "tuning": {2: {name: {0.005: [0.9], 0.01: [0.95]} for name in runs}},
    }
    committed = cfg.load(registry.config_path("sync_bn"), registry.load_module("sync_bn").DEFAULTS)
    config = {**committed, "criteria": [c for c in committed["criteria"] if "b2_" in c["id"]]}
    out = external.sync_bn(config, result, tmp_path)
    passed = {c["id"]: c["passed"] for c in out["checks"]}
    assert passed == {"acc_b2_shard_map": False, "loss_b2_shard_map": True, "acc_b2_pmap": False, "loss_b2_pmap": True}
    assert out["verdict"].startswith("mixed")
    with open(tmp_path / "quantities.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["quantity"] == "test_acc/b2/pmap/local"]
    assert [float(r["value"]) for r in rows] == [0.95, 0.98, 0.95] and [r["seed"] for r in rows] == ["0", "1", "2"]


# ------------------------------------------------------------------ statistics protocol


@pytest.mark.parametrize("n", range(1, 61))
def test_median_interval_is_the_widest_order_statistic_pair_with_95_percent_coverage(n):
    """significance.median_interval against scipy's binomial distribution: (x_(k), x_(n+1-k))
    covers the median with probability 1 - 2 P(B <= k - 1), B ~ Binomial(n, 1/2); k is the
    largest rank for which that is at least 95% (nan where no k is: n < 6)."""
    from scipy import stats

    values = np.random.default_rng(n).standard_cauchy(n)  # heavy-tailed: no moment assumption
    low, high = significance.median_interval(values)
    ranks = [k for k in range(1, n // 2 + 1) if 1 - 2 * stats.binom.cdf(k - 1, n, 0.5) >= 0.95]
    if not ranks:
        assert np.isnan(low) and np.isnan(high)
        return
    k, ordered = max(ranks), np.sort(values)
    assert (low, high) == (ordered[k - 1], ordered[n - k])
    if n in (10, 30):  # the textbook ranks: (2, 9) for 10, (10, 21) for 30
        assert k == {10: 2, 30: 10}[n]


def criterion(**kw):
    base = {
        "id": "c",
        "says": "a beats b",
        "quantity": "a",
        "compare": "greater",
        "threshold": 0.0,
        "test": "t95",
        "fixed": "2026-12-01",
    }
    return protocol.validate([{**base, **kw}], "test")[0]


def test_t_interval_matches_scipy_and_the_hand_formula():
    from scipy import stats

    rng = np.random.default_rng(0)
    for n in (2, 3, 10, 30):
        v = rng.normal(0.3, 0.2, size=n)
        s = protocol.summarize(v)
        mean, sd = v.sum() / n, np.sqrt(((v - v.sum() / n) ** 2).sum() / (n - 1))
        assert s.n == n and np.isclose(s.mean, mean) and np.isclose(s.sd, sd)
        low, high = stats.t.interval(0.95, n - 1, loc=mean, scale=sd / np.sqrt(n))
        assert np.isclose(s.low, low) and np.isclose(s.high, high)
    # The 97.5% quantile of Student's t with 9 degrees of freedom (printed tables: 2.262).
    assert abs(protocol.t_quantile(0.975, 9) - 2.262) < 5e-4


def test_paired_difference_is_taken_seed_by_seed():
    a, b = np.array([0.70, 0.60, 0.80, 0.75]), np.array([0.65, 0.56, 0.77, 0.70])
    # Unpaired, the arms overlap; paired, every seed gains 0.03-0.05.
    o = protocol.judge([criterion(quantity="a", versus="b")], {"a": a, "b": b})[0]
    np.testing.assert_allclose(o.values, a - b)
    assert o.passed is True and o.summary.n == 4
    from scipy import stats

    assert np.isclose(stats.ttest_rel(a, b).pvalue < 0.05, o.summary.low > 0)
    ratio = protocol.judge([criterion(quantity="a", versus="b", op="ratio", threshold=1.0)], {"a": a, "b": b})[0]
    np.testing.assert_allclose(ratio.values, a / b)
    log = protocol.judge([criterion(quantity="a", versus="b", op="log10_ratio")], {"a": a, "b": b})[0]
    np.testing.assert_allclose(log.values, np.log10(a / b))


@pytest.mark.parametrize(
    "values, compare, threshold, test, expected",
    [
        ([0.1, 0.2, 0.3], "greater", 0.0, "t95", False),  # mean 0.2, sd 0.1, half-width 4.303 * 0.1 / sqrt(3) = 0.248
        ([0.19, 0.2, 0.21], "greater", 0.1, "t95", True),
        ([0.19, 0.2, 0.21], "greater", 0.2, "t95", False),
        ([0.19, 0.2, 0.21], "less", 0.3, "t95", True),
        ([0.001, -0.002, 0.001], "within", 0.01, "t95", True),
        ([0.001, -0.002, 0.03], "within", 0.01, "t95", False),
        ([0.4, 0.45, 0.3], "less", 0.5, "every_seed", True),
        ([0.4, 0.55, 0.3], "less", 0.5, "every_seed", False),
        ([0.4, np.inf, 0.3], "less", 0.5, "every_seed", False),  # a seed that never got there fails
        ([2.0], "greater", 1.0, "mean", True),
        ([0.5], "greater", 0.0, "t95", None),  # one seed: no interval, undecided
    ],
)
def test_decide(values, compare, threshold, test, expected):
    assert protocol.decide(np.asarray(values), compare, threshold, test) is expected


def test_verdict_is_computed_from_the_criteria_only():
    crits = protocol.validate(
        [
            {
                "id": "x",
                "part": "A",
                "says": "x",
                "quantity": "x",
                "compare": "greater",
                "threshold": 0.0,
                "test": "t95",
                "fixed": "2026-12-01",
            },
            {
                "id": "y",
                "part": "B",
                "says": "y",
                "quantity": "y",
                "compare": "greater",
                "threshold": 0.0,
                "test": "t95",
                "fixed": "2026-12-01",
            },
            {
                "id": "z",
                "part": "B",
                "says": "z",
                "quantity": "missing",
                "compare": "less",
                "threshold": 0.0,
                "test": "t95",
                "fixed": "2026-12-01",
            },
        ],
        "test",
    )
    q = {"x": [1.0, 1.1, 0.9], "y": [-1.0, -1.1, -0.9]}
    outcomes = protocol.judge(crits, q)
    assert [o.passed for o in outcomes] == [True, False, None]
    assert protocol.verdict(outcomes) == "mixed (1 of 3 criteria undecided)"
    assert protocol.verdicts_by_part(outcomes) == {"A": "confirmed", "B": "not confirmed (1 of 2 criteria undecided)"}
    assert protocol.verdict(outcomes[:1]) == "confirmed" and protocol.verdict(outcomes[1:2]) == "not confirmed"
    assert protocol.verdict(outcomes[2:]) == "undecided"
    # The threshold is the config's: the same numbers with a higher bar flip the verdict.
    raised = protocol.validate([{**crits[0], "threshold": 2.0}], "test")
    assert protocol.verdict(protocol.judge(raised, q)) == "not confirmed"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"compare": "bigger"}, "`compare` must be one of"),
        ({"test": "z"}, "`test` must be one of"),
        ({"threshold": "high"}, "`threshold` must be a finite number"),
        ({"fixed": "yesterday"}, "must be a date YYYY-MM-DD"),
        ({"op": "ratio"}, "needs a `versus`"),
        ({"versus": "b", "op": "sum"}, "`op` must be one of"),
        ({"history": [{"until": "2026-11-23", "was": "x"}]}, "exactly the keys until, was, verdict, reason"),
        ({"treshold": 1.0}, "unknown key(s) treshold"),
    ],
)
def test_bad_criteria_name_the_criterion_and_the_fix(change, message):
    with pytest.raises(protocol.CriteriaError, match=re.escape(message)):
        criterion(**change)


def test_missing_key_and_duplicate_id_are_rejected():
    good = {
        "id": "c",
        "says": "s",
        "quantity": "a",
        "compare": "greater",
        "threshold": 0.0,
        "test": "t95",
        "fixed": "2026-12-01",
    }
    with pytest.raises(protocol.CriteriaError, match="lacks fixed"):
        protocol.validate([{k: v for k, v in good.items() if k != "fixed"}], "test")
    with pytest.raises(protocol.CriteriaError, match="used twice"):
        protocol.validate([good, good], "test")


def test_criteria_cannot_be_overridden_and_a_config_needs_them(tmp_path):
    with pytest.raises(cfg.ConfigError, match="cannot be overridden"):
        cli.resolve(registry.config_path("ioffe_fig1"), ["criteria=[]"])
    bare = tmp_path / "ioffe_fig1.yaml"
    bare.write_text("steps: 10\n")
    with pytest.raises(cfg.ConfigError, match="no `criteria:` block"):
        cli.resolve(bare)


def test_summary_keeps_an_old_verdict_beside_the_new_one(tmp_path):
    crits = protocol.validate(
        [
            {
                "id": "acc",
                "says": "BN is better",
                "quantity": "a",
                "versus": "b",
                "compare": "greater",
                "threshold": 0.0,
                "test": "t95",
                "fixed": "2026-12-01",
                "history": [
                    {
                        "until": "2026-11-23",
                        "was": "mean gap > summed SDs",
                        "verdict": "confirmed",
                        "reason": "loosened",
                    }
                ],
            }
        ],
        "test",
    )
    outcomes = protocol.judge(crits, {"a": [0.5, 0.6, 0.4], "b": [0.5, 0.5, 0.5]})
    path, v = report.write_summary(
        tmp_path,
        title="t",
        claim="c",
        setup="s",
        table="",
        outcomes=outcomes,
        figures=[],
        quantities={"a": [0.5, 0.6, 0.4], "b": [0.5, 0.5, 0.5]},
        seeds=[0, 1, 2],
    )
    text = path.read_text()
    assert v == "not confirmed"
    assert '**acc** (until 2026-11-23): was "mean gap > summed SDs", verdict then **confirmed**' in text
    assert "Now (fixed 2026-12-01): no." in text
    assert "| acc | BN is better | 95% t-CI of the mean of a − b (paired by seed) > 0 | 2026-12-01 |" in text


def test_every_committed_config_states_its_criteria_with_dates():
    for e in registry.EXPERIMENTS:
        module = registry.load_module(e.name)
        config = cfg.load(registry.config_path(e.name), module.DEFAULTS)
        assert config["criteria"], e.name
        # No criterion setting is left in DEFAULTS: thresholds live in the criteria block only.
        for key in module.DEFAULTS:
            assert not any(w in key for w in ("margin", "tolerance", "factor", "threshold")), (e.name, key)


def test_every_committed_config_is_one_holm_family_with_effect_sizes():
    # Each config's criteria are decided together by Holm's correction: every criterion has a
    # p-value test and says in `reason` why its threshold is the effect size it is. The one
    # exception is a per-seed direction check of experiment 8 (every seed, no p-value).
    exceptions = {("dropout_variance", "direction")}
    for e in registry.EXPERIMENTS:
        module = registry.load_module(e.name)
        for c in cfg.load(registry.config_path(e.name), module.DEFAULTS)["criteria"]:
            if (e.name, c["id"]) in exceptions:
                continue
            assert c["test"] in significance.P_TESTS, (e.name, c["id"], c["test"])
            assert c["reason"].strip(), (e.name, c["id"])


def test_reproducibility_report_gives_the_drift_of_each_criterion(tmp_path):
    from experiments import reproducibility

    def write_run(folder, bn_acc):
        (folder / "ioffe_fig1").mkdir(parents=True)
        q = {
            "test_acc/BN": bn_acc,
            "test_acc/baseline": [0.45, 0.46, 0.47],
            "reach_fraction/BN": [0.1, 0.2, 0.1],
            "drift/BN": [0.3, 0.3, 0.3],
            "drift/baseline": [0.8, 0.8, 0.8],
        }
        report.write_rows(folder / "ioffe_fig1" / "quantities.csv", protocol.quantity_rows(q, [0, 1, 2]))

    write_run(tmp_path / "a", [0.65, 0.66, 0.67])
    write_run(tmp_path / "b", [0.44, 0.47, 0.49])  # paired gain -0.01, +0.01, +0.02: no longer clear of 0
    table, rows = reproducibility.compare(tmp_path / "a", tmp_path / "b")
    acc = next(r for r in rows if r["experiment"] == "ioffe_fig1" and r["criterion"] == "accuracy")
    assert np.isclose(acc["mean_a"], 0.20) and np.isclose(acc["mean_b"], 0.00666666, atol=1e-6)
    assert np.isclose(acc["drift"], acc["mean_b"] - acc["mean_a"])
    assert acc["holds_a"] == "yes" and acc["holds_b"] == "no" and "yes -> no **(flips)**" in table
    assert "| 2 | learning_rates | not rerun |" in table
    # the command line writes the same table under the title and what differs between the runs
    out = tmp_path / "report.md"
    note = "Run B: the same seeds on another machine."
    assert reproducibility.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), "--note", note]) == 0
    text = out.read_text()
    assert text.index(note) < text.index("1 change their outcome") < text.index("yes -> no **(flips)**")


def test_init_and_order_seed_offset_moves_every_judged_seed_and_nothing_else():
    from experiments import run_all

    assert run_all.seed_overrides("bn_benefit", 0) == []
    for name, moved, kept in (
        ("bn_benefit", ["seeds"], ["tuning_seeds", "data_seed"]),
        ("batch_order", ["order_seeds", "init_seed"], []),
        ("init_scale", ["seeds", "draw_order_seed"], []),
        ("small_batches", ["seeds", "ghost_seeds"], []),
        ("sync_bn", ["seeds"], ["split_seed", "tuning_seeds"]),
    ):
        _, _, base = cli.resolve(registry.config_path(name))
        _, _, rerun = cli.resolve(registry.config_path(name), run_all.seed_overrides(name, 1000))
        for key in moved:
            want = [v + 1000 for v in base[key]] if isinstance(base[key], list) else base[key] + 1000
            assert rerun[key] == want, (name, key)
        for key in kept:
            assert rerun[key] == base[key], (name, key)
        assert {k: v for k, v in rerun.items() if k not in moved} == {k: v for k, v in base.items() if k not in moved}


def test_reproducibility_report_says_which_seeds_each_run_judged(tmp_path):
    from experiments import reproducibility

    for folder, seeds in (("a", [0, 1, 2]), ("b", [1000, 1001, 1002]), ("c", [0, 1, 2])):
        (tmp_path / folder / "ioffe_fig1").mkdir(parents=True)
        (tmp_path / folder / "ioffe_fig1" / "config.yaml").write_text(yaml.safe_dump({"seeds": seeds, "steps": 5}))
        (tmp_path / folder / "ioffe_fig1" / "quantities.csv").write_text("quantity,seed,value\n")
    (line,) = reproducibility.seed_lines(tmp_path / "a", tmp_path / "b")
    assert "1 ioffe_fig1: new initializations and data orders" in line and "[1000, 1001, 1002]" in line
    (line,) = reproducibility.seed_lines(tmp_path / "a", tmp_path / "c")
    assert "the same judged seeds (only the data order can differ)" in line


def test_at_least_sixteen_experiments_are_listed(capsys):
    assert cli.main(["list"]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines()[1:] if "configs/" in line]
    assert len(listed) >= 16


def test_tuning_chooses_the_rate_with_the_best_mean_validation_accuracy():
    from experiments.tuning import choose_rate

    assert choose_rate({0.01: np.array([0.5, 0.6]), 0.1: np.array([0.7, 0.6]), 1.0: np.array([0.9, np.nan])}) == 0.1
    assert choose_rate({0.3: np.array([0.6]), 0.03: np.array([0.6])}) == 0.03  # a tie goes to the smaller rate


@pytest.mark.parametrize("placement, dropped_layers", [("before_last", [2]), ("last", []), ("each", [1, 2])])
def test_mlp_dropout_placement_puts_dropout_on_the_inputs_it_names(placement, dropped_layers):
    """Which hidden layers' inputs dropout changes: "before_last" only the last hidden layer's
    (one dropout layer, as many as "last", which changes only the classifier's input)."""
    import jax

    from experiments.models import MLP

    model = MLP((16, 16, 16), 10, dropout=0.5, dropout_placement=placement)
    x = np.random.default_rng(0).normal(size=(32, 8)).astype(np.float32)
    params = model.init(jax.random.PRNGKey(0), x)

    def apply(dropout):
        logits, inter = model.apply(
            params, x, train=True, dropout=dropout, rngs={"dropout": jax.random.PRNGKey(1)}, mutable=["intermediates"]
        )
        return logits, inter["intermediates"]

    with_dropout, plain = apply(True), apply(False)
    for i in range(3):
        same = np.allclose(with_dropout[1][f"norm_input_{i}"][0], plain[1][f"norm_input_{i}"][0])
        assert same == (i not in dropped_layers), i
    assert not np.allclose(with_dropout[0], plain[0])  # some dropout reaches the logits in every placement


def test_validation_split_holds_out_the_last_training_examples():
    d = data.digits("image")
    tuning, final = data.validation_split(d, 288)
    np.testing.assert_array_equal(tuning.x_test, d.x_train[-288:])
    np.testing.assert_array_equal(tuning.x_train, d.x_train[:-288])
    np.testing.assert_array_equal(final.x_train, tuning.x_train)
    np.testing.assert_array_equal(final.x_test, d.x_test)
    with pytest.raises(ValueError, match="num_val"):
        data.validation_split(d, len(d.y_train))


def test_experiment_zero_report_says_what_its_committed_per_seed_values_give():
    """Experiment zero's committed criteria, decided afresh on its committed per-seed values,
    give the marks and the verdict its summary and the report's section state, and the
    report's paired interval is the one those values give."""
    from experiments import reproducibility

    folder = registry.ROOT / "experiments" / "results" / "bn_benefit"
    quantities = reproducibility.read_quantities(folder / "quantities.csv")
    config = cfg.load(registry.config_path("bn_benefit"), registry.load_module("bn_benefit").DEFAULTS)
    outcomes = protocol.judge(config["criteria"], quantities)
    verdict = protocol.verdict(outcomes)
    summary = (folder / "summary.md").read_text()
    readme = (registry.ROOT / "experiments" / "README.md").read_text()
    section = readme[readme.index("## 0. ") : readme.index("## 1. ")]
    assert f"## Verdict: {verdict}" in summary and f"**Verdict: {verdict}.**" in section
    assert re.search(rf"^\| 0 \| \[bn_benefit\].*\| \*\*{verdict}\*\*", readme, re.M)
    for o in outcomes:
        assert re.search(rf"^\| {o.criterion['id']} \|.*\| {o.mark} \|$", summary, re.M), o.criterion["id"]
        assert re.search(rf"^\| {o.criterion['id']} \|.*\| \*\*{o.mark}\*\* \|$", section, re.M), o.criterion["id"]
    gain = protocol.summarize(quantities["test_acc/BN"] - quantities["test_acc/no_BN"])
    assert f"mean {gain.mean:+.4f}, 95% CI [{gain.low:+.4f}, {gain.high:+.4f}]" in section
    for arm, key in (("no BN", "no_BN"), ("BN", "BN")):  # the arm's row: its chosen rate, then its numbers
        row = re.search(rf"^\| {arm} \| [0-9.]+ \| .*$", section, re.M)
        assert row and report.fmt_seeds(quantities[f"test_acc/{key}"]) in row.group(0), arm


# ------------------------------------------------------------------ the report against the summaries


def _markdown_tables(text: str) -> list[list[list[str]]]:
    """Every markdown table of `text` (a header line followed by a |---| line), as rows of cells."""
    lines = text.splitlines()
    tables, i = [], 0
    while i + 1 < len(lines):
        if lines[i].startswith("|") and re.fullmatch(r"\|[-|: ]+\|", lines[i + 1].strip()):
            block = [lines[i]]
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                block.append(lines[i])
                i += 1
            # a cell may hold an escaped pipe (\|), which does not end it
            tables.append([[c.strip() for c in re.split(r"(?<!\\)\|", row.strip()[1:-1])] for row in block])
        else:
            i += 1
    return tables


def _report_section(readme: str, number: int) -> str:
    return re.search(rf"^## {number}\. .*?(?=^## )", readme, re.M | re.S).group(0)


@pytest.mark.parametrize("entry", registry.EXPERIMENTS, ids=NAMES)
def test_report_tables_state_what_the_committed_summaries_say(entry):
    """experiments/README.md against results/NAME/summary.md: the overview row and the section's
    verdict line give the summary's verdict and part verdicts; every criterion of the summary has
    a row, and every criterion row gives the summary's measured text and mark; every table whose
    header is the summary's has the summary's numbers. Reads text only (no training)."""
    readme = (registry.ROOT / "experiments" / "README.md").read_text()
    summary = (registry.ROOT / "experiments" / "results" / entry.name / "summary.md").read_text()
    verdict = re.search(r"^## Verdict: (.*)$", summary, re.M).group(1)
    parts = re.findall(r"^- Part (.*?): \*\*(.*?)\*\*$", summary, re.M)
    overview = re.search(
        rf"^\| {entry.number} \| \[{entry.name}\]\(results/{entry.name}/summary\.md\).*$", readme, re.M
    )
    assert overview and f"| **{verdict}" in overview.group(0), (entry.name, verdict)
    if parts:  # the overview names each part's verdict as the summary does
        stated = f"**{verdict} (" + "; ".join(f"{p}: {v}" for p, v in parts) + ")**"
        assert stated in overview.group(0), (entry.name, stated)
    section = _report_section(readme, entry.number)
    line = f"**Verdict: {verdict}**" + "".join(f"; {p}: {v}" for p, v in parts) + "."
    assert line in section or line.replace("**.", ".**") in section, (entry.name, line)

    summary_tables = _markdown_tables(summary)
    summary_headers = {tuple(t[0]) for t in summary_tables}
    criteria = {row[0].split(": ")[-1]: row for t in summary_tables if t[0][0] == "id" for row in t[1:]}
    checked, rows = 0, set()
    for table in _markdown_tables(section):
        if table[0][0] == "criterion":
            for row in table[1:]:
                cid = row[0].split(": ")[-1]
                rows.add(cid)
                if entry.name == "bn_benefit":  # its section words the measured column itself: tested above
                    assert cid in criteria and f"**{criteria[cid][-1]}**" == row[-1], cid
                else:
                    assert cid in criteria, (entry.name, cid)
                    assert (row[-2], row[-1]) == (criteria[cid][-2], f"**{criteria[cid][-1]}**"), (entry.name, cid)
                checked += 1
        elif tuple(table[0]) in summary_headers:
            for row in table[1:]:
                assert "| " + " | ".join(row) + " |" in summary, (entry.name, row)
                checked += 1
    assert checked, f"{entry.name}: no table of its section was checked against its summary"
    assert rows == set(criteria), (entry.name, "criteria without a row:", sorted(set(criteria) - rows))


def test_criteria_figure_is_drawn_only_for_a_summary_judged_on_the_configs_criteria():
    """A figure never pairs the config's criteria with a run judged on other criteria (other ids or dates)."""
    from experiments import criteria_figures

    criteria = [{"id": "gain", "fixed": "2026-12-04"}, {"id": "faster", "fixed": "2026-12-04"}]
    judged = "| gain | a | b | 2026-12-04 | m | yes |\n| A: faster | a | b | 2026-12-04 | m | no |\n"
    assert criteria_figures.judged_on_config(judged, criteria)
    assert not criteria_figures.judged_on_config(judged.replace("2026-12-04", "2026-12-01", 1), criteria)
    assert not criteria_figures.judged_on_config(judged.splitlines()[0], criteria)


def test_matched_loss_reads_the_crossing_interpolated_in_log_loss():
    """Experiment 12 reads each seed where its training loss crosses the target, between the
    evaluations around the crossing (worked by hand here), not at the first one below it."""
    from types import SimpleNamespace

    from experiments import regularization

    loss = np.array([[1.0, 1.0], [0.4, 0.2], [0.1, 0.1]])  # seed 0 crosses 0.2 between steps 50 and 100
    run = SimpleNamespace(
        steps=np.array([0, 50, 100]),
        series={
            "train_eval_loss": loss,
            "train_eval_accuracy": np.array([[0.5, 0.5], [0.7, 0.8], [0.9, 0.9]]),
            "test_accuracy": np.array([[0.4, 0.4], [0.6, 0.7], [0.7, 0.8]]),
        },
    )
    out = regularization.at_matched_loss(run, 0.2)
    w = np.log(0.4 / 0.2) / np.log(0.4 / 0.1)  # 0.5: the target is halfway in log loss
    assert out["step"] == pytest.approx([50 + w * 50, 50])
    assert out["train_accuracy"] == pytest.approx([0.7 + w * 0.2, 0.8])
    assert out["gap"] == pytest.approx([(0.7 + w * 0.2) - (0.6 + w * 0.1), 0.1])
    never = regularization.at_matched_loss(run, 0.01)
    assert np.isnan(never["gap"]).all()
