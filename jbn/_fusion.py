"""Helpers that shape the computation so that XLA fuses it well.

XLA:CPU fuses a reduction with its elementwise producer only when that producer has no
other user (it does not duplicate a shared producer), and never fuses a select or a
comparison into a reduction. A shared `x - mean` (or `x.astype(float32)`, or a
broadcast of `mean`) feeding two reductions is therefore written to memory in full and
read back, which costs more than recomputing it. `separate_uses` hands each reduction
its own handle on the inputs, so that each fuses its own copy of the cheap producer.

Only on CPU: XLA:GPU duplicates cheap producers by itself and fuses sibling reductions
over the same input into one pass (reading it once), which separate handles would hide.
"""

from __future__ import annotations

from typing import Any

import jax
from jax import lax

from jbn._axes import varying_axes


def separate_uses(n: int, *arrays: Any) -> list[tuple[Any, ...]]:
    """`n` tuples, each holding the same `arrays` (arrays or pytrees of them). On CPU,
    XLA cannot merge them back into one (an optimization barrier: no copy, no numerical
    effect, differentiable); elsewhere they are the arrays themselves. XLA folds a
    barrier over constants only: put a constant in a pytree with a computed array."""

    def barrier(*arrays):
        # One barrier per argument: a barrier over values of different device-variance
        # (shard_map's vma) makes them all varying, so arguments keep their own types (and
        # the leaves of one pytree argument are given one type, below).
        copies = [lax.optimization_barrier((a,) * n) for a in arrays]
        return [tuple(c[i] for c in copies) for i in range(n)]

    arrays = tuple(_same_variance(a) for a in arrays)
    return lax.platform_dependent(*arrays, cpu=barrier, default=lambda *a: [a] * n)


def kept_apart(*arrays: Any) -> tuple[Any, ...]:
    """The `arrays`, behind one optimization barrier on CPU (elsewhere themselves). In a
    linear rule that JAX transposes, the barrier becomes one over the arrays' cotangents:
    terms summed into one output then get separate handles on the output's cotangent,
    and a cast of it fuses into each consumer. (Separate barriers would not do: XLA
    merges identical barriers over the same cotangent.)"""
    arrays = _same_variance(arrays)
    return lax.platform_dependent(*arrays, cpu=lambda *a: lax.optimization_barrier(a), default=lambda *a: a)


def _same_variance(tree):
    """The leaves of `tree`, each made to vary over every manual axis that any of them
    varies over (a no-op outside shard_map, or for a single array)."""
    leaves = list(jax.tree.leaves(tree))
    axes = frozenset().union(*(varying_axes(leaf) for leaf in leaves)) if leaves else frozenset()
    if not axes:
        return tree

    def widen(leaf):
        missing = tuple(a for a in axes if a not in varying_axes(leaf))
        return lax.pcast(leaf, missing, to="varying") if missing else leaf

    return jax.tree.map(widen, tree)
