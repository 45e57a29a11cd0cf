"""CI smoke run of the benchmark suite: one tiny shape, one round, every library; checks
only that it writes its outputs (benchmarks assert nothing about time)."""
import json

from benchmarks import run


def test_benchmark_suite_writes_its_report(tmp_path):
    run.main([
        "--out", str(tmp_path), "--shapes", "4x2x2x4", "--dtypes", "float32", "--rounds", "1",
        "--layers", "1", "--memory-shape", "2x4x4x4", "--memory-variants", "0", "2", "4", "--no-progress",
    ])
    report = (tmp_path / "RESULTS.md").read_text()
    results = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "results.png").stat().st_size > 0
    for library in run.LIBRARIES:
        assert f"| {library} |" in report
    assert {row["case"] for row in results["speed"]} == set(run.CASES)
    assert len(results["memory"]) == 3 and "## Memory" in report
