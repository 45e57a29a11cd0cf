"""RESULTS.md and results.png from the measured rows (see benchmarks.run)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from benchmarks import peers, sections

ITEMSIZE = {"float32": 4, "bfloat16": 2}
CASE_TITLES = {
    "train_fwd": "training forward",
    "eval_fwd": "eval forward",
    "train_fwd_bwd": "training forward+backward (jax.vjp)",
}


def shape_name(shape) -> str:
    return "x".join(str(s) for s in shape)


def _groups(speed):
    out = {}
    for row in speed:
        out.setdefault((tuple(row["shape"]), row["dtype"]), {}).setdefault(row["case"], {})[row["library"]] = row
    return out


def bandwidth(row, case, min_traffic) -> float:
    """Achieved GB/s over the minimal traffic of the case."""
    nbytes = min_traffic[case] * math.prod(row["shape"]) * ITEMSIZE[row["dtype"]]
    return nbytes / row["median_s"] / 1e9


def copy_bandwidth(row) -> float:
    return 2 * math.prod(row["shape"]) * ITEMSIZE[row["dtype"]] / row["median_s"] / 1e9


def _cell(row, copy_row, case, min_traffic) -> str:
    ms, lo, hi = (1e3 * row[k] for k in ("median_s", "q25_s", "q75_s"))
    gbs = bandwidth(row, case, min_traffic)
    frac = gbs / copy_bandwidth(copy_row)
    ratio = row.get("ratio_to_flax")
    ratio_text = f" · {ratio:.2f}x" if ratio is not None and row["library"] != "flax.linen" else ""
    return f"{ms:.2f} [{lo:.2f}-{hi:.2f}] · {gbs:.1f} GB/s · {100 * frac:.0f}%{ratio_text}"


def headline(results) -> list[str]:
    """The issue's targets, as measured."""
    lines = []
    ratios = [
        (row["ratio_to_flax"], row)
        for row in results["speed"]
        if row["library"] == "jbn" and row["case"] == "train_fwd_bwd" and row["ratio_to_flax"] is not None
    ]
    if ratios:
        worst, worst_row = max(ratios, key=lambda r: r[0])
        met = sum(r <= 1.0 for r, _ in ratios)
        lines.append(
            f"- Training forward+backward, jbn / flax.linen (median of per-round ratios): "
            f"{', '.join(f'{r:.2f}' for r, _ in ratios)}; <= 1.0 in {met} of {len(ratios)} cases "
            f"(worst {worst:.2f} at {shape_name(worst_row['shape'])} {worst_row['dtype']})."
        )
    for dtype in sorted({m["dtype"] for m in results["memory"]}):
        mem = {m["label"]: m for m in results["memory"] if m["dtype"] == dtype}
        flax = mem.get("flax.linen + jax.nn.relu")
        if flax:
            parts = [
                f"{label}: {m['temp_bytes'] / flax['temp_bytes']:.2f}x"
                for label, m in mem.items()
                if label.startswith("jbn") and "fused=False" not in label
            ]
            lines.append(
                f"- Deep-net training step temp memory ({dtype}) relative to flax.linen: " + "; ".join(parts) + "."
            )
    return lines


