"""Sync BN on N devices: a small conv net on scikit-learn digits, data parallel.

Four runs train in lockstep on the same batches from the same initialization:
`jax.shard_map` and `jax.pmap`, each with batch statistics synchronized over the devices
(`jbn.BatchNorm(axis_name=...)`) and without (each device normalizes its own small batch).
Every step prints the loss of all four; the end prints their test accuracy. The four runs
are repeated for each per-device batch size in `per_device_batch` and each seed in `seeds`
(a seed picks the initialization and the batch order; the train/validation/test split is
drawn once, with `split_seed`), and the end also prints the mean and spread over the seeds.

Each of the four runs takes its own Adam learning rate at each per-device batch size, chosen
on the validation split by experiment zero's procedure (`experiments.tuning.choose_rate`): every
rate of `learning_rates` trains on the tuning seeds (never judged ones), and the rate with the
best mean final validation accuracy is the run's. The judged seeds then train at their run's
rate, and the test split is evaluated once per run, after training (until 2026-12-05: every run
at Adam lr 0.01, trained on all training images).

    python -m experiments.sync_bn [--config configs/sync_bn.yaml] [--steps N] [--out DIR]

Devices: the default backend's. On a CPU-only machine the command line makes
`devices` fake CPU devices (8 by default); with GPUs or TPUs it uses up to `devices` of
them. Called as `run(config, out_dir)` from a process whose JAX already started, it uses
the devices that process has.

Without sync the devices' running statistics are averaged before evaluation (what flax's
ImageNet example does); with sync they are equal on every device already.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import pathlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
from flax import linen as nn
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jbn
from experiments.tuning import choose_rate

DEFAULTS: dict[str, Any] = {
    "devices": 8,  # devices to train on (fake CPU devices when there is no accelerator)
    "per_device_batch": [2, 4, 8],  # examples per device and step (an int or a list): small, where sync BN matters
    "steps": 300,
    "learning_rates": [0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32],  # Adam; every run tunes over the whole grid
    "tuning_seeds": [100, 101, 102],  # initialization and order seeds of the tuning runs
    "bn_momentum": 0.9,
    "widths": [16, 32],  # channels of the conv layers; each is followed by BatchNorm and ReLU
    "test_fraction": 0.2,
    "num_val": 300,  # validation images, for the rates, taken from the training part
    "split_seed": 0,  # the train/validation/test split (the same for every seed)
    "seeds": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],  # each seed: its own initialization and batch order
    "log_every": 1,  # print the four losses every this many steps
    "late_fraction": 0.2,  # the summary's training loss: mean over this last fraction of the steps
}
RUNS = ("shard_map_sync", "shard_map_local", "pmap_sync", "pmap_local")

AXIS = "batch"
STYLES = ("shard_map", "pmap")


class ConvNet(nn.Module):
    """Conv -> BatchNorm -> ReLU per width (stride 2 after the first), mean pool, Dense."""

    widths: Sequence[int]
    bn_momentum: float
    axis_name: str | None  # None: each device normalizes with its own batch statistics

    @nn.compact
    def __call__(self, x, train: bool):
        for i, width in enumerate(self.widths):
            x = nn.Conv(width, (3, 3), strides=1 if i == 0 else 2, use_bias=False)(x)
            x = jbn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum, axis_name=self.axis_name)(x)
            x = nn.relu(x)
        return nn.Dense(10)(x.mean(axis=(1, 2)))


class TrainState(NamedTuple):
    params: Any
    batch_stats: Any  # leading axis: one copy per device
    opt_state: Any


def load_digits(test_fraction: float, num_val: int, seed: int):
    """scikit-learn's bundled 8x8 digits as NHWC float32 in [0, 1]: (train, validation,
    test), each (x, y). The test split is the first `test_fraction` of one permutation (the
    same images as before the validation split existed); validation, the last `num_val` of
    the rest."""
    from sklearn.datasets import load_digits as sk_load

    d = sk_load()
    x = (d.images / 16.0).astype(np.float32)[..., None]
    y = d.target.astype(np.int32)
    order = np.random.RandomState(seed).permutation(len(y))
    n_test = round(test_fraction * len(y))
    test, rest = order[:n_test], order[n_test:]
    if not 0 < num_val < len(rest):
        raise ValueError(f"num_val={num_val}: must leave training images; use 0 < num_val < {len(rest)}.")
    train, val = rest[:-num_val], rest[-num_val:]
    return (x[train], y[train]), (x[val], y[val]), (x[test], y[test])


def set_learning_rate(opt_state, learning_rate: float):
    """`opt_state` of `optax.inject_hyperparams(optax.adam)` with its rate replaced: one
    compiled step per run serves every rate."""
    rate = np.asarray(learning_rate, np.asarray(opt_state.hyperparams["learning_rate"]).dtype)
    return opt_state._replace(hyperparams={**opt_state.hyperparams, "learning_rate": rate})


def local_loss(model, params, stats, x, y, global_batch):
    """This device's share of the global mean cross-entropy, and its new batch stats."""
    logits, updates = model.apply({"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).sum() / global_batch
    return loss, updates["batch_stats"]


def shard_map_step(model, tx, mesh, global_batch):
    """One training step under shard_map (check_vma on). Parameters enter replicated, so
    the gradient of each device's share comes out summed over the devices by JAX itself."""

    def step(state, x, y):
        stats = jax.tree.map(lambda s: s[0], state.batch_stats)
        grad_fn = jax.value_and_grad(local_loss, argnums=1, has_aux=True)
        (loss, stats), grads = grad_fn(model, state.params, stats, x, y, global_batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, jax.tree.map(lambda s: s[None], stats), opt_state), lax.psum(loss, AXIS)

    specs = TrainState(P(), P(AXIS), P())
    return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(specs, P(AXIS), P(AXIS)), out_specs=(specs, P())))


