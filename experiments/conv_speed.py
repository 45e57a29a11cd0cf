"""Experiment 3: batch norm speeds up training of a conv net.

Claim (the seed articles, after Ioffe & Szegedy 2015): with BN a network reaches a given
accuracy in fewer steps. A small conv net on the 8x8 digit images, with and without
BN, the same optimizer and learning rates, several seeds: steps to a target accuracy on a
validation split (the last `num_val` training images, never trained on), each arm at the rate
with the fewest steps on validation. The test split is read once per run, after training
(until 2026-12-04 the steps and the rates were read on the test split).
"""

from __future__ import annotations

import pathlib

import numpy as np

from experiments import data as datasets
from experiments import report
from experiments.models import ConvNet, NormSpec
from experiments.training import first_step_reaching, fit, make_optimizer
from experiments.tuning import test_once, validation_rows

NAME = "conv_speed"
DEFAULTS = {
    "data": "digits_image",
    "num_val": 288,  # the last 288 of the 1438 training images: validation, for steps and rates
    "channels": [16, 32, 32],
    "pool_after": [0],  # max-pool after these conv blocks
    "batch_size": 32,
    "steps": 400,
    "eval_every": 10,
    "optimizer": "momentum",
    "learning_rates": [0.03, 0.1, 0.3],  # both arms run every rate; each is compared at its best
    "bn_momentum": 0.9,
    "target_accuracy": 0.95,
    "seeds": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
}
TINY = {"steps": 4, "eval_every": 2, "seeds": [0, 1], "channels": [4], "target_accuracy": 0.2, "learning_rates": [0.1]}

CLAIM = "Batch norm speeds up training: a conv net with BN reaches a target accuracy in fewer steps than without."


