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

import json

import jbn_select
import pytest

WARNING = "OneValuePerFeatureWarning"  # jbn's UserWarning subclass for one value per feature
SWAPS = {  # module path -> (attribute, replacement "module:attribute")
    "flax.linen": "jbn.linen:BatchNorm",
    "flax.linen.normalization": "jbn.linen:BatchNorm",
    "flax.nnx": "jbn.nnx:BatchNorm",
    "flax.nnx.nn.normalization": "jbn.nnx:BatchNorm",
}


def pytest_addoption(parser):
    group = parser.getgroup("jbn", "jbn's flax conformance run")
    group.addoption("--jbn-swap", action="store_true", help="put jbn's BatchNorm classes in flax's place")
    group.addoption("--jbn-select", action="store_true", help="run only the tests that use BatchNorm")
    group.addoption("--jbn-results", default=None, help="write selection and outcomes to this JSON file")


def _swap():
    import importlib

    swapped = {}
    for module_path, target in SWAPS.items():
        module = importlib.import_module(module_path)
        target_module, name = target.split(":")
        replacement = getattr(importlib.import_module(target_module), name)
        module.BatchNorm = replacement
        swapped[module_path + ".BatchNorm"] = f"{replacement.__module__}.{replacement.__qualname__}"
    return swapped


class _Recorder:
    def __init__(self, path):
        self.path = path
        self.selected: list[str] = []
        self.unresolved: list[str] = []
        self.outcomes: dict[str, str] = {}
        self.messages: dict[str, str] = {}
        self.swapped: dict[str, str] = {}
        self.warned: set[str] = set()

    def pytest_warning_recorded(self, warning_message, when, nodeid, location):
        if warning_message.category.__name__ == WARNING and nodeid:
            self.warned.add(nodeid)

    def _set(self, nodeid, outcome, report=None):
        # A failure in any phase (setup, call, teardown) decides; otherwise the call phase does.
        if self.outcomes.get(nodeid) in ("failed", "error"):
            return
        self.outcomes[nodeid] = outcome
        if report is not None and outcome in ("failed", "error"):
            self.messages[nodeid] = _reason(report)

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

    def pytest_runtest_logreport(self, report):
        if report.when == "call":
            if hasattr(report, "wasxfail"):
                self._set(report.nodeid, "xfailed" if report.skipped else "xpassed")
            else:
                self._set(report.nodeid, report.outcome, report)
        elif report.failed:
            self._set(report.nodeid, "error", report)
        elif report.when == "setup" and report.skipped:
            self._set(report.nodeid, "skipped")

    def pytest_sessionfinish(self, session):
        if self.path is None:
            return
        with open(self.path, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "selected": self.selected,
                    "unresolved": self.unresolved,
                    "outcomes": self.outcomes,
                    "messages": self.messages,
                    "swapped": self.swapped,
                    "warned": sorted(self.warned),
                },
                f,
                indent=1,
            )


def _reason(report) -> str:
    """The exception line of a failure (`TypeError: ...`), shortened, for grouping causes."""
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr)
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first[:300]


def pytest_configure(config):
    recorder = _Recorder(config.getoption("--jbn-results"))
    if config.getoption("--jbn-swap"):
        recorder.swapped = _swap()
        import jbn

        if hasattr(jbn, WARNING):
            # Appended after flax's "error": a later filter takes precedence in pytest.
            config.addinivalue_line("filterwarnings", f"always::jbn.{WARNING}")
    config.pluginmanager.register(recorder, "jbn_swap_recorder")
