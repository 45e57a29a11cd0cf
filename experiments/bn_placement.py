"""Experiment 4: where BN sits, and the bias before it.

Claims: (A) BN belongs before the activation (Ioffe & Szegedy 2015: "we add the BN
transform immediately before the nonlinearity"); practitioners and some seed articles put
it after. (B) A bias in the layer before BN is redundant: BN subtracts the batch mean, so
the bias cancels, its gradient is zero, and training is the same with or without it.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from experiments import data as datasets
from experiments import report
from experiments.models import MLP, NormSpec
from experiments.training import TrainState, fit_from_config, training_loss

NAME = "bn_placement"
DEFAULTS = {
    "data": "mnist1d",
    "widths": [100, 100, 100],
    "activation": "relu",
    "batch_size": 60,
    "steps": 3000,
    "eval_every": 100,
    "optimizer": "momentum",
    "learning_rate": 0.05,
    "bn_momentum": 0.99,
    "seeds": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
    "grad_examples": 60,  # training examples the bias gradient is measured on
}
TINY = {"widths": [8], "steps": 4, "eval_every": 2, "seeds": [0, 1]}

CLAIM = (
    "(A) BN before the activation (Dense -> BN -> ReLU, as Ioffe & Szegedy place it) trains better than after it "
    "(Dense -> ReLU -> BN). (B) A bias in the Dense layer before BN is redundant: its gradient is zero and the "
    "training curves are the same with and without it."
)


def gradient_probe(model, x, y):
    """probe(state, key) -> the largest |gradient| of the hidden Dense biases and kernels
    on a fixed training batch (training mode)."""

    def probe(state: TrainState, key):
        grads = jax.grad(lambda p: training_loss(model, p, state.batch_stats, x, y, key)[0])(state.params)
        hidden = [grads[f"dense_{i}"] for i in range(len(model.widths))]
        kernel = jnp.max(jnp.stack([jnp.max(jnp.abs(g["kernel"])) for g in hidden]))
        bias = jnp.max(jnp.stack([jnp.max(jnp.abs(g["bias"])) for g in hidden])) if "bias" in hidden[0] else jnp.nan
        return {"max_abs_grad_bias": bias, "max_abs_grad_kernel": kernel}

    return probe


def first_gap_step(steps: np.ndarray, gap: np.ndarray, threshold: float = 1e-6) -> str:
    """The first step at which any seed's gap exceeds `threshold`, or 'never'."""
    hits = np.flatnonzero(np.max(gap, axis=1) > threshold)
    return str(int(steps[hits[0]])) if hits.size else "never"


