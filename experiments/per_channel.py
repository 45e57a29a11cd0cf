"""Experiment 15: per-channel statistics in conv nets vs per-activation normalization.

Claim (Ioffe & Szegedy 2015, Sec. 3.2; seed articles on BN in CNNs): in a conv layer BN
keeps one mean and variance per channel (feature map), computed over the batch AND all
spatial positions, so that normalization obeys the convolutional property and each
statistic sees batch x height x width values; normalizing each activation (each position
of each channel) on its own over the batch only is worse.

Per-activation normalization with its own gamma and beta per activation has H x W times
more parameters than per-channel BN, so the judged comparison is against a per-activation
arm whose gamma and beta are per channel (the same parameters as per-channel BN: only the
statistics differ); the arm with per-activation gamma and beta is reported beside it, not
judged (until 2026-12-04 it was the judged one).

Each arm's learning rate is chosen on a validation split (the last `num_val` training
images) by the same procedure, at each batch size (until 2026-12-04 both arms ran at the
per-channel arm's rate); the test split is evaluated once per run, after training.
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np

from experiments import data as datasets
from experiments import report
from experiments.models import ConvNet, NormSpec
from experiments.training import fit, make_optimizer
from experiments.tuning import judged_rows, test_once, tune, validation_rows

NAME = "per_channel"
DEFAULTS = {
    "data": "digits_image",
    "num_val": 288,  # the last 288 of the 1438 training images: validation, for the rates
    "channels": [16, 32, 32],
    "pool_after": [0],
    "batch_sizes": [8, 32],
    "steps": 400,
    "eval_every": 20,
    "optimizer": "momentum",
    "learning_rates": [0.01, 0.03, 0.1, 0.3],  # each arm tunes over the whole grid
    "bn_momentum": 0.9,
    "tuning_seeds": [100, 101, 102],  # choose each arm's rate; never judged
    "seeds": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
}
TINY = {
    "channels": [4],
    "batch_sizes": [8],
    "steps": 4,
    "eval_every": 2,
    "learning_rates": [0.03],
    "tuning_seeds": [100],
    "seeds": [0, 1],
}

CLAIM = (
    "In conv nets BN normalizes per channel over the batch and all spatial positions; normalizing every activation on "
    "its own over the batch only trains worse (Ioffe & Szegedy 2015, Sec. 3.2)."
)
ARMS = {
    "per channel (N, H, W)": "bn",
    "per activation (N only), gamma/beta per channel": "bn_per_activation_channel_affine",
    "per activation (N only), gamma/beta per activation": "bn_per_activation",
}
KEYS = {
    "bn": "channel",
    "bn_per_activation_channel_affine": "activation_channel_affine",
    "bn_per_activation": "activation",
}


def parameter_count(run) -> int:
    """Trainable parameters of one seed's model in `run` (the leading axis is the seeds)."""
    return int(sum(leaf[0].size for leaf in jax.tree.leaves(run.state.params)))


def run(config: dict, out_dir: pathlib.Path) -> dict:
    out_dir = pathlib.Path(out_dir)
    data = datasets.load(config["data"])
    splits = datasets.validation_split(data, config["num_val"])
    runs, test, chosen, params, rows = {}, {}, {}, {}, []
    for b in config["batch_sizes"]:
        for arm, kind in ARMS.items():
            model = ConvNet(
                tuple(config["channels"]),
                data.num_classes,
                norm=NormSpec(kind, momentum=config["bn_momentum"]),
                pool_after=tuple(config["pool_after"]),
            )

            def train(lr, seeds, desc, model=model, b=b):
                return fit(
                    model,
                    make_optimizer(config["optimizer"], lr),
                    splits.tuning,
                    seeds=seeds,
                    steps=config["steps"],
                    batch_size=b,
                    eval_every=config["eval_every"],
                    desc=desc,
                    vmap_seeds=False,
                    scan_steps=False,
                )

            chosen[kind, b], tuning = tune(
                lambda lr, train=train, arm=arm, b=b: train(lr, config["tuning_seeds"], f"tune {arm} b={b} lr {lr:g}"),
                config["learning_rates"],
            )
            for lr, t in tuning.items():
                rows += validation_rows(t, phase="tuning", arm=kind, batch_size=b, learning_rate=lr)
            r = train(chosen[kind, b], config["seeds"], f"{arm} b={b} lr {chosen[kind, b]:g}")
            runs[kind, b], test[kind, b] = r, test_once(model, r, splits.final)
            params[kind] = parameter_count(r)
            rows += judged_rows(
                r, {"test_accuracy": test[kind, b]["accuracy"]}, arm=kind, batch_size=b, learning_rate=chosen[kind, b]
            )
    report.write_metrics(out_dir, rows)

    sizes = config["batch_sizes"]
    table = report.markdown_table(
        [
            "batch",
            "normalization",
            "parameters",
            "rate (chosen on validation)",
            "test acc",
            "mean val acc over the run",
            "final train loss",
        ],
        [
            (
                b,
                arm,
                params[k],
                f"{chosen[k, b]:g}",
                report.fmt_seeds(test[k, b]["accuracy"]),
                report.fmt_seeds(np.nanmean(runs[k, b].series["test_accuracy"][1:], 0)),
                report.fmt_seeds(runs[k, b].final("train_loss")),
            )
            for b in sizes
            for arm, k in ARMS.items()
        ],
    )
    quantities = {}
    for b in sizes:
        for k in ARMS.values():
            quantities[f"test_acc/{KEYS[k]}/b{b}"] = test[k, b]["accuracy"]
            # area under the validation-accuracy curve: speed and level together
            quantities[f"mean_val_acc/{KEYS[k]}/b{b}"] = np.nanmean(runs[k, b].series["test_accuracy"][1:], 0)

    fig, axes = report.figure(len(sizes), 1)
    for j, b in enumerate(sizes):
        for arm, k in ARMS.items():
            report.band(axes[0, j], runs[k, b].steps, runs[k, b].series["test_accuracy"], f"{arm}, lr {chosen[k, b]:g}")
        axes[0, j].set(xlabel="step", ylabel="validation accuracy", title=f"batch {b}", ylim=(0, 1))
        axes[0, j].legend(fontsize=7)
    figures = [report.save_figure(fig, out_dir, "per_channel.png")]
    setup = (
        f"{data.name}; conv net {config['channels']} (3x3, BN before each ReLU, max-pool after block(s) "
        f"{config['pool_after']}, global average pool); per channel = jbn.BatchNorm(axis=-1): one mean/variance per channel "
        f"over N, H, W; per activation = jbn.BatchNorm(axis=(1, 2, 3)): one per (h, w, c) over N only, either with gamma and "
        f"beta per channel (the same parameters as per channel; the judged arm) or with its own gamma and beta per "
        f"activation (H x W times more of them; reported, not judged). Batch {sizes}, {config['optimizer']}, {config['steps']} steps. Rates: at each batch size "
        f"each arm trains every rate of {config['learning_rates']} on tuning seeds {config['tuning_seeds']} and takes the "
        f"one with the best mean final accuracy on the validation split (the last {config['num_val']} training images, "
        f"not trained on). Judged: seeds {config['seeds']} at the chosen rates (paired: both arms share each seed's init "
        f"seed and data order), validation accuracy (running statistics) every {config['eval_every']} steps, the test "
        f"split once after the last step."
    )
    return report.finish(
        NAME,
        out_dir,
        config,
        title="15. Per-channel vs per-activation statistics in a conv net",
        claim=CLAIM,
        setup=setup,
        table=table,
        figures=figures,
        quantities=quantities,
        seeds=config["seeds"],
    )
