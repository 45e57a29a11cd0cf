"""Experiment 8: dropout and batch norm, the variance shift (Li et al. 2019).

Claim ("Understanding the Disharmony between Dropout and Batch Normalization by Variance
Shift", CVPR 2019): dropout placed before BN layers makes the variance a BN layer sees in
training (with dropout) differ from the one at test time (without), so the running
variance no longer fits at test time and accuracy suffers; dropout after the last BN
layer avoids it; re-estimating the BN statistics with dropout off recovers accuracy.
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
from experiments.training import TrainState, fit, make_evaluate, make_optimizer, variables_of

NAME = "dropout_variance"
DEFAULTS = {
    "data": "mnist1d",
    "widths": [128, 128, 128, 128],
    "dropout": 0.5,
    "batch_size": 64,
    "steps": 3000,
    "eval_every": 100,
    "optimizer": "momentum",
    "learning_rate": 0.05,
    "bn_momentum": 0.99,
    "recompute_batch_size": 500,
    "seeds": [0, 1, 2],
    "shift_factor": 2.0,  # "shift" = mean |log variance ratio| this many times the dropout-after arm's
}
TINY = {"widths": [8, 8], "steps": 4, "eval_every": 2, "seeds": [0]}

CLAIM = (
    "Dropout before BN layers shifts the variance BN sees between training and test, so the running statistics no "
    "longer fit at test time and accuracy drops; dropout only after the last BN avoids it; recomputing the BN "
    "statistics with dropout off recovers the accuracy (Li et al. 2019)."
)
ARMS = {"dropout before BN": "each", "dropout after last BN": "last", "no dropout": None}


def variance_ratios(model: MLP, state: TrainState, x: jax.Array) -> jax.Array:
    """(layers,) per BN layer, the mean over units of Var_test / running var, where Var_test
    is the variance of the BN layer's input over x in test mode (no dropout, running
    statistics everywhere) and the running var was accumulated in training (with dropout).
    One seed."""
    _, inter = model.apply(variables_of(state), x, train=False, mutable=["intermediates"])
    ratios = []
    for i in range(len(model.widths)):
        h = inter["intermediates"][f"norm_input_{i}"][0]
        running = state.batch_stats[f"norm_{i}"]["BatchNorm_0"]["var"]
        ratios.append(jnp.mean(jnp.var(h, axis=0) / running))
    return jnp.stack(ratios)


def run(config: dict, out_dir: pathlib.Path) -> dict:
    out_dir = pathlib.Path(out_dir)
    data = datasets.load(config["data"])
    bn = NormSpec("bn", momentum=config["bn_momentum"])
    x_train = jnp.asarray(data.x_train)
    waiting = features.waiting("recompute")
    runs, ratios, recomputed_acc, rows = {}, {}, {}, []
    for arm, placement in ARMS.items():
        model = MLP(
            tuple(config["widths"]), data.num_classes, activation="relu", norm=bn,
            dropout=config["dropout"] if placement else 0.0, dropout_placement=placement or "each",
        )
        r = fit(
            model, make_optimizer(config["optimizer"], config["learning_rate"]), data, seeds=config["seeds"],
            steps=config["steps"], batch_size=config["batch_size"], eval_every=config["eval_every"], desc=arm,
        )
        runs[arm] = r
        rows += r.rows(arm=arm)
        ratios[arm] = np.asarray(jax.jit(jax.vmap(lambda st: variance_ratios(model, st, x_train)))(r.state))  # (S, layers)
        rows += [
            {"arm": arm, "seed": s, "layer": layer, "metric": "var_test_over_running", "value": float(ratios[arm][i, layer])}
            for i, s in enumerate(r.seeds) for layer in range(len(config["widths"]))
        ]
        if waiting:
            rows += report.waiting_rows(waiting, arm=arm, metric="test_accuracy_recomputed")
            continue
        evaluate = jax.jit(make_evaluate(model))
        accs = []
        for i, s in enumerate(r.seeds):
            st = seed_state(r.state, i)
            st = st._replace(batch_stats=recompute(model, st, data.x_train, config["recompute_batch_size"], dropout=False))
            accs.append(float(evaluate(st, jnp.asarray(data.x_test), jnp.asarray(data.y_test))["accuracy"]))
            rows.append({"arm": arm, "seed": s, "metric": "test_accuracy_recomputed", "value": accs[-1]})
        recomputed_acc[arm] = np.asarray(accs)
    report.write_metrics(out_dir, rows)

    control = ratios["no dropout"].mean(0)  # (layers,) the train/test mismatch without dropout

    def shift(arm) -> np.ndarray:
        """(S,) mean over BN layers of |log(ratio / no-dropout ratio)|: the variance shift
        due to dropout, beyond the mismatch that running averages have anyway."""
        return np.mean(np.abs(np.log(ratios[arm] / control)), axis=1)

    acc = {a: r.final("test_accuracy") for a, r in runs.items()}
    table = report.markdown_table(
        ["arm", "test acc (running stats)", "test acc (recomputed, dropout off)", "Var_test / running var per BN layer", "dropout shift: mean |log(ratio / no-dropout ratio)|"],
        [
            (a, report.fmt_seeds(acc[a]), waiting or report.fmt_seeds(recomputed_acc[a]),
             ", ".join(f"{v:.3f}" for v in ratios[a].mean(0)), report.fmt_seeds(shift(a)))
            for a in runs
        ],
    )
    before, after = "dropout before BN", "dropout after last BN"
    (s_b, _), (s_a, _) = report.mean_std(shift(before)), report.mean_std(shift(after))
    (a_b, sd_b), (a_a, sd_a) = report.mean_std(acc[before]), report.mean_std(acc[after])
    factor = config["shift_factor"]
    checks = [
        report.Check(
            f"Dropout before BN shifts the variance: its dropout shift (mean over BN layers of |log(ratio / no-dropout ratio)|, "
            f"ratio = Var_test / running var) is more than {factor:g}x the dropout-after-last-BN arm's",
            bool(s_b > factor * s_a), f"{s_b:.3f} vs {s_a:.3f}",
        ),
        report.Check(
            "The shift goes the way Li et al. predict: with dropout before BN, Var_test / running var is below the no-dropout "
            "ratio in every BN layer that follows a dropout (layers 1 and up)",
            bool(np.all(ratios[before].mean(0)[1:] < control[1:])),
            ", ".join(f"layer {i}: {b:.3f} vs {c:.3f}" for i, (b, c) in enumerate(zip(ratios[before].mean(0), control)) if i > 0),
        ),
        report.Check(
            "Dropout before BN loses test accuracy against dropout after the last BN, by more than the seed spreads combined",
            bool(a_a - a_b > sd_a + sd_b), f"before {report.fmt(a_b, sd_b)} vs after {report.fmt(a_a, sd_a)}",
        ),
    ]
    criterion = "Recomputing the BN statistics with dropout off raises the dropout-before-BN arm's test accuracy (mean over seeds)"
    if waiting:
        checks.append(report.Check(criterion, None, waiting))
        checks.append(report.Check("The variance shift explains the loss: recomputing closes at least half of the accuracy gap to the "
                                   "dropout-after-last-BN arm", None, waiting))
    else:
        m_r = report.mean_std(recomputed_acc[before])[0]
        checks.append(report.Check(criterion, bool(m_r > a_b), f"{m_r:.3f} recomputed vs {a_b:.3f} running"))
        closed = (m_r - a_b) / (a_a - a_b) if a_a != a_b else float("nan")
        checks.append(report.Check(
            "The variance shift explains the loss: recomputing closes at least half of the accuracy gap to the "
            "dropout-after-last-BN arm",
            bool(closed >= 0.5), f"closes {closed:.0%} of the gap ({a_b:.3f} -> {m_r:.3f}, target {a_a:.3f})",
        ))

    fig, axes = report.figure(2, 1)
    layers = np.arange(len(config["widths"]))
    for j, a in enumerate(runs):
        axes[0, 0].bar(layers + (j - 1) * 0.27, ratios[a].mean(0), width=0.27, yerr=ratios[a].std(0), label=a)
    axes[0, 0].axhline(1.0, color="gray", lw=1)
    axes[0, 0].set(xlabel="BN layer", ylabel="Var_test / running var", title="variance shift per BN layer", xticks=layers, ylim=(0, 1.6))
    axes[0, 0].legend(fontsize=7, ncol=2, loc="upper center")
    for a, r in runs.items():
        report.band(axes[0, 1], r.steps, r.series["test_accuracy"], a)
    axes[0, 1].set(xlabel="step", ylabel="test accuracy (running stats)", title="test accuracy")
    axes[0, 1].legend(fontsize=7)
    figures = [report.save_figure(fig, out_dir, "dropout_variance.png")]
    setup = (
        f"{data.name}; MLP {config['widths']} ReLU with jbn.BatchNorm (momentum {config['bn_momentum']}) before each ReLU; "
        f"dropout {config['dropout']} either on every hidden layer's output (so it feeds the next Dense -> BN: 'before BN') "
        f"or only before the classifier ('after last BN'); batch {config['batch_size']}, {config['optimizer']} lr "
        f"{config['learning_rate']}, {config['steps']} steps, seeds {config['seeds']}. Var_test = variance of each BN "
        f"layer's input over the training set in test mode (no dropout, running statistics), divided by that layer's "
        f"running variance (accumulated in training, with dropout); the no-dropout arm's ratio is the control for the "
        f"mismatch running averages have without dropout. BN layer 0 sees the raw input, never a dropout. Recomputed = jbn.recompute_batch_stats over the "
        f"training set with BN in training mode and dropout off."
    )
    _, v = report.write_summary(
        out_dir, title="8. Dropout before BN: variance shift", claim=CLAIM, setup=setup, table=table, checks=checks,
        figures=figures, command=report.command_for(NAME),
    )
    return report.result(NAME, out_dir, v, table, figures, checks)
