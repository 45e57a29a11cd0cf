"""A probe: how often is a batch's mean close enough to the running mean to shift its sums by it?

On TPU, XLA computes sums shifted by a vector known before the pass inside the convolution
that produces batch norm's input, but not jbn's exact reduction (benchmarks/tpu_conv_fusion.py).
Sums shifted by the running mean `s` give a variance accurate to the last digits only while the
batch mean is near `s`: jbn's CPU formulation keeps its base within |mean - base|^2 <= 7 var
(its error then grows at most 8-fold over the sum's own rounding). A formulation that used the
running mean where that bound holds, and fell back to the exact reduction where it does not, would
read the convolution's output no more often than flax's, save on the steps it falls back. This
probe trains a network and counts, at every step and layer, whether the bound holds for every
channel, and how accurate the float32 shifted variance is there against float64. Nothing here
changes jbn; it runs on CPU:

    .venv/bin/python -m benchmarks.running_shift      # writes benchmarks/RESULTS-running-shift.md and .json

The network: experiment 5's plain 1-D conv net (16 blocks of 3-tap convolutions with 16
channels, He init, jbn.BatchNorm before each ReLU, 2x max-pool after blocks 1, 3, 5 and 7,
global average pool), on MNIST-1D (`mnist1d.data.make_dataset`'s defaults: 4000 training
sequences of length 40), batch 32, SGD with momentum 0.9 at 0.01 (experiment 5's tuned rate for
BN at batch 32), 1000 updates, per seed a new initialization and data order; BN momentum 0.99
(flax's default) and 0.9; the inputs as generated (about zero mean) and offset by +10 (a data set
that nobody centred: its first layer's batch means start far from the running mean's 0).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

import jbn
from benchmarks import machine

HERE = Path(__file__).resolve().parent
CHANNELS = (16,) * 16
POOL_AFTER = (1, 3, 5, 7)
BATCH = 32
STEPS = 1000
LEARNING_RATE = 0.01
SHIFT_BOUND = 7.0  # |mean - shift|^2 <= 7 var, the CPU formulation's bound on its base
PHASES = ((0, 1), (1, 10), (10, 100), (100, STEPS))  # [first, last) steps reported apart


class ConvNet(nn.Module):
    momentum: float

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """x: (N, L, 1); returns (N, 10) logits; sows each norm's input."""
        for i, c in enumerate(CHANNELS):
            x = nn.Conv(c, (3,), use_bias=False, kernel_init=nn.initializers.he_normal())(x)
            self.sow("intermediates", f"norm_input_{i}", x)
            x = nn.relu(jbn.BatchNorm(use_running_average=not train, momentum=self.momentum, name=f"norm_{i}")(x))
            if i in POOL_AFTER:
                x = nn.max_pool(x, (2,), strides=(2,))
        return nn.Dense(10)(x.mean(axis=1))


def mnist1d() -> tuple[np.ndarray, np.ndarray]:
    from mnist1d.data import make_dataset

    state = np.random.get_state()  # make_dataset seeds NumPy's global generator
    try:
        data = make_dataset()
    finally:
        np.random.set_state(state)
    return data["x"].astype(np.float32)[..., None], data["y"].astype(np.int32)


