"""Sync BN on N devices: a small conv net on scikit-learn digits, data parallel.

Four runs train in lockstep on the same batches from the same initialization:
`jax.shard_map` and `jax.pmap`, each with batch statistics synchronized over the devices
(`jbn.BatchNorm(axis_name=...)`) and without (each device normalizes its own small batch).
Every step prints the loss of all four; the end prints their test accuracy.

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
import csv
import pathlib
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jbn

DEFAULTS: dict[str, Any] = {
    "devices": 8,  # devices to train on (fake CPU devices when there is no accelerator)
    "per_device_batch": 2,  # examples per device and step: small, where sync BN matters
    "steps": 300,
    "learning_rate": 0.01,  # Adam
    "bn_momentum": 0.9,
    "widths": [16, 32],  # channels of the conv layers; each is followed by BatchNorm and ReLU
    "test_fraction": 0.2,
    "seed": 0,
    "log_every": 1,  # print the four losses every this many steps
}

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


def load_digits(test_fraction: float, seed: int):
    """scikit-learn's bundled 8x8 digits as NHWC float32 in [0, 1], split train/test."""
    from sklearn.datasets import load_digits as sk_load

    d = sk_load()
    x = (d.images / 16.0).astype(np.float32)[..., None]
    y = d.target.astype(np.int32)
    order = np.random.RandomState(seed).permutation(len(y))
    n_test = int(round(test_fraction * len(y)))
    test, train = order[:n_test], order[n_test:]
    return (x[train], y[train]), (x[test], y[test])


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


def run(config: dict, out_dir: pathlib.Path) -> dict:
    """Train the four runs; write metrics.csv and sync_bn.png into `out_dir`.

    Args:
      config: keys of DEFAULTS (missing ones take the default).
      out_dir: folder for the outputs; created if needed.

    Returns:
      Summary numbers: devices used, global batch, and per run (`shard_map_sync`,
      `shard_map_local`, `pmap_sync`, `pmap_local`) the final loss and test accuracy.
    """
    from tqdm import tqdm

    unknown = set(config) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown config keys {sorted(unknown)}: use keys of experiments.sync_bn.DEFAULTS {sorted(DEFAULTS)}.")
    c = {**DEFAULTS, **config}
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    devices = jax.devices()[: c["devices"]]
    n = len(devices)
    if n < c["devices"]:
        print(f"note: {c['devices']} devices asked for, {n} available ({devices[0].platform}); training on {n}.")
    global_batch = n * c["per_device_batch"]
    (x_train, y_train), (x_test, y_test) = load_digits(c["test_fraction"], c["seed"])

    tx = optax.adam(c["learning_rate"])
    mesh = Mesh(np.array(devices), (AXIS,))
    local_model = ConvNet(tuple(c["widths"]), c["bn_momentum"], None)

    @jax.jit
    def init(key, x):  # one compiled init shared by all runs (axis_name plays no part in it)
        variables = local_model.init(key, x, train=False)
        return variables["params"], variables["batch_stats"], tx.init(variables["params"])

    params, stats, opt_state = jax.device_get(init(jax.random.PRNGKey(c["seed"]), x_train[:2]))
    copies = lambda tree: jax.tree.map(lambda a: np.stack([a] * n), tree)  # noqa: E731
    place = lambda tree, spec: jax.device_put(tree, NamedSharding(mesh, spec))  # noqa: E731
    runs = {}
    for style in STYLES:
        for sync in (True, False):
            model = local_model.clone(axis_name=AXIS) if sync else local_model
            # The state starts where the step leaves it, so the step compiles once.
            if style == "shard_map":
                step = shard_map_step(model, tx, mesh, global_batch)
                state = TrainState(place(params, P()), place(copies(stats), P(AXIS)), place(opt_state, P()))
            else:
                step = pmap_step(model, tx, devices, global_batch)
                state = place(copies(TrainState(params, stats, opt_state)), P(AXIS))
            runs[f"{style}_{'sync' if sync else 'local'}"] = [step, state, style]

    rs = np.random.RandomState(c["seed"])
    order, position = rs.permutation(len(y_train)), 0
    losses = {name: [] for name in runs}
    for i in tqdm(range(1, c["steps"] + 1), desc="sync_bn", leave=False, disable=None):
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
            tqdm.write(f"step {i:4d}  " + "  ".join(f"{name} {losses[name][-1]:.4f}" for name in runs))

    summary: dict[str, Any] = {"devices": n, "global_batch": global_batch, "steps": c["steps"]}
    evaluate = jax.jit(lambda p, s, x: local_model.apply({"params": p, "batch_stats": s}, x, train=False))
    for name, (step, state, style) in runs.items():
        params = jax.device_get(state.params)
        if style == "pmap":
            params = jax.tree.map(lambda a: a[0], params)
        stats = jax.tree.map(lambda s: np.asarray(s).mean(0), state.batch_stats)
        logits = evaluate(params, stats, x_test)
        summary[f"{name}_final_loss"] = losses[name][-1]
        summary[f"{name}_test_accuracy"] = float(np.mean(np.argmax(np.asarray(logits), -1) == y_test))
    for name in runs:
        print(f"{name:16s} final loss {summary[f'{name}_final_loss']:.4f}  test accuracy {summary[f'{name}_test_accuracy']:.4f}")

    with open(out_dir / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", *(f"{name}_loss" for name in runs)])
        for i in range(c["steps"]):
            w.writerow([i + 1, *(f"{losses[name][i]:.6f}" for name in runs)])
    plot(losses, summary, n, devices[0].platform, out_dir / "sync_bn.png")
    return summary


def plot(losses: dict, summary: dict, n: int, platform: str, path: pathlib.Path) -> None:
    import flax
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2), gridspec_kw={"width_ratios": [2, 1]})
    for name, values in losses.items():
        a.plot(np.arange(1, len(values) + 1), values, label=name, lw=1, ls="-" if "sync" in name else "--")
    a.set_xlabel("step")
    a.set_ylabel("training loss")
    a.set_yscale("log")
    a.legend(fontsize=7)
    names = list(losses)
    bars = b.bar(range(len(names)), [summary[f"{k}_test_accuracy"] for k in names], color=["C0", "C1", "C2", "C3"])
    b.bar_label(bars, fmt="%.3f", fontsize=7)
    b.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
    b.set_ylabel("test accuracy")
    b.set_ylim(0, 1)
    fig.suptitle(f"digits, {n} {platform} devices x {summary['global_batch'] // n} examples; "
                 f"jax {jax.__version__}, flax {flax.__version__}", fontsize=8)
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
    try:  # fake CPU devices when there is no accelerator (no effect on GPU/TPU)
        jax.config.update("jax_num_cpu_devices", int(config["devices"]))
    except RuntimeError:  # JAX already started in this process: use the devices it has
        pass
    return run(config, a.out)


if __name__ == "__main__":
    main()