def run(config: dict, out_dir: pathlib.Path) -> dict:
    out_dir = pathlib.Path(out_dir)
    data = datasets.load(config["data"])
    splits = datasets.validation_split(data, config["num_val"])
    arms = {"baseline": NormSpec("none"), "BN": NormSpec("bn", momentum=config["bn_momentum"])}
    target, steps, lrs = config["target_accuracy"], config["steps"], config["learning_rates"]
    models, runs, reach, rows = {}, {}, {}, []
    for arm, norm in arms.items():
        model = models[arm] = ConvNet(
            tuple(config["channels"]), data.num_classes, norm=norm, pool_after=tuple(config["pool_after"])
        )
        for lr in lrs:
            r = fit(
                model,
                make_optimizer(config["optimizer"], lr),
                splits.tuning,  # its held-out part, which `fit` calls "test", is the validation split
                seeds=config["seeds"],
                steps=steps,
                batch_size=config["batch_size"],
                eval_every=config["eval_every"],
                desc=f"{arm} lr {lr:g}",
                vmap_seeds=False,
                scan_steps=False,
            )
            # A seed that never reaches the target: inf here, one evaluation past the run below.
            runs[arm, lr], reach[arm, lr] = r, first_step_reaching(r, target)
            rows += validation_rows(r, arm=arm, learning_rate=lr)
            rows += [
                {
                    "arm": arm,
                    "learning_rate": lr,
                    "seed": s,
                    "step": "",
                    "metric": f"steps_to_val_{target:g}",
                    "value": float(v),
                }
                for s, v in zip(r.seeds, reach[arm, lr])
            ]

    n_seeds = len(config["seeds"])
    # a seed that never reaches the target counts as one evaluation past the run
    censored = {k: np.where(np.isfinite(v), v, steps + config["eval_every"]) for k, v in reach.items()}
    never = {k: int(np.sum(~np.isfinite(v))) for k, v in reach.items()}
    best = {
        a: min(lrs, key=lambda lr: (np.mean(censored[a, lr]), -np.mean(runs[a, lr].final("test_accuracy"))))
        for a in arms
    }  # on validation: fewest mean steps, then the best final validation accuracy
    # The test split, once per run: each arm's seeds at the rate chosen on validation.
    test = {a: test_once(models[a], runs[a, best[a]], splits.final)["accuracy"] for a in arms}
    rows += [
        {"arm": a, "learning_rate": best[a], "seed": s, "step": "", "metric": "test_accuracy", "value": float(v)}
        for a in arms
        for s, v in zip(config["seeds"], test[a])
    ]
    report.write_metrics(out_dir, rows)
    table = report.markdown_table(
        ["arm", "learning rate", f"steps to {target:g} val acc", "never reached", "final val acc", "test acc"],
        [
            (
                a + (" (best rate)" if lr == best[a] else ""),
                f"{lr:g}",
                report.fmt_seeds(censored[a, lr], 0),
                f"{never[a, lr]} of {n_seeds}",
                report.fmt_seeds(runs[a, lr].final("test_accuracy")),
                report.fmt_seeds(test[a]) if lr == best[a] else "",
            )
            for a in arms
            for lr in lrs
        ],
    )
    # Per-seed quantities at each arm's best rate (paired: both arms share each seed's init
    # seed and data order); a seed that never reaches the target counts as one evaluation
    # past the run (steps, and a reach fraction above 1), so sign tests count it against BN.
    quantities = {
        "reach_fraction/BN": censored["BN", best["BN"]] / steps,
        "steps/BN": censored["BN", best["BN"]],
        "steps/baseline": censored["baseline", best["baseline"]],
        # per seed, the smallest over the grid of the baseline/BN step ratio at the same rate
        "worst_grid_ratio": np.min([censored["baseline", lr] / censored["BN", lr] for lr in lrs], axis=0),
        "test_acc/BN": test["BN"],
        "test_acc/baseline": test["baseline"],
    }
    fig, axes = report.figure(2, 1)
    for a in arms:
        means = [np.mean(censored[a, lr]) for lr in lrs]
        stds = [np.std(censored[a, lr], ddof=1) if n_seeds > 1 else 0.0 for lr in lrs]
        axes[0, 0].errorbar(lrs, means, yerr=stds, marker="o", capsize=3, label=a)
    report.log_ticks(axes[0, 0], lrs)
    axes[0, 0].set(
        xlabel="learning rate", ylabel=f"steps to {target:g} val acc", title=f"mean ± sample SD over {n_seeds} seeds"
    )
    axes[0, 0].legend()
    for a in arms:
        r = runs[a, best[a]]
        report.band(axes[0, 1], r.steps, r.series["test_accuracy"], f"{a} (lr {best[a]:g})")
    axes[0, 1].axhline(target, color="gray", ls=":", lw=1)
    axes[0, 1].set(xlabel="step", ylabel="validation accuracy", title="at each arm's best rate", ylim=(0, 1))
    axes[0, 1].legend()
    figures = [report.save_figure(fig, out_dir, "conv_speed.png")]
    setup = (
        f"{data.name}, its last {config['num_val']} training images held out as the validation split; conv net {config['channels']} 3x3 channels, ReLU, max-pool after block(s) {config['pool_after']}, "
        f"global average pool, Dense; batch {config['batch_size']}, {config['optimizer']} (0.9) at learning rates {lrs} for "
        f"both arms, {steps} steps, validation accuracy (running statistics) every {config['eval_every']} steps, seeds "
        f"{config['seeds']} (same init seed and data order in both arms). BN = jbn.BatchNorm (momentum "
        f"{config['bn_momentum']}) after each conv (conv without bias). Each arm's best rate = fewest mean steps to the target on validation; the test split is read "
        "once, after training, at that rate."
    )
    return report.finish(
        NAME,
        out_dir,
        config,
        title="3. Convergence speed on a conv net",
        claim=CLAIM,
        setup=setup,
        table=table,
        figures=figures,
        quantities=quantities,
        seeds=config["seeds"],
    )
