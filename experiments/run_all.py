"""Run every default config one after the other and record the wall-clock time of each.

    python -m experiments.run_all [--runs-dir runs] [--order-seed-offset K] [--init-and-order-seed-offset K] [NAME ...]

Writes runs/NAME/ for each experiment (as `python -m experiments run configs/NAME.yaml`, plus
criteria.png from experiments/criteria_figures.py)
and runs/timings.csv (experiment, seconds, verdict). With --order-seed-offset K the same
initializations train on other batch orders; with --init-and-order-seed-offset K every judged
seed moves by K, so both the initializations and the batch orders are new (the data set, its
test split and the tuning seeds that choose learning rates stay the same). Either gives a
reproducibility rerun: experiments/reproducibility.py reports the drift between two sets of runs.
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import time

from experiments import cli, criteria_figures, registry
from experiments import config as cfg


def seed_overrides(name: str, offset: int) -> list[str]:
    """Config overrides ("key=value") that move every judged seed of experiment `name` by `offset`."""
    if offset == 0:
        return []
    config = cfg.load(registry.config_path(name), registry.load_module(name).DEFAULTS)
    out = []
    for key in cfg.JUDGED_SEED_KEYS:
        if key in config:
            value = config[key]
            moved = [int(v) + offset for v in value] if isinstance(value, list) else int(value) + offset
            out.append(f"{key}={moved}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.run_all")
    parser.add_argument("names", nargs="*", help="experiments to run (default: all, in report order)")
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument(
        "--order-seed-offset", type=int, default=0, help="move every data-order seed by K (same initializations)"
    )
    parser.add_argument(
        "--init-and-order-seed-offset",
        type=int,
        default=0,
        help="move every judged seed by K: new initializations and new data orders",
    )
    args = parser.parse_args(argv)
    cli._use_eight_cpu_devices()
    from experiments import training

    training.ORDER_SEED_OFFSET = args.order_seed_offset
    names = args.names or [e.name for e in registry.EXPERIMENTS]
    runs_dir = pathlib.Path(args.runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    path = runs_dir / "timings.csv"
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(
                ["experiment", "seconds", "order_seed_offset", "init_and_order_seed_offset", "finished_utc", "verdict"]
            )
        for name in names:
            start = time.perf_counter()
            overrides = seed_overrides(name, args.init_and_order_seed_offset)
            result = cli.run_experiment(registry.config_path(name), overrides, runs_dir=runs_dir)
            seconds = time.perf_counter() - start
            writer.writerow(
                [
                    name,
                    f"{seconds:.1f}",
                    args.order_seed_offset,
                    args.init_and_order_seed_offset,
                    time.strftime("%H:%M:%S", time.gmtime()),
                    result["verdict"],
                ]
            )
            f.flush()
            print(f"{name}: {seconds:.0f} s, {result['verdict']}", flush=True)
            try:  # the judged quantities as a figure; a failure here must not cost the run's results
                criteria_figures.draw(name, runs_dir)
            except Exception as error:
                print(f"{name}: criteria figure not drawn ({type(error).__name__}: {error})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
