"""Reports for experiment modules that come from other issues and write no summary.md.

`experiments/sync_bn.py` (experiment 10, from the sync issue) exposes `DEFAULTS` and
`run(config, out_dir)`, writes metrics.csv and sync_bn.png, and returns its numbers. The
CLI then calls the report function registered here, which states the claim and the
config's criteria and writes summary.md with a verdict computed from those numbers, like
every other experiment. TINY holds the few-step settings of these modules.
"""

from __future__ import annotations

import pathlib

from experiments import report

TINY = {
    "sync_bn": {
        "steps": 3,
        "log_every": 1,
        "per_device_batch": [2],
        "seeds": [0, 1],
        "learning_rates": [0.01],
        "tuning_seeds": [100],
    }
}

SYNC_CLAIM = (
    "With a few examples per device, normalizing with statistics synchronized over all devices (the global batch) "
    "trains better than normalizing each device's small batch on its own (Wu & He 2018; Ioffe & Szegedy 2015)."
)
RUNS = ("shard_map_sync", "shard_map_local", "pmap_sync", "pmap_local")


def sync_bn(config: dict, result: dict, out_dir: pathlib.Path) -> dict:
    """summary.md for experiment 10 from the numbers `experiments.sync_bn.run` returned.

    The four runs of a seed share its initialization and batch order, so sync and local are
    compared seed by seed (paired); the criteria come from the config's `criteria:` block.
    """
    out_dir = pathlib.Path(out_dir)
    by_batch, rates = result["by_batch"], result["rates"]
    late_pct = f"{config.get('late_fraction', 0.2):.0%}"
    rows, quantities = [], {}
    for b, numbers in by_batch.items():
        for style in ("shard_map", "pmap"):
            s, loc = f"{style}_sync", f"{style}_local"
            rows.append(
                (
                    b,
                    style,
                    f"{rates[b][s]:g}",
                    f"{rates[b][loc]:g}",
                    report.fmt_seeds(numbers[f"{s}_test_accuracy"]),
                    report.fmt_seeds(numbers[f"{loc}_test_accuracy"]),
                    report.fmt_seeds(numbers[f"{s}_late_loss"]),
                    report.fmt_seeds(numbers[f"{loc}_late_loss"]),
                )
            )
            for sync in ("sync", "local"):
                quantities[f"test_acc/b{b}/{style}/{sync}"] = numbers[f"{style}_{sync}_test_accuracy"]
                quantities[f"late_loss/b{b}/{style}/{sync}"] = numbers[f"{style}_{sync}_late_loss"]
    table = report.markdown_table(
        [
            "examples per device",
            "style",
            "rate, sync",
            "rate, local",
            "test acc, sync",
            "test acc, local",
            f"train loss (last {late_pct}), sync",
            f"train loss (last {late_pct}), local",
        ],
        rows,
    )
    tuning = result["tuning"]

    def cell(b, name, lr) -> str:
        return report.fmt_seeds(tuning[b][name][lr]) + (" (chosen)" if lr == rates[b][name] else "")

    table += "\n\nEach run's rate: final validation accuracy per rate on the tuning seeds.\n\n" + report.markdown_table(
        ["examples per device", "Adam rate", *(f"{name}: val acc" for name in RUNS)],
        [
            (b, f"{lr:g}", *(cell(b, name, lr) for name in RUNS))
            for b in tuning
            for lr in next(iter(tuning[b].values()))
        ],
    )
    figures = sorted(out_dir.glob("*.png"))
    n, seeds = result.get("devices"), result.get("seeds")
    setup = (
        f"experiments/sync_bn.py (from the sync issue): a conv net {config.get('widths')} on the 8x8 digits, {n} devices "
        f"(fake CPU devices on a CPU-only machine) x {result.get('per_device_batch')} examples per device, Adam, "
        f"{config.get('steps')} steps, BN momentum {config.get('bn_momentum')}, seeds {seeds} "
        f"(each seed: one initialization and one batch order shared by its four runs, so sync and local are paired; the "
        f"train/validation/test split, {config.get('test_fraction'):.0%} test and {config.get('num_val')} validation "
        f"images, is the same for all, split seed {config.get('split_seed')}). Each run's rate, at each per-device batch, "
        f"is its own: every rate of {config.get('learning_rates')} trains on tuning seeds {config.get('tuning_seeds')}, "
        f"and the one with the best mean final validation accuracy is chosen (experiment zero's procedure); the test "
        f"split is read once per judged run. "
        f"sync = jbn.BatchNorm(axis_name=...) over the devices; local = each device's own statistics (running statistics "
        f"averaged over the devices before evaluation). Train loss = mean per-step training loss over the last {late_pct} "
        f"of the steps. ± is the sample standard deviation over the seeds."
    )
    return report.finish(
        "sync_bn",
        out_dir,
        config,
        title="10. Sync BN across devices",
        claim=SYNC_CLAIM,
        setup=setup,
        table=table,
        figures=figures,
        quantities=quantities,
        seeds=seeds,
    )


REPORTS = {"sync_bn": sync_bn}
