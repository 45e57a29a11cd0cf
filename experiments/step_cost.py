"""Experiment 17: what BN costs per training step, at the sizes these experiments use.

Claim (seed article 000, BN's limitations: "Computational overhead: Batch normalization
involves extra computations"): a training step with BN costs measurably more than one
without, and (the bound a user weighs) not more than half again. Seed article 002's line
that BN was "created to mitigate the computational overhead" is about whitening, not about
BN against no normalization, so it is not tested here. Judged on the median per-round
ratio (exact sign test), since the ratios are heavy-tailed on a shared machine. Measured with the benchmark suite's interleaved timer
(`benchmarks/timing.py`: every variant once per round in a shuffled order, after a short
pause), for whole jitted training steps of the experiments' networks: no norm,
jbn.BatchNorm, and flax.linen.BatchNorm as the peer.
"""

from __future__ import annotations

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import interleaved
from experiments import data as datasets
from experiments import report, significance
from experiments.models import MLP, ConvNet, NormSpec
from experiments.training import init_state, make_optimizer, make_train_step

NAME = "step_cost"
DEFAULTS = {
    # name -> which network, at the batch an experiment trains it with
    "sizes": ["mlp_3x100_b60", "mlp_3x128_b64", "conv_16_32_32_b32"],
    "rounds": 30,  # timing rounds (the "seeds" of this experiment)
    "min_sample_s": 0.005,  # each sample averages back-to-back steps for at least this long
    "settle_s": 0.02,
}
TINY = {"sizes": ["mlp_3x100_b60"], "rounds": 3, "min_sample_s": 0.0005, "settle_s": 0.0}
SIZES = {
    "mlp_3x100_b60": ("mnist1d", "mlp", (100, 100, 100), 60),  # experiments 1, 2
    "mlp_3x128_b64": ("mnist1d", "mlp", (128, 128, 128), 64),  # experiments 8, 12, 14, 16
    "conv_16_32_32_b32": ("digits_image", "conv", (16, 32, 32), 32),  # experiments 3, 15
}
ARMS = {"no norm": "none", "jbn.BatchNorm": "bn", "flax.linen.BatchNorm": "flax_bn"}
KEYS = {"none": "none", "bn": "jbn", "flax_bn": "flax"}

CLAIM = (
    "BN has a computational overhead: a training step with batch norm costs more than one without (seed article 000, "
    "limitations), but less than 1.5x (median per-round ratio)."
)


def step_call(kind: str, size: str):
    """A zero-argument callable running one jitted training step of `size` with norm `kind`."""
    data_name, net, widths, batch = SIZES[size]
    data = datasets.load(data_name)
    spec = NormSpec(kind)
    if net == "mlp":
        model = MLP(widths, data.num_classes, norm=spec)
    else:
        model = ConvNet(widths, data.num_classes, norm=spec, pool_after=(0,))
    opt = make_optimizer("momentum", 0.01)
    x, y = jnp.asarray(data.x_train[:batch]), jnp.asarray(data.y_train[:batch])
    state = init_state(model, opt, jax.random.PRNGKey(0), x)
    step = jax.jit(make_train_step(model, opt))
    key = jax.random.PRNGKey(1)
    return lambda: jax.block_until_ready(step(state, x, y, key))


def ratio_text(ratios: np.ndarray) -> str:
    """The median of per-round ratios with its distribution-free 95% interval (order statistics)."""
    low, high = significance.median_interval(ratios)
    return f"{np.median(ratios):.3f} [{low:.3f}, {high:.3f}]"


def run(config: dict, out_dir: pathlib.Path) -> dict:
    out_dir = pathlib.Path(out_dir)
    timings, rows = {}, []
    for size in config["sizes"]:
        if size not in SIZES:
            raise ValueError(f"`sizes` entry {size!r}: use one of {', '.join(SIZES)}.")
        calls = {arm: step_call(kind, size) for arm, kind in ARMS.items()}
        t = interleaved(
            calls, rounds=config["rounds"], min_sample_s=config["min_sample_s"], settle_s=config["settle_s"]
        )
        for arm, kind in ARMS.items():
            timings[size, kind] = np.asarray(t[arm].samples)
            rows += [
                {"size": size, "arm": kind, "round": i, "metric": "seconds_per_step", "value": float(v)}
                for i, v in enumerate(t[arm].samples)
            ]
    report.write_metrics(out_dir, rows)

    table = report.markdown_table(
        ["size", "arm", "median ms per step (IQR)", "per-round ratio to no norm: median [95% CI]"],
        [
            (
                size,
                arm,
                f"{1e3 * np.median(timings[size, k]):.3f} ({1e3 * np.percentile(timings[size, k], 25):.3f}-"
                f"{1e3 * np.percentile(timings[size, k], 75):.3f})",
                ratio_text(timings[size, k] / timings[size, "none"]),
            )
            for size in config["sizes"]
            for arm, k in ARMS.items()
        ],
    )
    quantities = {}
    for size in config["sizes"]:
        for k in ARMS.values():
            quantities[f"seconds/{size}/{KEYS[k]}"] = timings[size, k]

    fig, axes = report.figure(1, 1, width=5.0)
    ax = axes[0, 0]
    for j, (arm, k) in enumerate(ARMS.items()):
        med = [1e3 * np.median(timings[s, k]) for s in config["sizes"]]
        lo = [1e3 * np.percentile(timings[s, k], 25) for s in config["sizes"]]
        hi = [1e3 * np.percentile(timings[s, k], 75) for s in config["sizes"]]
        xs = np.arange(len(config["sizes"])) + (j - 1) * 0.27
        ax.bar(xs, med, width=0.27, yerr=[np.subtract(med, lo), np.subtract(hi, med)], capsize=2, label=arm)
    ax.set_xticks(range(len(config["sizes"])), config["sizes"], fontsize=7)
    ax.set(ylabel="ms per training step (median, IQR)", title="cost of a training step")
    ax.legend(fontsize=7)
    figures = [report.save_figure(fig, out_dir, "step_cost.png")]
    setup = (
        f"One jitted training step (forward, backward, SGD-momentum update) of each network at the batch an experiment "
        f"trains it with: {', '.join(config['sizes'])} (MLP on MNIST-1D, conv net on the 8x8 digits; the norm before "
        f"each ReLU). benchmarks.timing.interleaved: {config['rounds']} rounds, in each round every arm runs once in a "
        f"shuffled order after a {config['settle_s'] * 1e3:g} ms pause, a sample being the mean of back-to-back steps "
        f"lasting at least {config['min_sample_s'] * 1e3:g} ms. Rounds pair the arms (a slow period of the machine hits "
        f"all arms of a round), so ratios are taken round by round. CPU backend, {os.cpu_count()} cores visible, shared "
        f"with other jobs: absolute times are noisy, the per-round ratios less so. The interval of a median ratio is "
        f"distribution-free (order statistics: coverage at least 95% whatever the ratios' distribution)."
    )
    return report.finish(
        NAME,
        out_dir,
        config,
        title="17. BN's cost per training step",
        claim=CLAIM,
        setup=setup,
        table=table,
        figures=figures,
        quantities=quantities,
        seeds=list(range(config["rounds"])),
    )
