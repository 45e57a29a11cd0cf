"""Helpers that shape the computation so that XLA fuses it well.

XLA:CPU fuses a reduction with its elementwise producer only when that producer has no
other user (it does not duplicate a shared producer), and never fuses a select or a
comparison into a reduction. A shared `x - mean` (or `x.astype(float32)`, or a
broadcast of `mean`) feeding two reductions is therefore written to memory in full and
read back, which costs more than recomputing it. `separate_uses` hands each reduction
its own handle on the inputs, so that each fuses its own copy of the cheap producer;
on GPU this changes nothing (XLA:GPU duplicates cheap producers anyway).
"""
from __future__ import annotations

import jax
from jax import lax


def separate_uses(n: int, *arrays: jax.Array) -> list[tuple[jax.Array, ...]]:
    """`n` tuples, each holding the same `arrays`, that XLA cannot merge back into one
    (an optimization barrier: no copy, no numerical effect, differentiable)."""
    return list(lax.optimization_barrier((arrays,) * n))
