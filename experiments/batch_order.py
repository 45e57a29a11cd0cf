"""Experiment 11: batch order and non-i.i.d. batches, BN vs Batch Renorm.

Claims: (A) a BN network is sensitive to the order of its batches: the same model trained
on the same data in different orders gives different results (seed article 000; article
002 claims the opposite, that BN reduces the importance of the order). (B) With
non-i.i.d. batches (each batch drawn from a few classes) BN suffers, because its batch
statistics no longer match the population statistics used at test time; Batch Renorm
(Ioffe 2017) reduces the damage.

Every norm in every order takes its own learning rate, chosen on a validation split (the last
`num_val` training sequences) by the procedure of experiment zero (`experiments.tuning`); the
judged runs train on the other sequences and read the test split once (until 2026-12-05: every
run at lr 0.05 on all 4000 sequences, read on the test split).
"""

from __future__ import annotations

import pathlib

import numpy as np

from experiments import data as datasets
from experiments import features, report
from experiments.models import MLP, NormSpec, renorm_ramp
from experiments.small_batches import ramp_text
from experiments.training import fit, make_optimizer
from experiments.tuning import judged_rows, test_once, tune, validation_rows

NAME = "batch_order"
DEFAULTS = {
    "data": "mnist1d",
    "widths": [128, 128],
    "norms": ["none", "bn", "renorm"],
    "classes_per_batch": 2,  # the non-i.i.d. order draws each batch from this many classes
    "batch_size": 32,
    "steps": 1500,
    "eval_every": 100,
    "optimizer": "momentum",
    "num_val": 1000,  # the last 1000 of the 4000 training sequences: validation, for the rates
    "learning_rates": [0.01, 0.02, 0.05, 0.1, 0.2],  # every norm in every order tunes over the whole grid
    "tuning_seeds": [100, 101, 102],  # initialization and order seeds of the tuning runs
    "bn_momentum": 0.99,
    "renorm_r_max": 3.0,
    "renorm_d_max": 5.0,
    "renorm_ramp": [0.05, 0.4],  # plain BN for the first 5% of steps, limits reached at 40%; [] = fixed limits
    "init_seed": 0,  # every run starts from this initialization ...
    "order_seeds": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],  # ... and sees the training set in these orders
}
TINY = {
    "widths": [8],
    "steps": 4,
    "eval_every": 2,
    "order_seeds": [0, 1],
    "learning_rates": [0.05],
    "tuning_seeds": [100],
}

CLAIM = (
    "(A) BN makes training sensitive to the batch order: one initialization trained on the same data in different "
    "orders ends further apart with BN than without. (B) Non-i.i.d. batches (each from a few classes) hurt BN at test "
    "time far more than they hurt the same net without BN; Batch Renorm reduces the damage (Ioffe 2017)."
)
LABELS = {"none": "no norm", "bn": "BN", "renorm": "Batch Renorm"}
ORDERS = {"shuffle": "i.i.d. (reshuffled each epoch)", "class_grouped": "class-grouped (non-i.i.d.)"}


