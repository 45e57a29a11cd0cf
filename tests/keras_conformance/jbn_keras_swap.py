"""pytest plugin that runs keras's own BatchNormalization tests, optionally with jbn's class
in keras's place.

Loaded as `-p jbn_keras_swap` (this folder on PYTHONPATH) in the subprocesses that
tests/test_keras_conformance.py starts. Options:

  --jbn-swap          replace keras.layers.BatchNormalization, keras.src.layers.BatchNormalization
                      and keras.src.layers.normalization.batch_normalization.BatchNormalization
                      by jbn.keras.BatchNormalization, in pytest_configure, before collection
                      imports keras's test module.
  --jbn-results=PATH  write {"outcomes": {nodeid: outcome}, "messages": {nodeid: reason},
                      "swapped": {name: replacement}} as JSON.
"""

from __future__ import annotations

import importlib
import json

SWAPPED_MODULES = ("keras.layers", "keras.src.layers", "keras.src.layers.normalization.batch_normalization")


def pytest_addoption(parser):
    group = parser.getgroup("jbn", "jbn's keras conformance run")
    group.addoption("--jbn-swap", action="store_true", help="put jbn's BatchNormalization in keras's place")
    group.addoption("--jbn-results", default=None, help="write the outcomes to this JSON file")


def _swap() -> dict[str, str]:
    from jbn.keras import BatchNormalization

    swapped = {}
    for module_path in SWAPPED_MODULES:
        importlib.import_module(module_path).BatchNormalization = BatchNormalization
        swapped[f"{module_path}.BatchNormalization"] = (
            f"{BatchNormalization.__module__}.{BatchNormalization.__qualname__}"
        )
    return swapped


def _current(name: str) -> str:
    module_path, attribute = name.rsplit(".", 1)
    value = getattr(importlib.import_module(module_path), attribute)
    return f"{value.__module__}.{value.__qualname__}"


class _Recorder:
    def __init__(self, path, swapped):
        self.path = path
        self.swapped = swapped
        self.outcomes: dict[str, str] = {}
        self.messages: dict[str, str] = {}

    def _set(self, nodeid, outcome, report=None):
        # A failure in any phase (setup, call, teardown) decides; otherwise the call phase does.
        if self.outcomes.get(nodeid) in ("failed", "error"):
            return
        self.outcomes[nodeid] = outcome
        if report is not None and outcome in ("failed", "error"):
            crash = getattr(report.longrepr, "reprcrash", None)
            text = (crash.message if crash is not None else str(report.longrepr)).strip()
            self.messages[nodeid] = text.splitlines()[0][:300] if text else ""

    def pytest_runtest_logreport(self, report):
        if report.when == "call":
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
                    "outcomes": self.outcomes,
                    "messages": self.messages,
                    "swapped": self.swapped,
                    # Still jbn's at the end: no test module put keras's class back.
                    "swapped_at_end": {name: _current(name) for name in self.swapped},
                },
                f,
                indent=1,
            )


def pytest_configure(config):
    swapped = _swap() if config.getoption("--jbn-swap") else {}
    config.pluginmanager.register(_Recorder(config.getoption("--jbn-results"), swapped), "jbn_keras_recorder")
