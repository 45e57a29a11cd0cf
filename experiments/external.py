"""Reports for experiment modules that come from other issues and write no summary.md.

`experiments/sync_bn.py` (experiment 10, from the sync issue) exposes `DEFAULTS` and
`run(config, out_dir)`, writes metrics.csv and sync_bn.png, and returns its numbers. The
CLI then calls the report function registered here, which states the claim and the
criteria and writes summary.md with a verdict computed from those numbers, like every
other experiment. TINY holds the few-step settings of these modules.
"""
from __future__ import annotations

import pathlib

from experiments import report

TINY = {"sync_bn": {"steps": 3, "log_every": 1, "per_device_batch": [2, 4], "seeds": [0, 1]}}

SYNC_CLAIM = (
    "With a few examples per device, normalizing with statistics synchronized over all devices (the global batch) "
    "trains better than normalizing each device's small batch on its own (Wu & He 2018; Ioffe & Szegedy 2015)."
)
RUNS = ("shard_map_sync", "shard_map_local", "pmap_sync", "pmap_local")


def sync_bn(config: dict, result: dict, out_dir: pathlib.Path) -> dict:
    """summary.md for experiment 10 from the numbers `experiments.sync_bn.run` returned.

    Each criterion is noise-aware: sync must beat local by more than the two arms'
    standard deviations over the seeds combined (mean gap > std_sync + std_local).
    """
    out_dir = pathlib.Path(out_dir)
    by_batch = result["by_batch"]
    late_pct = f"{config.get('late_fraction', 0.2):.0%}"
    rows, checks = [], []
    for b, numbers in by_batch.items():
        acc = {name: report.mean_std(numbers[f"{name}_test_accuracy"]) for name in RUNS}
        late = {name: report.mean_std(numbers[f"{name}_late_loss"]) for name in RUNS}
        for style in ("shard_map", "pmap"):
            s, l = f"{style}_sync", f"{style}_local"
            rows.append((b, style, report.fmt_seeds(numbers[f"{s}_test_accuracy"]), report.fmt_seeds(numbers[f"{l}_test_accuracy"]),
                         report.fmt_seeds(numbers[f"{s}_late_loss"]), report.fmt_seeds(numbers[f"{l}_late_loss"])))
            part = f"{b} per device"
            gap, spread = acc[s][0] - acc[l][0], acc[s][1] + acc[l][1]
            checks.append(report.Check(
                f"{b}/device, {style}: sync gives a higher test accuracy than local, by more than the seed spreads combined",
                bool(gap > spread), f"{report.fmt(*acc[s])} vs {report.fmt(*acc[l])} (gap {gap:+.3f}, spreads {spread:.3f})", part=part))
            gap, spread = late[l][0] - late[s][0], late[s][1] + late[l][1]
            checks.append(report.Check(
                f"{b}/device, {style}: sync gives a lower training loss over the last {late_pct} of steps, by more than the seed spreads combined",
                bool(gap > spread), f"{report.fmt(*late[s])} vs {report.fmt(*late[l])} (gap {gap:+.3f}, spreads {spread:.3f})", part=part))
    table = report.markdown_table(
        ["examples per device", "style", "test acc, sync", "test acc, local", f"train loss (last {late_pct}), sync", f"train loss (last {late_pct}), local"],
        rows,
    )
    figures = sorted(out_dir.glob("*.png"))
    n, seeds = result.get("devices"), result.get("seeds")
    setup = (
        f"experiments/sync_bn.py (from the sync issue): a conv net {config.get('widths')} on the 8x8 digits, {n} devices "
        f"(fake CPU devices on a CPU-only machine) x {result.get('per_device_batch')} examples per device, Adam lr "
        f"{config.get('learning_rate')}, {config.get('steps')} steps, BN momentum {config.get('bn_momentum')}, seeds {seeds} "
        f"(each seed: one initialization and one batch order shared by its four runs; the train/test split, "
        f"{config.get('test_fraction'):.0%} test, is the same for all, split seed {config.get('split_seed')}). "
        f"sync = jbn.BatchNorm(axis_name=...) over the devices; local = each device's own statistics (running statistics "
        f"averaged over the devices before evaluation). Train loss = mean per-step training loss over the last {late_pct} "
        f"of the steps. ± is the standard deviation over the seeds."
    )
    notes = (
        "A criterion holds only when the gap exceeds the two arms' seed spreads combined "
        "(mean_sync - mean_local > std_sync + std_local for accuracy, and the other way round for the loss); "
        "a smaller gap is not counted as a difference."
    )
    _, v = report.write_summary(
        out_dir, title="10. Sync BN across devices", claim=SYNC_CLAIM, setup=setup, table=table, checks=checks,
        figures=figures, notes=notes, command=report.command_for("sync_bn"),
    )
    return report.result("sync_bn", out_dir, v, table, figures, checks)


REPORTS = {"sync_bn": sync_bn}
