"""One figure per experiment of what its criteria judge: results/NAME/criteria.png.

    python -m experiments.criteria_figures [--results-dir experiments/results] [NAME ...]

Each criterion gets a panel with its per-seed values (the paired difference or ratio when it
compares two arms, seed by seed), their mean with its two-sided 95% Student-t interval (the
median for a criterion judged by a sign test), the
threshold (dashed) and the no-effect line (0 for a difference, 1 for a ratio). Ratios are
drawn on a log axis; every axis includes the no-effect line and the threshold, so none is
truncated away from what is judged. Drawn from the committed quantities.csv and the
config's criteria, and only when the summary was judged on those criteria (same ids and
dates): a figure never pairs new criteria with an older run's numbers.
"""

from __future__ import annotations

import argparse
import pathlib
import re

import numpy as np
from matplotlib import ticker

from experiments import config as cfg
from experiments import protocol, registry, report, reproducibility

NO_EFFECT = {"difference": 0.0, "ratio": 1.0, "log10_ratio": 0.0, None: None}


def judged_on_config(summary: str, criteria: list[dict]) -> bool:
    """Whether the summary's criteria table lists exactly these criteria with these dates."""
    rows = re.findall(r"^\| (?:[^|]*: )?([A-Za-z0-9_.]+) \|.*\| (\d{4}-\d{2}-\d{2}) \|", summary, re.M)
    return sorted(rows) == sorted((c["id"], str(c["fixed"])) for c in criteria)


def axis_label(c: dict) -> str:
    if c["versus"] is None:
        return c["quantity"]
    sign = {"difference": "-", "ratio": "/", "log10_ratio": "log10 of /"}[c["op"]]
    return f"{c['quantity']} {sign} {c['versus']} (paired per seed)"


def draw(name: str, results_dir: pathlib.Path) -> pathlib.Path | None:
    folder = results_dir / name
    if not (folder / "quantities.csv").exists():
        return None
    config = cfg.load(registry.config_path(name), registry.load_module(name).DEFAULTS)
    criteria = config["criteria"]
    if not judged_on_config((folder / "summary.md").read_text(), criteria):
        return None
    quantities = reproducibility.read_quantities(folder / "quantities.csv")
    fig, axes = report.figure(1, len(criteria), width=6.4, height=1.5)
    for ax, c in zip(axes[:, 0], criteria, strict=True):
        if c["quantity"] not in quantities or (c["versus"] is not None and c["versus"] not in quantities):
            ax.text(0.5, 0.5, f"{c['id']}: not measured in this run", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        values = protocol.paired(quantities[c["quantity"]], quantities.get(c["versus"]), c["op"])
        finite = values[np.isfinite(values)]
        jitter = np.linspace(-0.25, 0.25, values.size)
        ax.plot(values, jitter, "o", ms=3, alpha=0.6, color="C0", label="seeds")
        if c["test"] == "sign" and finite.size:  # the sign test judges the median
            ax.plot([np.median(finite)], [0.0], "D", color="k", label="median (sign test)")
        elif finite.size >= 2:
            s = protocol.summarize(finite)
            ax.errorbar(
                [s.mean],
                [0.0],
                xerr=[[s.mean - s.low], [s.high - s.mean]],
                fmt="D",
                color="k",
                capsize=4,
                label="mean, 95% CI",
            )
        ax.axvline(c["threshold"], color="C3", ls="--", lw=1, label=f"threshold ({c['compare']} {c['threshold']:g})")
        reference = NO_EFFECT[c["op"]] if c["versus"] is not None else None
        if reference is not None:
            ax.axvline(reference, color="gray", lw=1, label="no effect")
        shown = [*finite, c["threshold"], *([] if reference is None else [reference])]
        if c["op"] == "ratio" and min(shown) > 0:
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        low, high = min(shown), max(shown)
        pad = 0.08 * (high - low or abs(high) or 1.0)
        ax.set_xlim(
            low / 1.15 if ax.get_xscale() == "log" else low - pad,
            high * 1.15 if ax.get_xscale() == "log" else high + pad,
        )
        ax.set_ylim(-0.6, 0.6)
        ax.set_yticks([])
        ax.set_ylabel("seeds\n(or rounds)", fontsize=7)
        ax.set_xlabel(axis_label(c), fontsize=7)
        ax.set_title(c["id"], fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=6, loc="best")
    return report.save_figure(fig, folder, "criteria.png")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.criteria_figures")
    parser.add_argument("names", nargs="*")
    parser.add_argument("--results-dir", default=str(registry.ROOT / "experiments" / "results"))
    args = parser.parse_args(argv)
    for name in args.names or [e.name for e in registry.EXPERIMENTS]:
        path = draw(name, pathlib.Path(args.results_dir))
        print(f"{name}: {path or 'skipped (no results judged on the current criteria)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
