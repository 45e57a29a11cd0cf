"""RESULTS-accelerators.md and RESULTS-accelerators.png from benchmarks/accelerators.py's rows."""

from __future__ import annotations

import math
from pathlib import Path

from benchmarks import plans

FLAX = "flax.linen"
JBN = "jbn"
CASE_TITLES = {
    "train_fwd": "training forward",
    "train_fwd_bwd": "training forward+backward (jax.vjp)",
    "eval_fwd": "eval forward",
    "resnet18_step": "ResNet-18 training step (batch 128, 224x224)",
}
ITEMSIZE = {"float32": 4, "bfloat16": 2}


def shape_name(shape) -> str:
    return "x".join(str(s) for s in shape) if shape else "ResNet-18"


def input_bytes(row) -> float | None:
    """N: the bytes of one chip's share of the input (op-level cases)."""
    if not row["shape"]:
        return None
    chips = 4 if row["target"].startswith("TPU") else 1
    return math.prod(row["shape"]) * ITEMSIZE[row["dtype"]] / chips


def groups(rows) -> dict:
    """{(target, case, shape name, dtype): {library: row}}."""
    out: dict = {}
    for row in rows:
        key = (row["target"], row["case"], shape_name(row["shape"]), row["dtype"])
        out.setdefault(key, {})[row["library"]] = row
    return out


def ratio(row, flax_row) -> float | None:
    if flax_row is None or not flax_row["hbm_bytes"]:
        return None
    return row["hbm_bytes"] / flax_row["hbm_bytes"]


def _cell(row, flax_row) -> str:
    n = input_bytes(row)
    size = f"{row['hbm_bytes'] / n:.2f}N" if n else f"{row['hbm_bytes'] / 1e9:.2f} GB"
    r = ratio(row, flax_row)
    r_text = f" ({r:.2f}x)" if r is not None and row["library"] != FLAX else ""
    return f"{size}{r_text} · {row['kernels']} k"


def target_rows(rows) -> list[dict]:
    """jbn against flax's default per (target, case, shape, dtype): the issue's targets."""
    out = []
    for (target, case, shape, dtype), by_library in groups(rows).items():
        jbn, flax = by_library.get(JBN), by_library.get(FLAX)
        if jbn is None or flax is None:
            continue
        out.append(
            dict(
                target=target,
                case=case,
                shape=shape,
                dtype=dtype,
                bytes_ratio=ratio(jbn, flax),
                kernels=jbn["kernels"],
                flax_kernels=flax["kernels"],
                meets=jbn["hbm_bytes"] <= flax["hbm_bytes"]
                and (case == "resnet18_step" or jbn["kernels"] <= flax["kernels"] + 1),
            )
        )
    return out


