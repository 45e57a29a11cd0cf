"""Test setup: 8 fake CPU devices and JAX's strict settings, made before any JAX backend starts.

The whole suite runs under JAX's strict settings by default: `jax_numpy_rank_promotion="raise"` and
`jax_numpy_dtype_promotion="strict"`, so an implicit broadcast or dtype promotion anywhere in jbn fails its test.
Passing under them implies the same numbers under JAX's default settings: those two settings only turn an
implicit rank promotion or dtype promotion into an error and change no other rule, so a computation that makes
neither (every one that passes here) traces to the same operations, dtypes and shapes under the defaults.

`JBN_STRICT` picks the settings of a run:
- unset or `1`: the strict settings (the default);
- `0`: JAX's default settings (for a run by hand, e.g. to tell a strict-settings failure from another);
- `x64`: the strict settings with `jax_enable_x64` on (`make test`'s second invocation runs the files that
  exercise dtype rules this way).

A test whose peer library (flax, keras, haiku, equinox, optax, torch) itself fails under the strict settings is
marked `peer_not_strict(reason)`: it still runs, under JAX's default promotion rules, with the reason in its marker.
Where the peer's side is one call of a test that also checks jbn, the test runs only that call under the default
rules (`with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):`), so jbn's side stays strict.
A test of this repository's programs outside the library (the benchmark scripts, run by `make bench`, and the
docs' examples, users' programs) that make an implicit promotion, or call a peer that does, is marked
`script_not_strict(reason)` and runs under the default rules the same way, as their users run them.
"""

import os

import pytest

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax

jax.config.update("jax_num_cpu_devices", 8)

from tests.compiled_programs import release_compiled_programs_if_needed  # noqa: E402 (after the device count)

SETTINGS = os.environ.get("JBN_STRICT", "1")
if SETTINGS not in ("0", "1", "x64"):
    raise ValueError(f"JBN_STRICT={SETTINGS!r} must be unset, 0, 1 or x64.")
STRICT = SETTINGS in ("1", "x64")
if STRICT:
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.config.update("jax_numpy_dtype_promotion", "strict")
if SETTINGS == "x64":
    jax.config.update("jax_enable_x64", True)


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "peer_not_strict(reason): the test's peer library fails under the strict settings (reason says how); "
        "it runs under JAX's default promotion rules",
    )
    config.addinivalue_line(
        "markers",
        "script_not_strict(reason): the test's program outside the library (benchmarks/, the docs' examples) makes "
        "an implicit promotion (reason says where); it runs under JAX's default promotion rules, as users run it",
    )


def pytest_report_header(config):
    return (
        f"jbn settings: JBN_STRICT={SETTINGS} (rank promotion {jax.config.jax_numpy_rank_promotion}, "
        f"dtype promotion {jax.config.jax_numpy_dtype_promotion}, x64 {jax.config.jax_enable_x64})"
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Run a `peer_not_strict` or `script_not_strict` test (its fixtures too) under JAX's default promotion rules;
    after each test, drop compiled programs if the process holds too many (`tests/compiled_programs.py`).

    A hook rather than an autouse fixture: hypothesis refuses function-scoped fixtures around its tests."""
    try:
        if STRICT and any(item.get_closest_marker(m) is not None for m in ("peer_not_strict", "script_not_strict")):
            with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
                return (yield)
        return (yield)
    finally:
        release_compiled_programs_if_needed()
