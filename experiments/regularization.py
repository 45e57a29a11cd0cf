"""Experiment 12: does BN regularize, and reduce the need for dropout?

Claim (seed articles 002-004: "BN regularizes the model ... in some cases you might not
even need dropout"; Ioffe & Szegedy 2015, Sec. 3.4): the noise of batch statistics acts as
a regularizer, so a BN net generalizes better than the same net without it, as dropout
does. A fair test compares nets that fit the training data equally well: the train-test
gap is read where each net's training-set loss (eval mode, no
dropout) crosses the same value (interpolated between the two evaluations around the
crossing), over several training-set sizes.

Every arm takes its own learning rate at every training-set size, chosen on a validation split
by the procedure of experiment zero (`experiments.tuning`: the whole grid on tuning seeds, the
best mean final validation accuracy). The data is experiment zero's generated MNIST-1D (the
subsets are the first N of its 30000 training sequences, validation 5000, test 10000). The
step is chosen on the training loss alone; the test split is read at every evaluation to find
the accuracy at that step, and nothing is chosen on it. (Until 2026-12-05: every arm at lr
0.05, subsets of the 4000-sequence MNIST-1D, test 1000.)
"""

from __future__ import annotations

import pathlib

import jax.numpy as jnp
import numpy as np

from experiments import report, testbed
from experiments.models import MLP, NormSpec
from experiments.training import TrainState, fit_from_config, make_evaluate
from experiments.tuning import tune, validation_rows

NAME = "regularization"
DEFAULTS = {
    # experiment zero's generated MNIST-1D: the subsets come from its training split
    **{k: testbed.DEFAULTS[k] for k in ("num_train", "num_val", "num_test", "data_seed")},
    "widths": [128, 128, 128],
    "train_sizes": [500, 1000, 4000],  # the first N training examples
    "dropout": 0.3,  # the dropout arm: on every hidden layer, no BN
    "batch_size": 64,
    "steps": 2000,
    "eval_every": 50,
    "optimizer": "momentum",
    "learning_rates": [0.01, 0.02, 0.05, 0.1, 0.2],  # every arm at every size tunes over the whole grid
    "tuning_seeds": [100, 101, 102],
    "bn_momentum": 0.99,
    "matched_train_loss": 0.3,  # the gap is read where the training-set loss first reaches this
    "seeds": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
}
TINY = {
    **{k: testbed.TINY[k] for k in ("num_train", "num_val", "num_test")},
    "widths": [8],
    "train_sizes": [200],
    "steps": 4,
    "eval_every": 2,
    "seeds": [0, 1],
    "learning_rates": [0.05],
    "tuning_seeds": [100],
    "matched_train_loss": 5.0,
}

CLAIM = (
    "BN regularizes: at the same training loss, a BN net has a smaller train-test gap than the same net without BN, "
    "about as small as with dropout, so it reduces the need for dropout (seed articles; Ioffe & Szegedy 2015, Sec. 3.4)."
)
ARMS = {"none": dict(norm=NormSpec("none")), "BN": dict(norm=NormSpec("bn")), "dropout": dict(norm=NormSpec("none"))}


def train_set_probe(model, x, y):
    """probe(state, key) -> loss and accuracy on the (sub)training set in eval mode."""
    evaluate = make_evaluate(model)

    def probe(state: TrainState, key):
        m = evaluate(state, x, y)
        return {"train_eval_loss": m["loss"], "train_eval_accuracy": m["accuracy"]}

    return probe


def at_matched_loss(run, target: float) -> dict[str, np.ndarray]:
    """Per seed, the numbers where the eval-mode training loss crosses `target`, interpolated
    linearly in log(loss) between the last evaluation above it and the first at or below it
    (NaN for a seed that never gets there). Reading the first evaluation at or below the
    target instead compared nets at different losses: one evaluation interval can take the
    loss well below it, more for one arm than another."""
    loss = run.series["train_eval_loss"]  # (T, S)
    keys = ("step", "gap", "test_accuracy", "train_accuracy", "loss")
    out = {k: np.full(loss.shape[1], np.nan) for k in keys}
    series = {
        "step": np.broadcast_to(np.asarray(run.steps, float)[:, None], loss.shape),
        "train_accuracy": run.series["train_eval_accuracy"],
        "test_accuracy": run.series["test_accuracy"],
        "loss": loss,
    }
    for s in range(loss.shape[1]):
        hits = np.flatnonzero(loss[:, s] <= target)
        if not hits.size:
            continue
        t = hits[0]
        w = 1.0  # no usable evaluation before the crossing: read the first one at or below it
        if t > 0 and np.isfinite(loss[t - 1, s]) and loss[t - 1, s] > loss[t, s] > 0:
            w = (np.log(loss[t - 1, s]) - np.log(target)) / (np.log(loss[t - 1, s]) - np.log(loss[t, s]))
        for k, v in series.items():
            out[k][s] = v[t, s] if t == 0 else v[t - 1, s] + w * (v[t, s] - v[t - 1, s])
        out["gap"][s] = out["train_accuracy"][s] - out["test_accuracy"][s]
    return out