def pmap_step(model, tx, devices, global_batch):
    """One training step under pmap: everything carries a leading device axis and the
    gradients are summed over the devices explicitly."""

    def step(state, x, y):
        grad_fn = jax.value_and_grad(local_loss, argnums=1, has_aux=True)
        (loss, stats), grads = grad_fn(model, state.params, state.batch_stats, x, y, global_batch)
        grads = lax.psum(grads, AXIS)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return TrainState(optax.apply_updates(state.params, updates), stats, opt_state), lax.psum(loss, AXIS)

    return jax.pmap(step, axis_name=AXIS, devices=devices)


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def train_one(
    c: dict, devices, mesh, per_device: int, fns: dict, seed: int, rates: dict, data, log
) -> tuple[dict, dict]:
    """The four runs for one per-device batch size and one seed, run `name` at Adam rate
    `rates[name]`; `data`: (train, {split: (x, y)} evaluated after training).

    Returns ({run: per-step training losses}, {split: {run: accuracy}}).
    """
    (x_train, y_train), evaluated = data
    n = len(devices)
    global_batch = n * per_device
    init, evaluate, compiled = fns["init"], fns["evaluate"], fns["compiled"]
    params, stats, opt_state = jax.device_get(init(jax.random.PRNGKey(seed), x_train[:2]))
    copies = lambda tree: jax.tree.map(lambda a: np.stack([a] * n), tree)  # noqa: E731
    place = lambda tree, spec: jax.device_put(tree, NamedSharding(mesh, spec))  # noqa: E731
    runs = {}
    for name, (step, style) in compiled.items():
        # The state starts where the step leaves it, so the step compiles once.
        own = set_learning_rate(opt_state, rates[name])
        if style == "shard_map":
            state = TrainState(place(params, P()), place(copies(stats), P(AXIS)), place(own, P()))
        else:
            state = place(copies(TrainState(params, stats, own)), P(AXIS))
        runs[name] = [step, state, style]

    rs = np.random.RandomState(seed)
    order, position = rs.permutation(len(y_train)), 0
    losses = {name: [] for name in runs}
    for i in log.steps(c["steps"], f"sync_bn {per_device}/device seed {seed}"):
        if position + global_batch > len(order):
            order, position = rs.permutation(len(y_train)), 0
        idx = order[position : position + global_batch]
        position += global_batch
        for name, entry in runs.items():
            step, state, style = entry
            x, y = x_train[idx], y_train[idx]
            if style == "pmap":
                x, y = x.reshape((n, -1) + x.shape[1:]), y.reshape(n, -1)
            entry[1], loss = step(state, x, y)
            losses[name].append(float(np.asarray(loss).reshape(-1)[0]))
        if i % c["log_every"] == 0 or i == c["steps"]:
            log.write(f"step {i:4d}  " + "  ".join(f"{name} {losses[name][-1]:.4f}" for name in runs))

    accuracy = {split: {} for split in evaluated}
    for name, (_step, state, style) in runs.items():
        params = jax.device_get(state.params)
        if style == "pmap":
            params = jax.tree.map(lambda a: a[0], params)
        stats = jax.tree.map(lambda s: np.asarray(s).mean(0), state.batch_stats)
        for split, (x, y) in evaluated.items():
            logits = evaluate(params, stats, x)
            accuracy[split][name] = float(np.mean(np.argmax(np.asarray(logits), -1) == y))
    return losses, accuracy


