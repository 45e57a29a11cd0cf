"""Experiment 9: which statistics to normalize with at test time.

Claims: (A) the running averages (EMA) that BN keeps during training are a good stand-in
for the population statistics it should use at inference (Ioffe & Szegedy 2015, and the
seed articles); Wu & Johnson (2021) show the EMA can lag the population statistics, so
exact ("precise") population statistics may do better. (B) Normalizing test examples with
their own batch's statistics instead hurts when those batches are small.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from experiments import data as datasets
from experiments import features, report
from experiments.models import MLP, NormSpec
from experiments.population import recompute, seed_state
from experiments.training import TrainState, accuracy, fit, make_evaluate, make_optimizer, variables_of

NAME = "eval_statistics"
DEFAULTS = {
    "data": "mnist1d",
    "widths": [128, 128, 128],
    "batch_sizes": [4, 16, 64],  # normalization (= training) batch sizes
    "momenta": [0.9, 0.99],
    "epochs": 10.0,
    "evaluations": 10,
    "optimizer": "momentum",
    "learning_rate": 0.05,  # at batch `reference_batch_size`; scaled linearly with the batch
    "reference_batch_size": 32,
    "recompute_batch_size": 500,
    "seeds": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
}
TINY = {"widths": [8], "batch_sizes": [4, 16], "momenta": [0.9], "epochs": 0.02, "evaluations": 2, "seeds": [0, 1]}

CLAIM = (
    "(A) BN's running averages (EMA, momentum 0.9 or 0.99) are about as good at test time as the exact population "
    "statistics. (B) Normalizing test examples with the statistics of their own test batch hurts when batches are small."
)


def batch_stat_accuracy(model, state: TrainState, x: jax.Array, y: jax.Array, batch_size: int) -> jax.Array:
    """Test accuracy when each test batch of `batch_size` is normalized with its own
    statistics (training-mode BN, running statistics left alone). One seed; x is cut
    into whole batches (the remainder is dropped)."""
    n = (len(x) // batch_size) * batch_size
    xb = x[:n].reshape((-1, batch_size) + x.shape[1:])
    yb = y[:n].reshape(-1, batch_size)

    def one(xi):
        logits, _ = model.apply(variables_of(state), xi, train=True, mutable=["batch_stats"])
        return logits

    logits = jax.lax.map(one, xb)
    return accuracy(logits.reshape(n, -1), yb.reshape(n))


def run(config: dict, out_dir: pathlib.Path) -> dict:
    out_dir = pathlib.Path(out_dir)
    data = datasets.load(config["data"])
    waiting = features.waiting("recompute")
    order = np.random.default_rng(0).permutation(len(data.y_test))  # test batches mix the classes
    x_test, y_test = jnp.asarray(data.x_test[order]), jnp.asarray(data.y_test[order])
    n_train = len(data.y_train)
    ema, exact, batch_acc, rows = {}, {}, {}, []
    for b in config["batch_sizes"]:
        for m in config["momenta"]:
            model = MLP(tuple(config["widths"]), data.num_classes, activation="relu", norm=NormSpec("bn", momentum=m))
            steps = max(1, int(config["epochs"] * n_train) // b)
            lr = config["learning_rate"] * b / config["reference_batch_size"]
            r = fit(
                model,
                make_optimizer(config["optimizer"], lr),
                data,
                seeds=config["seeds"],
                steps=steps,
                batch_size=b,
                eval_every=max(1, steps // config["evaluations"]),
                desc=f"b={b} momentum {m:g}",
            )
            ema[b, m] = r.final("test_accuracy")
            rows += r.rows(batch_size=b, momentum=m, learning_rate=lr, statistics="ema")
            batch_acc[b, m] = np.asarray(
                jax.jit(jax.vmap(lambda st: batch_stat_accuracy(model, st, x_test, y_test, b)))(r.state)
            )
            rows += [
                {
                    "batch_size": b,
                    "momentum": m,
                    "seed": s,
                    "metric": "test_accuracy",
                    "statistics": "test batch",
                    "value": float(v),
                }
                for s, v in zip(r.seeds, batch_acc[b, m])
            ]
            if waiting:
                rows += report.waiting_rows(waiting, batch_size=b, momentum=m, statistics="exact population")
                continue
            evaluate = jax.jit(make_evaluate(model))
            accs = []
            for i, s in enumerate(r.seeds):
                st = seed_state(r.state, i)
                st = st._replace(batch_stats=recompute(model, st, data.x_train, config["recompute_batch_size"]))
                accs.append(float(evaluate(st, x_test, y_test)["accuracy"]))
                rows.append(
                    {
                        "batch_size": b,
                        "momentum": m,
                        "seed": s,
                        "metric": "test_accuracy",
                        "statistics": "exact population",
                        "value": accs[-1],
                    }
                )
            exact[b, m] = np.asarray(accs)
    report.write_metrics(out_dir, rows)

    keys = [(b, m) for b in config["batch_sizes"] for m in config["momenta"]]
    table = report.markdown_table(
        ["batch", "momentum", "EMA (running averages)", "exact population", "test-batch statistics"],
        [
            (
                b,
                f"{m:g}",
                report.fmt_seeds(ema[b, m]),
                waiting or report.fmt_seeds(exact[b, m]),
                report.fmt_seeds(batch_acc[b, m]),
            )
            for b, m in keys
        ],
    )
    # Per-seed quantities, cell by cell: the three columns of a cell are the same trained nets
    # (paired by seed).
    quantities = {}
    for b, m in keys:
        quantities[f"ema/b{b}/m{m:g}"] = ema[b, m]
        quantities[f"test_batch/b{b}/m{m:g}"] = batch_acc[b, m]
        if not waiting:
            quantities[f"exact/b{b}/m{m:g}"] = exact[b, m]

    fig, axes = report.figure(len(config["momenta"]), 1, width=4.0)
    sizes = config["batch_sizes"]
    for j, m in enumerate(config["momenta"]):
        ax = axes[0, j]
        curves = [("EMA", ema), ("test-batch statistics", batch_acc)] + (
            [] if waiting else [("exact population", exact)]
        )
        for label, d in curves:
            ax.errorbar(
                sizes,
                [np.mean(d[b, m]) for b in sizes],
                yerr=[np.nan_to_num(report.mean_std(d[b, m])[1]) for b in sizes],
                marker="o",
                capsize=3,
                label=label,
            )
        if waiting:
            ax.plot([], [], ls="none", label=f"exact population: {waiting}")
        ax.set(xlabel="normalization batch size", ylabel="test accuracy", title=f"BN momentum {m:g}")
        report.log_ticks(ax, sizes)
        ax.legend(fontsize=7)
    figures = [report.save_figure(fig, out_dir, "eval_statistics.png")]
    setup = (
        f"{data.name}; MLP {config['widths']} ReLU, jbn.BatchNorm before each ReLU with momentum {config['momenta']}; trained "
        f"with batches of {config['batch_sizes']} for {config['epochs']} epochs, {config['optimizer']} lr "
        f"{config['learning_rate']} x batch/{config['reference_batch_size']}, seeds {config['seeds']}. At the end the test set "
        f"is normalized three ways: the running averages (EMA); exact population statistics of the training set "
        f"(jbn.recompute_batch_stats); or each shuffled test batch of the training batch size with its own statistics."
    )
    return report.finish(
        NAME,
        out_dir,
        config,
        title="9. Evaluation statistics",
        claim=CLAIM,
        setup=setup,
        table=table,
        figures=figures,
        quantities=quantities,
        seeds=config["seeds"],
    )
