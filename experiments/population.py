"""Exact population statistics for a trained network, through `jbn.recompute_batch_stats`.

Experiments 8 and 9 compare the running averages kept during training with the exact
statistics of the training set. That computation is jbn's (`recompute_batch_stats`, from
the variants issue); until it lands, `features.waiting("recompute")` is set and the arms
that need it report `waiting for jbn.recompute_batch_stats`.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

import jbn
from experiments.training import TrainState, variables_of


def recompute(model, state: TrainState, x: np.ndarray, batch_size: int, **apply_kwargs: Any) -> Any:
    """The `batch_stats` of `state` (ONE seed) replaced by the exact statistics of `x`.

    Args:
      model: the flax module; it is run in training mode (`train=True`) over `x` in
        batches of `batch_size`, with `apply_kwargs` (e.g. `dropout=False`).
      state: the trained state of one seed.
      x: (N, ...) the examples whose statistics are wanted (the training set).
      batch_size: examples per forward pass (does not change the exact result).
    """

    @jax.jit
    def apply_fn(variables, batch):
        return model.apply(variables, batch, train=True, mutable=["batch_stats"], **apply_kwargs)

    batches = [x[i : i + batch_size] for i in range(0, len(x), batch_size)]
    updated = jbn.recompute_batch_stats(apply_fn, variables_of(state), batches, progress=False)
    return updated["batch_stats"]


def seed_state(state: TrainState, s: int) -> TrainState:
    """The TrainState of the s-th seed of a state stacked over seeds."""
    return jax.tree.map(lambda leaf: leaf[s], state)
