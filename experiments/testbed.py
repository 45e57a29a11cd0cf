"""The testbed of experiment zero, for the experiments that test how to use BN on it.

Experiment zero (`bn_benefit`) shows that BN clearly helps a 16-layer plain tanh MLP on a
larger generated MNIST-1D; the claims about how to use BN (where it sits, dropout around it)
run on the same network and data. Every arm of such an experiment gets its learning rate by
the same procedure (`experiments.tuning`): the whole rate grid on tuning seeds, read on the
validation split; the judged seeds train at the chosen rate and the test split is touched
once per run, after training.

`DEFAULTS` are the testbed's config keys; an experiment's own `DEFAULTS` add to them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from experiments import data as datasets
from experiments import report
from experiments.models import MLP, NormSpec
from experiments.training import Run, TrainState, fit, make_optimizer
from experiments.tuning import choose_rate, judged_rows, test_once, validation_rows

DEFAULTS = {
    "num_train": 30000,
    "num_val": 5000,
    "num_test": 10000,
    "data_seed": 42,  # mnist1d.data.make_dataset's seed
    "widths": [64] * 16,
    "activation": "tanh",
    "weight_init": "lecun",  # variance 1/fan_in: the variance-preserving scale for tanh
    "batch_size": 128,
    "steps": 2000,
    "eval_every": 100,
    "optimizer": "momentum",
    "learning_rates": [0.003, 0.01, 0.03, 0.1, 0.3],  # every arm tunes over the whole grid
    "bn_momentum": 0.9,
    "tuning_seeds": [100, 101, 102],  # choose each arm's rate; never judged
    "seeds": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],  # judged
}
TINY = {
    "num_train": 512,
    "num_val": 128,
    "num_test": 128,
    "widths": [8, 8],
    "steps": 4,
    "eval_every": 2,
    "learning_rates": [0.1],
    "tuning_seeds": [100],
    "seeds": [0, 1],
}


def splits(config: dict) -> datasets.Splits:
    """The testbed's train / validation / test splits of MNIST-1D."""
    return datasets.mnist1d_splits(config["num_train"], config["num_val"], config["num_test"], seed=config["data_seed"])


def mlp(config: dict, norm: NormSpec | None = None, **options) -> MLP:
    """The testbed's MLP with `norm` (default: jbn BN at the config's momentum; NormSpec("none")
    for none) and `MLP`'s other fields from `options`."""
    norm = NormSpec("bn", momentum=config["bn_momentum"]) if norm is None else norm
    return MLP(
        tuple(config["widths"]),
        10,
        activation=config["activation"],
        norm=norm,
        weight_init=config["weight_init"],
        **options,
    )


def train(
    config: dict,
    model: MLP,
    learning_rate: float,
    data: datasets.Dataset,
    seeds: Sequence[int],
    desc: str,
    probe: Callable[[TrainState, object], dict] | None = None,
) -> Run:
    """`model` trained on `data` for each seed, with the testbed's optimizer, batch and steps."""
    return fit(
        model,
        make_optimizer(config["optimizer"], learning_rate),
        data,
        seeds=list(seeds),
        steps=config["steps"],
        batch_size=config["batch_size"],
        eval_every=config["eval_every"],
        probe=probe,
        desc=desc,
    )


@dataclasses.dataclass
class TunedArm:
    """One arm trained the testbed's way.

    Attributes:
      rate: the learning rate chosen on the validation split.
      scores: {rate: (tuning seeds,) final validation accuracies}.
      run: the judged seeds at `rate`, trained on the train split (its "test_" series are
        the validation split's).
      test: {"loss", "accuracy"}: (judged seeds,) each, the test split evaluated once.
      rows: metrics.csv rows of the tuning runs, the judged runs and their test evaluation.
    """

    rate: float
    scores: dict[float, np.ndarray]
    run: Run
    test: dict[str, np.ndarray]
    rows: list[dict]


def judge_at(config: dict, arm: str, model: MLP, rate: float, data: datasets.Splits, probe=None, **extra) -> tuple:
    """(judged Run, test metrics, rows): the judged seeds of `model` at `rate`, the test split
    evaluated once after training. `extra` joins every row (e.g. phase)."""
    run = train(config, model, rate, data.tuning, config["seeds"], f"{arm} lr {rate:g}", probe)
    test = test_once(model, run, data.final)
    rows = judged_rows(
        run, {m: test[m] for m in ("loss", "accuracy")}, step=config["steps"], arm=arm, learning_rate=rate, **extra
    )
    return run, test, rows


def tune_and_judge(config: dict, arm: str, model: MLP, data: datasets.Splits, probe=None) -> TunedArm:
    """`model`'s rate chosen over the config's grid on the tuning seeds (validation split),
    then the judged seeds at that rate, the test split evaluated once per run."""
    scores, rows = {}, []
    for lr in config["learning_rates"]:
        r = train(config, model, lr, data.tuning, config["tuning_seeds"], f"tune {arm} lr {lr:g}")
        scores[lr] = r.final("test_accuracy")
        rows += validation_rows(r, phase="tuning", arm=arm, learning_rate=lr)
    rate = choose_rate(scores)
    run, test, judged_rows = judge_at(config, arm, model, rate, data, probe)
    return TunedArm(rate, scores, run, test, rows + judged_rows)


def tuning_table(arms: dict[str, TunedArm], learning_rates: Sequence[float]) -> str:
    """Markdown: each rate's mean final validation accuracy (tuning seeds) per arm, the chosen one marked."""

    def cell(tuned: TunedArm, lr: float) -> str:
        return report.fmt_seeds(tuned.scores[lr]) + (" (chosen)" if lr == tuned.rate else "")

    return report.markdown_table(
        ["learning rate", *(f"{a}: final val acc (tuning seeds)" for a in arms)],
        [(f"{lr:g}", *(cell(t, lr) for t in arms.values())) for lr in learning_rates],
    )


def describe(config: dict, data: datasets.Splits, schedule: str | None = None) -> str:
    """The testbed, in a sentence or two for an experiment's setup; `schedule` replaces its
    batch, optimizer and steps where an experiment sets them per arm."""
    if schedule is None:
        schedule = f"batch {config['batch_size']}, {config['optimizer']} (0.9), {config['steps']} steps"
    return (
        f"Experiment zero's testbed: {data.final.name.rsplit(',', 1)[0]} examples (train / validation / test; "
        f"mnist1d.data.make_dataset seed {config['data_seed']}); MLP {len(config['widths'])}x{config['widths'][0]} "
        f"{config['activation']}, no skip connections, {config['weight_init']} init; {schedule}; "
        f"BN = jbn.BatchNorm (momentum {config['bn_momentum']}). "
        f"Every arm's rate is chosen the same way: each rate of {config['learning_rates']} on tuning seeds "
        f"{config['tuning_seeds']}, the best mean final validation accuracy; judged seeds {config['seeds']} then train at "
        f"the chosen rate (same initialization and data order in every arm) and the test split is evaluated once, "
        f"after the last step."
    )
