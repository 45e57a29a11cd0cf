"""Download flax's source distribution, extract its tests and run them twice (flax, jbn).

Nothing from flax is copied into this repository: the sdist of the *installed* flax version
is fetched with pip (source only, no dependencies) into `.cache/flax-sdist/` (gitignored),
its `tests/` folder and `pyproject.toml` (flax's pytest settings, warnings-as-errors
included) are extracted next to it, and both are reused by later runs.

Command line (prints the summary, exits 1 on a regression):
    .venv/bin/python -m tests.flax_conformance.runner [-k EXPR] [--keep-going]
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "flax-sdist"
PLUGIN_DIR = Path(__file__).resolve().parent
TARGET = "BatchNorm"
# flax's CI runs its tests with 4 fake CPU devices (tests/run_all_tests.sh); so do we.
XLA_FLAGS = "--xla_force_host_platform_device_count=4"


class DownloadError(RuntimeError):
    pass


def flax_version() -> str:
    return importlib.metadata.version("flax")


def sdist_path(version: str) -> Path:
    return CACHE / f"flax-{version}.tar.gz"


def ensure_sdist(version: str, timeout: float = 300) -> Path:
    """The cached sdist of flax==version, downloaded with pip on first use."""
    path = sdist_path(version)
    if path.exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
               "-q", "-d", tmp, f"flax=={version}"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise DownloadError(f"`{' '.join(cmd)}` did not finish in {timeout:.0f} s") from e
        found = sorted(Path(tmp).glob("flax-*.tar.gz"))
        if proc.returncode != 0 or not found:
            raise DownloadError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n"
                                f"{proc.stderr.strip()[-2000:]}")
        # Rename into place last, so an interrupted download never leaves a partial file there.
        os.replace(found[0], path)
    return path


def extract_tests(sdist: Path) -> Path:
    """`<cache>/flax-<version>/` holding flax's `tests/` and `pyproject.toml`; extracted once."""
    root = CACHE / sdist.name.removesuffix(".tar.gz")
    stamp = root / ".extracted"
    if stamp.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    top = root.name + "/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers()
                   if m.name.startswith(top + "tests/") or m.name == top + "pyproject.toml"]
        tar.extractall(CACHE, members=members, filter="data")
    if not (root / "tests").is_dir():
        raise DownloadError(f"{sdist} holds no tests/ folder")
    stamp.touch()
    return root


def candidate_files(root: Path) -> list[str]:
    """Test files whose text mentions BatchNorm at all (the plugin then selects per test)."""
    files = []
    for path in sorted((root / "tests").rglob("*_test.py")) + sorted((root / "tests").rglob("test_*.py")):
        if TARGET in path.read_text(encoding="utf-8"):
            files.append(str(path.relative_to(root)))
    return sorted(set(files))


@dataclasses.dataclass
class Pass:
    swap: bool
    results: dict
    returncode: int
    seconds: float
    output: str


def _command(root: Path, files, swap: bool, results: Path, extra) -> list[str]:
    return [sys.executable, "-m", "pytest", "-p", "jbn_swap", "--jbn-select", f"--jbn-results={results}",
            *(["--jbn-swap"] if swap else []),
            "-c", str(root / "pyproject.toml"), "--rootdir", str(root), "-p", "no:cacheprovider",
            "-q", "-o", "timeout=300", "--tb=short", *extra, *files]


