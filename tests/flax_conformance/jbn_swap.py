"""pytest plugin that runs flax's own tests, optionally with jbn's BatchNorm in flax's place.

Loaded as `-p jbn_swap` (this folder on PYTHONPATH) in the subprocesses that
tests/test_flax_conformance.py starts inside flax's extracted `tests/` folder. Options:

  --jbn-swap          replace flax.linen.BatchNorm, flax.linen.normalization.BatchNorm,
                      flax.nnx.BatchNorm and flax.nnx.nn.normalization.BatchNorm by
                      jbn.linen.BatchNorm / jbn.nnx.BatchNorm. It happens in pytest_configure,
                      before collection imports flax's test modules, so `from flax.linen
                      import BatchNorm` at their top gets jbn's class too.
  --jbn-select        keep only the tests that use BatchNorm (the rule: jbn_select.py).
  --jbn-results=PATH  write {"selected": [...], "outcomes": {nodeid: outcome},
                      "messages": {nodeid: one-line failure reason}, "swapped": {...},
                      "warned": [nodeids that emitted jbn's one-value warning]} as JSON.

flax's pytest settings turn every warning into an error. With --jbn-swap, jbn's own
documented warning for training on one value per feature (`jbn.OneValuePerFeatureWarning`,
where flax computes silently) is shown instead of raised, and the tests that emit it are
listed in the results: a deliberate, counted difference, not a hidden one.
"""

from __future__ import annotations

import jbn_select
import pytest
from jbn_peer_recorder import OutcomeRecorder, swap

WARNING = "OneValuePerFeatureWarning"  # jbn's UserWarning subclass for one value per feature
TARGETS = {
    "flax.linen.BatchNorm": "jbn.linen:BatchNorm",
    "flax.linen.normalization.BatchNorm": "jbn.linen:BatchNorm",
    "flax.nnx.BatchNorm": "jbn.nnx:BatchNorm",
    "flax.nnx.nn.normalization.BatchNorm": "jbn.nnx:BatchNorm",
}


def pytest_addoption(parser):
    group = parser.getgroup("jbn", "jbn's flax conformance run")
    group.addoption("--jbn-swap", action="store_true", help="put jbn's BatchNorm classes in flax's place")
    group.addoption("--jbn-select", action="store_true", help="run only the tests that use BatchNorm")
    group.addoption("--jbn-results", default=None, help="write selection and outcomes to this JSON file")


class _Recorder(OutcomeRecorder):
    """Outcomes (xfails told apart), the selection, and the tests that warned."""

    def __init__(self, path, swapped):
        super().__init__(path, swapped)
        self.selected: list[str] = []
        self.unresolved: list[str] = []
        self.warned: set[str] = set()

    def pytest_warning_recorded(self, warning_message, when, nodeid, location):
        if warning_message.category.__name__ == WARNING and nodeid:
            self.warned.add(nodeid)

    def outcome(self, report) -> str:
        if hasattr(report, "wasxfail"):
            return "xfailed" if report.skipped else "xpassed"
        return report.outcome

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, session, config, items):
        if not config.getoption("--jbn-select"):
            self.selected = [item.nodeid for item in items]
            return
        keep, drop = [], []
        for item in items:
            function = getattr(item, "function", None) or getattr(item, "obj", None)
            verdict = jbn_select.selected(function) if function is not None else None
            if verdict is None:
                self.unresolved.append(item.nodeid)
            (keep if verdict else drop).append(item)
        if drop:
            config.hook.pytest_deselected(items=drop)
        items[:] = keep
        self.selected = [item.nodeid for item in keep]

    def results(self) -> dict:
        return {
            "selected": self.selected,
            "unresolved": self.unresolved,
            **super().results(),
            "warned": sorted(self.warned),
        }


def pytest_configure(config):
    swapped = swap(TARGETS) if config.getoption("--jbn-swap") else {}
    if swapped:
        import jbn

        if hasattr(jbn, WARNING):
            # Appended after flax's "error": a later filter takes precedence in pytest.
            config.addinivalue_line("filterwarnings", f"always::jbn.{WARNING}")
    config.pluginmanager.register(_Recorder(config.getoption("--jbn-results"), swapped), "jbn_swap_recorder")
