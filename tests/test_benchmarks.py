"""The benchmarks: CI smoke runs at tiny sizes (they check that each writes its outputs;
nothing here asserts a time), the model-level benchmark's variants against flax.linen,
the statistics strategies against float64 NumPy, and a dry run of benchmarks/device.sh."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from benchmarks import floor, model, run, statistics_strategies

pytestmark = pytest.mark.script_not_strict(
    "benchmarks/statistics_strategies.py and floor.py subtract a (C,) shift from (N, ..., C) arrays by rank "
    "promotion, and peers.py runs haiku's BatchNorm (its moving average mixes float32 and int32)"
)


def test_benchmark_suite_writes_its_report(tmp_path):
    run.main(
        [
            "--out",
            str(tmp_path),
            "--shapes",
            "4x2x2x4",
            "--dtypes",
            "float32",
            "--rounds",
            "1",
            "--layers",
            "1",
            "--memory-shape",
            "2x4x4x4",
            "--memory-variants",
            "0",
            "2",
            "4",
            "--no-progress",
        ]
    )
    report = (tmp_path / "RESULTS.md").read_text()
    results = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "results.png").stat().st_size > 0
    for library in run.LIBRARIES:
        assert f"| {library} |" in report
    assert {row["case"] for row in results["speed"]} == set(run.CASES)
    assert len(results["memory"]) == 3 and "## Memory" in report


# ------------------------------------------------------------------ model level

# Final feature maps 2x2 over a batch of 4: 16 values per channel in the last batch norms.
TINY = model.parse_size("4x16x16:2")


def _relative_gap(tree, reference) -> float:
    """Largest |a - b| over a leaf, relative to that leaf's largest |b|."""
    gaps = jax.tree.map(
        lambda a, b: float(
            np.max(np.abs(np.asarray(a) - np.asarray(b))) / max(float(np.max(np.abs(np.asarray(b)))), 1e-12)
        ),
        tree,
        reference,
    )
    return max(jax.tree.leaves(gaps))


def test_model_variants_compute_flax_step():
    """Every variant's step (ResNet-10 here: 1 block per stage, to compile fast) gives
    flax.linen's loss, parameters, batch statistics and momentum: the benchmark compares
    the same model. Tolerance: float32 roundoff through 12 batch norms stays far below
    1e-3 of a leaf's scale, where a
    miswired block (a relu lost or doubled, a norm misplaced) changes leaves by O(1)."""
    results = {}
    for variant in model.VARIANTS:
        step, state, images, labels = model.make_step(variant, TINY, blocks=1)
        results[variant] = step(state, images, labels)
    (ref_state, ref_loss) = results[model.FLAX]
    assert np.isfinite(float(ref_loss))
    for variant, (state, loss) in results.items():
        assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss)), variant
        assert _relative_gap(state, ref_state) < 1e-3, variant


def test_model_variants_use_the_options_they_name():
    """ResNet-18 has 20 batch norms, 9 followed by a relu (stem, first of each block):
    each variant sets activation / save_output_only on exactly the ones it names."""
    from flax import linen as nn

    import jbn

    def options(variant):
        seen = []

        def record(next_fun, args, kwargs, context):
            if context.method_name == "__call__" and isinstance(context.module, (jbn.BatchNorm, nn.BatchNorm)):
                m = context.module
                seen.append(
                    (
                        type(m).__module__.split(".")[0],
                        getattr(m, "activation", None),
                        getattr(m, "save_output_only", False),
                    )
                )
            return next_fun(*args, **kwargs)

        images, _ = model.batch(TINY)
        with nn.intercept_methods(record):
            jax.eval_shape(lambda: model.make_model(variant, TINY).init(jax.random.key(0), images, train=True))
        return sorted(seen, key=str)

    flax_name = nn.BatchNorm.__module__.split(".")[0]
    assert options("flax.linen") == [(flax_name, None, False)] * 20
    assert options("jbn (drop-in)") == [("jbn", None, False)] * 20
    assert options("jbn, relu fused") == sorted([("jbn", None, False)] * 11 + [("jbn", "relu", False)] * 9, key=str)
    assert options("jbn, relu fused + save_output_only") == sorted(
        [("jbn", None, True)] * 11 + [("jbn", "relu", False)] * 9, key=str
    )


