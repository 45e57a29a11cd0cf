"""Experiment 15: per-channel statistics in conv nets vs per-activation normalization.

Claim (Ioffe & Szegedy 2015, Sec. 3.2; seed articles on BN in CNNs): in a conv layer BN
keeps one mean and variance per channel (feature map), computed over the batch AND all
spatial positions, so that normalization obeys the convolutional property and each
statistic sees batch x height x width values; normalizing each activation (each position
of each channel) on its own over the batch only is worse.
"""

from __future__ import annotations

import pathlib

import numpy as np

from experiments import data as datasets
from experiments import report
from experiments.models import ConvNet, NormSpec
from experiments.training import fit_from_config

NAME = "per_channel"
DEFAULTS = {
    "data": "digits_image",
    "channels": [16, 32, 32],
    "pool_after": [0],
    "batch_sizes": [8, 32],
    "steps": 400,
    "eval_every": 20,
    "optimizer": "momentum",
    "learning_rate": 0.03,
    "bn_momentum": 0.9,
    "seeds": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
}
TINY = {"channels": [4], "batch_sizes": [8], "steps": 4, "eval_every": 2, "seeds": [0, 1]}

CLAIM = (
    "In conv nets BN normalizes per channel over the batch and all spatial positions; normalizing every activation on "
    "its own over the batch only trains worse (Ioffe & Szegedy 2015, Sec. 3.2)."
)
ARMS = {"per channel (N, H, W)": "bn", "per activation (N only)": "bn_per_activation"}
KEYS = {"bn": "channel", "bn_per_activation": "activation"}


def run(config: dict, out_dir: pathlib.Path) -> dict:
    out_dir = pathlib.Path(out_dir)
    data = datasets.load(config["data"])
    runs, rows = {}, []
    for b in config["batch_sizes"]:
        for arm, kind in ARMS.items():
            model = ConvNet(
                tuple(config["channels"]),
                data.num_classes,
                norm=NormSpec(kind, momentum=config["bn_momentum"]),
                pool_after=tuple(config["pool_after"]),
            )
            r = fit_from_config(
                model,
                data,
                config,
                batch_size=b,
                desc=f"{arm} b={b}",
                vmap_seeds=False,
                scan_steps=False,
            )
            runs[kind, b] = r
            rows += r.rows(arm=kind, batch_size=b)
    report.write_metrics(out_dir, rows)

    sizes = config["batch_sizes"]
    table = report.markdown_table(
        ["batch", "statistics", "final test acc", "mean test acc over the run", "final train loss"],
        [
            (
                b,
                arm,
                report.fmt_seeds(runs[k, b].final("test_accuracy")),
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
            quantities[f"test_acc/{KEYS[k]}/b{b}"] = runs[k, b].final("test_accuracy")
            # area under the test-accuracy curve: speed and level together
            quantities[f"mean_test_acc/{KEYS[k]}/b{b}"] = np.nanmean(runs[k, b].series["test_accuracy"][1:], 0)

    fig, axes = report.figure(len(sizes), 1)
    for j, b in enumerate(sizes):
        for arm, k in ARMS.items():
            report.band(axes[0, j], runs[k, b].steps, runs[k, b].series["test_accuracy"], arm)
        axes[0, j].set(xlabel="step", ylabel="test accuracy", title=f"batch {b}", ylim=(0, 1))
        axes[0, j].legend(fontsize=7)
    figures = [report.save_figure(fig, out_dir, "per_channel.png")]
    setup = (
        f"{data.name}; conv net {config['channels']} (3x3, BN before each ReLU, max-pool after block(s) "
        f"{config['pool_after']}, global average pool); per channel = jbn.BatchNorm(axis=-1): one mean/variance per channel "
        f"over N, H, W; per activation = jbn.BatchNorm(axis=(1, 2, 3)): one per (h, w, c) over N only, with its own gamma "
        f"and beta per activation. Batch {sizes}, {config['optimizer']} lr {config['learning_rate']}, {config['steps']} "
        f"steps, seeds {config['seeds']} (paired: both arms share each seed's init seed and data order). Test accuracy "
        f"with the running statistics every {config['eval_every']} steps."
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
