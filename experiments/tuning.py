"""Choosing a learning rate on the validation split, the same way for every arm.

Every arm trains each rate of the same grid on tuning seeds (never the judged ones) and
takes the rate with the best mean final validation accuracy; the judged seeds then train
at that rate, and the test split is evaluated once per run, after training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np

from experiments.data import Dataset
from experiments.training import Run, make_evaluate


def choose_rate(scores: dict[float, np.ndarray]) -> float:
    """The rate with the highest mean final validation accuracy over the tuning seeds (a
    diverged seed, NaN, counts as 0); ties go to the smaller rate."""
    return max(sorted(scores), key=lambda lr: (float(np.mean(np.nan_to_num(scores[lr], nan=0.0))), -lr))


def tune(train: Callable[[float], Run], learning_rates: Sequence[float]) -> tuple[float, dict[float, Run]]:
    """(chosen rate, the tuning run of every rate). `train(lr)` trains the tuning seeds on
    the (train, validation) Dataset, whose held-out part `fit` calls "test"."""
    runs = {lr: train(lr) for lr in learning_rates}
    return choose_rate({lr: r.final("test_accuracy") for lr, r in runs.items()}), runs


def test_once(model, run: Run, final: Dataset) -> dict[str, np.ndarray]:
    """{"loss", "accuracy"}, (S,) each: the trained seeds of `run` evaluated on the test split
    of `final`, once (eval mode, running statistics)."""
    evaluate = jax.jit(jax.vmap(make_evaluate(model), in_axes=(0, None, None)))
    return {k: np.asarray(v) for k, v in evaluate(run.state, final.x_test, final.y_test).items()}


def validation_rows(run: Run, **extra) -> list[dict]:
    """metrics.csv rows of a run on a (train, validation) Dataset: its "test_" metrics renamed "val_"."""
    return [{**r, "metric": r["metric"].replace("test_", "val_")} for r in run.rows(**extra)]


def judged_rows(run: Run, test: dict[str, np.ndarray], seeds=None, step=None, **extra) -> list[dict]:
    """metrics.csv rows of a judged run: its validation rows, then the test split's numbers
    (`test`: metric -> (S,), read once after training), one row per seed (`seeds`, default the
    run's) and metric; `step` (optional) is written on the test rows only."""
    at = {} if step is None else {"step": step}
    rows = validation_rows(run, phase="judged", **extra)
    return rows + [
        {"phase": "judged", **extra, "seed": s, **at, "metric": m, "value": v}
        for m, values in test.items()
        for s, v in zip(run.seeds if seeds is None else seeds, np.asarray(values).tolist())
    ]