def markdown(results) -> str:
    info, rows = results["machine"], results["rows"]
    libraries = list(dict.fromkeys(r["library"] for r in rows))
    lines = [
        "# Accelerator plans: HBM bytes and kernels, compiled without an accelerator",
        "",
        "Written by `make bench-accelerators` (benchmarks/accelerators.py); nothing here ran on a TPU or a GPU. "
        "Each case is compiled by XLA's TPU or GPU compiler on a CPU-only machine (deviceless ahead-of-time "
        "compilation) and the compiled program is read:",
        "",
        "- **TPU v5e**: bytes are XLA's own cost analysis (`bytes accessed`, per chip; TPU layouts pad the minor "
        "dimension to 128 lanes, so C = 64 costs twice its size); 4 chips, inputs split along the batch.",
        "- **H100, H200**: bytes are a model, an **upper bound**: every kernel of the compiled entry computation "
        "charged its operands plus its results (a kernel reading a slice of an operand is charged all of it; "
        "nothing is assumed to stay in L2). One device.",
        "- `N` is one chip's share of the input in bytes; `k` is kernels launched; `(r x)` is bytes over "
        "flax.linen.BatchNorm's (default options) in the same case. Not timings: bytes moved are what a "
        "memory-bound layer's time follows.",
        "",
        f"Command: `{info['command']}` · {info['date']} · total {info.get('total_s', '?')} s of compilation on "
        f"{info['cores']} cores ({info['cpu']})",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()),
        "",
        "Targets:",
        "",
    ]
    for name, text in info["targets"].items():
        lines.append(f"- {text}")
        if name in plans.GPU_CONFIGS:
            lines.append(f"  (published figures: {_gpu_figures(plans.GPU_CONFIGS[name].read_text())})")
    lines += ["", "## jbn against flax's default (the targets)", ""]
    lines += [
        "Target on TPU v5e and H100: bytes <= flax's in every op-level case and the ResNet-18 step; kernels <= "
        "flax's + 1 in the op-level cases.",
        "",
        "| target | case | shape | dtype | jbn bytes / flax | jbn kernels | flax kernels | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    targets = target_rows(rows)
    for t in targets:
        r = "-" if t["bytes_ratio"] is None else f"{t['bytes_ratio']:.2f}"
        lines.append(
            f"| {t['target']} | {CASE_TITLES[t['case']]} | {t['shape']} | {t['dtype']} | {r} | {t['kernels']} | "
            f"{t['flax_kernels']} | {'yes' if t['meets'] else '**no**'} |"
        )
    met = sum(t["meets"] for t in targets)
    lines += ["", f"Met in {met} of {len(targets)} cases.", ""]
    lines += ["## Every library", ""]
    grouped = groups(rows)
    for target in dict.fromkeys(r["target"] for r in rows):
        for case in CASE_TITLES:
            keys = [k for k in grouped if k[0] == target and k[1] == case]
            if not keys:
                continue
            present = [lib for lib in libraries if any(lib in grouped[k] for k in keys)]
            lines += [f"### {target}: {CASE_TITLES[case]}", ""]
            lines.append("| shape | dtype | " + " | ".join(present) + " |")
            lines.append("|---|---|" + "---|" * len(present))
            for k in keys:
                flax_row = grouped[k].get(FLAX)
                cells = [_cell(grouped[k][lib], flax_row) if lib in grouped[k] else "-" for lib in present]
                lines.append(f"| {k[2]} | {k[3]} | " + " | ".join(cells) + " |")
            lines.append("")
            extra = _extra_table(target, keys, grouped, present)
            lines += extra
    lines += ["![jbn's bytes over flax's per case](RESULTS-accelerators.png)", ""]
    return "\n".join(lines)


def _extra_table(target, keys, grouped, present) -> list[str]:
    """Estimated time (TPU) and compiled temporary memory per library."""
    out = ["<details><summary>estimated time (TPU cost model) and temp memory</summary>", ""]
    out.append("| shape | dtype | " + " | ".join(present) + " |")
    out.append("|---|---|" + "---|" * len(present))
    for k in keys:
        cells = []
        for lib in present:
            row = grouped[k].get(lib)
            if row is None:
                cells.append("-")
                continue
            est = f"{1e6 * row['estimated_s']:.0f} us · " if row.get("estimated_s") else ""
            temp = row.get("temp_bytes")
            cells.append(est + (f"temp {temp / 2**20:.1f} MiB" if temp is not None else "temp -"))
        out.append(f"| {k[2]} | {k[3]} | " + " | ".join(cells) + " |")
    out += ["", "</details>", ""]
    return out


def _gpu_figures(proto: str) -> str:
    wanted = ("core_count", "memory_bandwidth", "l2_cache_size", "clock_rate_ghz", "device_memory_size")
    found = []
    for line in proto.splitlines():
        key, _, value = line.strip().partition(": ")
        if key in wanted:
            found.append(f"{key} {value}")
    return ", ".join(found)


def chart(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = target_rows(results["rows"])
    names = list(dict.fromkeys(t["target"] for t in targets))
    fig, axes = plt.subplots(len(names), 1, figsize=(12, 3.2 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        mine = [t for t in targets if t["target"] == name and t["bytes_ratio"] is not None]
        labels = [f"{t['case']}\n{t['shape']} {t['dtype'][:4]}" for t in mine]
        values = [t["bytes_ratio"] for t in mine]
        colors = ["tab:green" if t["meets"] else "tab:red" for t in mine]
        ax.bar(range(len(values)), values, color=colors)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(values)), labels, rotation=90, fontsize=6)
        ax.set_ylabel("jbn bytes / flax")
        ax.set_title(f"{name}: jbn's HBM bytes over flax.linen's (green: target met)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results, out: Path) -> None:
    (out / "RESULTS-accelerators.md").write_text(markdown(results))
    chart(results, out / "RESULTS-accelerators.png")
