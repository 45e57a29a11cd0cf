"""Experiment 2: batch norm allows much higher learning rates.

Claim (Ioffe & Szegedy 2015, Sec. 3.3; repeated by the seed articles): with BN a network
trains at higher learning rates, and its best rate is higher, than without. Both arms
(experiment 1's 3x100 sigmoid MLP, batch 60) sweep the same grid of rates, so neither arm's
rate is chosen for the other: per arm and seed, the best rate and the largest stable rate,
both read on a validation split (the last `num_val` training sequences, never trained on).
The test split is read once per seed and arm, at the rate that seed chose on validation
(until 2026-12-04 the rates were chosen on the test split).
"""

from __future__ import annotations

import pathlib

import numpy as np

from experiments import data as datasets
from experiments import report
from experiments.models import MLP, NormSpec
from experiments.training import fit, make_optimizer
from experiments.tuning import test_once, validation_rows

NAME = "learning_rates"
DEFAULTS = {
    "data": "mnist1d",
    "num_val": 1000,  # the last 1000 of the 4000 training sequences: validation, for every choice
    "widths": [100, 100, 100],
    "activation": "sigmoid",
    "batch_size": 60,
    "steps": 1500,
    "eval_every": 100,
    "optimizer": "sgd",
    "learning_rates": [0.125, 0.5, 2.0, 8.0, 32.0],  # both arms sweep the whole grid
    "bn_momentum": 0.99,
    "seeds": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
    # Definition of "stable" (a quantity, not a criterion): no divergence, and a final validation
    # accuracy that keeps this fraction of the seed's best gain over chance on the grid.
    "stable_fraction": 0.5,
}
TINY = {"widths": [8], "steps": 4, "eval_every": 2, "seeds": [0, 1], "learning_rates": [0.5, 8.0]}

CLAIM = (
    "Batch norm lets a network train at much higher learning rates (Ioffe & Szegedy 2015, Sec. 3.3): with BN the "
    "largest learning rate at which the net still trains, and the best learning rate, are higher than without BN."
)


def per_seed_rates(acc: np.ndarray, finite: np.ndarray, lrs, chance: float, fraction: float):
    """(index of the best rate, largest stable rate) per seed from acc/finite of shape (rates, seeds)."""
    gain = np.where(finite, acc, -np.inf)
    best_i = np.argmax(gain, axis=0)
    best_gain = np.max(gain, axis=0) - chance
    stable = finite & (acc >= chance + fraction * best_gain[None])
    lrs = np.asarray(lrs, dtype=float)
    largest = np.array(
        [lrs[np.flatnonzero(stable[:, s])].max() if stable[:, s].any() else np.nan for s in range(acc.shape[1])]
    )
    return best_i, largest


