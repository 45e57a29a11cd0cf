"""Test setup: 8 fake CPU devices, made available before any JAX backend starts.

`JBN_STRICT=1` runs the suite under JAX's strict settings (`jax_numpy_rank_promotion="raise"`,
`jax_numpy_dtype_promotion="strict"`), `JBN_STRICT=x64` also with x64 on: an implicit
broadcast or dtype promotion anywhere in jbn then fails its test. A test whose reference
(a peer library) itself fails under these settings is marked `peer_not_strict(reason)`
and is not run under them."""

import os

import pytest

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax

jax.config.update("jax_num_cpu_devices", 8)

STRICT = os.environ.get("JBN_STRICT", "")
if STRICT not in ("", "0", "1", "x64"):
    raise ValueError(f"JBN_STRICT={STRICT!r} must be unset, 0, 1 or x64.")
if STRICT in ("1", "x64"):
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.config.update("jax_numpy_dtype_promotion", "strict")
if STRICT == "x64":
    jax.config.update("jax_enable_x64", True)


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "peer_not_strict(reason): the test's peer library fails under JBN_STRICT's settings (reason says how)",
    )


def pytest_collection_modifyitems(config, items):
    if STRICT not in ("1", "x64"):
        return
    for item in items:
        marker = item.get_closest_marker("peer_not_strict")
        if marker is not None:
            reason = marker.args[0] if marker.args else marker.kwargs.get("reason", "")
            item.add_marker(pytest.mark.skip(reason=f"peer fails under JBN_STRICT: {reason}"))
