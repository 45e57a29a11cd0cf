"""Experiment 13: is a BN net less sensitive to its weight initialization, in scale and in draw?

Claim (seed articles 002 and 004: BN "reduces sensitivity to network initialization", "removes
the dependence of optimization on the initialization of weights"): the same net trained
from kernels initialized at very different scales ends about the same with BN, and very
differently without it. With BN each hidden layer's output is invariant to its kernel's
scale, so only the classifier and the effective learning rate (lr / ||W||^2) feel it.

The seed articles name two directions of "initialization": its scale (002: "the dependence
of optimization on the initialization of weights") and its random draw (003: deep nets are
"sensitive to ... underlying initial random weights"). Part "scale" varies the scale over
100x; part "draw" keeps He's scale and one data order for every seed (`draw_order_seed`),
so the seeds differ only in their initial weights, and measures each seed's distance from
its arm's median final test accuracy (a paired, Levene-style dispersion measure).

Each arm trains at its own learning rate, chosen at He's scale on a validation split (the last
`num_val` training sequences) by the procedure of experiment zero (`experiments.tuning`); every
scale and the draw part then train at that rate on the other training sequences, and the test
split is read once per run (until 2026-12-05: both arms at lr 0.02, read on the test split).
"""

from __future__ import annotations

import pathlib

import numpy as np

from experiments import data as datasets
from experiments import report
from experiments.models import MLP, NormSpec
from experiments.training import fit_from_config
from experiments.tuning import judged_rows, test_once, tune, validation_rows

NAME = "init_scale"
DEFAULTS = {
    "data": "mnist1d",
    "widths": [128, 128, 128, 128],
    "init_scales": [0.1, 0.3, 1.0, 3.0, 10.0],  # times He-normal's standard deviation
    "batch_size": 64,
    "steps": 1500,
    "eval_every": 100,
    "optimizer": "momentum",
    "num_val": 1000,  # the last 1000 of the 4000 training sequences: validation, for the rate
    "learning_rates": [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4],  # each arm's rate chosen from these at He's scale
    "tuning_seeds": [100, 101, 102],
    "bn_momentum": 0.99,
    "seeds": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
    "draw_order_seed": 0,  # part "draw": every seed trains on this one data order
}
TINY = {
    "widths": [8],
    "init_scales": [0.1, 10.0],
    "steps": 4,
    "eval_every": 2,
    "seeds": [0, 1],
    "learning_rates": [0.02],
    "tuning_seeds": [100],
}

CLAIM = (
    "BN makes training less sensitive to the weight initialization: over a 100x range of initial kernel scales, a BN "
    "net's final test accuracy varies less, and its worst scale is better, than without BN (seed articles)."
)


