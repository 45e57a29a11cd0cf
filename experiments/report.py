"""Writing an experiment's outputs: metrics.csv, quantities.csv, PNG figures, summary.md.

A verdict is never written by hand and no threshold lives here: the experiment measures
per-seed quantities, `experiments.protocol.judge` decides the config's pre-registered
criteria on them, and `write_summary` states each criterion, when it was fixed, what it
measured, its earlier versions with their verdicts, and the verdict. "±" in tables is the
sample standard deviation over seeds (ddof=1).
"""

from __future__ import annotations

import csv
import datetime
import math
import os
import pathlib
import platform
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1), ignoring NaN; SD nan for one value."""
    v = np.asarray(list(values), dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else math.nan)


def fmt(mean: float, std: float | None = None, digits: int = 3) -> str:
    """'0.912 ± 0.010' (or 'n/a' for NaN)."""
    if mean is None or not np.isfinite(mean):
        return "n/a"
    if std is None or not np.isfinite(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def fmt_seeds(values: Iterable[float], digits: int = 3, missing: str = "non-finite") -> str:
    """Mean ± std over seeds of `values`, e.g. '0.912 ± 0.010'.

    Non-finite values (e.g. NaN for a seed that never reached a target) are left out of the
    mean and said so, with `missing` naming what they mean: '600 ± 0 (2 of 3 seeds; 1 never
    reached)', '600 (1 of 3 seeds; 2 never reached)', or 'none of 3 seeds (3 never reached)'.
    """
    values = [float(v) for v in values]
    finite = [v for v in values if np.isfinite(v)]
    n_missing = len(values) - len(finite)
    if n_missing and len(values) > 1:
        if not finite:
            return f"none of {len(values)} seeds ({n_missing} {missing})"
        mean, std = mean_std(finite)
        return f"{fmt(mean, std if len(finite) > 1 else None, digits)} ({len(finite)} of {len(values)} seeds; {n_missing} {missing})"
    mean, std = mean_std(values)
    return fmt(mean, std if len(values) > 1 else None, digits)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; a `|` inside a cell (e.g. |grad|) is escaped so it stays in its cell."""

    def line(cells) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    lines = [line(header), "|" + "|".join("---" for _ in header) + "|"]
    lines += [line(r) for r in rows]
    return "\n".join(lines)


def write_metrics(out_dir: pathlib.Path, rows: Sequence[dict]) -> pathlib.Path:
    """metrics.csv in long format: one row per (arm settings..., seed, step, metric, value).

    Rows of a waiting arm carry the marker in `status` and an empty `value`.
    """
    path = pathlib.Path(out_dir) / "metrics.csv"
    fields: list[str] = []
    for r in rows:
        for k in r:
            if k not in fields:
                fields.append(k)
    if "status" not in fields:
        fields.append("status")
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({"status": "ok", **{k: ("" if v is None else v) for k, v in r.items()}})
    return path


def waiting_rows(status: str, **arm) -> list[dict]:
    """The metrics.csv row of an arm that waits for a feature: the marker, no number."""
    return [{**arm, "seed": "", "step": "", "metric": "", "value": None, "status": status}]


def versions() -> str:
    """Package versions and machine, for every recorded result."""
    import flax
    import jax
    import optax

    import jbn

    return (
        f"python {platform.python_version()}, jax {jax.__version__}, flax {flax.__version__}, "
        f"optax {optax.__version__}, numpy {np.__version__}, jbn {jbn.__version__}; "
        f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores visible, "
        f"backend {jax.default_backend()}; {datetime.date.today().isoformat()}"
    )


def figure(ncols: int = 1, nrows: int = 1, width: float = 4.2, height: float = 3.2):
    """A small figure (saved at low dpi so committed PNGs stay small)."""
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    return fig, axes


def save_figure(fig, out_dir: pathlib.Path, name: str) -> pathlib.Path:
    path = pathlib.Path(out_dir) / name
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def log_ticks(ax, values: Sequence[float]) -> None:
    """A log-scaled x axis labelled exactly at `values` (no minor tick labels)."""
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    ax.set_xticks(list(values), [f"{v:g}" for v in values])
    ax.xaxis.set_minor_formatter(NullFormatter())


def band(ax, x, values: np.ndarray, label: str, **kw):
    """Plot the mean over seeds (axis 1 of `values`, shape (T, S)) with a min-max band."""
    values = np.asarray(values, dtype=float)
    with np.errstate(all="ignore"):
        mean = np.nanmean(values, axis=1) if values.ndim == 2 else values
    (line,) = ax.plot(x, mean, label=label, **kw)
    if values.ndim == 2 and values.shape[1] > 1:
        ax.fill_between(
            x, np.nanmin(values, axis=1), np.nanmax(values, axis=1), color=line.get_color(), alpha=0.2, lw=0
        )
    return line


def _history_lines(outcomes) -> str:
    """The criteria changed after results existed: each earlier version, its date, reason and verdict."""
    lines = [
        f'- **{o.criterion["id"]}** (until {h["until"]}): was "{h["was"]}", verdict then **{h["verdict"]}**; '
        f"changed because: {h['reason']}. Now (fixed {o.criterion['fixed']}): {o.mark}."
        for o in outcomes
        for h in o.criterion["history"]
    ]
    if not lines:
        return ""
    return "\n\n### Criteria changed after results existed\n\n" + "\n".join(lines)


