"""Experiment 8: dropout and batch norm, the variance shift (Li et al. 2019).

Claim ("Understanding the Disharmony between Dropout and Batch Normalization by Variance
Shift", CVPR 2019): dropout placed before BN layers makes the variance a BN layer sees in
training (with dropout) differ from the one at test time (without), so the running
variance no longer fits at test time and accuracy suffers; dropout after the last BN
layer avoids it (Li et al.'s first remedy; their second, the variance-stable "Uout"
dropout, is not tested here). Re-estimating the BN statistics on the training set with
dropout off is the "precise BN" remedy (Wu & Johnson 2021, "Rethinking 'Batch' in
BatchNorm"), tested here against the same shift. A no-BN control with the same dropout
separates the cost of the variance shift from the cost of the dropout itself.

Both placements have the same amount of dropout: ONE dropout layer of the same rate on a
hidden layer of the same width, either on the input of the last hidden Dense (so it feeds
the last BN: "before BN") or on the last hidden layer's output (after the last BN, before
the classifier). (Until 2026-12-04 the "before" arm had a dropout on every hidden layer, four
layers against one, so the amount of dropout was confounded with its place.)
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from experiments import features, report, testbed
from experiments.models import MLP, NormSpec
from experiments.population import recompute, seed_state
from experiments.training import TrainState, make_evaluate, variables_of

NAME = "dropout_variance"
# Experiment zero's testbed (until 2026-12-05: a 4x128 ReLU MLP on the 4000-example MNIST-1D at
# one learning rate for every arm).
DEFAULTS = {
    **testbed.DEFAULTS,
    "dropout": 0.5,
    "recompute_batch_size": 500,
    "variance_examples": 10000,  # training examples the test-mode variance of each BN input is taken over
}
TINY = {**testbed.TINY, "variance_examples": 64, "recompute_batch_size": 64}

CLAIM = (
    "Dropout before BN layers shifts the variance BN sees between training and test, so the running statistics no "
    "longer fit at test time and accuracy drops; dropout only after the last BN avoids it; recomputing the BN "
    "statistics with dropout off recovers the accuracy (Li et al. 2019)."
)
# arm -> (dropout placement or None, with BN)
ARMS = {
    "dropout before BN": ("before_last", True),
    "dropout after last BN": ("last", True),
    "no dropout": (None, True),
    # the no-BN control: the same dropout layer in the same two places, without BN
    "no BN, dropout before last hidden layer": ("before_last", False),
    "no BN, dropout before classifier": ("last", False),
}


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
    data = testbed.splits(config)
    train, final = data.tuning, data.final
    x_var = jnp.asarray(train.x_train[: config["variance_examples"]])
    waiting = features.waiting("recompute")
    runs, rates, acc, ratios, recomputed_acc, rows = {}, {}, {}, {}, {}, []
    tuned = {}
    for arm, (placement, with_bn) in ARMS.items():
        model = testbed.mlp(
            config,
            None if with_bn else NormSpec("none"),
            dropout=config["dropout"] if placement else 0.0,
            dropout_placement=placement or "each",
        )
        tuned[arm] = t = testbed.tune_and_judge(config, arm, model, data)
        runs[arm], rates[arm], acc[arm] = t.run, t.rate, t.test["accuracy"]
        rows += t.rows
        if not with_bn:
            continue
        ratios[arm] = np.asarray(
            jax.jit(jax.vmap(lambda st: variance_ratios(model, st, x_var)))(t.run.state)
        )  # (S, layers)
        rows += [
            {
                "arm": arm,
                "seed": s,
                "layer": layer,
                "metric": "var_test_over_running",
                "value": float(ratios[arm][i, layer]),
            }
            for i, s in enumerate(t.run.seeds)
            for layer in range(len(config["widths"]))
        ]
        if waiting:
            rows += report.waiting_rows(waiting, arm=arm, metric="test_accuracy_recomputed")
            continue
        evaluate = jax.jit(make_evaluate(model))
        accs = []
        for i, s in enumerate(t.run.seeds):
            st = seed_state(t.run.state, i)
            st = st._replace(
                batch_stats=recompute(model, st, train.x_train, config["recompute_batch_size"], dropout=False)
            )
            accs.append(float(evaluate(st, jnp.asarray(final.x_test), jnp.asarray(final.y_test))["accuracy"]))
            rows.append({"arm": arm, "seed": s, "metric": "test_accuracy_recomputed", "value": accs[-1]})
        recomputed_acc[arm] = np.asarray(accs)
    report.write_metrics(out_dir, rows)

    control = ratios["no dropout"]  # (S, layers) the train/test mismatch without dropout, seed by seed

    def shift(arm) -> np.ndarray:
        """(S,) mean over BN layers of |log(ratio / no-dropout ratio)|: the variance shift
        due to dropout, beyond the mismatch that running averages have anyway."""
        return np.mean(np.abs(np.log(ratios[arm] / control)), axis=1)

    table = (
        testbed.tuning_table(tuned, config["learning_rates"])
        + "\n\n"
        + report.markdown_table(
            [
                "arm",
                "rate",
                "test acc (running stats; once, after training)",
                "test acc (recomputed, dropout off)",
                "Var_test / running var: last BN layer; mean of the others",
                "dropout shift: mean |log(ratio / no-dropout ratio)|",
            ],
            [
                (
                    a,
                    f"{rates[a]:g}",
                    report.fmt_seeds(acc[a]),
                    (waiting or report.fmt_seeds(recomputed_acc[a])) if a in ratios else "(no BN)",
                    f"{ratios[a][:, -1].mean():.3f}; {ratios[a][:, :-1].mean():.3f}" if a in ratios else "",
                    report.fmt_seeds(shift(a)) if a in ratios else "",
                )
                for a in runs
            ],
        )
    )
    before, after = "dropout before BN", "dropout after last BN"
    # Per-seed quantities; all arms share each seed's init seed and data order (paired).
    quantities = {
        "shift/before": shift(before),
        "shift/after": shift(after),
        # the BN layer that follows the dropout (the last one), ratio - no-dropout ratio
        "ratio_minus_control_max/before": np.max(ratios[before][:, -1:] - control[:, -1:], axis=1),
        "test_acc/before": acc[before],
        "test_acc/after": acc[after],
        "test_acc/none": acc["no dropout"],
        "test_acc/noBN_before": acc["no BN, dropout before last hidden layer"],
        "test_acc/noBN_last": acc["no BN, dropout before classifier"],
        # what moving the dropout before the last BN costs, with BN and (same move) without BN
        "dropout_cost/BN": acc[after] - acc[before],
        "dropout_cost/noBN": acc["no BN, dropout before classifier"] - acc["no BN, dropout before last hidden layer"],
    }
    if not waiting:
        quantities["test_acc/before_recomputed"] = recomputed_acc[before]
        with np.errstate(all="ignore"):
            quantities["gap_closed/before"] = (recomputed_acc[before] - acc[before]) / (acc[after] - acc[before])

    fig, axes = report.figure(2, 1)
    layers = np.arange(len(config["widths"]))
    for a in ratios:  # each arm's seeds: mean and min-max band (the paired differences are in criteria.png)
        report.band(axes[0, 0], layers, ratios[a].T, a)
    axes[0, 0].axhline(1.0, color="gray", lw=1)
    axes[0, 0].set(
        xlabel="BN layer",
        ylabel="Var_test / running var",
        title="variance shift per BN layer",
    )
    axes[0, 0].legend(fontsize=7, ncol=2, loc="upper center")
    for a, r in runs.items():
        report.band(axes[0, 1], r.steps, r.series["test_accuracy"], a)
    axes[0, 1].set(xlabel="step", ylabel="validation accuracy (running stats)", title="each arm at its rate")
    axes[0, 1].legend(fontsize=7)
    figures = [report.save_figure(fig, out_dir, "dropout_variance.png")]
    setup = (
        f"{testbed.describe(config, data)} BN before each activation; one dropout layer of rate {config['dropout']} "
        f"in both placements: on the input of the last hidden Dense (so it feeds the last BN: 'before BN') or on the "
        f"last hidden layer's output, before the classifier ('after last BN'); every arm tuned. Var_test = variance "
        f"of each BN layer's input over the first {config['variance_examples']} training examples in test mode (no "
        f"dropout, running statistics), divided by that layer's running variance (accumulated in training, with "
        f"dropout); the no-dropout arm's ratio is the control for the mismatch running averages have without "
        f"dropout. Only the last BN layer follows a dropout. Recomputed = jbn.recompute_batch_stats over the training "
        f"split with BN in training mode and dropout off, then the test split once. No-BN control: the same MLP "
        f"without BN (Dense with bias), the same dropout layer in the same two places; dropout cost = test accuracy "
        f"with the dropout before the classifier minus with it before the last hidden layer, per seed."
    )
    return report.finish(
        NAME,
        out_dir,
        config,
        title="8. Dropout before BN: variance shift",
        claim=CLAIM,
        setup=setup,
        table=table,
        figures=figures,
        quantities=quantities,
        seeds=config["seeds"],
    )
