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

from jbn_peer_recorder import OutcomeRecorder, swap

TARGETS = {"haiku.BatchNorm": "jbn.haiku:BatchNorm", "haiku._src.batch_norm.BatchNorm": "jbn.haiku:BatchNorm"}


def pytest_addoption(parser):
    group = parser.getgroup("jbn", "jbn's haiku conformance run")
    group.addoption("--jbn-swap", action="store_true", help="put jbn.haiku.BatchNorm in haiku's place")
    group.addoption("--jbn-results", default=None, help="write the outcomes to this JSON file")


class _Recorder(OutcomeRecorder):
    def results(self) -> dict:
        import jax

        return {**super().results(), "devices": jax.local_device_count()}


def pytest_configure(config):
    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    swapped = swap(TARGETS) if config.getoption("--jbn-swap") else {}
    recorder = _Recorder(config.getoption("--jbn-results"), swapped, key=lambda nodeid: nodeid.split("::")[-1])
    config.pluginmanager.register(recorder, "jbn_haiku_recorder")