def run(config: dict, out_dir: pathlib.Path) -> dict:
    out_dir = pathlib.Path(out_dir)
    splits = datasets.validation_split(datasets.load(config["data"]), config["num_val"])
    data = splits.tuning  # every run trains on the training sequences; its "test_" series are the validation's
    order_seeds = config["order_seeds"]
    seeds = [config["init_seed"]] * len(order_seeds)
    runs, test, rates, status, rows = {}, {}, {}, {}, []
    for kind in config["norms"]:
        status[kind] = features.waiting_for_norm(kind)
        for order in ORDERS:
            if status[kind]:
                rows += report.waiting_rows(status[kind], norm=kind, order=order)
                continue
            spec = NormSpec(
                kind,
                momentum=config["bn_momentum"],
                r_max=config["renorm_r_max"],
                d_max=config["renorm_d_max"],
                renorm_ramp=renorm_ramp(config["renorm_ramp"], config["steps"]),
            )
            model = MLP(tuple(config["widths"]), data.num_classes, activation="relu", norm=spec)

            def train(lr, seeds, order_seeds, desc, model=model, order=order):
                return fit(
                    model,
                    make_optimizer(config["optimizer"], lr),
                    data,
                    seeds=seeds,
                    order_seeds=order_seeds,
                    steps=config["steps"],
                    batch_size=config["batch_size"],
                    eval_every=config["eval_every"],
                    order=order,
                    classes_per_batch=config["classes_per_batch"],
                    desc=desc,
                )

            tuning_seeds = config["tuning_seeds"]
            rates[kind, order], tuned = tune(
                lambda lr, train=train, kind=kind, order=order: train(
                    lr, tuning_seeds, tuning_seeds, f"tune {LABELS[kind]}, {order}, lr {lr:g}"
                ),
                config["learning_rates"],
            )
            for lr, r in tuned.items():
                rows += validation_rows(r, phase="tuning", norm=kind, order=order, learning_rate=lr)
            lr = rates[kind, order]
            r = train(lr, seeds, order_seeds, f"{LABELS[kind]}, {order}, lr {lr:g}")
            runs[kind, order] = r
            test[kind, order] = test_once(model, r, splits.final)["accuracy"]
            rows += judged_rows(
                r, {"test_accuracy": test[kind, order]}, order_seeds, norm=kind, order=order, learning_rate=lr
            )
    report.write_metrics(out_dir, rows)

    def acc(kind, order) -> np.ndarray:
        return test[kind, order]

    def train_acc(kind, order) -> np.ndarray:
        return runs[kind, order].final("train_accuracy")

    table = report.markdown_table(
        ["norm", "order", "rate", "test acc (mean ± std over orders)", "train acc in training mode (batch stats)"],
        [
            (
                LABELS[k],
                ORDERS[o],
                status[k] or f"{rates[k, o]:g}",
                status[k] or report.fmt_seeds(acc(k, o)),
                status[k] or report.fmt_seeds(train_acc(k, o)),
            )
            for k in config["norms"]
            for o in ORDERS
        ],
    )
    # Per-order-seed quantities (all runs share the initialization; index i = order seed i).
    quantities = {}
    for kind in config["norms"]:
        if status[kind]:
            continue
        a = acc(kind, "shuffle")
        # absolute deviation from the median over orders (a Brown-Forsythe spread, per order)
        quantities[f"abs_dev_iid/{kind}"] = np.abs(a - np.median(a))
        quantities[f"drop/{kind}"] = a - acc(kind, "class_grouped")

    fig, axes = report.figure(2, 1)
    for j, order in enumerate(ORDERS):
        ax = axes[0, j]
        for kind in config["norms"]:
            if status[kind]:
                ax.plot([], [], ls="none", label=f"{LABELS[kind]} ({status[kind]})")
                continue
            report.band(ax, runs[kind, order].steps, runs[kind, order].series["test_accuracy"], LABELS[kind])
        ax.set(xlabel="step", ylabel="validation accuracy", title=ORDERS[order], ylim=(0, 1))
        ax.legend(fontsize=7)
    figures = [report.save_figure(fig, out_dir, "batch_order.png")]
    setup = (
        f"{splits.final.name.rsplit(',', 1)[0]}, its last {config['num_val']} training sequences held out as the "
        f"validation split; MLP {config['widths']} ReLU, the norm before each ReLU (BN = jbn.BatchNorm, Batch Renorm = "
        f"jbn.BatchRenorm r_max {config['renorm_r_max']}, d_max {config['renorm_d_max']}, "
        f"{ramp_text(config['renorm_ramp'])}; momentum {config['bn_momentum']}); "
        f"batch {config['batch_size']}, {config['optimizer']}, {config['steps']} steps. Rates: every norm in every order "
        f"trains each rate of {config['learning_rates']} on tuning seeds {config['tuning_seeds']} (as initialization "
        f"and order seeds) and takes the best mean final validation accuracy; the judged runs train at it. Every run "
        f"starts from initialization seed {config['init_seed']}; the batch orders use seeds {order_seeds}. i.i.d. = the "
        f"training set reshuffled every epoch; class-grouped = each batch drawn from {config['classes_per_batch']} random "
        f"classes. Test accuracy (the test split, once per run) uses the running statistics; train accuracy is the training-mode accuracy of the last "
        f"{config['eval_every']} steps (batch statistics)."
    )
    notes = (
        "(A) compares spreads, not means: per batch order, the absolute deviation of the final test accuracy from "
        "the median over the orders (Brown-Forsythe), paired by order seed between BN and no norm."
    )
    return report.finish(
        NAME,
        out_dir,
        config,
        title="11. Batch order and non-i.i.d. batches",
        claim=CLAIM,
        setup=setup,
        table=table,
        figures=figures,
        quantities=quantities,
        seeds=order_seeds,
        notes=notes,
    )
