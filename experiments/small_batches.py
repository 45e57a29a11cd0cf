"""Experiment 5: batch norm with small statistics batches; ghost BN for large batches.

(A) Wu & He 2018 (Table 1 / Fig. 1) and Ioffe 2017: BN's accuracy drops when each
normalization sees only 2-4 examples, while GroupNorm (statistics over groups of channels
and the spatial positions of one example, so no batch dependence) and Batch Renorm
(batch statistics corrected towards the running ones) degrade less. Run on a conv net, so
GroupNorm normalizes over channels x space as Wu & He define it.
(B) Ghost BN is Hoffer et al. 2017's ("Train longer, generalize better") remedy for LARGE
batches: statistics over small virtual batches inside a large optimizer batch close part of
the generalization gap of large-batch training. It is not a small-batch remedy, so it is
tested on its own claim: large batch with ghost BN vs large batch with plain BN.
"""

from __future__ import annotations

import pathlib

import numpy as np

from experiments import data as datasets
from experiments import features, report
from experiments.models import MLP, ConvNet, NormSpec, renorm_ramp
from experiments.training import fit, make_optimizer

NAME = "small_batches"
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
    # (B) ghost BN for large batches (Hoffer et al. 2017), MLP on MNIST-1D
    "ghost_data": "mnist1d",
    "ghost_widths": [128, 128, 128],
    "large_batch": 512,
    "ghost_batch_size": 32,
    "ghost_epochs": 30.0,
    "ghost_learning_rate": 0.05,  # at batch reference_batch_size, scaled linearly (Hoffer et al. use sqrt; see setup)
    "ghost_seeds": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
}
TINY = {
    "statistics_batch_sizes": [2],
    "steps": 2,
    "seeds": [0, 1],
    "evaluations": 1,
    "channels": [4],
    "group_size": 2,
    "ghost_widths": [16],
    "ghost_epochs": 0.5,
    "ghost_seeds": [0, 1],
    "large_batch": 64,
    "ghost_batch_size": 16,
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
    # batch for reference), same number of epochs.
    gdata = datasets.load(config["ghost_data"])
    large, small_b = config["large_batch"], config["ghost_batch_size"]
    ghost_acc = {}
    for arm, batch, spec in (
        ("BN, large batch", large, NormSpec("bn", momentum=config["bn_momentum"])),
        ("ghost BN, large batch", large, NormSpec("ghost", momentum=config["bn_momentum"], virtual_batch_size=small_b)),
        ("BN, small batch", small_b, NormSpec("bn", momentum=config["bn_momentum"])),
    ):
        wait = features.waiting_for_norm(spec.kind)
        if wait:
            rows += report.waiting_rows(wait, part="B", arm=arm)
            continue
        steps = max(1, int(config["ghost_epochs"] * len(gdata.y_train)) // batch)
        lr = config["ghost_learning_rate"] * batch / config["reference_batch_size"]
        model = MLP(tuple(config["ghost_widths"]), gdata.num_classes, norm=spec)
        r = fit(
            model,
            make_optimizer(config["optimizer"], lr),
            gdata,
            seeds=config["ghost_seeds"],
            steps=steps,
            batch_size=batch,
            eval_every=max(1, steps // config["evaluations"]),
            desc=arm,
        )
        ghost_acc[arm] = r.final("test_accuracy")
        rows += r.rows(part="B", arm=arm, batch=batch, learning_rate=lr)
    report.write_metrics(out_dir, rows)

    table = report.markdown_table(
        ["(A) norm, conv net"] + [f"stat. batch {b}" for b in sizes],
        [
            [LABELS[k] + (f" ({status[k]})" if status[k] else "")]
            + ["waiting" if status[k] else report.fmt_seeds(acc[k, b]) for b in sizes]
            for k in config["norms"]
        ],
    )
    table += "\n\n" + report.markdown_table(
        ["(B) arm", "final test acc"], [(a, report.fmt_seeds(v)) for a, v in ghost_acc.items()]
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
    ax.bar(
        range(len(names)),
        [np.mean(ghost_acc[a]) for a in names],
        yerr=[np.nan_to_num(report.mean_std(ghost_acc[a])[1]) for a in names],
        capsize=3,
    )
    ax.set_xticks(range(len(names)), [a.replace(", ", "\n") for a in names], fontsize=7)
    ax.set(ylabel="final test accuracy", title=f"(B) batch {large}: ghost BN ({small_b}) vs BN")
    figures = [report.save_figure(fig, out_dir, "small_batches.png")]
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
        f"none). Drop = accuracy at batch {largest} minus the mean over batches {small}. (B) {gdata.name}; MLP "
        f"{config['ghost_widths']} ReLU with the norm before each ReLU, {config['ghost_epochs']} epochs, lr "
        f"{config['ghost_learning_rate']} x batch/{config['reference_batch_size']}, seeds {config['ghost_seeds']}: batch "
        f"{large} with plain BN vs batch {large} with ghost BN (jbn.BatchNorm(virtual_batch_size={small_b})), and batch "
        f"{small_b} with BN for reference. Hoffer et al. also scale the rate by sqrt(batch) and train longer; here both "
        f"large-batch arms share the same (linear) rate and epochs, so only the statistics batch differs."
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
