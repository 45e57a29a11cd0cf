"""Experiment 14: what gamma and beta (and epsilon) do.

Claims (seed articles 001, 003, 004): BN's learnable scale gamma and shift beta restore what
normalization takes away ("the network can learn non-linear transformations that suit the
data"; Ioffe & Szegedy 2015: they let BN "represent the identity transform"); Keras's
`center` decides whether beta is learned; epsilon is "a small value added to the variance
to avoid division by zero". Tested: the same BN net with `use_scale` / `use_bias` off
(jbn.BatchNorm's flax-style names for Keras's scale/center), how far the learned gamma and
beta move from their initial 1 and 0, and epsilon from 1e-5 to 1.
"""

from __future__ import annotations

import pathlib

import numpy as np

from experiments import data as datasets
from experiments import report
from experiments.models import MLP, NormSpec
from experiments.training import fit_from_config

NAME = "gamma_beta"
DEFAULTS = {
    "data": "mnist1d",
    "widths": [128, 128, 128],
    "activation": "tanh",  # not ReLU: the next layer can absorb gamma through a ReLU
    "batch_size": 64,
    "steps": 2000,
    "eval_every": 100,
    "optimizer": "momentum",
    "learning_rate": 0.05,
    "bn_momentum": 0.99,
    "epsilons": [1.0e-5, 1.0e-3, 1.0e-1, 1.0],  # with gamma and beta on
    "seeds": list(range(20)),  # 20: enough for the epsilon equivalence tests to pass
}
TINY = {"widths": [8], "steps": 4, "eval_every": 2, "seeds": [0, 1], "epsilons": [1.0e-5, 1.0]}

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
    data = datasets.load(config["data"])
    eps = config["epsilons"]
    runs, rows = {}, []
    arms = [(name, scale, bias, eps[0]) for name, (scale, bias) in OPTIONS.items()]
    arms += [(f"epsilon {e:g}", True, True, e) for e in eps[1:]]
    for name, use_scale, use_bias, e in arms:
        spec = NormSpec("bn", momentum=config["bn_momentum"], use_scale=use_scale, use_bias=use_bias, epsilon=e)
        model = MLP(tuple(config["widths"]), data.num_classes, activation=config["activation"], norm=spec)
        r = fit_from_config(
            model,
            data,
            config,
            desc=name,
        )
        runs[name] = r
        rows += r.rows(arm=name, use_scale=use_scale, use_bias=use_bias, epsilon=e)
    gamma_move, beta_move = learned(runs["gamma and beta"].state, len(config["widths"]))
    rows += [
        {"arm": "gamma and beta", "seed": s, "metric": m, "value": float(v)}
        for m, vals in (("mean_abs_gamma_minus_1", gamma_move), ("mean_abs_beta", beta_move))
        for s, v in zip(config["seeds"], vals)
    ]
    report.write_metrics(out_dir, rows)

    table = report.markdown_table(
        ["arm", "epsilon", "final test acc", "final train loss"],
        [
            (
                name,
                f"{e:g}",
                report.fmt_seeds(runs[name].final("test_accuracy")),
                report.fmt_seeds(runs[name].final("train_loss")),
            )
            for name, _, _, e in arms
        ],
    )
    table += "\n\n" + report.markdown_table(
        ["learned (gamma and beta arm, mean over units and layers)", "value"],
        [("|gamma - 1|", report.fmt_seeds(gamma_move)), ("|beta|", report.fmt_seeds(beta_move))],
    )
    quantities = {}
    for name in OPTIONS:
        quantities[f"test_acc/{KEYS[name]}"] = runs[name].final("test_accuracy")
        quantities[f"train_loss/{KEYS[name]}"] = runs[name].final("train_loss")
    for e in eps[1:]:
        quantities[f"test_acc/eps{e:g}"] = runs[f"epsilon {e:g}"].final("test_accuracy")
    quantities[f"test_acc/eps{eps[0]:g}"] = runs["gamma and beta"].final("test_accuracy")
    quantities["gamma_move"], quantities["beta_move"] = gamma_move, beta_move

    fig, axes = report.figure(2, 1)
    names = list(OPTIONS)
    axes[0, 0].bar(
        range(len(names)),
        [np.mean(runs[n].final("test_accuracy")) for n in names],
        yerr=[np.nan_to_num(report.mean_std(runs[n].final("test_accuracy"))[1]) for n in names],
        capsize=3,
    )
    axes[0, 0].set_xticks(range(len(names)), [n.split(" (")[0] for n in names], fontsize=7)
    lo = min(np.mean(runs[n].final("test_accuracy")) for n in names)
    axes[0, 0].set(ylabel="final test accuracy", title="gamma / beta on or off", ylim=(max(0, lo - 0.1), None))
    accs = [runs["gamma and beta"].final("test_accuracy")] + [
        runs[f"epsilon {e:g}"].final("test_accuracy") for e in eps[1:]
    ]
    axes[0, 1].errorbar(
        eps,
        [np.mean(a) for a in accs],
        yerr=[np.nan_to_num(report.mean_std(a)[1]) for a in accs],
        marker="o",
        capsize=3,
    )
    report.log_ticks(axes[0, 1], eps)
    axes[0, 1].set(xlabel="epsilon", ylabel="final test accuracy", title="epsilon (± sample SD)")
    figures = [report.save_figure(fig, out_dir, "gamma_beta.png")]
    setup = (
        f"{data.name}; MLP {config['widths']} {config['activation']}, jbn.BatchNorm before each activation (momentum "
        f"{config['bn_momentum']}, epsilon {eps[0]:g} unless varied), Dense without bias before it; batch "
        f"{config['batch_size']}, {config['optimizer']} lr {config['learning_rate']}, {config['steps']} steps, seeds "
        f"{config['seeds']} (paired: every arm shares each seed's init seed and data order). use_scale=False fixes gamma "
        f"at 1, use_bias=False fixes beta at 0 (Keras: scale=False, center=False). Learned gamma/beta: the final values "
        f"of the full arm."
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
