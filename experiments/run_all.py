"""Run every default config one after the other and record the wall-clock time of each.

    python -m experiments.run_all [--runs-dir runs] [--order-seed-offset K] [NAME ...]

Writes runs/NAME/ for each experiment (as `python -m experiments run configs/NAME.yaml`, plus
criteria.png from experiments/criteria_figures.py)
and runs/timings.csv (experiment, seconds, verdict). With --order-seed-offset K the same
initializations train on other batch orders: the reproducibility reruns (see
experiments/reproducibility.py for the drift between two such sets of runs).
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import time

from experiments import cli, criteria_figures, registry


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.run_all")
    parser.add_argument("names", nargs="*", help="experiments to run (default: all, in report order)")
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--order-seed-offset", type=int, default=0)
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
            writer.writerow(["experiment", "seconds", "order_seed_offset", "finished_utc", "verdict"])
        for name in names:
            start = time.perf_counter()
            result = cli.run_experiment(registry.config_path(name), runs_dir=runs_dir)
            seconds = time.perf_counter() - start
            writer.writerow(
                [
                    name,
                    f"{seconds:.1f}",
                    args.order_seed_offset,
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