def markdown(results, note: str = "") -> str:
    info = results["machine"]
    min_traffic = results["min_traffic"]
    copy_name = results["copy"]
    out = ["# jbn benchmarks", ""]
    out += [
        f"Measured {info['date']} on {info['cpu']} ({info['cores']} usable cores, {info['os']}); "
        f"JAX device: {info['device']}. {info['rounds']} interleaved rounds per case. Command: `{info['command']}`.",
        "",
    ]
    if note:
        out += [note, ""]
    out += ["Versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()) + ".", ""]
    if info.get("skipped"):
        out += [f"Not importable here, skipped: {', '.join(info['skipped'])}.", ""]
    out += ["## Headline", ""] + headline(results) + [""]
    out += [
        "## Speed",
        "",
        "Each cell: median ms per call [interquartile range] · achieved GB/s over the minimal traffic "
        f"({', '.join(f'{CASE_TITLES[c]} {n}N' for c, n in min_traffic.items())} element reads+writes, "
        "N = elements of x) · that as a percentage of the copy bandwidth of a jitted `x + 1` on the same array "
        "measured in the same rounds · time relative to flax.linen (median over rounds of the per-round ratio; "
        "below 1 is faster).",
        "",
    ]
    for (shape, dtype), cases in _groups(results["speed"]).items():
        libraries = [name for name in next(iter(cases.values())) if name != copy_name]
        out += [f"### {shape_name(shape)} {dtype}", ""]
        out += ["| library | " + " | ".join(CASE_TITLES[c] for c in cases) + " |"]
        out += ["|---" * (len(cases) + 1) + "|"]
        for name in libraries:
            cells = [_cell(rows[name], rows[copy_name], case, min_traffic) for case, rows in cases.items()]
            out += [f"| {name} | " + " | ".join(cells) + " |"]
        copy_cells = []
        for rows in cases.values():
            c = rows[copy_name]
            copy_cells.append(f"{1e3 * c['median_s']:.2f} ms · {copy_bandwidth(c):.1f} GB/s")
        out += [f"| {copy_name} | " + " | ".join(copy_cells) + " |", ""]

    losses = [
        row
        for row in results["speed"]
        if row["library"] == "jbn" and row["ratio_to_flax"] is not None and row["ratio_to_flax"] > 1.0
    ]
    out += ["### Where jbn is slower than flax.linen", ""]
    if losses:
        for row in losses:
            out.append(
                f"- {CASE_TITLES[row['case']]}, {shape_name(row['shape'])} {row['dtype']}: {row['ratio_to_flax']:.2f}x"
            )
    else:
        out.append("- none in this run")
    out.append("")

    mem = results["memory"]
    if mem:
        shape, layers = mem[0]["shape"], mem[0]["layers"]
        out += [
            "## Memory",
            "",
            f"`compiled.memory_analysis().temp_size_in_bytes` of the jitted training step (loss, gradients, new "
            f"batch statistics) of a {layers}-block conv3x3-BN-activation net at {shape_name(shape)} (NHWC), the "
            "same convolutions for every library; and what one BN+activation block saves for the backward pass "
            "(`jax.ad_checkpoint.print_saved_residuals`; activation-sized residuals listed).",
            "",
            "| variant | dtype | temp MiB | vs flax.linen | activation-sized residuals per block | "
            "all residual bytes per block | which |",
            "|---|---|---|---|---|---|---|",
        ]
        for dtype in sorted({m["dtype"] for m in mem}):
            rows = [m for m in mem if m["dtype"] == dtype]
            flax = next((m for m in rows if m["label"].startswith("flax.linen")), None)
            for m in rows:
                rel = f"{m['temp_bytes'] / flax['temp_bytes']:.2f}x" if flax else "-"
                which = m["residuals"].replace("|", "/")
                out.append(
                    f"| {m['label']} | {dtype} | {m['temp_bytes'] / 2**20:.1f} | {rel} | {m['activation_residuals']} "
                    f"| {m['residual_bytes'] / 2**20:.2f} MiB | {which} |"
                )
        out.append("")
    out += ["## What ran", ""] + [f"- {name}: {text}" for name, text in peers.NOTES.items()]
    out += [
        "- Memory variants: jbn's fused variants apply the activation inside batch norm; every other variant "
        "applies `jax.nn.relu` after it. `save_output_only` needs an invertible activation, so that variant uses "
        "leaky_relu(0.01) instead of relu.",
        "",
        "## Reading the numbers",
        "",
        "- jbn's training forward sums `x - shift` and `(x - shift)^2` (shift: one sample per feature) so that "
        "the variance stays accurate when |mean| >> std; flax, nnx and haiku sum `x` and `x^2`, which loses the "
        "variance to cancellation there. On XLA:CPU the shifted sums are two passes over `x` where the raw ones "
        "cost about one, which is what jbn pays in the training-forward column. The backward pass then reads "
        "`x` and `dy` for two reductions and once more for `dx`, and writes nothing else, where autodiff "
        "writes centred and normalized copies of `x` (float32, also for bfloat16 inputs).",
        "- Memory on XLA:CPU: the convolution's weight gradient reads a transposed copy of its input that XLA "
        "makes during the forward pass and keeps until the backward pass, for every library. So when jbn keeps "
        "only `y` (`save_output_only`), the convolution still keeps its own copy, and the CPU figure equals the "
        "default's. Where the convolution reads `y` itself (as we expect of cuDNN on GPU; not measured here), "
        "`y` is shared and the saving should show.",
        "- Runs on a busy machine: a round in which another process took the cores slows every library in that "
        "round, so compare libraries by the paired ratio rather than by the medians of different rows.",
        "- Order within a round: a runtime's threads keep spinning for a while after its call (PyTorch's OpenMP "
        "pool most of all) and slow whatever runs next, by about 40 % on 2 cores. So each round runs the "
        "libraries in a new random order, each after a 20 ms pause (benchmarks/timing.py). Runs before "
        "2026-11-23 used a fixed rotating order, which put jbn right after the copy that followed PyTorch in "
        "every round.",
        "",
    ]
    return "\n".join(out)


def chart(results, path: Path) -> None:
    """Time relative to flax.linen per case (log scale), and the deep-net temp memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    groups = _groups(results["speed"])
    short = {"float32": "f32", "bfloat16": "bf16"}
    labels = [f"{shape_name(s)}\n{short.get(d, d)}" for s, d in groups]
    case_names = list(next(iter(groups.values())))
    libraries = [n for n in next(iter(next(iter(groups.values())).values())) if n != results["copy"]]
    fig, axes = plt.subplots(2, 2, figsize=(14, 8.5))
    axes = axes.ravel()
    width = 0.8 / max(len(libraries), 1)
    for ax, case in zip(axes, case_names):
        for i, name in enumerate(libraries):
            values = [groups[g][case][name]["ratio_to_flax"] or np.nan for g in groups]
            ax.bar(np.arange(len(groups)) + i * width, values, width, label=name)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, labels, fontsize=7, rotation=25)
        ax.set_title(CASE_TITLES[case], fontsize=10)
        ax.set_ylabel("time / flax.linen time (log; < 1 is faster)", fontsize=8)
    axes[0].legend(fontsize=7, ncol=2)
    ax = axes[3]
    if results["memory"]:
        dtype = "float32" if any(m["dtype"] == "float32" for m in results["memory"]) else results["memory"][0]["dtype"]
        mem = [m for m in results["memory"] if m["dtype"] == dtype]
        ax.barh(
            range(len(mem)),
            [m["temp_bytes"] / 2**20 for m in mem],
            color=["tab:blue" if m["label"].startswith("jbn") else "tab:gray" for m in mem],
        )
        ax.set_yticks(range(len(mem)), [m["label"] for m in mem], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("MiB", fontsize=8)
        ax.set_title(f"deep-net training step temp memory ({dtype})", fontsize=10)
    else:
        ax.axis("off")
    info = results["machine"]
    fig.suptitle(
        f"jbn benchmarks: {info['device']}, {info['cpu']} ({info['cores']} cores), {info['date']}", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=60)
    plt.close(fig)


def load_json(path: Path):
    """The JSON in `path`, or None where there is no such file."""
    return json.loads(path.read_text()) if path.exists() else None


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def accelerator_status(out: Path) -> list[str]:
    """Which accelerator reports exist next to RESULTS.md (written by benchmarks/device.sh)."""
    found = sorted(p.name for p in out.glob("RESULTS-*.md"))
    if found:
        return ["Accelerator figures: " + ", ".join(f"[{n}]({n})" for n in found) + " (benchmarks/device.sh).", ""]
    return [
        "Accelerator figures: none yet. Every figure below is from XLA:CPU; the GPU/TPU columns (speed against "
        "the bandwidth roofline, memory with cuDNN convolutions) wait for an accelerator, where "
        "`bash benchmarks/device.sh` writes `benchmarks/RESULTS-<device>.md`.",
        "",
    ]


def write(results, out: Path, note: str = "") -> None:
    """RESULTS.md from the op-level results plus whatever model.json / strategies.json /
    floor.json lie in `out`; the figures where matplotlib is installed."""
    model = load_json(out / "model.json")
    # strategies.json (benchmarks.statistics_strategies), then any strategies-*.json (focused reruns)
    strategies = [
        load_json(p) for p in sorted(out.glob("strategies*.json"), key=lambda p: (p.name != "strategies.json", p.name))
    ]
    title, _, body = (markdown(results, note) if results else "# jbn benchmarks\n\n").partition("\n\n")
    parts = [title + "\n", "\n".join(accelerator_status(out)), body]
    if model:
        parts.append(
            "\n".join(
                sections.model_markdown(model) + (["![model-level figure](model.png)", ""] if have_matplotlib() else [])
            )
        )
    parts.extend("\n".join(sections.strategies_markdown(strat)) for strat in strategies)
    floor = load_json(out / "floor.json")
    if floor:
        parts.append("\n".join(sections.floor_markdown(floor)))
    (out / "RESULTS.md").write_text("\n".join(parts))
    if have_matplotlib():
        if results:
            chart(results, out / "results.png")
        if model:
            sections.model_chart(model, out / "model.png")


def save(results: dict, out: Path, name: str, render_report: bool = True) -> None:
    """Write `results` as `out/name` and, unless `render_report` is False, rewrite
    RESULTS.md (and the figures) from every JSON file in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(results, indent=1))
    if render_report:
        render(out)


def render(out: Path) -> None:
    """Rewrite RESULTS.md (and the figures) in `out` from the JSON files there."""
    results = load_json(out / "results.json")
    write(results, out, (results or {}).get("note", ""))


if __name__ == "__main__":  # re-render RESULTS.md and the figures from the JSON files of a folder
    import sys

    source = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results.json")
    render(source.parent if source.suffix == ".json" else source)