def run(config: dict, out_dir: pathlib.Path) -> dict:
    out_dir = pathlib.Path(out_dir)
    splits = testbed.splits(config)
    target = config["matched_train_loss"]
    runs, matched, rates, rows = {}, {}, {}, []
    for n in config["train_sizes"]:
        # the first n training sequences; held out: the validation split (choices) or the test split (measurements)
        tuning, final = (d._replace(x_train=d.x_train[:n], y_train=d.y_train[:n]) for d in splits)
        px, py = jnp.asarray(final.x_train), jnp.asarray(final.y_train)
        for arm, kw in ARMS.items():
            spec = kw["norm"] if arm != "BN" else NormSpec("bn", momentum=config["bn_momentum"])
            model = MLP(
                tuple(config["widths"]),
                final.num_classes,
                norm=spec,
                dropout=config["dropout"] if arm == "dropout" else 0.0,
            )
            batch = min(config["batch_size"], n)
            rates[arm, n], tuned = tune(
                lambda lr, model=model, batch=batch, arm=arm, n=n: fit_from_config(
                    model,
                    tuning,
                    config | {"learning_rate": lr},
                    seeds=config["tuning_seeds"],
                    batch_size=batch,
                    desc=f"tune {arm} n={n} lr {lr:g}",
                ),
                config["learning_rates"],
            )
            for lr, r in tuned.items():
                rows += validation_rows(r, phase="tuning", arm=arm, train_size=n, learning_rate=lr)
            r = fit_from_config(
                model,
                final,
                config | {"learning_rate": rates[arm, n]},
                batch_size=batch,
                probe=train_set_probe(model, px, py),
                desc=f"{arm} n={n} lr {rates[arm, n]:g}",
            )
            runs[arm, n] = r
            matched[arm, n] = at_matched_loss(r, target)
            rows += r.rows(phase="judged", arm=arm, train_size=n, learning_rate=rates[arm, n])
    report.write_metrics(out_dir, rows)

    sizes = config["train_sizes"]
    table = report.markdown_table(
        [
            "train size",
            "arm",
            "rate",
            f"step where train loss = {target:g}",
            "train acc there",
            "test acc there",
            "gap (train - test)",
            "final test acc",
        ],
        [
            (
                n,
                a,
                f"{rates[a, n]:g}",
                report.fmt_seeds(matched[a, n]["step"], 0, missing="never reached"),
                report.fmt_seeds(matched[a, n]["train_accuracy"]),
                report.fmt_seeds(matched[a, n]["test_accuracy"]),
                report.fmt_seeds(matched[a, n]["gap"], missing="never reached"),
                report.fmt_seeds(runs[a, n].final("test_accuracy")),
            )
            for n in sizes
            for a in ARMS
        ],
    )
    quantities = {}
    for n in sizes:
        for a in ARMS:
            quantities[f"gap/{a}/n{n}"] = matched[a, n]["gap"]
            quantities[f"test_acc_matched/{a}/n{n}"] = matched[a, n]["test_accuracy"]

    fig, axes = report.figure(2, 1)
    for a in ARMS:
        m = [np.nanmean(matched[a, n]["gap"]) for n in sizes]
        sd = [np.nan_to_num(report.mean_std(matched[a, n]["gap"])[1]) for n in sizes]
        axes[0, 0].errorbar(sizes, m, yerr=sd, marker="o", capsize=3, label=a)
    report.log_ticks(axes[0, 0], sizes)
    axes[0, 0].set(
        xlabel="training examples", ylabel="train acc - test acc", title=f"gap at train loss {target:g} (± SD)"
    )
    axes[0, 0].legend()
    n0 = min(sizes)
    for a in ARMS:
        r = runs[a, n0]
        report.band(axes[0, 1], r.steps, r.series["train_eval_loss"], f"{a} train")
    axes[0, 1].axhline(target, color="gray", ls=":", lw=1)
    axes[0, 1].set(xlabel="step", ylabel="training-set loss (eval mode)", title=f"{n0} examples", yscale="log")
    axes[0, 1].legend(fontsize=7)
    figures = [report.save_figure(fig, out_dir, "regularization.png")]
    setup = (
        f"{splits.final.name.rsplit(',', 1)[0]} (experiment zero's data), the first {sizes} training sequences; ReLU "
        f"MLP {config['widths']}: no norm / jbn.BatchNorm before each ReLU (momentum {config['bn_momentum']}) / dropout "
        f"{config['dropout']} on every hidden layer (no BN); batch {config['batch_size']} (or the whole subset), "
        f"{config['optimizer']}, {config['steps']} steps. Rates: every arm at every size trains each rate of "
        f"{config['learning_rates']} on tuning seeds {config['tuning_seeds']} and takes the best mean final validation "
        f"accuracy; seeds {config['seeds']} then train at it (paired: the arms share each seed's data order). Every "
        f"{config['eval_every']} steps the training-set loss and accuracy in eval mode (running statistics, no "
        f"dropout) and the test accuracy (read, never chosen on); the gap is read where that loss crosses {target:g}, "
        f"interpolated linearly in log(loss) between the evaluations before and after the crossing (a seed that never "
        f"gets there is left out, and n says so)."
    )
    return report.finish(
        NAME,
        out_dir,
        config,
        title="12. Does BN regularize? Train-test gap at matched training loss",
        claim=CLAIM,
        setup=setup,
        table=table,
        figures=figures,
        quantities=quantities,
        seeds=config["seeds"],
    )