def _family_note(outcomes) -> str:
    """How the Holm-corrected criteria were decided, when the experiment has any."""
    from experiments import protocol

    family = [o for o in outcomes if o.family]
    if not family:
        return ""
    reasons = "\n".join(f"- **{o.criterion['id']}**: {o.criterion['reason']}" for o in family)
    return (
        f"\n\nThe {len(family)} criteria tested with a p-value (t, sign or permutation) are one family: "
        "each p-value is one-sided, against the null hypothesis that the effect is not beyond the threshold "
        f"(two one-sided tests for `within`), adjusted by Holm's step-down method over the family, and a "
        f"criterion holds when its adjusted p-value is at most {protocol.FAMILY_ALPHA:g} (familywise error "
        f"rate {protocol.FAMILY_ALPHA:g}). Why each threshold is the effect size it is:\n\n{reasons}"
    )


def write_summary(
    out_dir: pathlib.Path,
    *,
    title: str,
    claim: str,
    setup: str,
    table: str,
    outcomes: Sequence,
    figures: Sequence[pathlib.Path],
    quantities: dict | None = None,
    seeds: Sequence[int] | None = None,
    notes: str = "",
    command: str = "",
) -> tuple[pathlib.Path, str]:
    """summary.md (claim, setup, numbers, criteria and verdict) and quantities.csv (the
    per-seed values every criterion was decided on). Returns (path, verdict)."""
    from experiments import protocol

    if quantities is not None:
        write_rows(pathlib.Path(out_dir) / "quantities.csv", protocol.quantity_rows(quantities, seeds))
    result = protocol.verdict(outcomes)
    crit = markdown_table(
        ["id", "criterion", "rule", "fixed", "measured", "holds"],
        [
            (
                (o.criterion["part"] + ": " if o.criterion["part"] else "") + o.criterion["id"],
                o.criterion["says"],
                o.rule,
                o.criterion["fixed"],
                o.measured,
                o.mark,
            )
            for o in outcomes
        ],
    )
    figs = "\n".join(f"![{p.stem}]({p.name})" for p in figures)
    parts = protocol.verdicts_by_part(outcomes)
    part_lines = "".join(f"\n- Part {p}: **{v}**" for p, v in parts.items())
    if part_lines:
        part_lines = "\n\nBy part (each part's criteria alone):" + part_lines
    text = f"""# {title}

**Claim.** {claim}

**Setup.** {setup}

## Results

{table}

{figs}

## Verdict: {result}{part_lines}

The verdict is computed only from the criteria below, written in the config before the run
(`fixed` is the date): *confirmed* when every decided criterion holds, *not confirmed* when
none holds, *mixed* otherwise; *undecided* criteria (too few seeds, an arm not run) are left
out. "95% CI" is the two-sided Student-t interval of the mean over the seeds (sample SD,
ddof=1); "paired" means the difference is taken seed by seed between arms that share the
seed's initialization and data order. Per-seed values: quantities.csv.{_family_note(outcomes)}

{crit}{_history_lines(outcomes)}
{notes and chr(10) + notes + chr(10)}
{("Reproduce: `" + command + "`" + chr(10)) if command else ""}
Measured with {versions()}.
"""
    path = pathlib.Path(out_dir) / "summary.md"
    path.write_text(text)
    return path, result


def write_rows(path: pathlib.Path, rows: Sequence[dict]) -> pathlib.Path:
    """A CSV with the union of the rows' keys as header."""
    fields: list[str] = []
    for r in rows:
        for k in r:
            if k not in fields:
                fields.append(k)
    with pathlib.Path(path).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields or ["empty"])
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return pathlib.Path(path)


def result(
    name: str, out_dir: pathlib.Path, verdict_text: str, table: str, figures: Sequence[pathlib.Path], outcomes: Sequence
) -> dict:
    """The dict an experiment's `run` returns (the CLI prints it)."""
    from experiments import protocol

    parts = protocol.verdicts_by_part(outcomes)
    if parts:
        verdict_text += " (" + "; ".join(f"{p}: {v}" for p, v in parts.items()) + ")"
    return {
        "name": name,
        "verdict": verdict_text,
        "table": table,
        "figures": [str(p) for p in figures],
        "summary": str(pathlib.Path(out_dir) / "summary.md"),
        "metrics": str(pathlib.Path(out_dir) / "metrics.csv"),
        "checks": [
            {
                "id": o.criterion["id"],
                "part": o.criterion["part"],
                "criterion": o.criterion["says"],
                "passed": o.passed,
                "measured": o.measured,
            }
            for o in outcomes
        ],
    }


def finish(
    name: str,
    out_dir,
    config: dict,
    *,
    title: str,
    claim: str,
    setup: str,
    table: str,
    figures,
    quantities: dict,
    seeds=None,
    notes: str = "",
) -> dict:
    """Judge the config's criteria on `quantities`, write summary.md and quantities.csv,
    and return the result dict: the one ending every experiment's `run`."""
    from experiments import protocol

    outcomes = protocol.judge(config["criteria"], quantities)
    _, v = write_summary(
        out_dir,
        title=title,
        claim=claim,
        setup=setup,
        table=table,
        outcomes=outcomes,
        figures=figures,
        quantities=quantities,
        seeds=seeds,
        notes=notes,
        command=command_for(name),
    )
    return result(name, out_dir, v, table, figures, outcomes)


def command_for(name: str) -> str:
    return f"python -m experiments run configs/{name}.yaml"


def stderr(*args):
    print(*args, file=sys.stderr)