class _Log:
    """Per-step lines through tqdm (a progress bar per block of steps unless TQDM_DISABLE)."""

    def steps(self, total: int, desc: str):
        from tqdm import tqdm

        return tqdm(range(1, total + 1), desc=desc, leave=False, disable=None)

    def write(self, line: str) -> None:
        from tqdm import tqdm

        tqdm.write(line)


def run(config: dict, out_dir: pathlib.Path) -> dict:
    """Tune, then train, the four runs for every per-device batch size and seed; write
    metrics.csv (judged runs' per-step losses), tuning.csv and sync_bn.png into `out_dir`.

    Args:
      config: keys of DEFAULTS (missing ones take the default). `per_device_batch` may be
        an int or a list of ints.
      out_dir: folder for the outputs; created if needed.

    Returns:
      Summary numbers: `devices`, `steps`, `seeds`, `per_device_batch` (a list) and
      `by_batch`: per-device batch -> {"global_batch", and per run (`shard_map_sync`,
      `shard_map_local`, `pmap_sync`, `pmap_local`) lists over the seeds of the final
      loss (`NAME_final_loss`), the mean loss over the last `late_fraction` of the steps
      (`NAME_late_loss`), the final validation accuracy (`NAME_val_accuracy`) and the
      test accuracy (`NAME_test_accuracy`)}; `rates`: per-device batch -> {run: chosen
      rate}; `tuning`: per-device batch -> {run: {rate: validation accuracy per tuning
      seed}}. With a single per-device batch size the top level also has its
      `global_batch` and, per run, the means over the seeds of those four numbers.
    """
    unknown = set(config) - set(DEFAULTS) - {"criteria"}  # criteria: judged by experiments.external
    if unknown:
        raise ValueError(
            f"unknown config keys {sorted(unknown)}: use keys of experiments.sync_bn.DEFAULTS {sorted(DEFAULTS)}."
        )
    c = {**DEFAULTS, **config}
    per_devices = [int(b) for b in _as_list(c["per_device_batch"])]
    seeds = [int(s) for s in _as_list(c["seeds"])]
    tuning_seeds = [int(s) for s in _as_list(c["tuning_seeds"])]
    grid = [float(lr) for lr in _as_list(c["learning_rates"])]
    if not per_devices or not seeds or not tuning_seeds or not grid:
        raise ValueError("per_device_batch, seeds, tuning_seeds and learning_rates must not be empty.")
    if set(seeds) & set(tuning_seeds):
        raise ValueError(f"tuning_seeds {sorted(set(seeds) & set(tuning_seeds))} are judged seeds too: use others.")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    devices = jax.devices()[: c["devices"]]
    n = len(devices)
    if n < c["devices"]:
        print(f"note: {c['devices']} devices asked for, {n} available ({devices[0].platform}); training on {n}.")
    train, val, test = load_digits(c["test_fraction"], c["num_val"], c["split_seed"])

    # The rate lives in the optimizer state (set per run by `set_learning_rate`).
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=grid[0])
    mesh = Mesh(np.array(devices), (AXIS,))
    local_model = ConvNet(tuple(c["widths"]), c["bn_momentum"], None)

    @jax.jit
    def init(key, x):  # one compiled init shared by all runs (axis_name plays no part in it)
        variables = local_model.init(key, x, train=False)
        return variables["params"], variables["batch_stats"], tx.init(variables["params"])

    evaluate = jax.jit(lambda p, s, x: local_model.apply({"params": p, "batch_stats": s}, x, train=False))
    log = _Log()
    summary: dict[str, Any] = {
        "devices": n,
        "steps": c["steps"],
        "seeds": seeds,
        "per_device_batch": per_devices,
        "by_batch": {},
        "rates": {},
        "tuning": {},
    }
    losses_by: dict[int, dict[str, np.ndarray]] = {}
    late_steps = max(1, int(c["steps"] * c["late_fraction"]))
    for per_device in per_devices:
        global_batch = n * per_device
        compiled = {}
        for style in STYLES:  # compiled once per batch size, shared by the seeds
            for sync in (True, False):
                model = local_model.clone(axis_name=AXIS) if sync else local_model
                step = (
                    shard_map_step(model, tx, mesh, global_batch)
                    if style == "shard_map"
                    else pmap_step(model, tx, devices, global_batch)
                )
                compiled[f"{style}_{'sync' if sync else 'local'}"] = (step, style)
        fns = {"init": init, "evaluate": evaluate, "compiled": compiled}
        tuning: dict[str, dict[float, list[float]]] = {name: {lr: [] for lr in grid} for name in RUNS}
        for lr in grid:  # the four runs in lockstep at each rate, scored on the validation split
            for seed in tuning_seeds:
                log.write(f"-- tuning {per_device} examples per device, lr {lr:g}, seed {seed}")
                _, accuracy = train_one(
                    c, devices, mesh, per_device, fns, seed, dict.fromkeys(RUNS, lr), (train, {"val": val}), log
                )
                for name in RUNS:
                    tuning[name][lr].append(accuracy["val"][name])
        rates = {name: choose_rate({lr: np.asarray(a) for lr, a in tuning[name].items()}) for name in RUNS}
        summary["rates"][per_device], summary["tuning"][per_device] = rates, tuning
        per_seed_losses = {name: [] for name in RUNS}
        numbers: dict[str, Any] = {"global_batch": global_batch}
        for seed in seeds:
            log.write(f"-- {per_device} examples per device (global batch {global_batch}), seed {seed}, rates {rates}")
            losses, accuracy = train_one(
                c, devices, mesh, per_device, fns, seed, rates, (train, {"val": val, "test": test}), log
            )
            for name in RUNS:
                per_seed_losses[name].append(losses[name])
                numbers.setdefault(f"{name}_final_loss", []).append(losses[name][-1])
                numbers.setdefault(f"{name}_late_loss", []).append(float(np.mean(losses[name][-late_steps:])))
                numbers.setdefault(f"{name}_val_accuracy", []).append(accuracy["val"][name])
                numbers.setdefault(f"{name}_test_accuracy", []).append(accuracy["test"][name])
        losses_by[per_device] = {name: np.asarray(v) for name, v in per_seed_losses.items()}  # (seeds, steps)
        summary["by_batch"][per_device] = numbers

    print(f"\n{n} {devices[0].platform} devices, {c['steps']} steps, seeds {seeds}: mean ± std over the seeds")
    for per_device, numbers in summary["by_batch"].items():
        print(f"{per_device} examples per device (global batch {numbers['global_batch']}):")
        for name in RUNS:
            acc, loss = np.asarray(numbers[f"{name}_test_accuracy"]), np.asarray(numbers[f"{name}_final_loss"])
            print(
                f"  {name:16s} lr {summary['rates'][per_device][name]:g}  final loss {loss.mean():.4f} ± {loss.std():.4f}  "
                f"test accuracy {acc.mean():.4f} ± {acc.std():.4f}  (per seed: {', '.join(f'{a:.3f}' for a in acc)})"
            )
    if len(per_devices) == 1:
        numbers = summary["by_batch"][per_devices[0]]
        summary["global_batch"] = numbers["global_batch"]
        for key, values in numbers.items():
            if key != "global_batch":
                summary[key] = float(np.mean(values))

    with open(out_dir / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "per_device_batch",
                "step",
                *(f"{name}_loss" for name in RUNS),
                *(f"{name}_loss_seed{s}" for name in RUNS for s in seeds),
            ]
        )
        for per_device, losses in losses_by.items():
            for i in range(c["steps"]):
                w.writerow(
                    [
                        per_device,
                        i + 1,
                        *(f"{losses[name][:, i].mean():.6f}" for name in RUNS),
                        *(f"{losses[name][k, i]:.6f}" for name in RUNS for k in range(len(seeds))),
                    ]
                )
    with open(out_dir / "tuning.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["per_device_batch", "run", "learning_rate", "seed", "val_accuracy", "chosen"])
        for per_device, tuning in summary["tuning"].items():
            for name, by_rate in tuning.items():
                for lr, accuracies in by_rate.items():
                    chosen = int(lr == summary["rates"][per_device][name])
                    for seed, acc in zip(tuning_seeds, accuracies):
                        w.writerow([per_device, name, f"{lr:g}", seed, f"{acc:.6f}", chosen])
    plot(losses_by, summary, n, devices[0].platform, out_dir / "sync_bn.png")
    return summary


def plot(losses_by: dict, summary: dict, n: int, platform: str, path: pathlib.Path) -> None:
    """Per per-device batch: the training loss of the four runs (mean over seeds, running
    mean over 20 steps); last panel: test accuracy against the per-device batch."""
    import flax
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    batches = list(losses_by)
    fig, axes = plt.subplots(1, len(batches) + 1, figsize=(3.0 * (len(batches) + 1), 3.0), squeeze=False)
    colors = {"shard_map_sync": "C0", "shard_map_local": "C1", "pmap_sync": "C2", "pmap_local": "C3"}
    for ax, b in zip(axes[0], batches):
        for name in RUNS:
            mean = losses_by[b][name].mean(0)
            w = min(20, len(mean))
            smooth = np.convolve(mean, np.ones(w) / w, mode="valid")
            wide = name.startswith("shard_map")  # drawn wide and pale under pmap's line: the two coincide
            ax.plot(
                np.arange(w, len(mean) + 1),
                smooth,
                lw=3 if wide else 1,
                alpha=0.45 if wide else 1,
                color=colors[name],
                ls="-" if "sync" in name else "--",
                label=name,
            )
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (20-step mean)")
        ax.set_yscale("log")
        low, high = ax.get_ylim()
        ticks = [t for t in (0.01, 0.03, 0.1, 0.3, 1.0, 3.0) if low <= t <= high]
        ax.set_yticks(ticks, [f"{t:g}" for t in ticks])
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{b} per device (global {n * b})", fontsize=9)
    axes[0, 0].legend(fontsize=7)
    ax = axes[0, -1]
    x = np.arange(len(batches))
    for k, name in enumerate(RUNS):
        accs = [np.asarray(summary["by_batch"][b][f"{name}_test_accuracy"]) for b in batches]
        ax.errorbar(
            x + (k - 1.5) * 0.08,
            [a.mean() for a in accs],
            yerr=[a.std() for a in accs],
            marker="o" if "sync" in name else "s",
            ms=4,
            capsize=3,
            ls="none",
            color=colors[name],
            label=name,
        )
    ax.set_xticks(x, [str(b) for b in batches])
    ax.set_xlabel("examples per device")
    ax.set_ylabel("test accuracy (mean ± std)")
    ax.legend(fontsize=6)
    fig.suptitle(
        f"digits, {n} {platform} devices, seeds {summary['seeds']}; jax {jax.__version__}, flax {flax.__version__}",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def load_config(path: pathlib.Path | None) -> dict:
    if path is None:
        return dict(DEFAULTS)
    import yaml

    with open(path) as f:
        return {**DEFAULTS, **(yaml.safe_load(f) or {})}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=pathlib.Path, default=None, help="YAML file with keys of DEFAULTS")
    parser.add_argument("--steps", type=int, default=None, help="override the number of steps")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/sync_bn"), help="output folder")
    a = parser.parse_args(argv)
    config = load_config(a.config)
    if a.steps is not None:
        config["steps"] = a.steps
    # Fake CPU devices when there is no accelerator (no effect on GPU/TPU); if JAX already
    # started in this process, use the devices it has.
    with contextlib.suppress(RuntimeError):
        jax.config.update("jax_num_cpu_devices", int(config["devices"]))
    return run(config, a.out)


if __name__ == "__main__":
    main()
