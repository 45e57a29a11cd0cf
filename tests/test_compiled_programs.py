"""The test processes' guard against the kernel's limit on memory mappings (tests/compiled_programs.py)."""

import jax.numpy as jnp
import pytest

from tests import compiled_programs


@pytest.mark.skipif(compiled_programs.memory_maps() is None, reason="/proc/self/maps is Linux's")
def test_clearing_the_caches_releases_the_mappings_of_compiled_programs(monkeypatch):
    before = compiled_programs.memory_maps()
    for n in range(1, 151):  # 150 eager ops on new shapes: 150 executables
        jnp.where(jnp.arange(n + 1000) > 3, 1.0, 2.0).block_until_ready()
    grown = compiled_programs.memory_maps()
    assert grown - before > 300  # each executable holds mappings of its own (about 9 on XLA:CPU)

    monkeypatch.setattr(compiled_programs, "MAP_BUDGET", grown + 1000)
    assert not compiled_programs.release_compiled_programs_if_needed()  # below the budget: nothing cleared
    assert compiled_programs.memory_maps() >= grown - 10

    monkeypatch.setattr(compiled_programs, "MAP_BUDGET", before)
    assert compiled_programs.release_compiled_programs_if_needed()
    assert compiled_programs.memory_maps() < before + (grown - before) // 4
