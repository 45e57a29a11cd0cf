"""Experiment 7: gradients at initialization in deep BN nets without skips (Yang et al. 2019).

Claim ("A Mean Field Theory of Batch Normalization", ICLR 2019): in a deep fully
connected network with batch norm and no skip connections, the gradients explode at
initialization: their norm grows exponentially from the last layer back to the first,
whatever the nonlinearity, while the same net without BN at a critical initialization
(He init for ReLU) keeps them at one scale. The seed articles say the opposite in general
terms ("BN mitigates vanishing/exploding gradients"), and mean of saturating nets during
training. So the experiment also trains the nets, ReLU and sigmoid, for a few hundred steps:
how the gradient range changes once training starts (Yang et al. report that it shrinks after
the first steps), whether BN helps a saturating (sigmoid) net train, and whether deep BN nets
without skips are still trainable (Yang et al.: not past ~50 layers).
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from experiments import data as datasets
from experiments import report
from experiments.models import MLP, NormSpec
from experiments.training import cross_entropy, fit, make_optimizer
from experiments.tuning import test_once, tune, validation_rows

NAME = "deep_gradients"
DEFAULTS = {
    "data": "mnist1d",
    "depths": [10, 20, 30, 50],
    "width": 128,
    "activations": ["relu", "sigmoid"],
    "batch_size": 64,
    "seeds": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],  # initializations (each with its own batch)
    "train_depths": [10, 50],  # depths that are also trained
    "train_steps": 300,
    "train_eval_every": 30,
    "optimizer": "momentum",
    # Each trained arm (activation, BN or not, depth) takes its own rate from this grid, chosen
    # on a validation split (the last `num_val` training examples) on tuning seeds by the same
    # procedure (experiments/tuning.py); the test split is evaluated once per judged run.
    "learning_rates": [0.003, 0.01, 0.03, 0.1, 0.3],
    "num_val": 500,
    "tuning_seeds": [100, 101, 102],
}
TINY = {
    "depths": [2, 3],
    "width": 8,
    "seeds": [0, 1],
    "activations": ["relu"],
    "train_depths": [3],
    "train_steps": 4,
    "train_eval_every": 2,
    "learning_rates": [0.05],
    "tuning_seeds": [100],
}

CLAIM = (
    "At initialization, a deep BN MLP without skips has exploding gradients (norm growing exponentially from the last "
    "layer back to the first), while the same ReLU net without BN, He-initialized, keeps them at one scale; once training "
    "starts the range shrinks, and BN nets of ~50 layers are hard to train (Yang et al. 2019). The seed articles: BN "
    "mitigates vanishing gradients and helps saturating (sigmoid) nets train."
)


def layer_gradient_norms(model: MLP, variables: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    """(depth,) Frobenius norms of the loss gradient w.r.t. each hidden Dense kernel of the
    freshly initialized `variables`, in training mode (batch statistics of x)."""

    def loss(params):
        logits, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return cross_entropy(logits, y)

    grads = jax.grad(loss)(variables["params"])
    return jnp.stack([jnp.linalg.norm(grads[f"dense_{i}"]["kernel"]) for i in range(len(model.widths))])


def initialize(model: MLP, keys, x) -> dict:
    """Variables of one initialization per key, stacked on a leading axis (initialized
    eagerly: compiling a flax init costs more than running it)."""
    inits = [model.init({"params": k}, x, train=False) for k in keys]
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *inits)


def growth_per_layer(log_norms: np.ndarray) -> float:
    """The factor by which the gradient norm grows per layer towards the input: 10 ** (minus
    the least-squares slope of log10 norm against the layer index)."""
    layers = np.arange(len(log_norms))
    return float(10 ** (-np.polyfit(layers, log_norms, 1)[0]))


def gradient_probe(model: MLP, x: jax.Array, y: jax.Array):
    """probe(state, key) -> {"grad_norms": (depth,)} on the fixed batch (x, y), training mode."""

    def probe(state, key):
        variables = {"params": state.params, **({"batch_stats": state.batch_stats} if state.batch_stats else {})}
        return {"grad_norms": layer_gradient_norms(model, variables, x, y)}

    return probe


def run(config: dict, out_dir: pathlib.Path) -> dict:
    out_dir = pathlib.Path(out_dir)
    full = datasets.load(config["data"])
    splits = datasets.validation_split(full, config["num_val"])
    data = splits.tuning  # training examples without the validation ones; its "test" split is validation
    seeds, b = config["seeds"], config["batch_size"]
    rng = np.random.default_rng(0)
    batches = [rng.choice(len(data.y_train), size=b, replace=False) for _ in seeds]
    xs = jnp.asarray(np.stack([data.x_train[i] for i in batches]))
    ys = jnp.asarray(np.stack([data.y_train[i] for i in batches]))
    keys = [jax.random.PRNGKey(s) for s in seeds]
    arms = {"BN": NormSpec("bn"), "no BN": NormSpec("none")}
    acts, depths = config["activations"], config["depths"]
    norms, trained, chosen, test_acc, rows = {}, {}, {}, {}, []
    for act in acts:
        for arm, spec in arms.items():
            for depth in depths:
                model = MLP((config["width"],) * depth, data.num_classes, activation=act, norm=spec, weight_init="he")
                variables = initialize(model, keys, xs[0])
                n = np.asarray(
                    jax.jit(jax.vmap(lambda v, x, y: layer_gradient_norms(model, v, x, y)))(variables, xs, ys)
                )  # (S, depth)
                norms[act, arm, depth] = n
                rows += [
                    {
                        "activation": act,
                        "arm": arm,
                        "depth": depth,
                        "layer": layer,
                        "seed": s,
                        "step": 0,
                        "metric": "grad_norm",
                        "value": float(n[i, layer]),
                    }
                    for i, s in enumerate(seeds)
                    for layer in range(depth)
                ]
            for depth in config["train_depths"]:
                # Training: the same nets, a fixed probe batch (the first seed's) for the gradient norms.
                model = MLP((config["width"],) * depth, data.num_classes, activation=act, norm=spec, weight_init="he")

                def train(lr, run_seeds, desc, model=model):
                    return fit(
                        model,
                        make_optimizer(config["optimizer"], lr),
                        data,
                        seeds=run_seeds,
                        steps=config["train_steps"],
                        batch_size=b,
                        eval_every=config["train_eval_every"],
                        probe=gradient_probe(model, xs[0], ys[0]),
                        desc=desc,
                    )

                key = (act, arm, depth)
                chosen[key], tuning = tune(
                    lambda lr, train=train, key=key: train(lr, config["tuning_seeds"], f"tune {key} lr {lr:g}"),
                    config["learning_rates"],
                )
                for lr, t in tuning.items():
                    rows += validation_rows(
                        t, phase="tuning", activation=act, arm=arm, depth=depth, learning_rate=lr, layer=""
                    )
                r = train(chosen[key], seeds, f"{act} {arm} depth {depth} lr {chosen[key]:g}")
                trained[key], test_acc[key] = r, test_once(model, r, splits.final)["accuracy"]
                rows += validation_rows(
                    r, phase="judged", activation=act, arm=arm, depth=depth, learning_rate=chosen[key], layer=""
                )
                rows += [
                    {
                        "phase": "judged",
                        "activation": act,
                        "arm": arm,
                        "depth": depth,
                        "learning_rate": chosen[key],
                        "layer": "",
                        "seed": s,
                        "metric": "test_accuracy",
                        "value": float(v),
                    }
                    for s, v in zip(r.seeds, test_acc[key].tolist())
                ]
    report.write_metrics(out_dir, rows)

    def log_ratio(n: np.ndarray) -> np.ndarray:
        """(S,) log10 of (first hidden layer's gradient norm / last hidden layer's)."""
        return np.log10(n[..., 0] / n[..., -1])

    def log_spread(n: np.ndarray) -> np.ndarray:
        """(S,) log10 of (largest / smallest gradient norm over all hidden layers)."""
        return np.log10(n.max(axis=-1) / n.min(axis=-1))

    def growth(n: np.ndarray) -> np.ndarray:
        return np.array([growth_per_layer(np.log10(row)) for row in n])

    table = report.markdown_table(
        [
            "activation",
            "depth",
            "BN: log10(first/last)",
            "BN: growth per layer",
            "no BN: log10(first/last)",
            "no BN: log10(max/min over layers)",
        ],
        [
            (
                act,
                d,
                report.fmt_seeds(log_ratio(norms[act, "BN", d]), 2),
                report.fmt_seeds(growth(norms[act, "BN", d]), 3),
                report.fmt_seeds(log_ratio(norms[act, "no BN", d]), 2),
                report.fmt_seeds(log_spread(norms[act, "no BN", d]), 2),
            )
            for act in acts
            for d in depths
        ],
    )
    t_steps = config["train_steps"]
    table += "\n\n" + report.markdown_table(
        [
            "activation",
            "depth",
            "arm",
            "rate (chosen on validation)",
            "log10(first/last) at init (probe batch)",
            "after the first evaluation interval",
            f"after {t_steps} steps",
            f"test acc after {t_steps} steps",
        ],
        [
            (
                act,
                d,
                arm,
                f"{chosen[act, arm, d]:g}",
                report.fmt_seeds(log_ratio(r.series["grad_norms"][0]), 2),
                report.fmt_seeds(log_ratio(r.series["grad_norms"][1]), 2),
                report.fmt_seeds(log_ratio(r.series["grad_norms"][-1]), 2),
                report.fmt_seeds(test_acc[act, arm, d]),
            )
            for (act, arm, d), r in trained.items()
        ],
    )
    deepest = max(depths)
    quantities = {}
    for act in acts:
        quantities[f"init_log10_first_over_last/{act}/BN/depth{deepest}"] = log_ratio(norms[act, "BN", deepest])
        quantities[f"init_log10_max_over_min/{act}/noBN/worst_depth"] = np.max(
            [log_spread(norms[act, "no BN", d]) for d in depths], axis=0
        )
        g = np.stack([growth(norms[act, "BN", d]) for d in depths])  # (depths, S)
        quantities[f"init_growth_min_over_depths/{act}/BN"] = g.min(axis=0)
        quantities[f"init_growth_max_over_min_depths/{act}/BN"] = g.max(axis=0) / g.min(axis=0)
        for arm, key in (("BN", "BN"), ("no BN", "noBN")):
            for d in config["train_depths"]:
                r = trained[act, arm, d]
                quantities[f"test_acc/{act}/{key}/depth{d}"] = test_acc[act, arm, d]
                quantities[f"log10_first_over_last/{act}/{key}/depth{d}/init"] = log_ratio(r.series["grad_norms"][0])
                quantities[f"log10_first_over_last/{act}/{key}/depth{d}/trained"] = log_ratio(
                    r.series["grad_norms"][-1]
                )

    fig, axes = report.figure(3, 1, width=4.0)
    for j, d in enumerate(depths):
        for arm, ls in (("BN", "-"), ("no BN", "--")):
            m = np.mean(np.log10(norms[acts[0], arm, d]), axis=0)
            axes[0, 0].plot(np.arange(d), m, ls=ls, color=f"C{j}", label=f"{arm}, depth {d}")
    axes[0, 0].set(
        xlabel="hidden layer (0 = first)", ylabel="log10 ||dL/dW||", title=f"{acts[0]}: gradient norm per layer at init"
    )
    axes[0, 0].legend(fontsize=6, ncol=2)
    for k, act in enumerate(acts):
        for arm, marker in (("BN", "o"), ("no BN", "s")):
            vals = [log_ratio(norms[act, arm, d]) for d in depths]
            axes[0, 1].errorbar(
                depths,
                [np.mean(v) for v in vals],
                yerr=[np.nan_to_num(report.mean_std(v)[1]) for v in vals],
                marker=marker,
                capsize=3,
                ls="-" if k == 0 else ":",
                label=f"{act}, {arm}",
            )
    axes[0, 1].set(xlabel="depth", ylabel="log10(first / last)", title="at init: explosion vs depth")
    axes[0, 1].legend(fontsize=6)
    for (act, arm, d), r in trained.items():
        if arm == "BN":
            report.band(axes[0, 2], r.steps, log_ratio(r.series["grad_norms"]), f"{act}, BN, depth {d}")
    axes[0, 2].set(xlabel="training step", ylabel="log10(first / last)", title="BN: gradient range during training")
    axes[0, 2].legend(fontsize=6)
    figures = [report.save_figure(fig, out_dir, "deep_gradients.png")]
    setup = (
        f"{full.name}; MLPs of {depths} hidden layers of {config['width']} units ({', '.join(acts)}), He-initialized "
        f"kernels, no skips; BN = jbn.BatchNorm before each activation (no Dense bias there); no BN = Dense with bias. "
        f"At initialization, the cross-entropy gradient of one batch of {b} training examples (training mode), per hidden "
        f"Dense kernel; {len(seeds)} initializations (seeds {seeds}), each with its own batch. Growth per layer = "
        f"10^(-slope) of a least-squares line through log10 norm vs layer index. Training: depths {config['train_depths']}, "
        f"{config['optimizer']}, each trained arm at its own rate of {config['learning_rates']}, chosen on a "
        f"validation split (the last {config['num_val']} training examples, held out from all training) by the best mean "
        f"final validation accuracy over tuning seeds {config['tuning_seeds']}; batch {b}, {t_steps} steps, the same seeds; gradient norms "
        f"on one fixed batch every {config['train_eval_every']} steps; test accuracy with the running statistics, once per judged run."
    )
    return report.finish(
        NAME,
        out_dir,
        config,
        title="7. Gradients in deep BN nets without skips: at init and in training",
        claim=CLAIM,
        setup=setup,
        table=table,
        figures=figures,
        quantities=quantities,
        seeds=seeds,
    )
