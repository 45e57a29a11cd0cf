"""Experiment 14: what gamma and beta (and epsilon) do.

Claims (seed articles 001, 003, 004): BN's learnable scale gamma and shift beta restore what
normalization takes away ("the network can learn non-linear transformations that suit the
data"; Ioffe & Szegedy 2015: they let BN "represent the identity transform"); Keras's
`center` decides whether beta is learned; epsilon is "a small value added to the variance
to avoid division by zero". Tested: the same BN net with `use_scale` / `use_bias` off
(jbn.BatchNorm's flax-style names for Keras's scale/center), how far the learned gamma and
beta move from their initial 1 and 0, and epsilon from 1e-5 to 1. On experiment zero's
testbed (a 16-layer tanh MLP: tanh, unlike ReLU, cannot pass gamma on to the next layer),
every arm's learning rate tuned on the validation split, the test split read once per run
(until 2026-12-05: a 3x128 tanh MLP on the 4000-example MNIST-1D, every arm at lr 0.05).
"""

from __future__ import annotations

import pathlib

import numpy as np

from experiments import protocol, report, testbed
from experiments.models import NormSpec

NAME = "gamma_beta"
DEFAULTS = {
    **testbed.DEFAULTS,
    "epsilons": [1.0e-5, 1.0e-3, 1.0e-1, 1.0],  # with gamma and beta on
    "seeds": list(range(20)),  # 20: enough for the epsilon equivalence tests to pass
}
TINY = {**testbed.TINY, "epsilons": [1.0e-5, 1.0]}

CLAIM = (
    "gamma and beta matter: a BN net without the learnable scale and shift trains worse, the learned values move away "
    "from their initial 1 and 0, and epsilon, a guard against division by zero, does not change the result while small "
    "(seed articles; Ioffe & Szegedy 2015)."
)
OPTIONS = {
    "gamma and beta": (True, True),
    "no gamma (use_scale=False)": (False, True),
    "no beta (use_bias=False)": (True, False),
    "neither": (False, False),
}
KEYS = {
    "gamma and beta": "full",
    "no gamma (use_scale=False)": "no_scale",
    "no beta (use_bias=False)": "no_bias",
    "neither": "neither",
}


def learned(state, n_layers: int):
    """Per seed: mean over hidden units of |gamma - 1| and of |beta|, averaged over layers."""
    g = np.mean(
        [
            np.mean(np.abs(np.asarray(state.params[f"norm_{i}"]["BatchNorm_0"]["scale"]) - 1), axis=-1)
            for i in range(n_layers)
        ],
        axis=0,
    )
    b = np.mean(
        [
            np.mean(np.abs(np.asarray(state.params[f"norm_{i}"]["BatchNorm_0"]["bias"])), axis=-1)
            for i in range(n_layers)
        ],
        axis=0,
    )
    return g, b


