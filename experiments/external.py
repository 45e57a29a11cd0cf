"""Reports for experiment modules that come from other issues and write no summary.md.

`experiments/sync_bn.py` (experiment 10, from the sync issue) exposes `DEFAULTS` and
`run(config, out_dir)`, writes metrics.csv and sync_bn.png, and returns its numbers. The
CLI then calls the report function registered here, which states the claim and the
criteria and writes summary.md with a verdict computed from those numbers, like every
other experiment. TINY holds the few-step settings of these modules.
"""
from __future__ import annotations

import csv
import pathlib

import numpy as np

from experiments import report

TINY = {"sync_bn": {"steps": 3, "log_every": 1}}

SYNC_CLAIM = (
    "With a few examples per device, normalizing with statistics synchronized over all devices (the global batch) "
    "trains better than normalizing each device's small batch on its own (Wu & He 2018; Ioffe & Szegedy 2015)."
)
RUNS = ("shard_map_sync", "shard_map_local", "pmap_sync", "pmap_local")


def _late_losses(out_dir: pathlib.Path, fraction: float = 0.2) -> dict[str, float]:
    """Mean training loss of each run over the last `fraction` of the steps (metrics.csv)."""
    with open(out_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    tail = rows[-max(1, int(len(rows) * fraction)) :]
    return {name: float(np.mean([float(r[f"{name}_loss"]) for r in tail])) for name in RUNS}


def sync_bn(config: dict, result: dict, out_dir: pathlib.Path) -> dict:
    """summary.md for experiment 10 from the numbers `experiments.sync_bn.run` returned."""
    out_dir = pathlib.Path(out_dir)
    acc = {name: result[f"{name}_test_accuracy"] for name in RUNS}
    late = _late_losses(out_dir)
    table = report.markdown_table(
        ["run", "test accuracy", "mean training loss, last 20% of steps"],
        [(name, f"{acc[name]:.3f}", f"{late[name]:.3f}") for name in RUNS],
    )
    checks = []
    for style in ("shard_map", "pmap"):
        s, l = f"{style}_sync", f"{style}_local"
        checks.append(report.Check(f"{style}: synchronized statistics give a higher test accuracy than per-device ones",
                                   bool(acc[s] > acc[l]), f"{acc[s]:.3f} vs {acc[l]:.3f}"))
        checks.append(report.Check(f"{style}: synchronized statistics give a lower training loss over the last 20% of steps",
                                   bool(late[s] < late[l]), f"{late[s]:.3f} vs {late[l]:.3f}"))
    figures = sorted(out_dir.glob("*.png"))
    n, per_device = result.get("devices"), config.get("per_device_batch")
    setup = (
        f"experiments/sync_bn.py (from the sync issue): a conv net {config.get('widths')} on the 8x8 digits, {n} devices "
        f"(fake CPU devices on a CPU-only machine) x {per_device} examples per device (global batch "
        f"{result.get('global_batch')}), Adam lr {config.get('learning_rate')}, {config.get('steps')} steps, BN momentum "
        f"{config.get('bn_momentum')}, one initialization (seed {config.get('seed')}) shared by the four runs, the same "
        f"batches for all. sync = jbn.BatchNorm(axis_name=...) over the devices; local = each device's own statistics "
        f"(running statistics averaged over the devices before evaluation). One seed: no spread over seeds."
    )
    _, v = report.write_summary(
        out_dir, title="10. Sync BN across devices", claim=SYNC_CLAIM, setup=setup, table=table, checks=checks,
        figures=figures, command=f"{report.command_for('sync_bn')} --override per_device_batch={per_device}",
    )
    return report.result("sync_bn", out_dir, v, table, figures, checks)


REPORTS = {"sync_bn": sync_bn}
