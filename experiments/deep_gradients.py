"""Experiment 7: gradients at initialization in deep BN nets without skips (Yang et al. 2019).

Claim ("A Mean Field Theory of Batch Normalization", ICLR 2019): in a deep fully
connected network with batch norm and no skip connections, the gradients explode at
initialization: their norm grows exponentially from the last layer back to the first,
whatever the nonlinearity, while the same net without BN at a critical initialization
(He init for ReLU) keeps them at one scale. The seed articles say the opposite in general
terms ("BN mitigates vanishing/exploding gradients").
"""
from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from experiments import data as datasets
from experiments import report
from experiments.models import MLP, NormSpec
from experiments.training import cross_entropy

NAME = "deep_gradients"
DEFAULTS = {
    "data": "mnist1d",
    "depths": [10, 20, 30, 50],
    "width": 128,
    "activation": "relu",
    "batch_size": 64,
    "seeds": [0, 1, 2, 3, 4],  # initializations (each with its own batch)
    "explosion_factor": 10.0,  # "explodes" = first-layer gradient this many times the last's at the largest depth
}
TINY = {"depths": [2, 3], "width": 8, "seeds": [0, 1]}

CLAIM = (
    "At initialization, a deep BN MLP without skips has exploding gradients (norm growing exponentially from the last "
    "layer back to the first), while the same net without BN, He-initialized, keeps them at one scale (Yang et al. 2019)."
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


def run(config: dict, out_dir: pathlib.Path) -> dict:
    out_dir = pathlib.Path(out_dir)
    data = datasets.load(config["data"])
    seeds, b = config["seeds"], config["batch_size"]
    rng = np.random.default_rng(0)
    batches = [rng.choice(len(data.y_train), size=b, replace=False) for _ in seeds]
    xs = jnp.asarray(np.stack([data.x_train[i] for i in batches]))
    ys = jnp.asarray(np.stack([data.y_train[i] for i in batches]))
    keys = [jax.random.PRNGKey(s) for s in seeds]
    arms = {"BN": NormSpec("bn"), "no BN": NormSpec("none")}
    norms, rows = {}, []
    for arm, spec in arms.items():
        for depth in config["depths"]:
            model = MLP((config["width"],) * depth, data.num_classes, activation=config["activation"], norm=spec, weight_init="he")
            variables = initialize(model, keys, xs[0])
            n = np.asarray(jax.jit(jax.vmap(lambda v, x, y: layer_gradient_norms(model, v, x, y)))(variables, xs, ys))  # (S, depth)
            norms[arm, depth] = n
            rows += [
                {"arm": arm, "depth": depth, "layer": layer, "seed": s, "metric": "grad_norm", "value": float(n[i, layer])}
                for i, s in enumerate(seeds) for layer in range(depth)
            ]
    report.write_metrics(out_dir, rows)

    def log_ratio(arm, depth) -> np.ndarray:
        """(S,) log10 of (first hidden layer's gradient norm / last hidden layer's)."""
        n = norms[arm, depth]
        return np.log10(n[:, 0] / n[:, -1])

    def log_spread(arm, depth) -> np.ndarray:
        """(S,) log10 of (largest / smallest gradient norm over all hidden layers)."""
        n = norms[arm, depth]
        return np.log10(n.max(axis=1) / n.min(axis=1))

    def growth(arm, depth) -> np.ndarray:
        return np.array([growth_per_layer(np.log10(n)) for n in norms[arm, depth]])

    depths = config["depths"]
    table = report.markdown_table(
        ["depth", "BN: log10(first/last)", "BN: growth per layer", "BN: log10(max/min over layers)",
         "no BN: log10(first/last)", "no BN: growth per layer", "no BN: log10(max/min over layers)"],
        [
            (d, report.fmt_seeds(log_ratio("BN", d), 2), report.fmt_seeds(growth("BN", d), 3), report.fmt_seeds(log_spread("BN", d), 2),
             report.fmt_seeds(log_ratio("no BN", d), 2), report.fmt_seeds(growth("no BN", d), 3), report.fmt_seeds(log_spread("no BN", d), 2))
            for d in depths
        ],
    )
    deepest, shallowest = max(depths), min(depths)
    factor = config["explosion_factor"]
    bn_deep = np.mean(log_ratio("BN", deepest))
    plain_spread = max(float(np.mean(log_spread("no BN", d))) for d in depths)
    bn_growth = [float(np.mean(growth("BN", d))) for d in depths]
    checks = [
        report.Check(
            f"With BN the gradient explodes: at depth {deepest} the first layer's gradient norm is more than {factor:g}x the last's (mean over seeds)",
            bool(bn_deep > np.log10(factor)), f"BN log10(first/last) = {bn_deep:.2f}",
        ),
        report.Check(
            "With BN the explosion is exponential: the growth factor per layer is above 1.1 at every depth and about "
            "constant across depths (largest / smallest mean factor < 1.05)",
            bool(min(bn_growth) > 1.1 and max(bn_growth) / min(bn_growth) < 1.05),
            ", ".join(f"depth {d}: {g:.3f}" for d, g in zip(depths, bn_growth)),
        ),
        report.Check(
            f"Without BN (He init) the gradient stays at one scale: at every depth, all hidden layers' gradient norms are "
            f"within {factor:g}x of each other (log10(max/min over layers), mean over seeds)",
            bool(plain_spread < np.log10(factor)),
            ", ".join(f"depth {d}: {np.mean(log_spread('no BN', d)):.2f}" for d in depths),
        ),
    ]

    fig, axes = report.figure(2, 1, width=4.4)
    for j, d in enumerate(depths):
        for arm, ls in (("BN", "-"), ("no BN", "--")):
            m = np.mean(np.log10(norms[arm, d]), axis=0)
            axes[0, 0].plot(np.arange(d), m, ls=ls, color=f"C{j}", label=f"{arm}, depth {d}")
    axes[0, 0].set(xlabel="hidden layer (0 = first)", ylabel="log10 ||dL/dW||", title="gradient norm per layer at init")
    axes[0, 0].legend(fontsize=6, ncol=2)
    for arm, marker in (("BN", "o"), ("no BN", "s")):
        means = [np.mean(log_ratio(arm, d)) for d in depths]
        stds = [np.std(log_ratio(arm, d)) for d in depths]
        axes[0, 1].errorbar(depths, means, yerr=stds, marker=marker, capsize=3, label=arm)
    axes[0, 1].set(xlabel="depth", ylabel="log10(first / last)", title="explosion vs depth")
    axes[0, 1].legend()
    figures = [report.save_figure(fig, out_dir, "deep_gradients.png")]
    setup = (
        f"{data.name}; MLPs of {depths} hidden layers of {config['width']} {config['activation']} units, He-initialized "
        f"kernels, no skips; BN = jbn.BatchNorm before each activation (no Dense bias there); no BN = Dense with bias. "
        f"At initialization, the cross-entropy gradient of one batch of {b} training examples (training mode), per hidden "
        f"Dense kernel; {len(seeds)} initializations (seeds {seeds}), each with its own batch. Growth per layer = "
        f"10^(-slope) of a least-squares line through log10 norm vs layer index."
    )
    _, v = report.write_summary(
        out_dir, title="7. Gradients at initialization in deep BN nets", claim=CLAIM, setup=setup, table=table,
        checks=checks, figures=figures, command=report.command_for(NAME),
    )
    return report.result(NAME, out_dir, v, table, figures, checks)
