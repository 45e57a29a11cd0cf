"""tests/run_suite.py: a run in which a test process crashed runs once more; a failing test is not retried."""

import subprocess
import sys
from pathlib import Path

RUNNER = Path(__file__).resolve().parent / "run_suite.py"

CRASHES_ONCE = """
import os
from pathlib import Path

def test_crashes_the_first_time():
    marker = Path(__file__).with_name("crashed-once")
    if not marker.exists():
        marker.touch()
        os.abort()

def test_other():
    pass
"""

FAILS = """
def test_fails():
    assert 1 == 2
"""


def _run(tmp_path, source):
    (tmp_path / "test_case.py").write_text(source)
    args = [sys.executable, str(RUNNER), "-q", "-n", "2", "--dist", "loadgroup", "--max-worker-restart=0"]
    args += ["-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(tmp_path / "test_case.py")]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=tmp_path)


def test_a_crashed_run_runs_once_more_and_passes(tmp_path):
    proc = _run(tmp_path, CRASHES_ONCE)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "crashed while running" in proc.stdout and "runs once more" in proc.stdout
    assert proc.stdout.rstrip().splitlines()[-1].startswith("2 passed")


def test_a_failing_test_fails_once_without_a_second_run(tmp_path):
    proc = _run(tmp_path, FAILS)
    assert proc.returncode == 1
    assert "runs once more" not in proc.stdout and proc.stdout.count("1 failed") == 1
