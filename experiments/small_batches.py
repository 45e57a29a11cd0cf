"""Experiment 5: batch norm with small statistics batches.

Claim (Wu & He 2018, Table 1 / Fig. 1; Ioffe 2017): BN's accuracy drops when each
normalization sees only 2-4 examples, while GroupNorm (no batch dependence), ghost BN
(small statistics batches inside a normal optimizer batch) and Batch Renorm (corrects batch
statistics towards the running ones) degrade less.
"""
from __future__ import annotations

import pathlib

import numpy as np

from experiments import data as datasets
from experiments import features, report
from experiments.models import MLP, NormSpec, renorm_ramp
from experiments.training import fit, make_optimizer

NAME = "small_batches"
DEFAULTS = {
    "data": "mnist1d",
    "widths": [128, 128, 128],
    "activation": "relu",
    "norms": ["bn", "ghost", "renorm", "group"],
    "statistics_batch_sizes": [2, 4, 8, 16, 32],
    "ghost_batch_size": 32,  # ghost BN: optimizer batch; its statistics batch is varied
    "epochs": 10.0,  # every arm sees the same number of examples
    "evaluations": 10,  # per run
    "optimizer": "momentum",
    "learning_rate": 0.05,  # at batch `reference_batch_size`; scaled linearly with the batch
    "reference_batch_size": 32,
    "bn_momentum": 0.99,
    "group_size": 16,
    "renorm_r_max": 3.0,
    "renorm_d_max": 5.0,
    "renorm_ramp": [0.05, 0.4],  # plain BN for the first 5% of steps, limits reached at 40%; [] = fixed limits
    "seeds": [0, 1, 2],
    "degrade_margin": 0.03,  # "degrades" = small-batch accuracy this far below batch 32
}
TINY = {"statistics_batch_sizes": [2], "epochs": 0.01, "seeds": [0], "evaluations": 2, "widths": [16], "group_size": 8}

CLAIM = (
    "BN degrades when its statistics come from 2-4 examples; GroupNorm, ghost BN and Batch Renorm "
    "degrade less (Wu & He 2018; Ioffe 2017)."
)
LABELS = {"bn": "BN", "ghost": "ghost BN", "renorm": "Batch Renorm", "group": "GroupNorm"}


def ramp_text(ramp) -> str:
    if not ramp:
        return "fixed limits"
    return f"plain BN for the first {ramp[0]:.0%} of the steps, then both limits linear up to {ramp[1]:.0%}"


def run(config: dict, out_dir: pathlib.Path) -> dict:
    out_dir = pathlib.Path(out_dir)
    data = datasets.load(config["data"])
    sizes = config["statistics_batch_sizes"]
    n_train = len(data.y_train)
    acc, status, rows = {}, {}, []
    for kind in config["norms"]:
        status[kind] = features.waiting_for_norm(kind)
        if status[kind]:  # the arm needs a jbn feature that has not landed: no number, a marker
            for b in sizes:
                rows += report.waiting_rows(status[kind], norm=kind, statistics_batch=b)
            continue
        for b in sizes:
            batch = config["ghost_batch_size"] if kind == "ghost" else b
            steps = max(1, int(config["epochs"] * n_train) // batch)
            spec = NormSpec(
                kind, momentum=config["bn_momentum"], virtual_batch_size=b, group_size=config["group_size"],
                r_max=config["renorm_r_max"], d_max=config["renorm_d_max"], renorm_ramp=renorm_ramp(config["renorm_ramp"], steps),
            )
            lr = config["learning_rate"] * batch / config["reference_batch_size"]
            model = MLP(tuple(config["widths"]), data.num_classes, activation=config["activation"], norm=spec)
            r = fit(
                model, make_optimizer(config["optimizer"], lr), data, seeds=config["seeds"], steps=steps, batch_size=batch,
                eval_every=max(1, steps // config["evaluations"]), desc=f"{LABELS[kind]} b={b}",
            )
            acc[kind, b] = r.final("test_accuracy")
            rows += r.rows(norm=kind, statistics_batch=b, batch=batch, learning_rate=lr)
    report.write_metrics(out_dir, rows)

    table = report.markdown_table(
        ["norm"] + [f"stat. batch {b}" for b in sizes],
        [
            [LABELS[k] + (f" ({status[k]})" if status[k] else "")] + ["waiting" if status[k] else report.fmt_seeds(acc[k, b]) for b in sizes]
            for k in config["norms"]
        ],
    )
    small = [b for b in sizes if b <= 4] or [min(sizes)]
    large = max(sizes)

    def drop(kind) -> float:
        """Accuracy at the largest statistics batch minus the mean over batches <= 4."""
        return float(np.mean(acc[kind, large]) - np.mean([np.mean(acc[kind, b]) for b in small]))

    margin = config["degrade_margin"]
    checks = []
    if "bn" in config["norms"]:
        checks.append(report.Check(
            f"BN degrades at small statistics batches: accuracy at batch {large} minus the mean over batches {small} > {margin:g}",
            bool(drop("bn") > margin), f"BN drop {drop('bn'):+.3f}",
        ))
        for kind in config["norms"]:
            if kind == "bn":
                continue
            criterion = f"{LABELS[kind]} degrades less than BN (smaller drop from batch {large} to batches {small})"
            if status[kind]:
                checks.append(report.Check(criterion, None, status[kind]))
            else:
                checks.append(report.Check(criterion, bool(drop(kind) < drop("bn")), f"{LABELS[kind]} drop {drop(kind):+.3f} vs BN {drop('bn'):+.3f}"))

    fig, axes = report.figure(1, 1, width=4.8)
    ax = axes[0, 0]
    for kind in config["norms"]:
        if status[kind]:
            ax.plot([], [], ls="none", label=f"{LABELS[kind]} ({status[kind]})")
            continue
        means = [np.mean(acc[kind, b]) for b in sizes]
        stds = [np.std(acc[kind, b]) for b in sizes]
        ax.errorbar(sizes, means, yerr=stds, marker="o", capsize=3, label=LABELS[kind])
    ax.set(xlabel="examples per statistics batch", ylabel="final test accuracy", title="small statistics batches")
    report.log_ticks(ax, sizes)
    ax.legend(fontsize=7)
    figures = [report.save_figure(fig, out_dir, "small_batches.png")]
    setup = (
        f"{data.name}; MLP {config['widths']} {config['activation']} with the norm before each ReLU; {config['epochs']} "
        f"epochs for every arm; {config['optimizer']} with lr {config['learning_rate']} x batch/{config['reference_batch_size']} "
        f"(linear scaling); seeds {config['seeds']}. BN, Batch Renorm (jbn.BatchRenorm, r_max {config['renorm_r_max']}, d_max "
        f"{config['renorm_d_max']}, {ramp_text(config['renorm_ramp'])}) and GroupNorm (flax, groups of {config['group_size']}) train with batches of the "
        f"statistics size; ghost BN trains with batches of {config['ghost_batch_size']} split into virtual batches of "
        f"that size. Test accuracy uses the running statistics (GroupNorm has none)."
    )
    _, v = report.write_summary(
        out_dir, title="5. Small statistics batches", claim=CLAIM, setup=setup, table=table, checks=checks,
        figures=figures, command=report.command_for(NAME),
    )
    return report.result(NAME, out_dir, v, table, figures, checks)
