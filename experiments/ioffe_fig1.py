"""Experiment 1: Ioffe & Szegedy (2015), Figure 1.

Claim: an MLP of 3 hidden layers of 100 sigmoid units trained with batches of 60 reaches
a higher test accuracy sooner with batch norm, and the distribution of a sigmoid's input
(its 15th, 50th and 85th percentiles) stays steady during training with BN while it drifts
without ("internal covariate shift").
"""

from __future__ import annotations

import pathlib

import jax.numpy as jnp
import numpy as np

from experiments import data as datasets
from experiments import report
from experiments.models import MLP, NormSpec
from experiments.training import TrainState, first_step_reaching, fit_from_config, rngs_for

NAME = "ioffe_fig1"
DEFAULTS = {
    "data": "mnist1d",  # a key of experiments.data.load
    "widths": [100, 100, 100],  # hidden layers
    "activation": "sigmoid",
    "batch_size": 60,
    "steps": 6000,
    "eval_every": 100,
    "optimizer": "sgd",
    "learning_rate": 0.5,  # the same for both arms
    "bn_momentum": 0.99,
    "seeds": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
    "unit": 0,  # which unit of the last hidden layer the percentile plot shows
    "probe_examples": 1000,  # fixed test examples the percentiles are measured on
    "settle_fraction": 0.1,  # the drift is measured after this fraction of training
}
TINY = {"widths": [8], "steps": 4, "eval_every": 2, "seeds": [0, 1], "probe_examples": 50}

CLAIM = (
    "With batch norm, a 3x100 sigmoid MLP (batch 60) reaches a higher test accuracy sooner, and the input "
    "distribution of a last-hidden-layer sigmoid (15th/50th/85th percentiles) stays steady during training, "
    "while without BN it drifts (Ioffe & Szegedy 2015, Fig. 1)."
)
PERCENTILES = (15.0, 50.0, 85.0)


def percentile_probe(model, probe_x):
    """probe(state, key) -> {"pct": (units, 3)} percentiles of the last hidden layer's
    sigmoid input over `probe_x`, in training mode (what the sigmoid sees while training;
    batch statistics of the probe batch, running statistics left unchanged)."""
    last = len(model.widths) - 1

    def probe(state: TrainState, key):
        variables = {"params": state.params, **({"batch_stats": state.batch_stats} if state.batch_stats else {})}
        _, inter = model.apply(
            variables, probe_x, train=True, rngs=rngs_for(key), mutable=["intermediates", "batch_stats"]
        )
        h = inter["intermediates"][f"act_input_{last}"][0]  # (N, units)
        return {"pct": jnp.percentile(h, jnp.asarray(PERCENTILES), axis=0).T}

    return probe


def percentile_drift(pct: np.ndarray, steps: np.ndarray, settle_fraction: float) -> np.ndarray:
    """(S,) how far the sigmoid-input distributions move after the first `settle_fraction`
    of training, in units of their width: mean over units and over the 15th/50th/85th
    percentiles of (max_t - min_t of the percentile) / mean_t (p85 - p15).

    Args:
      pct: (T, S, units, 3) percentiles over time.
      steps: (T,) the steps they were taken at.
    """
    after = steps >= settle_fraction * steps[-1]
    p = pct[after]  # (T', S, units, 3)
    ranges = (p.max(0) - p.min(0)).mean(-1)  # (S, units)
    width = (p[..., 2] - p[..., 0]).mean(0)
    return np.nanmean(ranges / np.maximum(width, 1e-12), axis=-1)


def steps_done(runs: dict) -> int:
    """The step of the last evaluation."""
    return int(next(iter(runs.values())).steps[-1])