def run(config: dict, out_dir: pathlib.Path) -> dict:
    out_dir = pathlib.Path(out_dir)
    data = datasets.load(config["data"])
    bn = NormSpec("bn", momentum=config["bn_momentum"])
    gx, gy = jnp.asarray(data.x_train[: config["grad_examples"]]), jnp.asarray(data.y_train[: config["grad_examples"]])
    arms = {
        # (A) placement; the Dense before BN has no bias, the one before the activation keeps it.
        "BN before act": dict(norm=bn, placement="before", dense_bias=False),
        "BN after act": dict(norm=bn, placement="after", dense_bias=True),
        "no BN": dict(norm=NormSpec("none"), dense_bias=True),
        # (B) the same net as "BN before act" with a bias before BN ...
        "BN before act + bias": dict(norm=bn, placement="before", dense_bias=True),
        # ... and a control: the same bias-free net with its training inputs moved by one float32
        # rounding step (x * (1 +- 2^-23)), to see how far rounding alone separates two curves.
        "BN before act, inputs +-1 ulp": dict(norm=bn, placement="before", dense_bias=False),
    }
    sign = np.random.default_rng(12345).choice([-1.0, 1.0], size=data.x_train.shape)
    nudged = data._replace(x_train=(data.x_train * (1 + sign * 2.0**-23)).astype(np.float32))
    runs, rows = {}, []
    for arm, kw in arms.items():
        model = MLP(tuple(config["widths"]), data.num_classes, activation=config["activation"], **kw)
        r = fit_from_config(
            model,
            nudged if "ulp" in arm else data,
            config,
            probe=gradient_probe(model, gx, gy),
            desc=arm,
        )
        runs[arm] = r
        rows += r.rows(arm=arm)
    report.write_metrics(out_dir, rows)

    acc = {a: r.final("test_accuracy") for a, r in runs.items()}
    loss = {a: r.final("train_loss") for a, r in runs.items()}
    with_b, without_b = runs["BN before act + bias"], runs["BN before act"]
    grad_ratio = with_b.series["max_abs_grad_bias"] / with_b.series["max_abs_grad_kernel"]  # (T, S)
    control = runs["BN before act, inputs +-1 ulp"]
    loss_gap = np.abs(with_b.series["train_loss"][1:] - without_b.series["train_loss"][1:])  # (T-1, S)
    control_gap = np.abs(control.series["train_loss"][1:] - without_b.series["train_loss"][1:])
    acc_gap = np.abs(with_b.series["test_accuracy"] - without_b.series["test_accuracy"])
    control_acc_gap = np.abs(control.series["test_accuracy"] - without_b.series["test_accuracy"])

    table_a = report.markdown_table(
        ["arm", "final test acc", "final train loss", "max |grad bias| / max |grad kernel| (over training)"],
        [
            (
                a,
                report.fmt_seeds(acc[a]),
                report.fmt_seeds(loss[a]),
                f"{np.nanmax(grad_ratio):.1e}" if a == "BN before act + bias" else "",
            )
            for a in runs
            if "ulp" not in a
        ],
    )
    table_b = report.markdown_table(
        ["bias before BN: with vs without", "value (over seeds and evaluations)"],
        [
            ("max |grad bias| / max |grad kernel|", f"{np.nanmax(grad_ratio):.2e}"),
            ("first evaluation with a train-loss difference > 1e-6 (step)", first_gap_step(with_b.steps[1:], loss_gap)),
            ("mean |train loss difference| over training", f"{np.mean(loss_gap):.2e}"),
            ("control (inputs +-1 ulp, no bias): mean |train loss difference|", f"{np.mean(control_gap):.2e}"),
            ("max |test accuracy difference|; control", f"{np.max(acc_gap):.4f}; {np.max(control_acc_gap):.4f}"),
        ],
    )
    table = table_a + "\n\n" + table_b

    # Per-seed quantities; every arm shares each seed's init seed and data order (paired).
    quantities = {
        "test_acc/before": acc["BN before act"],
        "test_acc/after": acc["BN after act"],
        "train_loss/before": loss["BN before act"],
        "train_loss/after": loss["BN after act"],
        "bias_grad_ratio": np.nanmax(grad_ratio, axis=0),  # per seed, the largest over training
        "loss_gap/with_vs_without_bias": np.mean(loss_gap, axis=0),
        "loss_gap/rounding_control": np.mean(control_gap, axis=0),
    }

    fig, axes = report.figure(3, 1, width=3.6)
    for a in ("BN before act", "BN after act", "no BN"):  # (A)
        report.band(axes[0, 0], runs[a].steps, runs[a].series["test_accuracy"], a)
    axes[0, 0].set(xlabel="step", ylabel="test accuracy", title="(A) placement")
    axes[0, 0].legend()
    for a, ls in (("BN before act", "-"), ("BN before act + bias", "--")):
        axes[0, 1].plot(runs[a].steps[1:], np.nanmean(runs[a].series["train_loss"][1:], 1), ls=ls, label=a)
    axes[0, 1].set(xlabel="step", ylabel="train loss", title="(B) with / without bias", yscale="log")
    axes[0, 1].legend()
    axes[0, 2].plot(with_b.steps, np.nanmax(grad_ratio, 1), label="|grad bias| / |grad kernel|")
    axes[0, 2].plot(with_b.steps[1:], np.mean(loss_gap, 1), label="|loss with - without bias|")
    axes[0, 2].plot(with_b.steps[1:], np.mean(control_gap, 1), ls=":", label="|loss control - without|")
    axes[0, 2].set(xlabel="step", yscale="log", title="(B) bias gradient, curve gap")
    axes[0, 2].legend(fontsize=7)
    figures = [report.save_figure(fig, out_dir, "bn_placement.png")]
    setup = (
        f"{data.name}; MLP {config['widths']} {config['activation']}, batch {config['batch_size']}, {config['optimizer']} "
        f"lr {config['learning_rate']}, {config['steps']} steps, seeds {config['seeds']} (same init and data order in "
        f"every arm); BN = jbn.BatchNorm (momentum {config['bn_momentum']}). Bias gradients are taken on "
        f"{config['grad_examples']} fixed training examples in training mode, at every evaluation."
    )
    return report.finish(
        NAME,
        out_dir,
        config,
        title="4. BN before vs after the activation; the bias before BN",
        claim=CLAIM,
        setup=setup,
        table=table,
        figures=figures,
        quantities=quantities,
        seeds=config["seeds"],
    )
