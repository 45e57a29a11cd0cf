"""Drift between two sets of runs of the default configs: a run against its rerun with other
data orders (`run_all --order-seed-offset K`) or with other initializations and data orders
(`run_all --init-and-order-seed-offset K`).

    python -m experiments.reproducibility RUNS_A RUNS_B [--out experiments/results/reproducibility.md]

For every experiment found in both folders, every criterion of its config is decided again
from each run's quantities.csv, and the report lists, per criterion: the mean of the
criterion's per-seed values in each run, the drift (B - A), the drift in units of the
run-A sample SD, and whether the verdict of the criterion is the same; and, per experiment,
the judged seeds of each run (from its resolved config.yaml), so the report says what varied.
"""

from __future__ import annotations

import argparse
import csv
import pathlib
from collections import defaultdict

import numpy as np
import yaml

from experiments import config as cfg
from experiments import protocol, registry, report


def read_quantities(path: pathlib.Path) -> dict[str, np.ndarray]:
    values: dict[str, list] = defaultdict(list)
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            values[row["quantity"]].append(float(row["value"]))
    return {k: np.asarray(v) for k, v in values.items()}


def judged_seeds(run_dir: pathlib.Path) -> dict:
    """{key: value} of the judged-seed keys in a run's resolved config.yaml ({} if it has none)."""
    path = run_dir / "config.yaml"
    if not path.exists():
        return {}
    config = yaml.safe_load(path.read_text()) or {}
    return {k: config[k] for k in cfg.JUDGED_SEED_KEYS if k in config}


def seed_lines(runs_a: pathlib.Path, runs_b: pathlib.Path) -> list[str]:
    """One markdown line per experiment with results in both folders: its judged seeds in A and in B."""
    lines = []
    for e in registry.EXPERIMENTS:
        if not ((runs_a / e.name / "quantities.csv").exists() and (runs_b / e.name / "quantities.csv").exists()):
            continue
        a, b = judged_seeds(runs_a / e.name), judged_seeds(runs_b / e.name)
        what = (
            "the same judged seeds (only the data order can differ)"
            if a == b
            else "new initializations and data orders"
        )
        fmt = "; ".join
        lines.append(
            f"- {e.number} {e.name}: {what}. A: {fmt(f'{k} {v}' for k, v in a.items())}; "
            f"B: {fmt(f'{k} {v}' for k, v in b.items())}"
        )
    return lines


def compare(runs_a: pathlib.Path, runs_b: pathlib.Path) -> tuple[str, list[dict]]:
    rows, lines = [], []
    for e in registry.EXPERIMENTS:
        qa, qb = runs_a / e.name / "quantities.csv", runs_b / e.name / "quantities.csv"
        if not (qa.exists() and qb.exists()):
            lines.append((e.number, e.name, "not rerun", "", "", "", "", ""))
            continue
        criteria = cfg.load(registry.config_path(e.name), registry.load_module(e.name).DEFAULTS)["criteria"]
        oa = protocol.judge(criteria, read_quantities(qa))
        ob = protocol.judge(criteria, read_quantities(qb))
        for a, b in zip(oa, ob):
            sd = a.summary.sd
            drift = b.summary.mean - a.summary.mean
            rows.append(
                {
                    "experiment": e.name,
                    "criterion": a.criterion["id"],
                    "mean_a": a.summary.mean,
                    "mean_b": b.summary.mean,
                    "drift": drift,
                    "drift_over_sd": drift / sd if sd and np.isfinite(sd) and sd > 0 else np.nan,
                    "holds_a": a.mark,
                    "holds_b": b.mark,
                }
            )
            lines.append(
                (
                    e.number,
                    e.name,
                    a.criterion["id"],
                    f"{a.summary.mean:+.4g}",
                    f"{b.summary.mean:+.4g}",
                    f"{drift:+.3g}",
                    "n/a" if not np.isfinite(rows[-1]["drift_over_sd"]) else f"{rows[-1]['drift_over_sd']:+.2f}",
                    f"{a.mark} -> {b.mark}" + ("" if a.mark == b.mark else " **(flips)**"),
                )
            )
    table = report.markdown_table(
        ["#", "experiment", "criterion", "mean, run A", "mean, run B", "drift B - A", "drift / SD(A)", "holds: A -> B"],
        lines,
    )
    return table, rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.reproducibility")
    parser.add_argument("runs_a")
    parser.add_argument("runs_b")
    parser.add_argument("--out", default="experiments/results/reproducibility.md")
    parser.add_argument("--note", default="", help="a paragraph under the title: what differs between the runs")
    args = parser.parse_args(argv)
    table, rows = compare(pathlib.Path(args.runs_a), pathlib.Path(args.runs_b))
    flips = sum(r["holds_a"] != r["holds_b"] for r in rows)
    text = (
        f"# Reproducibility: run A ({args.runs_a}) vs run B ({args.runs_b})\n\n"
        + (f"{args.note}\n\n" if args.note else "")
        + f"Every criterion decided again on each run's per-seed quantities; {len(rows)} criteria compared, "
        f"{flips} change their outcome.\n\n{table}\n\nJudged seeds of each run:\n\n"
        + "\n".join(seed_lines(pathlib.Path(args.runs_a), pathlib.Path(args.runs_b)))
        + "\n"
    )
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    report.write_rows(out.with_suffix(".csv"), rows)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