def run(config: dict, out_dir: pathlib.Path) -> dict:
    out_dir = pathlib.Path(out_dir)
    data = testbed.splits(config)
    eps = config["epsilons"]
    tuned, rows = {}, []
    arms = [(name, scale, bias, eps[0]) for name, (scale, bias) in OPTIONS.items()]
    arms += [(f"epsilon {e:g}", True, True, e) for e in eps[1:]]
    for name, use_scale, use_bias, e in arms:
        spec = NormSpec("bn", momentum=config["bn_momentum"], use_scale=use_scale, use_bias=use_bias, epsilon=e)
        tuned[name] = t = testbed.tune_and_judge(config, name, testbed.mlp(config, spec), data)
        rows += [{**row, "use_scale": use_scale, "use_bias": use_bias, "epsilon": e} for row in t.rows]
    runs = {a: t.run for a, t in tuned.items()}
    test = {a: t.test["accuracy"] for a, t in tuned.items()}
    gamma_move, beta_move = learned(runs["gamma and beta"].state, len(config["widths"]))
    rows += [
        {"arm": "gamma and beta", "seed": s, "metric": m, "value": float(v)}
        for m, vals in (("mean_abs_gamma_minus_1", gamma_move), ("mean_abs_beta", beta_move))
        for s, v in zip(config["seeds"], vals)
    ]
    report.write_metrics(out_dir, rows)

    table = (
        testbed.tuning_table(tuned, config["learning_rates"])
        + "\n\n"
        + report.markdown_table(
            ["arm", "epsilon", "rate", "test acc (once, after training)", "final val acc", "final train loss"],
            [
                (
                    name,
                    f"{e:g}",
                    f"{tuned[name].rate:g}",
                    report.fmt_seeds(test[name]),
                    report.fmt_seeds(runs[name].final("test_accuracy")),
                    report.fmt_seeds(runs[name].final("train_loss")),
                )
                for name, _, _, e in arms
            ],
        )
    )
    table += "\n\n" + report.markdown_table(
        ["learned (gamma and beta arm, mean over units and layers)", "value"],
        [("|gamma - 1|", report.fmt_seeds(gamma_move)), ("|beta|", report.fmt_seeds(beta_move))],
    )
    quantities = {}
    for name in OPTIONS:
        quantities[f"test_acc/{KEYS[name]}"] = test[name]
        quantities[f"train_loss/{KEYS[name]}"] = runs[name].final("train_loss")
    for e in eps[1:]:
        quantities[f"test_acc/eps{e:g}"] = test[f"epsilon {e:g}"]
    quantities[f"test_acc/eps{eps[0]:g}"] = test["gamma and beta"]
    quantities["gamma_move"], quantities["beta_move"] = gamma_move, beta_move

    fig, axes = report.figure(2, 1)
    _paired_panel(
        axes[0, 0],
        {n.split(" (")[0]: test["gamma and beta"] - test[n] for n in list(OPTIONS)[1:]},
        "test acc: gamma and beta - arm",
        "gamma / beta on or off, per seed",
    )
    _paired_panel(
        axes[0, 1],
        {f"{e:g}": test[f"epsilon {e:g}"] - test["gamma and beta"] for e in eps[1:]},
        f"test acc: epsilon - epsilon {eps[0]:g}",
        "epsilon, per seed",
    )
    axes[0, 1].set(xlabel="epsilon")
    figures = [report.save_figure(fig, out_dir, "gamma_beta.png")]
    setup = (
        f"{testbed.describe(config, data)} jbn.BatchNorm before each activation (epsilon {eps[0]:g} unless varied), "
        f"the Dense before it without bias. Arms: gamma and beta on or off (use_scale=False fixes gamma at 1, "
        f"use_bias=False fixes beta at 0; Keras: scale=False, center=False), and epsilon {eps[1:]} with both on; every "
        f"arm tuned. Learned gamma/beta: the final values of the full arm's judged seeds."
    )
    return report.finish(
        NAME,
        out_dir,
        config,
        title="14. gamma, beta and epsilon",
        claim=CLAIM,
        setup=setup,
        table=table,
        figures=figures,
        quantities=quantities,
        seeds=config["seeds"],
    )


def _paired_panel(ax, differences: dict[str, np.ndarray], ylabel: str, title: str) -> None:
    """Per-seed paired differences, one column each, with their mean and 95% t-interval."""
    for j, d in enumerate(differences.values()):
        ax.scatter(np.full(d.size, j) + np.linspace(-0.15, 0.15, d.size), d, s=10, color="gray", alpha=0.7)
        s = protocol.summarize(d)
        ax.errorbar([j + 0.3], [s.mean], yerr=[[s.mean - s.low], [s.high - s.mean]], fmt="o", color="k", capsize=4)
    ax.axhline(0, color="gray", lw=1)
    ax.set_xticks(range(len(differences)), list(differences), fontsize=7)
    ax.set(ylabel=ylabel, title=title + " (mean, 95% CI)")