def run(config: dict, out_dir: pathlib.Path) -> dict:
    out_dir = pathlib.Path(out_dir)
    data = datasets.load(config["data"])
    splits = datasets.validation_split(data, config["num_val"])
    arms = {"baseline": NormSpec("none"), "BN": NormSpec("bn", momentum=config["bn_momentum"])}
    lrs = config["learning_rates"]
    models, runs, rows = {}, {}, []
    for arm, norm in arms.items():
        models[arm] = MLP(tuple(config["widths"]), data.num_classes, activation=config["activation"], norm=norm)
        for lr in lrs:
            r = fit(
                models[arm],
                make_optimizer(config["optimizer"], lr),
                splits.tuning,  # its held-out part, which `fit` calls "test", is the validation split
                seeds=config["seeds"],
                steps=config["steps"],
                batch_size=config["batch_size"],
                eval_every=config["eval_every"],
                desc=f"{arm} lr {lr:g}",
            )
            runs[arm, lr] = r
            rows += validation_rows(r, arm=arm, learning_rate=lr)

    chance = 1.0 / data.num_classes
    acc = {a: np.stack([runs[a, lr].final("test_accuracy") for lr in lrs]) for a in arms}  # validation, (rates, seeds)
    finite = {a: np.stack([np.isfinite(runs[a, lr].final("train_loss")) for lr in lrs]) for a in arms}
    acc = {a: np.where(finite[a], acc[a], chance) for a in arms}  # a diverged seed is at chance
    best, largest, test_acc = {}, {}, {}
    for a in arms:
        best_i, largest[a] = per_seed_rates(acc[a], finite[a], lrs, chance, config["stable_fraction"])
        best[a] = np.asarray(lrs, dtype=float)[best_i]
        # The test split, once per seed: the model that seed chose on validation.
        test_acc[a] = np.full(len(config["seeds"]), np.nan)
        for i in sorted(set(best_i.tolist())):
            chose = best_i == i
            test_acc[a][chose] = test_once(models[a], runs[a, lrs[i]], splits.final)["accuracy"][chose]
        rows += [
            {"arm": a, "learning_rate": lr, "seed": s, "step": "", "metric": "test_accuracy", "value": float(v)}
            for s, lr, v in zip(config["seeds"], best[a], test_acc[a])
        ]
    report.write_metrics(out_dir, rows)

    table_rows = []
    for i, lr in enumerate(lrs):
        row = [f"{lr:g}"]
        for a in arms:
            d = int(np.sum(~finite[a][i]))
            row.append(report.fmt_seeds(acc[a][i]) + (f" ({d} diverged)" if d else ""))
        table_rows.append(row)
    table = report.markdown_table(["learning rate", "baseline final val acc", "BN final val acc"], table_rows)
    table += "\n\n" + report.markdown_table(
        [
            "arm",
            "best rate on validation (per seed: median, range)",
            "largest stable rate (median, range)",
            "test acc at the rate chosen on validation",
        ],
        [
            (
                a,
                f"{np.median(best[a]):g} ({best[a].min():g}-{best[a].max():g})",
                f"{np.nanmedian(largest[a]):g} ({np.nanmin(largest[a]):g}-{np.nanmax(largest[a]):g})",
                report.fmt_seeds(test_acc[a]),
            )
            for a in arms
        ],
    )
    quantities = {}
    for a in arms:
        quantities[f"best_lr/{a}"] = best[a]
        quantities[f"largest_stable_lr/{a}"] = largest[a]
        quantities[f"best_acc/{a}"] = test_acc[a]

    fig, axes = report.figure(2, 1)
    for a in arms:
        m, sd = acc[a].mean(1), acc[a].std(1, ddof=1) if acc[a].shape[1] > 1 else np.zeros(len(lrs))
        axes[0, 0].errorbar(lrs, m, yerr=sd, marker="o", capsize=3, label=a)
    report.log_ticks(axes[0, 0], lrs)
    axes[0, 0].axhline(chance, color="gray", ls=":", lw=1)
    axes[0, 0].set(
        xlabel="learning rate", ylabel="final validation accuracy", title="both arms sweep the grid (± sample SD)"
    )
    axes[0, 0].legend()
    for _, a in enumerate(arms):
        lr = float(np.median(best[a]))
        lr = min(lrs, key=lambda x: abs(x - lr))
        report.band(axes[0, 1], runs[a, lr].steps, runs[a, lr].series["test_accuracy"], f"{a} at lr {lr:g}")
    axes[0, 1].set(xlabel="step", ylabel="validation accuracy", title="each arm at its (median) best rate", ylim=(0, 1))
    axes[0, 1].legend()
    figures = [report.save_figure(fig, out_dir, "learning_rates.png")]
    setup = (
        f"{splits.final.name.rsplit(',', 1)[0]}, its last {config['num_val']} training sequences held out as the "
        f"validation split; MLP {config['widths']} {config['activation']}, batch {config['batch_size']}, "
        f"{config['optimizer']}, both arms at learning rates {lrs}, {config['steps']} steps, seeds {config['seeds']} "
        f"(paired: both arms share each seed's data order); BN = jbn.BatchNorm (momentum {config['bn_momentum']}) "
        "before each sigmoid. Accuracies use the running statistics; a seed whose final training loss is not finite has "
        "diverged (counted at chance). Per seed and arm, on the validation split: the best rate (highest final "
        "validation accuracy) and the largest stable rate (no divergence and at least "
        f"{config['stable_fraction']:.0%} of the seed's best validation gain over chance). The test split is read once "
        "per seed and arm, after training, at the rate that seed chose on validation."
    )
    return report.finish(
        NAME,
        out_dir,
        config,
        title="2. Higher learning rates with BN",
        claim=CLAIM,
        setup=setup,
        table=table,
        figures=figures,
        quantities=quantities,
        seeds=config["seeds"],
    )