def test_model_benchmark_writes_its_report(tmp_path):
    model.main(
        [
            "--sizes",
            "2x8x8:2",
            "--rounds",
            "1",
            "--blocks",
            "1",
            "--variants",
            "flax.linen",
            "jbn, relu fused",
            "--out",
            str(tmp_path),
        ]
    )
    results = json.loads((tmp_path / "model.json").read_text())
    assert [r["variant"] for r in results["rows"]] == ["flax.linen", "jbn, relu fused"]
    assert all(r["temp_bytes"] > 0 and r["median_s"] > 0 for r in results["rows"])
    report = (tmp_path / "RESULTS.md").read_text()
    assert "## Model level: ResNet-18 training step" in report and "| 2x8x8:2 | jbn, relu fused |" in report
    assert (tmp_path / "model.png").stat().st_size > 0


def test_model_sizes_are_checked():
    with pytest.raises(Exception, match="BATCHxHEIGHTxWIDTH"):
        model.parse_size("4x16:2")
    with pytest.raises(Exception, match="stem"):
        model.parse_size("4x16x16:2:vgg")


# ------------------------------------------------------------------ statistics strategies

ACCURATE = ("two_pass", f"sample_median (K={statistics_strategies.SAMPLE_ROWS})")


@pytest.fixture(scope="module")
def strategy_errors():
    return statistics_strategies.accuracy(2**16)["errors"]


def test_strategies_match_float64_on_benign_data(strategy_errors):
    """On N(1, 4) data every method but the unvectorized Welford reduce is within 1e-5 of
    float64 (float32 sums of 2^16 terms: ~1e-7 typical, 2^16 * 6e-8 = 4e-3 worst case)."""
    for name, err in strategy_errors["N(1, 2^2)"].items():
        assert err["var_rel_err"] < (1e-2 if name.startswith("welford") else 1e-5), name
        assert err["mean_err_in_std"] < 1e-3, name


def test_strategies_accuracy_on_adversarial_data(strategy_errors):
    """The property the design promises: two passes and a median-of-sample shift stay
    accurate with |mean|/std = 1e4 and an outlier first; the raw sums do not survive
    |mean|/std = 1e4 (cancellation costs ~1e8 * 6e-8 of the variance)."""
    for label, errs in strategy_errors.items():
        for name in ACCURATE:
            assert errs[name]["var_rel_err"] < 1e-5, (label, name)
    assert strategy_errors["|mean|/std = 1e4"]["raw (flax fast variance)"]["var_rel_err"] > 1e-1


def test_strategies_benchmark_writes_its_report(tmp_path):
    statistics_strategies.main(
        ["--shapes", "8x4x4x8", "--rounds", "1", "--accuracy-rows", "4096", "--out", str(tmp_path)]
    )
    results = json.loads((tmp_path / "strategies.json").read_text())
    rows = results["speed"][0]["rows"]
    for name in statistics_strategies.METHODS:
        assert rows[name]["median_s"] > 0 and rows[f"forward: {name}"]["median_s"] > 0
    assert "## Statistics strategies" in (tmp_path / "RESULTS.md").read_text()


def test_floor_benchmark_writes_its_report(tmp_path):
    floor.main(["--shapes", "16x2x2x4", "--rounds", "2", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "floor.json").read_text())["speed"][0]["rows"]
    assert set(floor.REDUCTIONS) | {floor.FLAX, floor.JBN, floor.COPY} < set(rows)
    assert all(r["median_s"] > 0 for r in rows.values())
    assert "## Floor of the float32 training forward" in (tmp_path / "RESULTS.md").read_text()


