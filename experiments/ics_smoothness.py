"""Experiment 6: internal covariate shift vs smoothness (Santurkar et al. 2018).

Claims: (A) "noisy BN" (BN followed by a random scale and shift for every activation of
every sample, resampled every step, as in Santurkar et al.'s Sec. 2.1, which makes the layer input distributions unstable on purpose) trains about as well
as BN and better than no BN, so BN's benefit does not come from stable distributions.
(B) BN does not reduce internal covariate shift as Santurkar et al. measure it: the
change of a layer's gradient when the earlier layers take their update. (C) BN makes the
loss landscape smoother: along the gradient direction the loss varies less, the gradient
changes less ("gradient predictiveness") and the effective beta-smoothness is lower.

Parts B and C compare the arms at one common learning rate, as Santurkar et al. do (the
landscape is probed at steps that are multiples of the rate). Part A, how well each arm
trains, compares each arm at its own rate, chosen on a validation split (the last `num_val`
training sequences) by the same procedure (until 2026-12-04 part A used the common rate).
Every run is evaluated on the validation split during training and on the test split once,
after training.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from experiments import data as datasets
from experiments import report
from experiments.models import MLP, NormSpec
from experiments.training import TrainState, fit, make_evaluate, make_optimizer, training_loss
from experiments.tuning import test_once, tune, validation_rows

NAME = "ics_smoothness"
DEFAULTS = {
    "data": "mnist1d",
    "num_val": 1000,  # the last 1000 of the 4000 training sequences: validation, for part A's rates
    "depth": 8,  # hidden layers
    "width": 100,
    "batch_size": 60,
    "steps": 2000,
    "eval_every": 100,
    "learning_rate": 0.05,  # plain SGD: the common rate of parts B and C
    "learning_rates": [0.0125, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2],  # part A: each arm tunes over the whole grid
    "tuning_seeds": [100, 101, 102],  # choose part A's rates; never judged
    "bn_momentum": 0.99,
    "noise_scale": 1.25,  # noisy BN: per activation, sample and step, scale ~ U(1, noise_scale), shift ~ U(-noise_shift, noise_shift)
    "noise_shift": 0.5,
    "probe_examples": 128,  # fixed training examples the ICS and landscape are measured on
    "step_multipliers": [0.25, 0.5, 1.0, 2.0, 4.0],  # landscape steps, times the learning rate
    "seeds": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
}
TINY = {
    "depth": 2,
    "width": 8,
    "steps": 4,
    "eval_every": 2,
    "seeds": [0, 1],
    "learning_rates": [0.05],
    "tuning_seeds": [100],
    "probe_examples": 16,
    "step_multipliers": [1.0],
}

CLAIM = (
    "BN's success is not due to reducing internal covariate shift but to a smoother loss landscape: "
    "noisy BN trains about as well as BN, BN does not reduce ICS (gradient change when earlier layers update), "
    "and with BN the loss and its gradient change less along the gradient (Santurkar et al. 2018)."
)
ARMS = {"standard": "none", "BN": "bn", "noisy BN": "noisy_bn"}


def _flat(tree) -> jax.Array:
    return jnp.concatenate([jnp.ravel(v) for v in jax.tree.leaves(tree)])


def landscape_probe(model, x, y, lr: float, multipliers):
    """probe(state, key) -> ICS and smoothness numbers on the fixed batch (x, y).

    ICS (per hidden layer i >= 1): G = grad of layer i's kernel; G' = the same gradient after
    layers 0..i-1 (Dense and norm parameters) take one SGD step of size `lr` on the same
    batch; returns the mean over layers of ||G - G'|| / ||G|| and of cos(G, G').
    Landscape: for eta = m * lr (m in `multipliers`), the loss and gradient at
    params - eta * g; returns the range of the loss, max ||g - g(eta)|| ("gradient
    predictiveness") and max ||g - g(eta)|| / ||eta g|| (effective beta-smoothness).
    Training mode, batch statistics of (x, y); the same noise key for every evaluation.
    """
    depth = len(model.widths)

    def probe(state: TrainState, key):
        def loss(p):
            return training_loss(model, p, state.batch_stats, x, y, key)[0]

        value_and_grad = jax.value_and_grad(loss)
        loss0, g = value_and_grad(state.params)
        rel, cos = [], []
        for i in range(1, depth):
            before = {f"dense_{j}" for j in range(i)} | {f"norm_{j}" for j in range(i)}
            moved = {
                k: (jax.tree.map(lambda p, d: p - lr * d, v, g[k]) if k in before else v)
                for k, v in state.params.items()
            }
            g_new = jax.grad(loss)(moved)[f"dense_{i}"]["kernel"]
            g_old = g[f"dense_{i}"]["kernel"]
            diff = jnp.linalg.norm(g_new - g_old)
            rel.append(diff / jnp.linalg.norm(g_old))
            cos.append(jnp.vdot(g_new, g_old) / (jnp.linalg.norm(g_new) * jnp.linalg.norm(g_old)))
        flat_g = _flat(g)
        losses, changes, betas = [loss0], [], []
        for m in multipliers:
            eta = m * lr
            loss_eta, g_eta = value_and_grad(jax.tree.map(lambda p, d: p - eta * d, state.params, g))
            change = jnp.linalg.norm(_flat(g_eta) - flat_g)
            losses.append(loss_eta)
            changes.append(change)
            betas.append(change / (eta * jnp.linalg.norm(flat_g)))
        losses = jnp.stack(losses)
        return {
            "ics_relative_l2": jnp.mean(jnp.stack(rel)),
            "ics_cosine": jnp.mean(jnp.stack(cos)),
            "loss_range": jnp.nanmax(losses) - jnp.nanmin(losses),
            "gradient_change": jnp.max(jnp.stack(changes)),
            "beta_smoothness": jnp.max(jnp.stack(betas)),
        }

    return probe


def run(config: dict, out_dir: pathlib.Path) -> dict:
    out_dir = pathlib.Path(out_dir)
    data = datasets.load(config["data"])
    splits = datasets.validation_split(data, config["num_val"])
    train_set = splits.tuning  # its held-out part, which `fit` calls "test", is the validation split
    px, py = (
        jnp.asarray(train_set.x_train[: config["probe_examples"]]),
        jnp.asarray(train_set.y_train[: config["probe_examples"]]),
    )
    lr = config["learning_rate"]
    x_train, y_train = jnp.asarray(train_set.x_train), jnp.asarray(train_set.y_train)
    runs, tuned, chosen, test, fit_loss, rows = {}, {}, {}, {}, {}, []

    def finish_run(arm, phase, model, r, learning_rate):
        """metrics.csv rows of a judged run, with its test accuracy (read once) and its final
        net's loss on the whole training set in evaluation mode (running statistics, no
        injected noise): how well it fits its training data."""
        evaluate = jax.jit(jax.vmap(make_evaluate(model), in_axes=(0, None, None)))
        test[arm, phase] = test_once(model, r, splits.final)["accuracy"]
        fit_loss[arm, phase] = np.asarray(evaluate(r.state, x_train, y_train)["loss"])
        extra = {"phase": phase, "arm": arm, "learning_rate": learning_rate}
        return validation_rows(r, **extra) + [
            {**extra, "seed": s, "step": config["steps"], "metric": metric, "value": float(v)}
            for metric, values in (
                ("test_accuracy", test[arm, phase]),
                ("train_set_loss_eval_mode", fit_loss[arm, phase]),
            )
            for s, v in zip(r.seeds, values)
        ]

    for arm, kind in ARMS.items():
        spec = NormSpec(
            kind, momentum=config["bn_momentum"], noise_scale=config["noise_scale"], noise_shift=config["noise_shift"]
        )
        model = MLP(
            (config["width"],) * config["depth"], data.num_classes, activation="relu", norm=spec, weight_init="he"
        )

        def train(rate, seeds, desc, probe=None, model=model):
            return fit(
                model,
                make_optimizer("sgd", rate),
                train_set,
                seeds=seeds,
                steps=config["steps"],
                batch_size=config["batch_size"],
                eval_every=config["eval_every"],
                probe=probe,
                desc=desc,
            )

        # Parts B and C: every arm at the common rate, probed along the way.
        runs[arm] = train(lr, config["seeds"], arm, landscape_probe(model, px, py, lr, config["step_multipliers"]))
        rows += finish_run(arm, "common rate", model, runs[arm], lr)
        # Part A: the arm's own rate, chosen on validation on the tuning seeds.
        chosen[arm], tuning = tune(
            lambda rate, arm=arm, train=train: train(rate, config["tuning_seeds"], f"tune {arm} lr {rate:g}"),
            config["learning_rates"],
        )
        for rate, t in tuning.items():
            rows += validation_rows(t, phase="tuning", arm=arm, learning_rate=rate)
        tuned[arm] = train(chosen[arm], config["seeds"], f"{arm} lr {chosen[arm]:g} (tuned)")
        rows += finish_run(arm, "tuned rate", model, tuned[arm], chosen[arm])
    report.write_metrics(out_dir, rows)

    def over_training(arm, metric):
        """(S,) the metric averaged over all evaluations (NaN-aware) of each seed."""
        with np.errstate(all="ignore"):
            return np.nanmean(runs[arm].series[metric], axis=0)

    metrics = ["ics_relative_l2", "ics_cosine", "loss_range", "gradient_change", "beta_smoothness"]
    table = report.markdown_table(
        ["arm", "rate (chosen on validation)", "test acc", "final train-set loss, eval mode"],
        [
            [
                arm,
                f"{chosen[arm]:g}",
                report.fmt_seeds(test[arm, "tuned rate"]),
                report.fmt_seeds(fit_loss[arm, "tuned rate"]),
            ]
            for arm in ARMS
        ],
    )
    table += (
        f"\n\nPart A, each arm at its own rate: the grid {config['learning_rates']} trained on tuning seeds "
        f"{config['tuning_seeds']}, the best mean final validation accuracy chosen.\n\n"
    )
    table += report.markdown_table(
        [
            "arm (common rate)",
            "test acc",
            "final train loss",
            "final train-set loss, eval mode",
            "ICS ||G-G'||/||G||",
            "ICS cos(G,G')",
            "loss range",
            "max grad change",
            "beta-smoothness",
        ],
        [
            [
                arm,
                report.fmt_seeds(test[arm, "common rate"]),
                report.fmt_seeds(r.final("train_loss")),
                report.fmt_seeds(fit_loss[arm, "common rate"]),
            ]
            + [report.fmt_seeds(over_training(arm, m)) for m in metrics]
            for arm, r in runs.items()
        ],
    )
    table += (
        f"\n\nParts B and C, every arm at the common rate {lr}. Final train loss: the training objective (training mode, noisy BN with its noise), mean over the last "
        f"{config['eval_every']} steps. Final train-set loss, eval mode: the final net on all training examples with the "
        f"running statistics and no injected noise. ICS and landscape columns: mean over the evaluations of training "
        f"(every {config['eval_every']} steps), then mean ± sample SD over seeds."
    )

    # Per-seed quantities; all arms share each seed's init seed and data order (paired).
    keys = {"standard": "standard", "BN": "bn", "noisy BN": "noisy"}
    quantities = {}
    for arm, key in keys.items():
        # part A: each arm at its tuned rate
        quantities[f"test_acc/{key}"] = test[arm, "tuned rate"]
        quantities[f"train_set_loss/{key}"] = fit_loss[arm, "tuned rate"]
        # parts B and C: the common rate
        quantities[f"test_acc_common_rate/{key}"] = test[arm, "common rate"]
        quantities[f"train_set_loss_common_rate/{key}"] = fit_loss[arm, "common rate"]
        quantities[f"objective/{key}"] = runs[arm].final("train_loss")
        for m in metrics:
            quantities[f"{m}/{key}"] = over_training(arm, m)

    fig, axes = report.figure(3, 2, width=3.4, height=2.8)
    panels = [
        ("train_loss", "train loss", "log"),
        ("test_accuracy", "validation accuracy", "linear"),
        ("ics_cosine", "ICS: cos(G, G')", "linear"),
        ("ics_relative_l2", "ICS: ||G - G'|| / ||G||", "log"),
        ("loss_range", "loss range along gradient", "log"),
        ("beta_smoothness", "effective beta-smoothness", "log"),
    ]
    for ax, (metric, title, scale) in zip(axes.ravel(), panels):
        for arm, r in runs.items():
            steps, values = (
                (r.steps[1:], r.series[metric][1:]) if metric == "train_loss" else (r.steps, r.series[metric])
            )
            report.band(ax, steps, values, arm)
        ax.set(xlabel="step", ylabel=title, title=f"{title} (common rate {lr:g})", yscale=scale)
    axes[0, 0].legend(fontsize=7)
    figures = [report.save_figure(fig, out_dir, "ics_smoothness.png")]
    setup = (
        f"{splits.final.name.rsplit(',', 1)[0]}, its last {config['num_val']} training sequences held out as the "
        f"validation split; ReLU MLP, {config['depth']} hidden layers of {config['width']} (He init), batch "
        f"{config['batch_size']}, plain SGD, {config['steps']} steps, seeds {config['seeds']} (paired: every arm shares "
        f"each seed's init seed and data order). Part A: each arm at its own rate, the grid {config['learning_rates']} "
        f"trained on tuning seeds {config['tuning_seeds']} and the best mean final validation accuracy taken. Parts B "
        f"and C: every arm at the common rate {lr}. The test split is read once per run, after training. "
        f"BN = jbn.BatchNorm before each ReLU; noisy BN multiplies each BN output activation of each example, in training, by "
        f"its own scale ~ U(1, {config['noise_scale']}) and adds its own shift ~ U(-{config['noise_shift']}, {config['noise_shift']}), drawn anew every step. Every {config['eval_every']} steps, on "
        f"{config['probe_examples']} fixed training examples in training mode: ICS of each hidden layer i >= 1 "
        f"(G = its kernel gradient; G' = the same after layers < i take one SGD step), averaged over layers; and "
        f"along the gradient g, at steps eta = {config['step_multipliers']} x lr: the loss range, max ||g - g(eta)|| and "
        f"max ||g - g(eta)|| / ||eta g||."
    )
    return report.finish(
        NAME,
        out_dir,
        config,
        title="6. Internal covariate shift vs smoothness",
        claim=CLAIM,
        setup=setup,
        table=table,
        figures=figures,
        quantities=quantities,
        seeds=config["seeds"],
    )
