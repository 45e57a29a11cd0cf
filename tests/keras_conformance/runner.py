"""Download keras's source distribution, extract its BatchNormalization tests and run them
twice: with keras's class, then with jbn's in its place.

Nothing from keras is copied into this repository: the sdist of the *installed* keras version
is fetched with pip (source only, no dependencies) into `.cache/keras-sdist/` (gitignored),
the test file and keras's `pyproject.toml` (its pytest settings: warnings are errors) are
extracted into a folder of their own next to it (no `keras/` package there, so the test
imports the installed keras), and both are reused by later runs.

Command line (prints the summary, exits 1 on a regression):
    .venv/bin/python -m tests.keras_conformance.runner
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests import peer_suites
from tests.peer_suites import Pass

CACHE = peer_suites.REPO / ".cache" / "keras-sdist"
PLUGIN_DIR = Path(__file__).resolve().parent
TEST_FILE = "keras/src/layers/normalization/batch_normalization_test.py"


def keras_version() -> str:
    return importlib.metadata.version("keras")


def extract_tests(sdist: Path) -> Path:
    """`<cache>/keras-<version>-tests/` holding the test file and keras's `pyproject.toml`."""
    top = sdist.name.removesuffix(".tar.gz")
    root = (CACHE / f"{top}-tests").resolve()
    if (root / ".extracted").exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as tar:
        for name in (TEST_FILE, "pyproject.toml"):
            member = tar.extractfile(f"{top}/{name}")
            if member is None:
                raise peer_suites.DownloadError(f"{sdist} holds no {name}")
            (root / Path(name).name).write_bytes(member.read())
    (root / ".extracted").touch()
    return root


def _run(root: Path, swap: bool, timeout: float) -> Pass:
    env = peer_suites.plugin_environment(PLUGIN_DIR, KERAS_BACKEND="jax")
    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp) / "results.json"
        command = [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "jbn_keras_swap",
            f"--jbn-results={results}",
            *(["--jbn-swap"] if swap else []),
            "-c",
            str(root / "pyproject.toml"),
            "--rootdir",
            str(root),
            "-p",
            "no:cacheprovider",
            "-q",
            "--tb=short",
            str(root / Path(TEST_FILE).name),
        ]
        start = time.perf_counter()
        try:
            proc = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
            code, output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            code, output = -1, f"timed out after {timeout:.0f} s: {e}"
        data = json.loads(results.read_text()) if results.exists() else {}
    return Pass(swap, data, code, time.perf_counter() - start, output)


def run_passes(root: Path, timeout: float = 900) -> tuple[Pass, Pass]:
    """keras's class and jbn's, as two pytest subprocesses side by side."""
    with ThreadPoolExecutor(2) as pool:
        keras_pass, jbn_pass = pool.map(lambda swap: _run(root, swap, timeout), (False, True))
    return keras_pass, jbn_pass


@dataclasses.dataclass
class Summary:
    keras_passed: list[str]
    jbn_passed: list[str]
    regressions: dict[str, str]  # nodeid -> jbn's failure reason
    out_of_scope: dict[str, str]  # nodeid -> outcome with keras's own class (not passed)

    def text(self, keras_pass: Pass, jbn_pass: Pass) -> str:
        lines = [
            f"keras {keras_version()}: {len(keras_pass.results.get('outcomes', {}))} BatchNormalization tests; "
            f"{len(self.keras_passed)} pass with keras's class, {len(self.jbn_passed)} with jbn's; "
            f"{len(self.regressions)} regressions; {len(self.out_of_scope)} fail or skip with keras itself.",
            f"passes took {keras_pass.seconds:.0f} s (keras) and {jbn_pass.seconds:.0f} s (jbn), side by side.",
            f"swapped: {jbn_pass.results.get('swapped', {})}",
        ]
        lines += [f"out of scope: {k} [{v}]" for k, v in sorted(self.out_of_scope.items())]
        lines += [f"REGRESSION {k}: {v}" for k, v in sorted(self.regressions.items())]
        return "\n".join(lines)


def summarize(keras_pass: Pass, jbn_pass: Pass) -> Summary:
    k_out = keras_pass.results.get("outcomes", {})
    j_out = jbn_pass.results.get("outcomes", {})
    keras_passed = [n for n, o in k_out.items() if o == "passed"]
    jbn_passed = [n for n, o in j_out.items() if o == "passed"]
    regressions = peer_suites.regressions(keras_pass, jbn_pass, k_out)
    out_of_scope = {n: o for n, o in k_out.items() if o != "passed"}
    return Summary(keras_passed, jbn_passed, regressions, out_of_scope)


def main() -> int:
    root = extract_tests(peer_suites.ensure_sdist("keras", keras_version(), CACHE))
    keras_pass, jbn_pass = run_passes(root)
    summary = summarize(keras_pass, jbn_pass)
    print(summary.text(keras_pass, jbn_pass))
    if not jbn_pass.results:
        print(jbn_pass.output[-4000:])
    return 1 if summary.regressions or not summary.keras_passed else 0


if __name__ == "__main__":
    sys.exit(main())