@pytest.mark.parametrize(
    "name", [floor.VARIADIC, floor.STACKED, floor.SHIFTED_SUM, floor.SHIFTED_SQUARES, floor.SCALED_SQUARES]
)
def test_floor_reductions_compute_the_shifted_sums(name):
    """The one-pass forms time the same sums as the two reductions: float64 reference."""
    x = np.random.default_rng(4).normal(size=(16, 3, 5)).astype(np.float32)
    s = np.float32([0.5, -1.0, 2.0, 0.0, 1.0])
    d = x.astype(np.float64) - s
    r = np.float32([0.5, 1.0, 2.0, 0.25, 1.0])
    got = floor.REDUCTIONS[name](*(jax.numpy.asarray(a) for a in (x, s, r)))
    expected = {
        floor.SHIFTED_SUM: d.sum((0, 1)),
        floor.SHIFTED_SQUARES: (d * d).sum((0, 1)),
        floor.SCALED_SQUARES: ((d * r) ** 2).sum((0, 1)),
    }.get(name, (d.sum((0, 1)), (d * d).sum((0, 1))))
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_strategy_forward_matches_float64_normalization():
    """Each method's forward normalizes as the float64 formula does."""
    x = np.random.default_rng(3).normal(size=(64, 4, 4, 8)).astype(np.float32) * 3 + 2
    ref = x.astype(np.float64)
    mean, var = ref.mean(axis=(0, 1, 2)), ref.var(axis=(0, 1, 2))
    expected = (ref - mean) / np.sqrt(var + statistics_strategies.EPSILON)
    ones, zeros = np.ones(8, np.float32), np.zeros(8, np.float32)
    for name, fn in statistics_strategies.METHODS.items():
        y, _ = jax.jit(statistics_strategies.forward_with(fn))(x, ones, zeros, zeros, ones)
        np.testing.assert_allclose(np.asarray(y), expected, atol=1e-4, err_msg=name)


# ------------------------------------------------------------------ device run


def test_device_script_dry_run(tmp_path):
    """benchmarks/device.sh end to end at tiny sizes on this backend, from the interpreter
    running the tests (the script itself needs only python3 with jax, flax and optax)."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("XLA_FLAGS", None)
    done = subprocess.run(
        ["bash", str(root / "benchmarks" / "device.sh"), "--dry-run", "--out", str(tmp_path)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    reports = list(tmp_path.glob("RESULTS-*.md"))
    assert len(reports) == 1, done.stdout
    text = reports[0].read_text()
    assert "Dry run" in text and "probe ok" in text and "op ok" in text and "model ok" in text, text[:2000]
    assert "against the bandwidth roofline" in text and "## Model level" in text and "## Op-level suite" in text


# benchmarks/running_shift.py: the pieces its table is computed from.


def test_running_shift_tree_sum_adds_pairwise_in_float32():
    from benchmarks import running_shift

    rng = np.random.default_rng(0)
    for rows in (1, 2, 7, 160, 1281):
        a = rng.normal(size=(rows, 3)).astype(np.float32) + 100
        total = running_shift.tree_sum(a)
        assert total.dtype == np.float32
        np.testing.assert_allclose(
            total, a.astype(np.float64).sum(0), rtol=4 * np.finfo(np.float32).eps * np.log2(2 * rows)
        )
    # the pairwise order: (1 + 2^24) + (1 + 1) = 2^24 + 2, where adding row after row rounds each 1 away
    np.testing.assert_equal(
        running_shift.tree_sum(np.float32([[1.0], [2.0**24], [1.0], [1.0]])), np.float32([2.0**24 + 2])
    )


def test_running_shift_summary_counts_acceptance_and_the_settling_step():
    from benchmarks import running_shift

    steps, layers = running_shift.STEPS, 2
    ratio = np.zeros((steps, layers))
    ratio[[0, 5], 0] = running_shift.SHIFT_BOUND * 2  # layer 0 rejected at steps 0 and 5, then never again
    run = {"ratio": ratio.tolist(), "error": np.full((steps, layers), 1e-7).tolist()}
    run |= {"error_exact": run["error"], "error_two_pass": run["error"], "loss": [0.5] * steps}
    summary = running_shift.summarize([run])
    assert summary["accepted"] == pytest.approx(1 - 2 / (steps * layers))
    assert summary["phases"]["0-0"] == 0.5 and summary["phases"]["1-9"] == pytest.approx(1 - 1 / 18)
    assert summary["settled_max"] == 6 and summary["settled_median"] == 3