def train(momentum: float, offset: float, seed: int, x: np.ndarray, y: np.ndarray, progress) -> dict:
    """One run: per (step, layer), the largest |mean - running mean|^2 / var over channels and
    the float32 shifted variance's largest relative error against float64."""
    model = ConvNet(momentum)
    x = x + np.float32(offset)
    variables = model.init(jax.random.key(seed), jnp.asarray(x[:BATCH]), train=False)
    params, stats = variables["params"], variables["batch_stats"]
    optimizer = optax.sgd(LEARNING_RATE, momentum=0.9)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, stats, opt_state, xb, yb):
        def loss_fn(p):
            logits, updates = model.apply(
                {"params": p, "batch_stats": stats}, xb, train=True, mutable=["batch_stats", "intermediates"]
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
            return loss, updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        changes, opt_state = optimizer.update(grads, opt_state, params)
        inputs = [updates["intermediates"][f"norm_input_{i}"][0] for i in range(len(CHANNELS))]
        return optax.apply_updates(params, changes), updates["batch_stats"], opt_state, loss, inputs

    order = np.random.default_rng(seed).permutation
    batches = []
    while len(batches) < STEPS:
        idx = order(len(x))
        batches += [idx[i : i + BATCH] for i in range(0, len(idx) - BATCH + 1, BATCH)]
    exact = jax.jit(lambda vs: [jbn.moments(v, axis=-1).var for v in vs])
    ratio = np.zeros((STEPS, len(CHANNELS)))
    error = np.zeros((STEPS, len(CHANNELS)))
    error_exact = np.zeros((STEPS, len(CHANNELS)))
    error_two_pass = np.zeros((STEPS, len(CHANNELS)))
    losses = np.zeros(STEPS)
    for t in range(STEPS):
        shifts = [np.asarray(stats[f"norm_{i}"]["mean"], np.float64) for i in range(len(CHANNELS))]
        params, stats, opt_state, loss, inputs = step(params, stats, opt_state, x[batches[t]], y[batches[t]])
        losses[t] = float(loss)
        exact_vars = exact(inputs)
        for i, (v, s) in enumerate(zip(inputs, shifts)):
            v64 = np.asarray(v, np.float64).reshape(-1, v.shape[-1])
            mean, var = v64.mean(0), v64.var(0)
            scale = np.maximum(var, np.finfo(np.float64).tiny)
            ratio[t, i] = np.max(np.square(mean - s) / scale)
            d = np.asarray(v, np.float32).reshape(-1, v.shape[-1]) - s.astype(np.float32)
            n = np.float32(d.shape[0])
            a, q = tree_sum(d) / n, tree_sum(np.square(d)) / n
            error[t, i] = np.max(np.abs((q - a * a).astype(np.float64) - var) / scale)
            error_exact[t, i] = np.max(np.abs(np.asarray(exact_vars[i], np.float64) - var) / scale)
            v32 = np.asarray(v, np.float32).reshape(-1, v.shape[-1])
            centred = v32 - tree_sum(v32) / n
            error_two_pass[t, i] = np.max(np.abs((tree_sum(np.square(centred)) / n).astype(np.float64) - var) / scale)
        progress.update(1)
    return {
        "ratio": ratio.tolist(),
        "error": error.tolist(),
        "error_exact": error_exact.tolist(),
        "error_two_pass": error_two_pass.tolist(),
        "loss": losses.tolist(),
    }


def tree_sum(a: np.ndarray) -> np.ndarray:
    """Sum over axis 0 in float32 by pairwise halving, as a reduction tree adds (NumPy's own sum
    over a non-contiguous axis adds row after row, whose error grows with the count)."""
    a = np.asarray(a, np.float32)
    while a.shape[0] > 1:
        if a.shape[0] % 2:
            a = np.concatenate([a, np.zeros_like(a[:1])])
        a = a[0::2] + a[1::2]
    return a[0]


def summarize(runs: list[dict]) -> dict:
    ratio = np.array([r["ratio"] for r in runs])  # (seeds, steps, layers)
    error = np.array([r["error"] for r in runs])
    accepted = ratio <= SHIFT_BOUND
    out = {"accepted": float(accepted.mean()), "phases": {}}
    for name, (first, last) in zip(summary_phases(), PHASES):
        out["phases"][name] = float(accepted[:, first:last].mean())
    # per (seed, layer): the first step from which every later step is accepted
    settled = []
    for s in range(ratio.shape[0]):
        for layer in range(ratio.shape[2]):
            rejected = np.nonzero(~accepted[s, :, layer])[0]
            settled.append(0 if rejected.size == 0 else int(rejected[-1]) + 1)
    out["settled_median"] = float(np.median(settled))
    out["settled_max"] = int(max(settled))
    out["ratio_max_after_100"] = float(ratio[:, 100:].max())
    out["ratio_median_after_100"] = float(np.median(ratio[:, 100:]))
    out["error_max_accepted"] = float(error[accepted].max()) if accepted.any() else None
    out["error_max_exact"] = float(np.array([r["error_exact"] for r in runs]).max())
    out["error_max_two_pass"] = float(np.array([r["error_two_pass"] for r in runs]).max())
    out["final_loss"] = [r["loss"][-1] for r in runs]
    return out


def write(results: dict, out: Path) -> None:
    (out / "RESULTS-running-shift.json").write_text(json.dumps(results))
    info = results["machine"]
    lines = [
        "# How often is the running mean close enough to shift a batch's sums by it?",
        "",
        f"Written by `{info['command']}` (benchmarks/running_shift.py, whose docstring says what was trained) on "
        f"{info['cpu']} ({info['cores']} cores), {info['date']}, {info['total_s']} s. "
        f"Versions: {', '.join(f'{k} {v}' for k, v in info['versions'].items())}.",
        "",
        "A (step, layer) is accepted when every channel's |batch mean - running mean|^2 <= "
        f"{SHIFT_BOUND:g} x its batch variance (the running mean as it was before the step's update). "
        f"Seeds {results['seeds']}; {STEPS} steps x {len(CHANNELS)} layers each. Relative error: the float32 "
        "variance from sums shifted by the running mean (float32 sums over a pairwise tree) against float64, "
        "largest over the accepted (step, layer, channel); beside it, jbn.moments' own on the same inputs (its CPU "
        "formulation), and that of the plain two-pass variance in float32 (the mean, then the mean of squared "
        "deviations from it, both over a pairwise tree), largest over every (step, layer, channel): the rounding "
        "floor of float32 sums over these counts (160-1280 elements per channel).",
        "",
        "| BN momentum, input offset | accepted, all steps | "
        + " | ".join(f"steps {p}" for p in summary_phases())
        + " | settled from step (median, max over seed x layer) | ratio after step 100 (median, max) "
        "| largest relative error where accepted | jbn.moments' largest (CPU) | two-pass largest | final training loss |",
        "|---" * (8 + len(PHASES)) + "|",
    ]
    for arm, s in results["summaries"].items():
        phases = " | ".join(f"{100 * s['phases'][p]:.1f}%" for p in summary_phases())
        losses = ", ".join(f"{v:.3f}" for v in s["final_loss"])
        error = "n/a" if s["error_max_accepted"] is None else f"{s['error_max_accepted']:.1e}"
        lines.append(
            f"| {arm} | {100 * s['accepted']:.1f}% | {phases} | {s['settled_median']:g}, {s['settled_max']} | "
            f"{s['ratio_median_after_100']:.3f}, {s['ratio_max_after_100']:.2f} | {error} | "
            f"{s['error_max_exact']:.1e} | {s['error_max_two_pass']:.1e} | {losses} |"
        )
    (out / "RESULTS-running-shift.md").write_text("\n".join(lines) + "\n")


def summary_phases() -> list[str]:
    return [f"{first}-{last - 1}" for first, last in PHASES]


def main(argv=None) -> dict:
    from tqdm import tqdm

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--momenta", nargs="*", type=float, default=[0.99, 0.9])
    parser.add_argument("--offsets", nargs="*", type=float, default=[0.0, 10.0])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    info = {**machine.describe(), "versions": machine.versions()}
    info["command"] = " ".join(["python -m benchmarks.running_shift", *(argv if argv is not None else [])])
    x, y = mnist1d()
    started = time.perf_counter()
    results: dict = {
        "machine": info,
        "seeds": args.seeds,
        "runs": {},
        "summaries": {},
    }  # runs: layers accepted per step
    arms = [(momentum, offset) for offset in args.offsets for momentum in args.momenta]
    with tqdm(total=len(arms) * len(args.seeds) * STEPS, desc="training") as progress:
        for momentum, offset in arms:
            runs = [train(momentum, offset, seed, x, y, progress) for seed in args.seeds]
            key = f"{momentum:g}, {offset:g}"
            # per seed and step, how many layers were accepted (the per-channel arrays stay out: megabytes)
            results["runs"][key] = [(np.array(r["ratio"]) <= SHIFT_BOUND).sum(axis=1).tolist() for r in runs]
            results["summaries"][key] = summarize(runs)
    info["total_s"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    write(results, args.out)
    return results


if __name__ == "__main__":
    main()
