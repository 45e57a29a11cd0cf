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

from jbn_peer_recorder import OutcomeRecorder, current, swap

SWAPPED_MODULES = ("keras.layers", "keras.src.layers", "keras.src.layers.normalization.batch_normalization")
TARGETS = {f"{module}.BatchNormalization": "jbn.keras:BatchNormalization" for module in SWAPPED_MODULES}


def pytest_addoption(parser):
    group = parser.getgroup("jbn", "jbn's keras conformance run")
    group.addoption("--jbn-swap", action="store_true", help="put jbn's BatchNormalization in keras's place")
    group.addoption("--jbn-results", default=None, help="write the outcomes to this JSON file")


class _Recorder(OutcomeRecorder):
    def results(self) -> dict:
        # Still jbn's at the end: no test module put keras's class back.
        return {**super().results(), "swapped_at_end": {name: current(name) for name in self.swapped}}


def pytest_configure(config):
    swapped = swap(TARGETS) if config.getoption("--jbn-swap") else {}
    config.pluginmanager.register(_Recorder(config.getoption("--jbn-results"), swapped), "jbn_keras_recorder")
