"""Keeping a long test process under the kernel's limit on memory mappings.

Every executable XLA:CPU compiles holds about ten memory mappings of its own until JAX's caches
drop it (an eager op on a new shape is one such executable). A process that compiles thousands
of them reaches the kernel's limit (`vm.max_map_count`, 65530 by default), where compiling fails
("LLVM compilation error: Cannot allocate memory") or, measured with a pmap program at a lowered
limit, the process segfaults. One worker of the suite held 22,000 mappings three quarters of the
way through, the CI profile of the differential fuzz adds 15,000, and one process through the
whole long fuzz profile died. Past half the limit JAX's compilation caches are cleared
(`tests/conftest.py` after each test, the differential fuzz before each example); nothing is
cleared below it.
"""

import gc

import jax


def memory_maps() -> int | None:
    """How many memory mappings this process holds (Linux), or None where that cannot be read."""
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:
        return None


def _map_limit() -> int:
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65530  # Linux's default


MAP_BUDGET = _map_limit() // 2


def release_compiled_programs_if_needed() -> bool:
    """Clear JAX's compilation caches if this process holds more than MAP_BUDGET memory
    mappings; whether it did."""
    n = memory_maps()
    if n is None or n <= MAP_BUDGET:
        return False
    jax.clear_caches()
    gc.collect()
    return True
