"""Writing an experiment's outputs: metrics.csv, PNG figures, summary.md with a verdict.

A verdict is never written by hand: an experiment states explicit `Check`s (a criterion in
words, whether the measured numbers meet it, and the numbers), and `verdict` turns them
into "confirmed" (every check holds), "not confirmed" (none holds) or "mixed". A check
whose arm waits for a jbn feature has `passed=None`; it is listed as waiting and left out
of the verdict, and when every check waits the verdict itself is the waiting marker.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import math
import os
import pathlib
import platform
import sys
from typing import Any, Iterable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

CONFIRMED, NOT_CONFIRMED, MIXED = "confirmed", "not confirmed", "mixed"


@dataclasses.dataclass
class Check:
    """One explicit criterion of a verdict.

    Attributes:
      criterion: what must hold, in words with its threshold.
      passed: True/False as measured; None when the arm it needs is waiting.
      measured: the numbers it was decided on (or the waiting marker).
      part: which sub-claim it belongs to when an experiment tests several (e.g. "A");
        each part then gets its own verdict besides the overall one.
    """

    criterion: str
    passed: bool | None
    measured: str
    part: str = ""

    @property
    def mark(self) -> str:
        return {True: "yes", False: "no", None: "waiting"}[self.passed]


def verdict(checks: Sequence[Check]) -> str:
    """confirmed / not confirmed / mixed from the decided checks (see module docstring)."""
    decided = [c.passed for c in checks if c.passed is not None]
    if not decided:
        waits = sorted({c.measured for c in checks})
        return "; ".join(waits) if waits else "no checks"
    result = CONFIRMED if all(decided) else NOT_CONFIRMED if not any(decided) else MIXED
    waiting = len(checks) - len(decided)
    if waiting:
        result += f" ({waiting} of {len(checks)} checks waiting for a feature)"
    return result


def verdicts_by_part(checks: Sequence[Check]) -> dict[str, str]:
    """{part: verdict of that part's checks} for experiments that test several sub-claims."""
    parts = list(dict.fromkeys(c.part for c in checks if c.part))
    return {p: verdict([c for c in checks if c.part == p]) for p in parts}


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and (population) standard deviation, ignoring NaN; (nan, nan) when empty."""
    v = np.asarray(list(values), dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std())


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
            writer.writerow({**{"status": "ok"}, **{k: ("" if v is None else v) for k, v in r.items()}})
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
        ax.fill_between(x, np.nanmin(values, axis=1), np.nanmax(values, axis=1), color=line.get_color(), alpha=0.2, lw=0)
    return line


def write_summary(
    out_dir: pathlib.Path,
    *,
    title: str,
    claim: str,
    setup: str,
    table: str,
    checks: Sequence[Check],
    figures: Sequence[pathlib.Path],
    notes: str = "",
    command: str = "",
) -> tuple[pathlib.Path, str]:
    """summary.md: claim, setup, numbers, the criteria with their outcome, the verdict.

    Returns (path, verdict).
    """
    result = verdict(checks)
    crit = markdown_table(["criterion", "measured", "holds"], [(c.criterion, c.measured, c.mark) for c in checks])
    figs = "\n".join(f"![{p.stem}]({p.name})" for p in figures)
    waiting = [c for c in checks if c.passed is None]
    waiting_note = ""
    if waiting:
        waiting_note = (
            "\n\nChecks marked `waiting` need a jbn feature that has not landed yet; they are left out "
            "of the verdict and no number is reported for them."
        )
    parts = verdicts_by_part(checks)
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

The verdict is computed from the criteria below: *confirmed* when every decided criterion
holds, *not confirmed* when none holds, *mixed* otherwise.{waiting_note}

{crit}
{notes and chr(10) + notes + chr(10)}
{("Reproduce: `" + command + "`" + chr(10)) if command else ""}
Measured with {versions()}.
"""
    path = pathlib.Path(out_dir) / "summary.md"
    path.write_text(text)
    return path, result


def result(name: str, out_dir: pathlib.Path, verdict_text: str, table: str, figures: Sequence[pathlib.Path], checks: Sequence[Check]) -> dict:
    """The dict an experiment's `run` returns (the CLI prints it)."""
    parts = verdicts_by_part(checks)
    if parts:
        verdict_text += " (" + "; ".join(f"{p}: {v}" for p, v in parts.items()) + ")"
    return {
        "name": name,
        "verdict": verdict_text,
        "table": table,
        "figures": [str(p) for p in figures],
        "summary": str(pathlib.Path(out_dir) / "summary.md"),
        "metrics": str(pathlib.Path(out_dir) / "metrics.csv"),
        "checks": [dataclasses.asdict(c) for c in checks],
    }


def command_for(name: str) -> str:
    return f"python -m experiments run configs/{name}.yaml"


def stderr(*args):
    print(*args, file=sys.stderr)
