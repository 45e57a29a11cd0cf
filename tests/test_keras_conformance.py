"""keras's own BatchNormalization tests, run with jbn.keras.BatchNormalization in keras's place.

What runs: `keras/src/layers/normalization/batch_normalization_test.py` from the source
distribution of the *installed* keras version, downloaded with
`pip download --no-binary :all: --no-deps keras==<installed>` into `.cache/keras-sdist/`
(gitignored; reused by later runs), with keras's own pytest settings (warnings are errors).

Two passes run side by side in subprocesses: keras's class, then jbn's swapped in by the
plugin tests/keras_conformance/jbn_keras_swap.py (keras.layers, keras.src.layers and
keras.src.layers.normalization.batch_normalization, replaced before keras's test module is
imported). A test that passes with keras and not with jbn is a regression.

No network: the test fails with the reason when CI=true, and skips otherwise.
Same from the command line: `.venv/bin/python -m tests.keras_conformance.runner`.
"""

import pytest

from tests import peer_suites
from tests.keras_conformance import runner

# Under pytest-xdist these tests stay on one worker: they share the keras source distribution it downloads once.
pytestmark = pytest.mark.xdist_group("keras-sdist")


def keras_tests_or_stop():
    """The extracted keras tests; without the download, a failure in CI and a skip elsewhere."""
    return runner.extract_tests(peer_suites.sdist_or_stop("keras", runner.keras_version(), runner.CACHE))


@pytest.mark.timeout(1200)
def test_keras_batch_normalization_tests_pass_with_jbn():
    root = keras_tests_or_stop()
    keras_pass, jbn_pass = runner.run_passes(root)
    for run in (keras_pass, jbn_pass):
        name = "jbn" if run.swap else "keras"
        # pytest exits 0 (all passed) or 1 (some failed); anything else is a broken run.
        assert run.returncode in (0, 1) and run.results.get("outcomes"), (
            f"the {name} pass did not run (exit {run.returncode}):\n{run.output[-4000:]}"
        )
    summary = runner.summarize(keras_pass, jbn_pass)
    report = summary.text(keras_pass, jbn_pass)
    print(report)
    # every name keras's tests reach the class by
    modules = ("keras.layers", "keras.src.layers", "keras.src.layers.normalization.batch_normalization")
    expected = {f"{m}.BatchNormalization": "jbn.keras.BatchNormalization" for m in modules}
    assert jbn_pass.results["swapped"] == expected
    assert jbn_pass.results["swapped_at_end"] == expected
    assert set(jbn_pass.results["outcomes"]) == set(keras_pass.results["outcomes"]), "the passes ran different tests"
    assert summary.keras_passed, f"no test passes with keras itself:\n{report}\n{keras_pass.output[-4000:]}"
    assert not summary.regressions, f"{len(summary.regressions)} keras tests fail with jbn:\n{report}"