def run(config: dict, out_dir: pathlib.Path) -> dict:
    out_dir = pathlib.Path(out_dir)
    data = datasets.load(config["data"])
    probe_x = jnp.asarray(data.x_test[: config["probe_examples"]])
    arms = {"baseline": NormSpec("none"), "BN": NormSpec("bn", momentum=config["bn_momentum"])}
    runs, rows = {}, []
    for arm, norm in arms.items():
        model = MLP(tuple(config["widths"]), data.num_classes, activation=config["activation"], norm=norm)
        run_ = fit_from_config(
            model,
            data,
            config,
            probe=percentile_probe(model, probe_x),
            desc=arm,
        )
        runs[arm] = run_
        rows += run_.rows(arm=arm)
        unit = config["unit"]
        for t, step in enumerate(run_.steps):
            for s, seed in enumerate(run_.seeds):
                for q, pq in enumerate(PERCENTILES):
                    rows.append(
                        {
                            "arm": arm,
                            "seed": seed,
                            "step": int(step),
                            "metric": f"unit{unit}_p{pq:g}",
                            "value": float(run_.series["pct"][t, s, unit, q]),
                        }
                    )
    report.write_metrics(out_dir, rows)

    # Numbers
    final = {a: r.final("test_accuracy") for a, r in runs.items()}
    drift = {a: percentile_drift(r.series["pct"], r.steps, config["settle_fraction"]) for a, r in runs.items()}
    base_mean, base_std = report.mean_std(final["baseline"])
    bn_mean, bn_std = report.mean_std(final["BN"])
    target = base_mean
    reach = {a: first_step_reaching(r, target) for a, r in runs.items()}
    table_rows = []
    for a, r in runs.items():
        table_rows.append(
            (
                a,
                report.fmt_seeds(final[a]),
                report.fmt_seeds(r.final("train_loss")),
                report.fmt_seeds(reach[a], 0, missing="never reached"),
                report.fmt_seeds(drift[a]),
                f"{r.seconds:.0f}",
            )
        )
    table = report.markdown_table(
        [
            "arm",
            "final test acc",
            "final train loss",
            f"steps to {target:.3f} (baseline final)",
            "percentile drift",
            "seconds",
        ],
        table_rows,
    )
    # How the distributions move, in plain numbers: the plotted unit (first seed, as in
    # panels b and c) at the first and last evaluation, and over all units and seeds the
    # 15-85 width and the median at the start of the drift window and at the end.
    unit = config["unit"]
    pct_rows = []
    for a, r in runs.items():
        pct = r.series["pct"]  # (T, S, units, 3)
        start = int(np.flatnonzero(r.steps >= config["settle_fraction"] * r.steps[-1])[0])
        first, last = pct[0, 0, unit], pct[-1, 0, unit]
        width = pct[..., 2] - pct[..., 0]  # (T, S, units)
        pct_rows.append(
            (
                a,
                f"{first[0]:+.2f} / {first[1]:+.2f} / {first[2]:+.2f}",
                f"{last[0]:+.2f} / {last[1]:+.2f} / {last[2]:+.2f}",
                f"{np.mean(width[start]):.2f} -> {np.mean(width[-1]):.2f}",
                f"{np.mean(np.abs(pct[-1, ..., 1] - pct[start, ..., 1])):.2f}",
            )
        )
    table += "\n\n" + report.markdown_table(
        [
            "arm",
            f"unit {unit} (seed {runs['BN'].seeds[0]}) 15/50/85th pct, step 0",
            f"unit {unit}, step {steps_done(runs)}",
            f"15-85 width, step {int(runs['BN'].steps[start])} -> {steps_done(runs)} (mean over units, seeds)",
            f"mean |median change|, step {int(runs['BN'].steps[start])} -> {steps_done(runs)}",
        ],
        pct_rows,
    )

    # Per-seed quantities (both arms share each seed's data order): the criteria are in the config.
    steps = config["steps"]
    quantities = {
        "test_acc/BN": final["BN"],
        "test_acc/baseline": final["baseline"],
        # fraction of training BN needs to reach the baseline's final accuracy
        # a seed that never reaches it counts as one evaluation past the run (> 1), so a sign
        # test counts it against the claim instead of leaving it out as non-finite
        "reach_fraction/BN": np.where(
            np.isfinite(reach["BN"]), reach["BN"] / steps, (steps + config["eval_every"]) / steps
        ),
        "drift/BN": drift["BN"],
        "drift/baseline": drift["baseline"],
    }

    # Figure: accuracy, then the percentiles of one unit without and with BN (first seed).
    fig, axes = report.figure(3, 1, width=3.6)
    for a, r in runs.items():
        report.band(axes[0, 0], r.steps, r.series["test_accuracy"], a)
    axes[0, 0].set(xlabel="step", ylabel="test accuracy", title="(a) test accuracy")
    axes[0, 0].legend()
    unit = config["unit"]
    for ax, a, letter in ((axes[0, 1], "baseline", "b"), (axes[0, 2], "BN", "c")):
        pct = runs[a].series["pct"][:, 0, unit, :]
        for q, pq in enumerate(PERCENTILES):
            ax.plot(runs[a].steps, pct[:, q], color="C0" if a == "baseline" else "C1", lw=1.5 if pq == 50 else 0.8)
        ax.set(xlabel="step", ylabel="sigmoid input", title=f"({letter}) {a}: unit {unit}, 15/50/85th pct")
    ylim = (
        min(axes[0, 1].get_ylim()[0], axes[0, 2].get_ylim()[0]),
        max(axes[0, 1].get_ylim()[1], axes[0, 2].get_ylim()[1]),
    )
    axes[0, 1].set_ylim(ylim)
    axes[0, 2].set_ylim(ylim)
    figures = [report.save_figure(fig, out_dir, "ioffe_fig1.png")]

    setup = (
        f"{data.name}; MLP {config['widths']} {config['activation']} units, batch {config['batch_size']}, "
        f"{config['optimizer']} lr {config['learning_rate']}, {steps} steps, seeds {config['seeds']}; BN = jbn.BatchNorm "
        f"(momentum {config['bn_momentum']}) between each Dense and sigmoid, Dense without bias there. Test accuracy "
        f"uses the running statistics. Percentiles of the last hidden layer's sigmoid inputs are taken on "
        f"{len(probe_x)} fixed test examples in training mode. *Percentile drift* = mean over the "
        f"{config['widths'][-1]} units and the 3 percentiles of (max - min over time of the percentile) / (the unit's "
        f"mean 15-85 width), measured after the first {config['settle_fraction']:.0%} of training: 0 for a "
        f"distribution that never moves."
    )
    return report.finish(
        NAME,
        out_dir,
        config,
        title="1. Ioffe & Szegedy 2015, Fig. 1",
        claim=CLAIM,
        setup=setup,
        table=table,
        figures=figures,
        quantities=quantities,
        seeds=config["seeds"],
    )