def run(config: dict, out_dir: pathlib.Path) -> dict:
    out_dir = pathlib.Path(out_dir)
    splits = datasets.validation_split(datasets.load(config["data"]), config["num_val"])
    data = splits.tuning  # training sequences and validation: every run trains here
    scales = config["init_scales"]
    chance = 1.0 / data.num_classes
    arms = {"no BN": NormSpec("none"), "BN": NormSpec("bn", momentum=config["bn_momentum"])}
    acc, diverged, runs, rates, scores, rows = {}, {}, {}, {}, {}, []

    def model_of(spec, scale):
        return MLP(tuple(config["widths"]), data.num_classes, norm=spec, weight_init="he", init_scale=scale)

    def tested(model, r):
        """Per seed, the test accuracy (once, after training); a seed that diverged is at chance."""
        return np.where(np.isfinite(r.final("train_loss")), test_once(model, r, splits.final)["accuracy"], chance)

    for arm, spec in arms.items():  # each arm's rate, at He's scale, on the validation split
        rates[arm], tuning = tune(
            lambda lr, spec=spec, arm=arm: fit_from_config(
                model_of(spec, 1.0),
                data,
                config | {"learning_rate": lr},
                seeds=config["tuning_seeds"],
                desc=f"tune {arm} lr {lr:g}",
            ),
            config["learning_rates"],
        )
        scores[arm] = {lr: r.final("test_accuracy") for lr, r in tuning.items()}
        for lr, r in tuning.items():
            rows += validation_rows(r, phase="tuning", arm=arm, learning_rate=lr)
    for arm, spec in arms.items():
        arm_config = config | {"learning_rate": rates[arm]}
        for sc in scales:
            model = model_of(spec, sc)
            r = fit_from_config(model, data, arm_config, desc=f"{arm} x{sc:g} lr {rates[arm]:g}")
            acc[arm, sc] = tested(model, r)
            diverged[arm, sc] = int(np.sum(~np.isfinite(r.final("train_loss"))))
            runs[arm, sc] = r
            rows += judged_rows(r, {"test_accuracy": acc[arm, sc]}, arm=arm, init_scale=sc, learning_rate=rates[arm])
    report.write_metrics(out_dir, rows)

    table = report.markdown_table(
        ["learning rate", *(f"{a}: final val acc at He's scale (tuning seeds)" for a in arms)],
        [
            (f"{lr:g}", *(report.fmt_seeds(scores[a][lr]) + (" (chosen)" if lr == rates[a] else "") for a in arms))
            for lr in config["learning_rates"]
        ],
    )
    table += "\n\n" + report.markdown_table(
        ["init scale"] + [f"{a} test acc (lr {rates[a]:g})" for a in arms],
        [
            [f"{sc:g}"]
            + [
                report.fmt_seeds(acc[a, sc]) + (f" ({diverged[a, sc]} diverged)" if diverged[a, sc] else "")
                for a in arms
            ]
            for sc in scales
        ],
    )
    draw_acc = {}
    for arm, spec in arms.items():  # part "draw": He's scale, one data order, the seeds vary the weights only
        model = model_of(spec, 1.0)
        r = fit_from_config(
            model,
            data,
            config | {"learning_rate": rates[arm]},
            order_seeds=[config["draw_order_seed"]] * len(config["seeds"]),
            desc=f"{arm} draw",
        )
        draw_acc[arm] = tested(model, r)
        rows += judged_rows(
            r, {"test_accuracy": draw_acc[arm]}, arm=arm, init_scale=1.0, part="draw", learning_rate=rates[arm]
        )
    report.write_metrics(out_dir, rows)
    quantities = {}
    for a, key in (("no BN", "noBN"), ("BN", "BN")):
        quantities[f"draw_final_test_acc/{key}"] = draw_acc[a]
        quantities[f"draw_distance_from_median/{key}"] = np.abs(draw_acc[a] - np.median(draw_acc[a]))
        grid = np.stack([acc[a, sc] for sc in scales])  # (scales, seeds)
        quantities[f"range_over_scales/{key}"] = grid.max(0) - grid.min(0)
        quantities[f"worst_scale_acc/{key}"] = grid.min(0)
        quantities[f"acc_at_1/{key}"] = acc[a, 1.0] if 1.0 in scales else grid[len(scales) // 2]

    fig, axes = report.figure(2, 1)
    for a in arms:
        axes[0, 0].errorbar(
            scales,
            [np.mean(acc[a, sc]) for sc in scales],
            yerr=[np.nan_to_num(report.mean_std(acc[a, sc])[1]) for sc in scales],
            marker="o",
            capsize=3,
            label=a,
        )
    report.log_ticks(axes[0, 0], scales)
    axes[0, 0].axhline(chance, color="gray", ls=":", lw=1)
    axes[0, 0].set(
        xlabel="initial kernel scale (x He std)", ylabel="test accuracy", title="each arm at its rate (± sample SD)"
    )
    axes[0, 0].legend()
    for a, ls in (("no BN", "--"), ("BN", "-")):
        for j, sc in enumerate(scales):
            r = runs[a, sc]
            axes[0, 1].plot(
                r.steps, np.nanmean(r.series["test_accuracy"], 1), ls=ls, color=f"C{j}", label=f"{a} x{sc:g}"
            )
    axes[0, 1].set(xlabel="step", ylabel="validation accuracy", title="mean over seeds")
    axes[0, 1].legend(fontsize=5, ncol=2)
    figures = [report.save_figure(fig, out_dir, "init_scale.png")]
    setup = (
        f"{splits.final.name.rsplit(',', 1)[0]}, its last {config['num_val']} training sequences held out as the "
        f"validation split; ReLU MLP {config['widths']}, hidden kernels He-normal times {scales}; no norm (Dense with "
        f"bias) or jbn.BatchNorm before each ReLU; batch {config['batch_size']}, {config['optimizer']}, "
        f"{config['steps']} steps. Rates: each arm trains every rate of {config['learning_rates']} at He's scale on "
        f"tuning seeds {config['tuning_seeds']} and takes the best mean final validation accuracy (no BN "
        f"{rates['no BN']:g}, BN {rates['BN']:g}); every scale then trains at its arm's rate, seeds {config['seeds']} "
        f"(paired: each seed's data order is shared by every arm and scale), and the test split is read once per run. "
        f"A seed whose final training loss is not finite counts at chance. Per seed: the range (max - min) of the "
        f'test accuracy over the scales, and its worst scale. Part "draw": He\'s scale, every seed on data '
        f"order {config['draw_order_seed']}, so the seeds differ only in their initial weights; per seed, "
        f"|test accuracy - its arm's median|."
    )
    return report.finish(
        NAME,
        out_dir,
        config,
        title="13. Sensitivity to the weight initialization",
        claim=CLAIM,
        setup=setup,
        table=table,
        figures=figures,
        quantities=quantities,
        seeds=config["seeds"],
    )
