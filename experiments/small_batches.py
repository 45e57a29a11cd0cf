"""Experiment 5: batch norm with small statistics batches; ghost BN for large batches.

(A) Wu & He 2018 (Table 1 / Fig. 1) and Ioffe 2017: BN's accuracy drops when each
normalization sees only 2-4 examples, while GroupNorm (statistics over groups of channels
and the spatial positions of one example, so no batch dependence) and Batch Renorm
(batch statistics corrected towards the running ones) degrade less. Run on a conv net, so
GroupNorm normalizes over channels x space as Wu & He define it.
(B) Ghost BN is Hoffer et al. 2017's ("Train longer, generalize better") remedy for LARGE
batches: statistics over small virtual batches inside a large optimizer batch close part of
the generalization gap of large-batch training. It is not a small-batch remedy, so it is
tested on its own claim: large batch with ghost BN vs large batch with plain BN, on
experiment zero's testbed, every arm's rate tuned on its validation split (until 2026-12-05:
a 3x128 ReLU MLP on the 4000-example MNIST-1D at one linearly scaled rate).
"""

from __future__ import annotations

import pathlib

import numpy as np

from experiments import data as datasets
from experiments import features, report, testbed
from experiments.models import ConvNet, NormSpec, renorm_ramp
from experiments.training import fit, make_optimizer

NAME = "small_batches"
# The testbed settings part B takes from experiment zero (as ghost_<key>).
TESTBED_KEYS = (
    "num_train",
    "num_val",
    "num_test",
    "data_seed",
    "widths",
    "activation",
    "weight_init",
    "optimizer",
    "bn_momentum",
    "tuning_seeds",
    "seeds",
)
DEFAULTS = {
    # (A) small statistics batches, conv net
    "data": "digits_image",
    "channels": [8, 16],
    "pool_after": [0],
    "norms": ["bn", "renorm", "group"],
    "statistics_batch_sizes": [2, 4, 32],
    # Every arm takes the same number of updates (until 2026-12-04: the same 3 epochs, so batch 2
    # took 16x the updates of batch 32); 2157 steps are 3 epochs at batch 2, 48 at batch 32.
    "steps": 2157,
    "evaluations": 5,  # per run
    "optimizer": "momentum",
    "learning_rate": 0.2,  # at batch `reference_batch_size`; scaled linearly with the batch
    "reference_batch_size": 32,
    "bn_momentum": 0.99,
    "group_size": 4,  # channels per group
    "renorm_r_max": 3.0,
    "renorm_d_max": 5.0,
    "renorm_ramp": [0.05, 0.4],  # plain BN for the first 5% of steps, limits reached at 40%; [] = fixed limits
    "seeds": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
    # (B) ghost BN for large batches (Hoffer et al. 2017) on experiment zero's testbed: its keys
    # with a "ghost_" prefix; batch, steps and rate grid are part B's own.
    **{f"ghost_{k}": v for k, v in testbed.DEFAULTS.items() if k in TESTBED_KEYS},
    "large_batch": 512,
    "virtual_batch_size": 32,  # ghost BN's statistics batch, and the small-batch reference arm's batch
    "ghost_epochs": 8.5,  # the testbed's 2000 steps of 128 examples over 30000 training examples
    # the testbed's grid and one more rate: a larger batch may want a larger rate
    "ghost_learning_rates": [0.003, 0.01, 0.03, 0.1, 0.3, 1.0],
}
TINY = {
    "statistics_batch_sizes": [2],
    "steps": 2,
    "seeds": [0, 1],
    "evaluations": 1,
    "channels": [4],
    "group_size": 2,
    **{f"ghost_{k}": v for k, v in testbed.TINY.items() if k in TESTBED_KEYS},
    "ghost_epochs": 0.5,
    "large_batch": 64,
    "virtual_batch_size": 16,
    "ghost_learning_rates": [0.1],
}

CLAIM = (
    "(A) BN degrades when its statistics come from 2-4 examples; GroupNorm and Batch Renorm degrade less (Wu & He "
    "2018; Ioffe 2017). (B) With a large optimizer batch, ghost BN (small virtual statistics batches) generalizes "
    "better than plain BN (Hoffer et al. 2017)."
)
LABELS = {"bn": "BN", "renorm": "Batch Renorm", "group": "GroupNorm"}


