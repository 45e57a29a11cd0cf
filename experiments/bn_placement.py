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

from experiments import report, testbed
from experiments.models import NormSpec
from experiments.training import TrainState, training_loss

NAME = "bn_placement"
# Experiment zero's testbed (until 2026-12-05: a 3x100 ReLU MLP on the 4000-example MNIST-1D at
# one learning rate for every arm).
DEFAULTS = {
    **testbed.DEFAULTS,
    "grad_examples": 128,  # training examples the bias gradient is measured on
}
TINY = {**testbed.TINY, "grad_examples": 16}

CLAIM = (
    "(A) BN before the activation (Dense -> BN -> tanh, as Ioffe & Szegedy place it) trains better than after it "
    "(Dense -> tanh -> BN), each at its own tuned learning rate. (B) A bias in the Dense layer before BN is "
    "redundant: its gradient is zero and the training curves are the same with and without it."
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
    data = testbed.splits(config)
    train = data.tuning  # every run trains on the train split; its "test_" series are the validation split's
    gx, gy = (
        jnp.asarray(train.x_train[: config["grad_examples"]]),
        jnp.asarray(train.y_train[: config["grad_examples"]]),
    )
    # (A) placement, every arm at its own rate chosen on validation; the Dense before BN has no
    # bias, the one before the activation keeps it.
    placements = {
        "BN before act": testbed.mlp(config, placement="before", dense_bias=False),
        "BN after act": testbed.mlp(config, placement="after", dense_bias=True),
        "no BN": testbed.mlp(config, NormSpec("none"), dense_bias=True),
    }
    tuned = {arm: testbed.tune_and_judge(config, arm, model, data) for arm, model in placements.items()}
    rows = [row for t in tuned.values() for row in t.rows]
    runs = {a: t.run for a, t in tuned.items()}
    test = {a: t.test["accuracy"] for a, t in tuned.items()}
    # (B) the same net as "BN before act", at its chosen rate, with a bias before BN, and a control:
    # the bias-free net with its training inputs moved by one float32 rounding step
    # (x * (1 +- 2^-23)), to see how far rounding alone separates two curves.
    rate = tuned["BN before act"].rate
    with_bias = testbed.mlp(config, placement="before", dense_bias=True)
    sign = np.random.default_rng(12345).choice([-1.0, 1.0], size=train.x_train.shape)
    nudged = data._replace(tuning=train._replace(x_train=(train.x_train * (1 + sign * 2.0**-23)).astype(np.float32)))
    part_b = {
        "BN before act + bias": (with_bias, data, gradient_probe(with_bias, gx, gy)),
        "BN before act, inputs +-1 ulp": (placements["BN before act"], nudged, None),
    }
    for arm, (model, arm_data, probe) in part_b.items():
        runs[arm], t, arm_rows = testbed.judge_at(config, arm, model, rate, arm_data, probe, part="B")
        test[arm] = t["accuracy"]
        rows += arm_rows
    report.write_metrics(out_dir, rows)

    acc = test  # the test split, once per run
    loss = {a: r.final("train_loss") for a, r in runs.items()}
    with_b, without_b = runs["BN before act + bias"], runs["BN before act"]
    grad_ratio = with_b.series["max_abs_grad_bias"] / with_b.series["max_abs_grad_kernel"]  # (T, S)
    control = runs["BN before act, inputs +-1 ulp"]
    loss_gap = np.abs(with_b.series["train_loss"][1:] - without_b.series["train_loss"][1:])  # (T-1, S)
    control_gap = np.abs(control.series["train_loss"][1:] - without_b.series["train_loss"][1:])
    acc_gap = np.abs(with_b.series["test_accuracy"] - without_b.series["test_accuracy"])
    control_acc_gap = np.abs(control.series["test_accuracy"] - without_b.series["test_accuracy"])

    rates = {a: t.rate for a, t in tuned.items()} | dict.fromkeys(part_b, rate)
    table_a = report.markdown_table(
        ["arm", "rate", "test acc (once, after training)", "final val acc", "final train loss"],
        [
            (
                a,
                f"{rates[a]:g}",
                report.fmt_seeds(acc[a]),
                report.fmt_seeds(runs[a].final("test_accuracy")),
                report.fmt_seeds(loss[a]),
            )
            for a in runs
        ],
    )
    table_b = report.markdown_table(
        ["bias before BN: with vs without", "value (over seeds and evaluations)"],
        [
            ("max |grad bias| / max |grad kernel|", f"{np.nanmax(grad_ratio):.2e}"),
            ("first evaluation with a train-loss difference > 1e-6 (step)", first_gap_step(with_b.steps[1:], loss_gap)),
            ("mean |train loss difference| over training", f"{np.mean(loss_gap):.2e}"),
            ("control (inputs +-1 ulp, no bias): mean |train loss difference|", f"{np.mean(control_gap):.2e}"),
            (
                "max |validation accuracy difference| over training; control",
                f"{np.max(acc_gap):.4f}; {np.max(control_acc_gap):.4f}",
            ),
        ],
    )
    table = testbed.tuning_table(tuned, config["learning_rates"]) + "\n\n" + table_a + "\n\n" + table_b

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
    axes[0, 0].set(xlabel="step", ylabel="validation accuracy", title="(A) placement, each at its rate")
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
        f"{testbed.describe(config, data)} (A) BN before the activation (the Dense before it without bias), after it "
        f"(the Dense with bias), and no BN, each tuned. (B) 'BN before act' with a bias in every Dense before BN, and "
        f"the bias-free net on inputs moved by one float32 rounding step, both at the rate 'BN before act' chose "
        f"({rate:g}). Bias gradients are taken on {config['grad_examples']} fixed training examples in training mode, "
        f"at every evaluation."
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
