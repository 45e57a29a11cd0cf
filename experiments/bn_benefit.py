"""Experiment 0: does batch norm help on this testbed at all?

Claim (Ioffe & Szegedy 2015; every seed article): a deep plain network (no skip
connections) trains faster and ends better with batch norm than without. The testbed the
other claims should stand on: a 16-layer tanh MLP on a larger generated MNIST-1D with a
train / validation / test split. Each arm's learning rate is chosen on the validation split
by the same procedure (the whole grid, on tuning seeds that are not judged); the judged
seeds then train at the chosen rates, every choice made on validation, and the test split
is evaluated once per run, after training.
"""

from __future__ import annotations

import pathlib

import numpy as np

from experiments import protocol, report, testbed
from experiments.models import MLP, NormSpec
from experiments.training import first_step_reaching

NAME = "bn_benefit"
DEFAULTS = {
    **testbed.DEFAULTS,
    "target_val_accuracy": 0.7,  # "steps to" this validation accuracy measures speed
}
TINY = {**testbed.TINY, "target_val_accuracy": 0.2}
ARMS = ("no BN", "BN")

CLAIM = (
    "Batch norm makes a deep plain network train faster and end better: with each arm's learning rate tuned on "
    "the validation split, a 16-layer tanh MLP with BN reaches a validation-accuracy target in fewer steps and "
    "ends with a higher test accuracy than without BN (Ioffe & Szegedy 2015)."
)


def _model(config: dict, arm: str) -> MLP:
    return testbed.mlp(config, None if arm == "BN" else NormSpec("none"))


def run(config: dict, out_dir: pathlib.Path) -> dict:
    out_dir = pathlib.Path(out_dir)
    splits = testbed.splits(config)
    lrs, steps, target = config["learning_rates"], config["steps"], config["target_val_accuracy"]

    # Each arm's rate chosen on the validation split by the same procedure, then the judged
    # seeds at the chosen rates; the test split once per run, after training.
    arms = {arm: testbed.tune_and_judge(config, arm, _model(config, arm), splits) for arm in ARMS}
    scores = {a: t.scores for a, t in arms.items()}
    chosen = {a: t.rate for a, t in arms.items()}
    runs = {a: t.run for a, t in arms.items()}
    test = {a: t.test for a, t in arms.items()}
    report.write_metrics(out_dir, [row for t in arms.values() for row in t.rows])

    censor = steps + config["eval_every"]  # a seed that never reaches the target counts as one evaluation past the end
    reach = {a: np.nan_to_num(first_step_reaching(runs[a], target), nan=censor) for a in ARMS}
    never = {a: int(np.sum(reach[a] == censor)) for a in ARMS}
    quantities = {
        "test_acc/BN": test["BN"]["accuracy"],
        "test_acc/no_BN": test["no BN"]["accuracy"],
        "steps_to_target/BN": reach["BN"],
        "steps_to_target/no_BN": reach["no BN"],
        "val_acc/BN": runs["BN"].final("test_accuracy"),
        "val_acc/no_BN": runs["no BN"].final("test_accuracy"),
        "train_loss/BN": runs["BN"].final("train_loss"),
        "train_loss/no_BN": runs["no BN"].final("train_loss"),
    }
    gain = protocol.summarize(quantities["test_acc/BN"] - quantities["test_acc/no_BN"])

    table = testbed.tuning_table(arms, lrs)
    table += "\n\n" + report.markdown_table(
        [
            "arm",
            "rate",
            "final val acc",
            "test acc",
            f"steps to val acc {target:g}",
            "never reached",
            "final train loss",
        ],
        [
            (
                a,
                f"{chosen[a]:g}",
                report.fmt_seeds(runs[a].final("test_accuracy")),
                report.fmt_seeds(test[a]["accuracy"]),
                report.fmt_seeds(reach[a], 0),
                f"{never[a]} of {len(config['seeds'])}",
                report.fmt_seeds(runs[a].final("train_loss")),
            )
            for a in ARMS
        ],
    )
    table += (
        f"\n\nPaired test-accuracy gain of BN (BN - no BN, seed by seed): mean {gain.mean:+.4f}, "
        f"95% t-CI [{gain.low:+.4f}, {gain.high:+.4f}], n={gain.n}."
    )
    figures = [_figure(config, scores, chosen, runs, quantities, out_dir)]
    n_params = sum(a * b for a, b in zip([40, *config["widths"]], [*config["widths"], 10]))
    setup = (
        f"{splits.final.name.rsplit(',', 1)[0]} examples (train / validation / test; mnist1d.data.make_dataset with "
        f"{config['num_train'] + config['num_val'] + config['num_test']} examples, seed {config['data_seed']}, its "
        f"other arguments at their defaults); MLP {len(config['widths'])}x{config['widths'][0]} "
        f"{config['activation']}, no skip connections, {config['weight_init']} init, about {n_params} weights; "
        f"batch {config['batch_size']}, {config['optimizer']} (0.9), {steps} steps, validation accuracy (running "
        f"statistics) every {config['eval_every']} steps. BN = jbn.BatchNorm (momentum {config['bn_momentum']}) "
        f"after every hidden Dense (which then has no bias). Rates: each arm trains every rate of {lrs} on tuning "
        f"seeds {config['tuning_seeds']} and takes the one with the best mean final validation accuracy. Judged: "
        f"seeds {config['seeds']} at the chosen rates (same initialization seed and data order in both arms); the "
        f"test split is evaluated once, after the last step."
    )
    return report.finish(
        NAME,
        out_dir,
        config,
        title="0. Does BN help on this testbed? (experiment zero)",
        claim=CLAIM,
        setup=setup,
        table=table,
        figures=figures,
        quantities=quantities,
        seeds=config["seeds"],
    )


