"""haiku's own BatchNorm tests, run with jbn's class in haiku's place.

What runs: `haiku/_src/batch_norm_test.py` from the *installed* dm-haiku wheel (11 tests in
0.0.17), copied at test time into a temporary folder (never into this repository), in two
pytest subprocesses: haiku's own class, then jbn.haiku.BatchNorm swapped in as
`haiku.BatchNorm` and `haiku._src.batch_norm.BatchNorm` before the test module is imported
(the plugin tests/haiku_conformance/jbn_haiku_swap.py), both on 8 fake CPU devices. A test
that passes with haiku's class and fails with jbn's is a regression.

Same from the command line: `python -m pytest tests/test_haiku_conformance.py`.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import peer_suites

pytest.importorskip("haiku")

PLUGIN_DIR = Path(__file__).resolve().parent / "haiku_conformance"


def installed_test_file() -> Path:
    spec = importlib.util.find_spec("haiku")
    assert spec is not None and spec.origin is not None
    path = Path(spec.origin).parent / "_src" / "batch_norm_test.py"
    assert path.is_file(), f"the installed haiku has no {path}: its wheel no longer ships the BatchNorm tests"
    return path


def run_pass(folder: Path, swap: bool) -> dict:
    """One pytest subprocess on the copied test file; its recorded outcomes."""
    results = folder / ("jbn.json" if swap else "haiku.json")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "jbn_haiku_swap", "-p", "no:cacheprovider"]
    command += ["--rootdir", str(folder), "-c", str(folder / "pytest.ini"), f"--jbn-results={results}"]
    command += ["--jbn-swap"] if swap else []
    command += [str(folder / "batch_norm_test.py")]
    env = peer_suites.plugin_environment(PLUGIN_DIR)
    proc = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode in (0, 1) and results.is_file(), (
        f"the pass did not run:\n{proc.stdout[-4000:]}{proc.stderr[-4000:]}"
    )
    return json.loads(results.read_text())


@pytest.fixture(scope="module")
def passes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("haiku_tests")
    shutil.copy(installed_test_file(), folder / "batch_norm_test.py")
    (folder / "pytest.ini").write_text("[pytest]\n")
    return run_pass(folder, swap=False), run_pass(folder, swap=True)


def test_haiku_batch_norm_tests_pass_with_jbn(passes):
    haiku_run, jbn_run = passes
    assert jbn_run["swapped"] == dict.fromkeys(
        ("haiku.BatchNorm", "haiku._src.batch_norm.BatchNorm"), "jbn.haiku.BatchNorm"
    )
    assert haiku_run["devices"] == jbn_run["devices"] == 8
    assert set(haiku_run["outcomes"]) == set(jbn_run["outcomes"]), "the two passes ran different tests"
    assert len(haiku_run["outcomes"]) >= 11, haiku_run["outcomes"]
    assert all(outcome == "passed" for outcome in haiku_run["outcomes"].values()), haiku_run
    regressions = {
        name: jbn_run["messages"].get(name, outcome)
        for name, outcome in jbn_run["outcomes"].items()
        if outcome != "passed"
    }
    assert not regressions, f"haiku tests that pass with haiku's class and not with jbn's: {regressions}"
