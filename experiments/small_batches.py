"""Experiment 5: batch norm with small statistics batches; ghost BN for large batches.

(A) Wu & He 2018 (Table 1 / Fig. 1) and Ioffe 2017: BN's accuracy drops when each
normalization sees only 2-4 examples, while GroupNorm (statistics over groups of channels
and the spatial positions of one example, so no batch dependence) and Batch Renorm
(batch statistics corrected towards the running ones) degrade less. Run on a conv net, so
GroupNorm normalizes over channels x space as Wu & He define it: a plain 16-layer 1-D conv
net on experiment zero's MNIST-1D, where BN is shown to help (an un-normalized arm at the
largest batch), every arm (norm and batch) at its own rate tuned on the validation split,
the test split once per run (until 2026-12-05: a 2-layer conv net on the 8x8 digits, where
BN was not shown to help, one linearly scaled rate, read on the test split).
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
    # (A) small statistics batches: a plain 1-D conv net on experiment zero's data
    **{k: testbed.DEFAULTS[k] for k in ("num_train", "num_val", "num_test", "data_seed")},
    "channels": [16] * 16,
    "pool_after": [1, 3, 5, 7],
    "weight_init": "he",  # variance 2/fan_in: the variance-preserving scale for ReLU
    "norms": ["bn", "renorm", "group"],
    "statistics_batch_sizes": [2, 4, 32],
    "reference_norm": "none",  # also trained at the largest batch: does BN help on this net?
    # Every arm takes the same number of updates (until 2026-12-04: the same 3 epochs, so batch 2
    # took 16x the updates of batch 32).
    "steps": 1000,
    "evaluations": 5,  # per run
    "optimizer": "momentum",
    "learning_rates": [0.0003, 0.001, 0.003, 0.01, 0.03, 0.1],  # every (norm, batch) tunes over the whole grid
    "tuning_seeds": [100, 101, 102],
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
    **{k: testbed.TINY[k] for k in ("num_train", "num_val", "num_test")},
    "statistics_batch_sizes": [2],
    "steps": 2,
    "seeds": [0, 1],
    "evaluations": 1,
    "channels": [4],
    "pool_after": [0],
    "group_size": 2,
    "learning_rates": [0.01],
    "tuning_seeds": [100],
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
LABELS = {"bn": "BN", "renorm": "Batch Renorm", "group": "GroupNorm", "none": "no norm"}


def ramp_text(ramp) -> str:
    if not ramp:
        return "fixed limits"
    return f"plain BN for the first {ramp[0]:.0%} of the steps, then both limits linear up to {ramp[1]:.0%}"


def run(config: dict, out_dir: pathlib.Path) -> dict:
    out_dir = pathlib.Path(out_dir)
    data = datasets.mnist1d_splits(
        config["num_train"], config["num_val"], config["num_test"], seed=config["data_seed"], layout="sequence"
    )
    sizes = config["statistics_batch_sizes"]
    largest = max(sizes)
    arms = [(kind, b) for kind in config["norms"] for b in sizes] + [(config["reference_norm"], largest)]
    acc, tuned, status, rows = {}, {}, {}, []
    for kind, b in arms:
        status[kind] = features.waiting_for_norm(kind)
        if status[kind]:  # the arm needs a jbn feature that has not landed: no number, a marker
            rows += report.waiting_rows(status[kind], part="A", norm=kind, statistics_batch=b)
            continue
        steps = config["steps"]
        spec = NormSpec(
            kind,
            momentum=config["bn_momentum"],
            group_size=config["group_size"],
            r_max=config["renorm_r_max"],
            d_max=config["renorm_d_max"],
            renorm_ramp=renorm_ramp(config["renorm_ramp"], steps),
        )
        model = ConvNet(
            tuple(config["channels"]),
            data.final.num_classes,
            norm=spec,
            pool_after=tuple(config["pool_after"]),
            weight_init=config["weight_init"],
        )
        arm_config = {
            **{k: config[k] for k in ("optimizer", "steps", "learning_rates", "tuning_seeds", "seeds")},
            "batch_size": b,
            "eval_every": max(1, steps // config["evaluations"]),
        }
        tuned[kind, b] = t = testbed.tune_and_judge(arm_config, f"{LABELS[kind]} b={b}", model, data)
        acc[kind, b] = t.test["accuracy"]
        rows += [{**row, "part": "A", "norm": kind, "statistics_batch": b, "batch": b} for row in t.rows]

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

    def cell(kind, b) -> str:
        if (kind, b) not in acc:
            return "waiting" if status.get(kind) else "-"
        return f"{report.fmt_seeds(acc[kind, b])} (lr {tuned[kind, b].rate:g})"

    table = report.markdown_table(
        ["(A) norm, conv net: test acc (its tuned rate)"] + [f"stat. batch {b}" for b in sizes],
        [
            [LABELS[k] + (f" ({status[k]})" if status[k] else "")] + [cell(k, b) for b in sizes]
            for k in [*config["norms"], config["reference_norm"]]
        ],
    )
    table += "\n\n(A) each arm's rate:\n\n" + testbed.tuning_table(
        {f"{LABELS[k]} b={b}": t for (k, b), t in tuned.items()}, config["learning_rates"]
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

    quantities = {}
    for kind in config["norms"]:
        if not status[kind]:
            # per seed: accuracy at the largest statistics batch minus the mean over batches <= 4
            quantities[f"drop/{kind}"] = acc[kind, largest] - np.mean([acc[kind, b] for b in small], axis=0)
    for kind in (*config["norms"], config["reference_norm"]):
        if (kind, largest) in acc:
            quantities[f"test_acc/{kind}_b{largest}"] = acc[kind, largest]
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
    reference = config["reference_norm"]
    if (reference, largest) in acc:
        ax.errorbar(
            [largest],
            [np.mean(acc[reference, largest])],
            yerr=[np.nan_to_num(report.mean_std(acc[reference, largest])[1])],
            marker="x",
            color="k",
            capsize=3,
            ls="none",
            label=f"no norm (batch {largest})",
        )
    ax.set(
        xlabel="examples per statistics batch",
        ylabel="test accuracy (mean ± sample SD)",
        title="(A) 16-layer conv net, small batches",
    )
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
    n_train = len(data.tuning.y_train)
    setup = (
        f"(A) {data.final.name.rsplit(',', 1)[0]} (train / validation / test; mnist1d.data.make_dataset seed "
        f"{config['data_seed']}, experiment zero's data); a plain 1-D conv net of {len(config['channels'])} blocks of "
        f"{config['channels'][0]} channels (length-3 convolutions, {config['weight_init']} init, the norm before each "
        f"ReLU, max-pool after blocks {config['pool_after']}, global average pool, no skip connections); "
        f"{config['steps']} updates for every arm (so {config['steps'] * min(sizes) / n_train:.2f} epochs at batch "
        f"{min(sizes)}, {config['steps'] * max(sizes) / n_train:.2f} at batch {max(sizes)}); {config['optimizer']} "
        f"(0.9), every arm (norm and batch) at its own rate: each rate of {config['learning_rates']} on tuning seeds "
        f"{config['tuning_seeds']}, the best mean final validation accuracy; judged seeds {config['seeds']} (paired "
        f"across batch sizes and norms: the drop is taken per seed), the test split read once per run. The same net "
        f"without normalization at batch {largest} shows whether BN helps here. BN = jbn.BatchNorm (per channel over N, L), Batch "
        f"Renorm = jbn.BatchRenorm (r_max {config['renorm_r_max']}, d_max {config['renorm_d_max']}, "
        f"{ramp_text(config['renorm_ramp'])}), GroupNorm = flax.linen.GroupNorm with {config['group_size']} channels per "
        f"group, normalizing each example over its group's channels and all spatial positions (Wu & He's definition); "
        f"every arm trains with batches of the statistics size. Test accuracy with the running statistics (GroupNorm has "
        f"none). Drop = test accuracy at batch {largest} minus the mean over batches {small}. (B) "
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