def _figure(config, scores, chosen, runs, quantities, out_dir) -> pathlib.Path:
    fig, axes = report.figure(3, 1)
    lrs = config["learning_rates"]
    for arm in ARMS:
        means = [float(np.mean(np.nan_to_num(scores[arm][lr], nan=0.0))) for lr in lrs]
        axes[0, 0].plot(lrs, means, marker="o", label=f"{arm} (chosen {chosen[arm]:g})")
    report.log_ticks(axes[0, 0], lrs)
    axes[0, 0].set(
        xlabel="learning rate",
        ylabel="final validation accuracy",
        title=f"tuning: mean of {len(config['tuning_seeds'])} tuning seeds",
    )
    axes[0, 0].legend()
    for arm in ARMS:
        r = runs[arm]
        report.band(axes[0, 1], r.steps, r.series["test_accuracy"], f"{arm} (lr {chosen[arm]:g})")
    axes[0, 1].axhline(config["target_val_accuracy"], color="gray", ls=":", lw=1)
    axes[0, 1].set(xlabel="step", ylabel="validation accuracy", title="judged seeds: mean, min-max band", ylim=(0, 1))
    axes[0, 1].legend()
    diff = quantities["test_acc/BN"] - quantities["test_acc/no_BN"]
    s = protocol.summarize(diff)
    ax = axes[0, 2]
    ax.scatter(np.zeros_like(diff) + np.linspace(-0.1, 0.1, diff.size), diff, s=14, label="seeds")
    ax.errorbar(
        [0.35],
        [s.mean],
        yerr=[[s.mean - s.low], [s.high - s.mean]],
        fmt="o",
        color="k",
        capsize=4,
        label="mean, 95% t-CI",
    )
    ax.axhline(0, color="gray", lw=1)
    ax.set(
        xlim=(-0.5, 0.8),
        xticks=[],
        xlabel="judged seeds (spread sideways)",
        ylabel="test accuracy, BN - no BN (paired)",
        title="paired gain per seed",
    )
    ax.legend()
    return report.save_figure(fig, out_dir, "bn_benefit.png")
