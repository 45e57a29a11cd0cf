"""Experiment 16: weight decay and scale invariance with BN.

Claim (van Laarhoven 2017, "L2 Regularization versus Batch and Weight Normalization";
Zhang et al. 2019, "Three Mechanisms of Weight Decay Regularization"; the seed articles'
"BN makes the net invariant to the scale of the weights"): a kernel followed by BN can be
scaled without changing the output, so the loss gradient is orthogonal to the kernel and
plain SGD can only grow its norm; the effective learning rate of its direction is
lr / ||W||^2, which then decays. Weight decay keeps ||W|| small, so the effective learning
rate stays high: with BN, weight decay acts on the learning rate, not as a regularizer of
the function.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import data as datasets
from experiments import report
from experiments.models import MLP, NormSpec
from experiments.training import TrainState, fit, training_loss

NAME = "weight_decay"
DEFAULTS = {
    "data": "mnist1d",
    "widths": [128, 128, 128],
    "batch_size": 64,
    "steps": 3000,
    "eval_every": 100,
    "learning_rate": 0.1,  # plain SGD: the theory of the effective rate is for it
    "weight_decay": 5.0e-3,  # on the hidden kernels only (they feed BN); 0 in the other arm
    "bn_momentum": 0.99,
    "probe_examples": 256,
    "seeds": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
}
TINY = {"widths": [8], "steps": 4, "eval_every": 2, "seeds": [0, 1], "probe_examples": 32}

CLAIM = (
    "With BN the loss is invariant to the scale of each kernel before a BN layer: the gradient is orthogonal to the "
    "kernel, so without weight decay ||W|| grows and the effective learning rate lr/||W||^2 falls; weight decay keeps "
    "||W|| small and the effective learning rate high (van Laarhoven 2017; Zhang et al. 2019)."
)


def optimizer(lr: float, wd: float) -> optax.GradientTransformation:
    """Plain SGD, with L2 weight decay on the hidden Dense kernels (those before a BN layer)."""

    def mask(params):
        return jax.tree_util.tree_map_with_path(lambda path, _: str(path[0].key).startswith("dense_"), params)

    return optax.chain(optax.add_decayed_weights(wd, mask=mask), optax.sgd(lr)) if wd > 0 else optax.sgd(lr)


def norm_probe(model: MLP, x, y):
    """probe(state, key) -> per hidden kernel: ||W|| and cos(W, dL/dW) on a fixed batch."""
    n = len(model.widths)

    def probe(state: TrainState, key):
        grads = jax.grad(lambda p: training_loss(model, p, state.batch_stats, x, y, key)[0])(state.params)
        w = [state.params[f"dense_{i}"]["kernel"] for i in range(n)]
        g = [grads[f"dense_{i}"]["kernel"] for i in range(n)]
        norms = jnp.stack([jnp.linalg.norm(v) for v in w])
        cos = jnp.stack([jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b) + 1e-30) for a, b in zip(w, g)])
        return {"w_norm": norms, "cos_w_grad": cos}

    return probe


def run(config: dict, out_dir: pathlib.Path) -> dict:
    out_dir = pathlib.Path(out_dir)
    data = datasets.load(config["data"])
    px, py = (
        jnp.asarray(data.x_train[: config["probe_examples"]]),
        jnp.asarray(data.y_train[: config["probe_examples"]]),
    )
    lr = config["learning_rate"]
    arms = {"no weight decay": 0.0, f"weight decay {config['weight_decay']:g}": config["weight_decay"]}
    runs, rows = {}, []
    for arm, wd in arms.items():
        model = MLP(tuple(config["widths"]), data.num_classes, norm=NormSpec("bn", momentum=config["bn_momentum"]))
        r = fit(
            model,
            optimizer(lr, wd),
            data,
            seeds=config["seeds"],
            steps=config["steps"],
            batch_size=config["batch_size"],
            eval_every=config["eval_every"],
            probe=norm_probe(model, px, py),
            desc=arm,
        )
        runs[arm] = r
        rows += r.rows(arm=arm, weight_decay=wd)
        for t, step in enumerate(r.steps):
            for s, seed in enumerate(r.seeds):
                for layer in range(len(config["widths"])):
                    for m in ("w_norm", "cos_w_grad"):
                        rows.append(
                            {
                                "arm": arm,
                                "seed": seed,
                                "step": int(step),
                                "layer": layer,
                                "metric": m,
                                "value": float(r.series[m][t, s, layer]),
                            }
                        )
    report.write_metrics(out_dir, rows)

    no, yes = list(arms)

    def mean_norm(r, t):  # (S,) mean over hidden layers of ||W|| at evaluation t
        return r.series["w_norm"][t].mean(-1)

    table = report.markdown_table(
        [
            "arm",
            "||W|| at init",
            "||W|| at the end",
            "lr / ||W||^2 at the end",
            "max |cos(W, dL/dW)|",
            "final test acc",
        ],
        [
            (
                a,
                report.fmt_seeds(mean_norm(r, 0)),
                report.fmt_seeds(mean_norm(r, -1)),
                report.fmt_seeds(lr / mean_norm(r, -1) ** 2, 4),
                f"{np.max(np.abs(r.series['cos_w_grad'])):.1e}",
                report.fmt_seeds(r.final("test_accuracy")),
            )
            for a, r in runs.items()
        ],
    )
    quantities = {
        "max_abs_cos/no_wd": np.max(np.abs(runs[no].series["cos_w_grad"]), axis=(0, 2)),
        "norm_growth/no_wd": mean_norm(runs[no], -1) / mean_norm(runs[no], 0),
        "final_norm/no_wd": mean_norm(runs[no], -1),
        "final_norm/wd": mean_norm(runs[yes], -1),
        "effective_lr/no_wd": lr / mean_norm(runs[no], -1) ** 2,
        "effective_lr/wd": lr / mean_norm(runs[yes], -1) ** 2,
        "test_acc/no_wd": runs[no].final("test_accuracy"),
        "test_acc/wd": runs[yes].final("test_accuracy"),
    }

    fig, axes = report.figure(3, 1, width=3.6)
    for a, r in runs.items():
        report.band(axes[0, 0], r.steps, r.series["w_norm"].mean(-1), a)
        report.band(axes[0, 1], r.steps, lr / r.series["w_norm"].mean(-1) ** 2, a)
        report.band(axes[0, 2], r.steps, r.series["test_accuracy"], a)
    axes[0, 0].set(xlabel="step", ylabel="||W|| (mean over hidden kernels)", title="kernel norm")
    axes[0, 1].set(xlabel="step", ylabel="lr / ||W||^2", title="effective learning rate", yscale="log")
    axes[0, 2].set(xlabel="step", ylabel="test accuracy", title="test accuracy")
    axes[0, 0].legend(fontsize=7)
    figures = [report.save_figure(fig, out_dir, "weight_decay.png")]
    setup = (
        f"{data.name}; ReLU MLP {config['widths']}, jbn.BatchNorm before each ReLU (the Dense before it has no bias, so "
        f"its output is invariant to the kernel's scale); plain SGD lr {lr}, batch {config['batch_size']}, "
        f"{config['steps']} steps, seeds {config['seeds']} (paired: both arms share each seed's init and data order); "
        f"weight decay {config['weight_decay']:g} (L2, added to the gradient) on the hidden kernels only, or none. Every "
        f"{config['eval_every']} steps on {config['probe_examples']} fixed training examples: ||W|| of each hidden kernel "
        f"and cos(W, dL/dW). Effective learning rate = lr / ||W||^2 with ||W|| the mean over the hidden kernels."
    )
    return report.finish(
        NAME,
        out_dir,
        config,
        title="16. Weight decay and scale invariance",
        claim=CLAIM,
        setup=setup,
        table=table,
        figures=figures,
        quantities=quantities,
        seeds=config["seeds"],
    )