def ramp_text(ramp) -> str:
    if not ramp:
        return "fixed limits"
    return f"plain BN for the first {ramp[0]:.0%} of the steps, then both limits linear up to {ramp[1]:.0%}"


def run(config: dict, out_dir: pathlib.Path) -> dict:
    out_dir = pathlib.Path(out_dir)
    data = datasets.load(config["data"])
    sizes = config["statistics_batch_sizes"]
    acc, status, rows = {}, {}, []
    for kind in config["norms"]:
        status[kind] = features.waiting_for_norm(kind)
        if status[kind]:  # the arm needs a jbn feature that has not landed: no number, a marker
            for b in sizes:
                rows += report.waiting_rows(status[kind], norm=kind, statistics_batch=b)
            continue
        for b in sizes:
            steps = config["steps"]
            spec = NormSpec(
                kind,
                momentum=config["bn_momentum"],
                group_size=config["group_size"],
                r_max=config["renorm_r_max"],
                d_max=config["renorm_d_max"],
                renorm_ramp=renorm_ramp(config["renorm_ramp"], steps),
            )
            lr = config["learning_rate"] * b / config["reference_batch_size"]
            model = ConvNet(
                tuple(config["channels"]), data.num_classes, norm=spec, pool_after=tuple(config["pool_after"])
            )
            r = fit(
                model,
                make_optimizer(config["optimizer"], lr),
                data,
                seeds=config["seeds"],
                steps=steps,
                batch_size=b,
                eval_every=max(1, steps // config["evaluations"]),
                desc=f"{LABELS[kind]} b={b}",
                vmap_seeds=False,
                scan_steps=True,
            )
            acc[kind, b] = r.final("test_accuracy")
            rows += r.rows(part="A", norm=kind, statistics_batch=b, batch=b, learning_rate=lr)

    # (B) ghost BN at a large optimizer batch vs plain BN at the same batch (and BN at the small
    # batch for reference), the same number of epochs, each arm's rate tuned on validation.
    base = {k: config[f"ghost_{k}"] for k in TESTBED_KEYS}
    gdata = testbed.splits(base)
    large, small_b = config["large_batch"], config["virtual_batch_size"]
    ghost, ghost_acc = {}, {}
    for arm, batch, spec in (
        ("BN, large batch", large, NormSpec("bn", momentum=base["bn_momentum"])),
        ("ghost BN, large batch", large, NormSpec("ghost", momentum=base["bn_momentum"], virtual_batch_size=small_b)),
        ("BN, small batch", small_b, NormSpec("bn", momentum=base["bn_momentum"])),
    ):
        wait = features.waiting_for_norm(spec.kind)
        if wait:
            rows += report.waiting_rows(wait, part="B", arm=arm)
            continue
        steps = max(1, int(config["ghost_epochs"] * len(gdata.tuning.y_train)) // batch)
        arm_config = base | {
            "batch_size": batch,
            "steps": steps,
            "eval_every": max(1, steps // config["evaluations"]),
            "learning_rates": config["ghost_learning_rates"],
        }
        ghost[arm] = t = testbed.tune_and_judge(arm_config, arm, testbed.mlp(arm_config, spec), gdata)
        ghost_acc[arm] = t.test["accuracy"]
        rows += [{**row, "part": "B", "batch": batch} for row in t.rows]
    report.write_metrics(out_dir, rows)

    table = report.markdown_table(
        ["(A) norm, conv net"] + [f"stat. batch {b}" for b in sizes],
        [
            [LABELS[k] + (f" ({status[k]})" if status[k] else "")]
            + ["waiting" if status[k] else report.fmt_seeds(acc[k, b]) for b in sizes]
            for k in config["norms"]
        ],
    )
    table += "\n\n" + testbed.tuning_table(ghost, config["ghost_learning_rates"])
    table += "\n\n" + report.markdown_table(
        ["(B) arm", "rate", "test acc (once, after training)", "final val acc"],
        [
            (a, f"{t.rate:g}", report.fmt_seeds(t.test["accuracy"]), report.fmt_seeds(t.run.final("test_accuracy")))
            for a, t in ghost.items()
        ],
    )
    small = [b for b in sizes if b <= 4] or [min(sizes)]
    largest = max(sizes)

    quantities = {}
    for kind in config["norms"]:
        if not status[kind]:
            # per seed: accuracy at the largest statistics batch minus the mean over batches <= 4
            quantities[f"drop/{kind}"] = acc[kind, largest] - np.mean([acc[kind, b] for b in small], axis=0)
    for arm, key in (
        ("BN, large batch", "bn_large"),
        ("ghost BN, large batch", "ghost_large"),
        ("BN, small batch", "bn_small"),
    ):
        if arm in ghost_acc:
            quantities[f"test_acc/{key}"] = ghost_acc[arm]

    fig, axes = report.figure(2, 1, width=4.4)
    ax = axes[0, 0]
    for kind in config["norms"]:
        if status[kind]:
            ax.plot([], [], ls="none", label=f"{LABELS[kind]} ({status[kind]})")
            continue
        means = [np.mean(acc[kind, b]) for b in sizes]
        stds = [report.mean_std(acc[kind, b])[1] for b in sizes]
        ax.errorbar(sizes, means, yerr=np.nan_to_num(stds), marker="o", capsize=3, label=LABELS[kind])
    ax.set(xlabel="examples per statistics batch", ylabel="final test accuracy", title="(A) conv net, small batches")
    report.log_ticks(ax, sizes)
    ax.legend(fontsize=7)
    ax = axes[0, 1]
    names = list(ghost_acc)
    if names:  # each seed's arms joined by a line: the comparison is paired by seed
        ax.plot(range(len(names)), np.stack([ghost_acc[a] for a in names]), color="gray", lw=0.8, alpha=0.6)
        ax.plot(range(len(names)), [np.mean(ghost_acc[a]) for a in names], "ko-", label="mean")
        ax.legend(fontsize=7)
    ax.set_xticks(range(len(names)), [a.replace(", ", "\n") for a in names], fontsize=7)
    ax.set(
        ylabel="test accuracy (once, after training)", title=f"(B) batch {large}: ghost BN ({small_b}) vs BN, per seed"
    )
    figures = [report.save_figure(fig, out_dir, "small_batches.png")]
    part_b = testbed.describe(
        base | {"learning_rates": config["ghost_learning_rates"]}, gdata, f"{base['optimizer']} (0.9)"
    )
    setup = (
        f"(A) {data.name}; conv net {config['channels']} channels (3x3, the norm before each ReLU, max-pool after block(s) "
        f"{config['pool_after']}, global average pool); {config['steps']} updates for every arm (so "
        f"{config['steps'] * min(sizes) / len(data.y_train):.1f} epochs at batch {min(sizes)}, "
        f"{config['steps'] * max(sizes) / len(data.y_train):.1f} at batch {max(sizes)}); {config['optimizer']} with "
        f"lr {config['learning_rate']} x batch/{config['reference_batch_size']} (linear scaling); seeds {config['seeds']} "
        f"(paired across batch sizes: the drop is taken per seed). BN = jbn.BatchNorm (per channel over N, H, W), Batch "
        f"Renorm = jbn.BatchRenorm (r_max {config['renorm_r_max']}, d_max {config['renorm_d_max']}, "
        f"{ramp_text(config['renorm_ramp'])}), GroupNorm = flax.linen.GroupNorm with {config['group_size']} channels per "
        f"group, normalizing each example over its group's channels and all spatial positions (Wu & He's definition); "
        f"every arm trains with batches of the statistics size. Test accuracy with the running statistics (GroupNorm has "
        f"none). Drop = accuracy at batch {largest} minus the mean over batches {small}. (B) "
        f"{part_b} "
        f"Here the batch and steps differ by arm: {config['ghost_epochs']} epochs each, batch {large} with plain BN vs "
        f"batch {large} with ghost BN (jbn.BatchNorm(virtual_batch_size={small_b})), and batch {small_b} with BN for "
        f"reference; every arm's rate tuned over {config['ghost_learning_rates']} by the same procedure. Hoffer et al. "
        f"also train longer at the large batch; here every arm has the same epochs, so the large-batch arms differ only "
        f"in the statistics batch."
    )
    return report.finish(
        NAME,
        out_dir,
        config,
        title="5. Small statistics batches; ghost BN for large batches",
        claim=CLAIM,
        setup=setup,
        table=table,
        figures=figures,
        quantities=quantities,
        seeds=None,
    )
