"""The runs of a peer's own test suite (flax's, keras's) need its source distribution: without
it, the suite fails in CI (it must not pass without the peer's tests) and skips elsewhere."""

from __future__ import annotations

import os

import pytest

from tests import peer_suites


@pytest.mark.parametrize("package", ["flax", "keras"])
@pytest.mark.parametrize("ci", ["true", ""])
def test_no_download_fails_in_ci_and_skips_locally(package, ci, monkeypatch, tmp_path):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip cannot reach any index: the offline case
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # nor a find-links folder from a config file
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.setenv("CI", ci)
    expected = pytest.fail.Exception if ci else pytest.skip.Exception
    version = pytest.importorskip(package).__version__
    with pytest.raises(expected, match="source distribution"):
        peer_suites.sdist_or_stop(package, version, tmp_path / "empty-cache")
