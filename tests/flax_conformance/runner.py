"""Download flax's source distribution, extract its tests and run them twice (flax, jbn).

Nothing from flax is copied into this repository: the sdist of the *installed* flax version
is fetched with pip (source only, no dependencies) into `.cache/flax-sdist/` (gitignored),
its `tests/` folder and `pyproject.toml` (flax's pytest settings, warnings-as-errors
included) are extracted next to it, and both are reused by later runs.

Command line (prints the summary, exits 1 on a regression):
    .venv/bin/python -m tests.flax_conformance.runner [-k EXPR] [--keep-going]
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from tests import peer_suites
from tests.peer_suites import Pass

CACHE = peer_suites.REPO / ".cache" / "flax-sdist"
PLUGIN_DIR = Path(__file__).resolve().parent
TARGET = "BatchNorm"
# flax's CI runs its tests with 4 fake CPU devices (tests/run_all_tests.sh); so do we.
XLA_FLAGS = "--xla_force_host_platform_device_count=4"


def flax_version() -> str:
    return importlib.metadata.version("flax")


def extract_tests(sdist: Path) -> Path:
    """`<cache>/flax-<version>/` holding flax's `tests/` and `pyproject.toml`; extracted once."""
    # Resolved: pytest names tests relative to a real rootdir (a symlinked cache would blank the file part).
    root = (CACHE / sdist.name.removesuffix(".tar.gz")).resolve()
    stamp = root / ".extracted"
    if stamp.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    top = root.name + "/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(top + "tests/") or m.name == top + "pyproject.toml"]
        tar.extractall(CACHE, members=members, filter="data")
    if not (root / "tests").is_dir():
        raise peer_suites.DownloadError(f"{sdist} holds no tests/ folder")
    stamp.touch()
    return root


def candidate_files(root: Path) -> list[str]:
    """Test files whose text mentions BatchNorm at all (the plugin then selects per test)."""
    paths = {*(root / "tests").rglob("*_test.py"), *(root / "tests").rglob("test_*.py")}
    return sorted(str(p.relative_to(root)) for p in paths if TARGET in p.read_text(encoding="utf-8"))


def _command(root: Path, files, swap: bool, results: Path, extra) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "jbn_swap",
        "--jbn-select",
        f"--jbn-results={results}",
        *(["--jbn-swap"] if swap else []),
        "-c",
        str(root / "pyproject.toml"),
        "--rootdir",
        str(root),
        "-p",
        "no:cacheprovider",
        "-q",
        "-o",
        "timeout=300",
        "--tb=short",
        *extra,
        *files,
    ]


def _environment() -> dict:
    return peer_suites.plugin_environment(PLUGIN_DIR, XLA_FLAGS=XLA_FLAGS)


def _run_all(root: Path, jobs: list[tuple[bool, list[str]]], timeout: float, parallel: int = 2) -> list[Pass]:
    """pytest subprocesses for (swap, args) jobs, `parallel` at a time, each timed on its own."""
    env, passes = _environment(), [None] * len(jobs)
    deadline = time.perf_counter() + timeout
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        waiting, running = list(enumerate(jobs)), []
        while waiting or running:
            while waiting and len(running) < parallel:
                i, (swap, args) = waiting.pop(0)
                results, log = Path(tmp) / f"{i}.json", stack.enter_context(open(Path(tmp) / f"{i}.log", "w+"))
                command = _command(root, args, swap, results, ())
                proc = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
                running.append((i, swap, results, log, proc, time.perf_counter()))
            time.sleep(0.2)
            for job in list(running):
                i, swap, results, log, proc, start = job
                if proc.poll() is None and time.perf_counter() < deadline:
                    continue
                if proc.returncode is None:  # past the deadline
                    proc.kill()
                    proc.wait()
                running.remove(job)
                log.seek(0)
                data = json.loads(results.read_text()) if results.exists() else {}
                passes[i] = Pass(swap, data, proc.returncode, time.perf_counter() - start, log.read())
    return passes


def run_passes(root: Path, files, extra=(), timeout: float = 900) -> tuple[Pass, Pass]:
    """Flax's classes and jbn's, as two pytest subprocesses running side by side."""
    flax, jbn = _run_all(root, [(False, [*extra, *files]), (True, [*extra, *files])], timeout)
    return flax, jbn


def rerun_alone(root: Path, nodeids, timeout: float = 600) -> dict[str, str]:
    """jbn's outcome for each test when only its file's regressed tests run in the process:
    flax's tests share process state (e.g. nnx.tabulate's hooks stay behind when a call
    inside it raises), so a failure can be a cascade from another file's test."""
    by_file: dict[str, list[str]] = {}
    for nodeid in nodeids:
        by_file.setdefault(nodeid.split("::")[0], []).append(nodeid)
    outcomes: dict[str, str] = {}
    for run in _run_all(root, [(True, ids) for ids in by_file.values()], timeout):
        outcomes.update(run.results.get("outcomes", {}))
    return outcomes


@dataclasses.dataclass
class Summary:
    selected: list[str]
    flax_passed: list[str]
    jbn_passed: list[str]
    regressions: dict[str, str]  # nodeid -> jbn's failure reason
    out_of_scope: dict[str, str]  # nodeid -> outcome with flax's own classes (not passed)
    missing: list[str]  # selected with flax but never reported by the jbn pass
    warned: list[str]  # jbn pass: tests that emitted jbn's one-value warning

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
            lines.append(
                f"{len(self.warned)} tests emit jbn.OneValuePerFeatureWarning (flax computes "
                f"silently; shown, not escalated): " + ", ".join(self.warned)
            )
        if self.out_of_scope:
            lines.append(
                "out of scope (outcome with flax): "
                + ", ".join(f"{k} [{v}]" for k, v in sorted(self.out_of_scope.items()))
            )
        unresolved = flax.results.get("unresolved", [])
        if unresolved:  # collected items whose definition the selection rule could not find: left out
            lines.append(
                f"{len(unresolved)} collected tests not matched to a definition (left out): " + ", ".join(unresolved)
            )
        if self.missing:
            lines.append("not reported by the jbn pass: " + ", ".join(self.missing))
        for nodeid, reason in sorted(self.regressions.items()):
            lines.append(f"REGRESSION {nodeid}: {reason}")
        return "\n".join(lines)


def summarize(flax: Pass, jbn: Pass) -> Summary:
    selected = flax.results.get("selected", [])
    f_out = flax.results.get("outcomes", {})
    j_out = jbn.results.get("outcomes", {})
    flax_passed = [n for n in selected if f_out.get(n) == "passed"]
    jbn_passed = [n for n in selected if j_out.get(n) == "passed"]
    regressions = peer_suites.regressions(flax, jbn, selected)
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
    root = extract_tests(peer_suites.ensure_sdist("flax", flax_version(), CACHE))
    extra = ["-k", args.k] if args.k else []
    flax, jbn = run_passes(root, candidate_files(root), extra)
    summary = summarize(flax, jbn)
    print(summary.text(flax, jbn))
    if summary.regressions:
        alone = rerun_alone(root, list(summary.regressions))
        cascades = [n for n in summary.regressions if alone.get(n) == "passed"]
        print(
            f"{len(cascades)} of the {len(summary.regressions)} regressions pass when their file's regressed "
            f"tests run alone (a cascade from another failure): " + ", ".join(cascades)
        )
    if args.json:
        Path(args.json).write_text(json.dumps(dataclasses.asdict(summary), indent=1))
    return 1 if summary.regressions or not summary.flax_passed else 0


if __name__ == "__main__":
    sys.exit(main())
