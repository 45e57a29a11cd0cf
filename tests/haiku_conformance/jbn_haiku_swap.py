"""pytest plugin for running haiku's own BatchNorm tests, optionally with jbn's class in haiku's place.

Loaded as `-p jbn_haiku_swap` (this folder on PYTHONPATH) in the subprocesses that
tests/test_haiku_conformance.py starts on a copy of the installed haiku's
`haiku/_src/batch_norm_test.py`. Options:

  --jbn-swap          replace haiku.BatchNorm and haiku._src.batch_norm.BatchNorm by
                      jbn.haiku.BatchNorm. It happens in pytest_configure, before collection
                      imports the test module, so `batch_norm.BatchNorm` there is jbn's class.
  --jbn-results=PATH  write {"outcomes": {test name: outcome}, "messages": {test name: reason},
                      "swapped": {name: class}, "devices": n} as JSON.

The test file asks for 8 host devices only when run as a script; here the plugin sets 8 fake
CPU devices before JAX starts, so its multi-device tests run instead of skipping.
"""

from __future__ import annotations

import json

SWAPPED = ("haiku.BatchNorm", "haiku._src.batch_norm.BatchNorm")


def pytest_addoption(parser):
    group = parser.getgroup("jbn", "jbn's haiku conformance run")
    group.addoption("--jbn-swap", action="store_true", help="put jbn.haiku.BatchNorm in haiku's place")
    group.addoption("--jbn-results", default=None, help="write the outcomes to this JSON file")


def _swap() -> dict[str, str]:
    import importlib

    from jbn.haiku import BatchNorm

    swapped = {}
    for path in SWAPPED:
        module_path, name = path.rsplit(".", 1)
        setattr(importlib.import_module(module_path), name, BatchNorm)
        swapped[path] = f"{BatchNorm.__module__}.{BatchNorm.__qualname__}"
    return swapped


class _Recorder:
    def __init__(self, path, swapped):
        self.path = path
        self.swapped = swapped
        self.outcomes: dict[str, str] = {}
        self.messages: dict[str, str] = {}

    def pytest_runtest_logreport(self, report):
        name = report.nodeid.split("::")[-1]
        if self.outcomes.get(name) in ("failed", "error"):
            return  # a failure in any phase decides
        if report.when == "call":
            self.outcomes[name] = report.outcome
        elif report.failed:
            self.outcomes[name] = "error"
        elif report.when == "setup" and report.skipped:
            self.outcomes[name] = "skipped"
        if report.failed:
            crash = getattr(report.longrepr, "reprcrash", None)
            text = (crash.message if crash is not None else str(report.longrepr)).strip()
            self.messages[name] = text.splitlines()[0][:300] if text else ""

    def pytest_sessionfinish(self, session):
        if self.path is None:
            return
        import jax

        with open(self.path, "w", encoding="utf-8") as f:
            results = {
                "outcomes": self.outcomes,
                "messages": self.messages,
                "swapped": self.swapped,
                "devices": jax.local_device_count(),
            }
            json.dump(results, f, indent=1)


def pytest_configure(config):
    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    swapped = _swap() if config.getoption("--jbn-swap") else {}
    config.pluginmanager.register(_Recorder(config.getoption("--jbn-results"), swapped), "jbn_haiku_recorder")