def run_passes(root: Path, files, extra=(), timeout: float = 900) -> tuple[Pass, Pass]:
    """Flax's classes and jbn's, as two pytest subprocesses running side by side."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PLUGIN_DIR), str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["XLA_FLAGS"] = XLA_FLAGS
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.pop("PYTEST_ADDOPTS", None)
    # Each pass gets half the machine; unpinned, two XLA thread pools oversubscribe it.
    env.setdefault("OMP_NUM_THREADS", "1")
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        for swap in (False, True):
            results = Path(tmp) / f"{'jbn' if swap else 'flax'}.json"
            log = open(Path(tmp) / f"{'jbn' if swap else 'flax'}.log", "w+", encoding="utf-8")
            proc = subprocess.Popen(_command(root, files, swap, results, extra), cwd=root, env=env,
                                    stdout=log, stderr=subprocess.STDOUT, text=True)
            procs.append((swap, results, log, proc, time.perf_counter()))
        passes = []
        deadline = time.perf_counter() + timeout
        for swap, results, log, proc, start in procs:
            try:
                proc.wait(timeout=max(1.0, deadline - time.perf_counter()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            seconds = time.perf_counter() - start
            log.seek(0)
            output = log.read()
            log.close()
            data = json.loads(results.read_text()) if results.exists() else {}
            passes.append(Pass(swap, data, proc.returncode, seconds, output))
    return passes[0], passes[1]


@dataclasses.dataclass
class Summary:
    selected: list[str]
    flax_passed: list[str]
    jbn_passed: list[str]
    regressions: dict[str, str]      # nodeid -> jbn's failure reason
    out_of_scope: dict[str, str]     # nodeid -> outcome with flax's own classes (not passed)
    missing: list[str]               # selected with flax but never reported by the jbn pass
    warned: list[str]                # jbn pass: tests that emitted jbn's one-value warning

    def text(self, flax: Pass, jbn: Pass) -> str:
        lines = [
            f"flax {flax_version()}: {len(self.selected)} selected tests use BatchNorm; "
            f"{len(self.flax_passed)} pass with flax's classes, {len(self.jbn_passed)} pass with jbn's; "
            f"{len(self.regressions)} regressions; {len(self.out_of_scope)} out of scope "
            f"(fail or skip with flax itself).",
            f"passes took {flax.seconds:.0f} s (flax) and {jbn.seconds:.0f} s (jbn), side by side.",
            f"swapped: {jbn.results.get('swapped', {})}",
        ]
        if self.warned:
            lines.append(f"{len(self.warned)} tests emit jbn.OneValuePerFeatureWarning (flax computes "
                         f"silently; shown, not escalated): " + ", ".join(self.warned))
        if self.out_of_scope:
            lines.append("out of scope (outcome with flax): " + ", ".join(
                f"{k} [{v}]" for k, v in sorted(self.out_of_scope.items())))
        if self.missing:
            lines.append("not reported by the jbn pass: " + ", ".join(self.missing))
        for nodeid, reason in sorted(self.regressions.items()):
            lines.append(f"REGRESSION {nodeid}: {reason}")
        return "\n".join(lines)


def summarize(flax: Pass, jbn: Pass) -> Summary:
    selected = flax.results.get("selected", [])
    f_out = flax.results.get("outcomes", {})
    j_out = jbn.results.get("outcomes", {})
    j_msg = jbn.results.get("messages", {})
    flax_passed = [n for n in selected if f_out.get(n) == "passed"]
    jbn_passed = [n for n in selected if j_out.get(n) == "passed"]
    regressions = {n: f"{j_out.get(n, 'not run')}: {j_msg.get(n, '')}".rstrip(": ")
                   for n in flax_passed if j_out.get(n) != "passed"}
    out_of_scope = {n: f_out.get(n, "not run") for n in selected if f_out.get(n) != "passed"}
    missing = [n for n in flax_passed if n not in j_out]
    warned = jbn.results.get("warned", [])
    return Summary(selected, flax_passed, jbn_passed, regressions, out_of_scope, missing, warned)


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default=None, help="pytest -k expression, to run a subset")
    parser.add_argument("--json", default=None, help="also write the summary as JSON here")
    args = parser.parse_args(argv)
    root = extract_tests(ensure_sdist(flax_version()))
    extra = ["-k", args.k] if args.k else []
    flax, jbn = run_passes(root, candidate_files(root), extra)
    summary = summarize(flax, jbn)
    print(summary.text(flax, jbn))
    if args.json:
        Path(args.json).write_text(json.dumps(dataclasses.asdict(summary), indent=1))
    return 1 if summary.regressions or not summary.flax_passed else 0


if __name__ == "__main__":
    sys.exit(main())
