"""What the three swap plugins (flax's, keras's and haiku's own tests run with jbn's class in
the peer's place) share: putting jbn's classes in place, and recording each test's outcome.

The plugins run in pytest subprocesses whose PYTHONPATH holds this folder (see
`tests/peer_suites.plugin_environment`); the module's name is jbn's own so that it cannot
shadow a module of the peer's test tree.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping


def qualified(value) -> str:
    return f"{value.__module__}.{value.__qualname__}"


def current(name: str) -> str:
    """The qualified name of what `module.attribute` holds now."""
    module_path, attribute = name.rsplit(".", 1)
    return qualified(getattr(importlib.import_module(module_path), attribute))


def swap(targets: Mapping[str, str]) -> dict[str, str]:
    """Set each `module.attribute` of `targets` to the class its value names ("module:Class");
    {name: qualified name of what it holds now}."""
    swapped = {}
    for name, target in targets.items():
        module_path, attribute = name.rsplit(".", 1)
        replacement_module, replacement = target.split(":")
        value = getattr(importlib.import_module(replacement_module), replacement)
        setattr(importlib.import_module(module_path), attribute, value)
        swapped[name] = qualified(value)
    return swapped


def reason(report) -> str:
    """The exception line of a failure (`TypeError: ...`), shortened, for grouping causes."""
    crash = getattr(report.longrepr, "reprcrash", None)
    text = (crash.message if crash is not None else str(report.longrepr)).strip()
    return text.splitlines()[0][:300] if text else ""


class OutcomeRecorder:
    """A pytest plugin object: each test's outcome (a failure in any phase, setup, call or
    teardown, decides; otherwise the call phase does) and the reason of each failure, written
    as JSON at the end of the session with `results()`. `key` names a test from its nodeid."""

    def __init__(self, path: str | None, swapped: dict[str, str], key: Callable[[str], str] = lambda nodeid: nodeid):
        self.path = path
        self.swapped = swapped
        self.key = key
        self.outcomes: dict[str, str] = {}
        self.messages: dict[str, str] = {}

    def _set(self, report, outcome: str) -> None:
        name = self.key(report.nodeid)
        if self.outcomes.get(name) in ("failed", "error"):
            return
        self.outcomes[name] = outcome
        if outcome in ("failed", "error"):
            self.messages[name] = reason(report)

    def outcome(self, report) -> str:
        """The call phase's outcome (a subclass may tell xfails apart)."""
        return report.outcome

    def pytest_runtest_logreport(self, report):
        if report.when == "call":
            self._set(report, self.outcome(report))
        elif report.failed:
            self._set(report, "error")
        elif report.when == "setup" and report.skipped:
            self._set(report, "skipped")

    def results(self) -> dict:
        return {"outcomes": self.outcomes, "messages": self.messages, "swapped": self.swapped}

    def pytest_sessionfinish(self, session):
        if self.path is not None:
            with open(self.path, "w", encoding="utf-8") as f:
                json.dump(self.results(), f, indent=1)
