"""What the runs of a peer's own test suite with jbn swapped in share (flax's, keras's, haiku's):
fetching the peer's source distribution, the stop when it cannot be fetched, one pass's
record, and the rule that makes a regression (passes with the peer's class, not with jbn's).

Nothing from a peer is copied into this repository: its source distribution, at the installed
version, is fetched with pip (source only, no dependencies) into a gitignored cache.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RECORDER_DIR = Path(__file__).resolve().parent / "peer_plugin"  # jbn_peer_recorder, the plugins' shared part


def plugin_environment(plugin_dir: Path, **variables: str) -> dict[str, str]:
    """The environment of a peer's pytest subprocess: its swap plugin's folder, the shared
    recorder's and this repository on PYTHONPATH, the `variables` set, and one XLA thread
    pool (two passes run side by side) unless one is asked for."""
    env = dict(os.environ)
    path = [str(plugin_dir), str(RECORDER_DIR), str(REPO), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(path).rstrip(os.pathsep)
    env.update(variables)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("PYTEST_ADDOPTS", None)
    return env


class DownloadError(RuntimeError):
    pass


def ensure_sdist(package: str, version: str, cache: Path, timeout: float = 300) -> Path:
    """`cache/<package>-<version>.tar.gz`, downloaded with pip on first use."""
    path = cache / f"{package}-{version}.tar.gz"
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-q", "-d", tmp]
        cmd.append(f"{package}=={version}")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise DownloadError(f"`{' '.join(cmd)}` did not finish in {timeout:.0f} s") from e
        found = sorted(Path(tmp).glob(f"{package}-*.tar.gz"))
        if proc.returncode != 0 or not found:
            raise DownloadError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{proc.stderr.strip()[-2000:]}")
        os.replace(found[0], path)  # renamed into place last: an interrupted download leaves no partial file
    return path


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def sdist_or_stop(package: str, version: str, cache: Path) -> Path:
    """The peer's source distribution; without it, a failure in CI (the suite must not pass
    without the peer's tests) and a skip elsewhere, saying how to provide it."""
    try:
        return ensure_sdist(package, version, cache)
    except DownloadError as e:
        message = (
            f"cannot get {package} {version}'s source distribution, so {package}'s own tests cannot run "
            f"against jbn. Put {package}-{version}.tar.gz into {cache} or allow pip to reach the package index. {e}"
        )
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)


@dataclasses.dataclass
class Pass:
    """One pytest subprocess over the peer's tests: with jbn's class swapped in or not."""

    swap: bool
    results: dict  # what the swap plugin recorded: outcomes, messages, swapped names, ...
    returncode: int
    seconds: float
    output: str


def regressions(peer: Pass, jbn: Pass, names) -> dict[str, str]:
    """Each of `names` that passes with the peer's class and not with jbn's: jbn's outcome and reason."""
    peer_outcomes, outcomes = peer.results.get("outcomes", {}), jbn.results.get("outcomes", {})
    messages = jbn.results.get("messages", {})
    return {
        n: f"{outcomes.get(n, 'not run')}: {messages.get(n, '')}".rstrip(": ")
        for n in names
        if peer_outcomes.get(n) == "passed" and outcomes.get(n) != "passed"
    }
