"""Experiment 2: batch norm allows much higher learning rates.

Claim (Ioffe & Szegedy 2015, Sec. 3.3; repeated by the seed articles): with BN a network
keeps training at learning rates where the same network without BN stalls or diverges.
The nets are experiment 1's (3x100 sigmoid MLP, batch 60) at 1x, 5x and 30x a base rate.
"""
from __future__ import annotations

import pathlib

import numpy as np

from experiments import data as datasets
from experiments import report
from experiments.models import MLP, NormSpec
from experiments.training import fit, make_optimizer

NAME = "learning_rates"
DEFAULTS = {
    "data": "mnist1d",
    "widths": [100, 100, 100],
    "activation": "sigmoid",
    "batch_size": 60,
    "steps": 3000,
    "eval_every": 100,
    "optimizer": "sgd",
    "base_learning_rate": 0.5,  # the best rate for the baseline in a sweep of 0.1-30 (README)
    "multipliers": [1.0, 5.0, 30.0],
    "bn_momentum": 0.99,
    "seeds": [0, 1, 2],
    "keep_fraction": 0.5,  # "trains" = keeps this fraction of its own 1x gain over chance
}
TINY = {"widths": [8], "steps": 4, "eval_every": 2, "seeds": [0], "multipliers": [1.0, 30.0]}

CLAIM = (
    "Batch norm lets a network train at much higher learning rates: at 5x and 30x the base rate the BN net "
    "still trains, where the same net without BN stalls or diverges."
)


def run(config: dict, out_dir: pathlib.Path) -> dict:
    out_dir = pathlib.Path(out_dir)
    data = datasets.load(config["data"])
    arms = {"baseline": NormSpec("none"), "BN": NormSpec("bn", momentum=config["bn_momentum"])}
    mults = config["multipliers"]
    runs, rows = {}, []
    for arm, norm in arms.items():
        model = MLP(tuple(config["widths"]), data.num_classes, activation=config["activation"], norm=norm)
        for m in mults:
            lr = config["base_learning_rate"] * m
            r = fit(
                model, make_optimizer(config["optimizer"], lr), data, seeds=config["seeds"], steps=config["steps"],
                batch_size=config["batch_size"], eval_every=config["eval_every"], desc=f"{arm} lr x{m:g}",
            )
            runs[arm, m] = r
            rows += r.rows(arm=arm, multiplier=m, learning_rate=lr)
    report.write_metrics(out_dir, rows)

    def final_acc(arm, m):
        return report.mean_std(runs[arm, m].final("test_accuracy"))

    def diverged(arm, m):
        return int(np.sum(~np.isfinite(runs[arm, m].final("train_loss"))))

    table_rows = []
    for m in mults:
        row = [f"x{m:g} (lr {config['base_learning_rate'] * m:g})"]
        for arm in arms:
            acc = report.fmt_seeds(runs[arm, m].final("test_accuracy"))
            d = diverged(arm, m)
            row.append(acc + (f" ({d} diverged)" if d else ""))
        table_rows.append(row)
    table = report.markdown_table(["learning rate", "baseline final test acc", "BN final test acc"], table_rows)

    low = min(mults)
    keep = config["keep_fraction"]
    chance = 1.0 / data.num_classes

    def trains(arm, m) -> bool:
        """Whether `arm` still trains at multiplier m: no diverged seed, and a mean final
        accuracy that keeps `keep` of the gain over chance it has at the lowest multiplier."""
        return diverged(arm, m) == 0 and final_acc(arm, m)[0] >= chance + keep * (final_acc(arm, low)[0] - chance)

    def described(arm, m) -> str:
        return f"{arm} x{m:g}: {final_acc(arm, m)[0]:.3f} ({diverged(arm, m)} diverged), x{low:g}: {final_acc(arm, low)[0]:.3f}"

    rule = f"(a net 'trains' at a rate when no seed diverges and its mean final accuracy keeps {keep:.0%} of its x{low:g} gain over chance {chance:.2f})"
    checks = []
    for m in [m for m in mults if m > low]:  # every raised rate is part of the claim, each judged on its own
        part = f"x{m:g}"
        (mb, sb), (mn, sn) = final_acc("BN", m), final_acc("baseline", m)
        checks += [
            report.Check(f"Without BN the net stalls or diverges at x{m:g} {rule}", not trains("baseline", m), described("baseline", m), part=part),
            report.Check(f"With BN the net still trains at x{m:g} (same rule)", trains("BN", m), described("BN", m), part=part),
            report.Check(
                f"At x{m:g}, BN's final test accuracy beats the baseline's by more than the seed spreads combined "
                "(mean_BN - mean_base > std_BN + std_base)",
                bool(mb - mn > sb + sn), f"BN {report.fmt(mb, sb)} vs baseline {report.fmt(mn, sn)}", part=part,
            ),
        ]

    fig, axes = report.figure(len(mults), 1, width=3.3)
    for j, m in enumerate(mults):
        ax = axes[0, j]
        for arm in arms:
            report.band(ax, runs[arm, m].steps, runs[arm, m].series["test_accuracy"], arm)
        ax.set(xlabel="step", ylabel="test accuracy", title=f"lr x{m:g} = {config['base_learning_rate'] * m:g}", ylim=(0, 1))
        ax.legend()
    figures = [report.save_figure(fig, out_dir, "learning_rates.png")]
    setup = (
        f"{data.name}; MLP {config['widths']} {config['activation']}, batch {config['batch_size']}, "
        f"{config['optimizer']}, base lr {config['base_learning_rate']} times {mults}, {config['steps']} steps, "
        f"seeds {config['seeds']}; BN = jbn.BatchNorm (momentum {config['bn_momentum']}) before each sigmoid. "
        "Final test accuracy uses the running statistics; a seed whose final training loss is not finite counts as diverged."
    )
    _, v = report.write_summary(
        out_dir, title="2. Higher learning rates with BN", claim=CLAIM, setup=setup, table=table, checks=checks,
        figures=figures, command=report.command_for(NAME),
    )
    return report.result(NAME, out_dir, v, table, figures, checks)
