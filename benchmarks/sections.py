"""RESULTS.md sections for the model-level benchmark (model.json) and the statistics
strategies (strategies.json), and the model-level figure (model.png)."""

from __future__ import annotations

from pathlib import Path


def _ms(row) -> str:
    return f"{1e3 * row['median_s']:.1f} [{1e3 * row['q25_s']:.1f}-{1e3 * row['q75_s']:.1f}]"


def _measured(info) -> str:
    return (
        f"Measured {info['date']} on {info['cpu']} ({info['cores']} usable cores); JAX device: {info['device']}; "
        f"{info['rounds']} interleaved rounds. Command: `{info['command']}`. Versions: "
        + ", ".join(f"{k} {v}" for k, v in info["versions"].items())
        + "."
    )


def _sizes(rows):
    out = {}
    for row in rows:
        out.setdefault(row["size"], {})[row["variant"]] = row
    return out


def model_markdown(model: dict, flax: str = "flax.linen") -> list[str]:
    blocks = {row.get("blocks_per_stage", 2) for row in model["rows"]}
    out = ["## Model level: ResNet-18 training step", "", _measured(model["machine"]), ""]
    if blocks != {2}:
        out += [f"**Not ResNet-18: {', '.join(map(str, sorted(blocks)))} basic block(s) per stage (a smoke run).**", ""]
    if model.get("note"):
        out += [model["note"], ""]
    out += [
        "One jitted step of SGD with momentum (optax, lr 0.1, momentum 0.9) on a ResNet-18 (basic blocks, NHWC, "
        "written in benchmarks/model.py; batch-norm momentum 0.9 as flax's ImageNet example), cross-entropy on "
        "random labels. Size `BATCHxHxW:BASE[:stem]`: stage widths BASE x (1, 2, 4, 8); `cifar` stem = 3x3 conv, "
        "`imagenet` stem = 7x7/2 conv and 3x3/2 max-pool. Only the batch norms differ; all variants start from the "
        "same parameters and their first losses agree (column). Time: median ms per step [interquartile range] "
        "and the median over rounds of the per-round ratio to flax.linen. Memory: "
        "`compiled.memory_analysis().temp_size_in_bytes` of the step.",
        "",
        "| size | variant | step ms | vs flax.linen | temp MiB | vs flax.linen | first loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for size, rows in _sizes(model["rows"]).items():
        base = rows.get(flax)
        for variant, row in rows.items():
            ratio = f"{row['ratio_to_flax']:.2f}x" if row.get("ratio_to_flax") is not None and variant != flax else "-"
            mem = f"{row['temp_bytes'] / base['temp_bytes']:.2f}x" if base and variant != flax else "-"
            out.append(
                f"| {size} | {variant} | {_ms(row)} | {ratio} | {row['temp_bytes'] / 2**20:.1f} | {mem} "
                f"| {row['first_loss']:.6f} |"
            )
    out += ["", "Variants:", ""] + [f"- {name}: {text}" for name, text in model["variants"].items()] + [""]
    out += ["Summary (per size, in the table's order):", ""]
    for variant in model["variants"]:
        if variant == flax:
            continue
        times, mems = [], []
        for rows in _sizes(model["rows"]).values():
            if variant in rows and flax in rows:
                times.append(f"{rows[variant]['ratio_to_flax']:.2f}")
                mems.append(f"{rows[variant]['temp_bytes'] / rows[flax]['temp_bytes']:.2f}")
        out.append(f"- {variant}: step time {', '.join(times)} x flax.linen; temp memory {', '.join(mems)} x.")
    out += [
        "",
        "Why the options move the figures as they do (mechanisms, read from the compiled programs on XLA:CPU):",
        "",
        "- Convolutions take most of a step, so batch norm's share of the time bounds what any batch-norm "
        "change can gain at the model level; the narrower the net, the larger that share.",
        "- `save_output_only` keeps the output `y` of a batch norm instead of its input; in a basic block it "
        "applies to the norms without an activation, which feed the residual add. The residuals saved for the "
        "backward pass have the same total size with and without it (`print_saved_residuals` on the whole net, "
        "8x16x16:8: 2.21 MB both; the norm's output replaces the convolution's output), so a higher temp memory "
        "for that variant comes from XLA's buffer assignment, not from what is saved. Not traced further; the "
        "likely buffer is `y` itself, which must now be written on its own instead of being fused into the add "
        "and relu that follow.",
        "",
    ]
    return out


def model_chart(model: dict, path: Path, flax: str = "flax.linen") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    sizes = _sizes(model["rows"])
    variants = [v for v in model["variants"] if v != flax]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / max(len(variants), 1)
    for ax, title, value in (
        (axes[0], "step time / flax.linen (median and IQR of per-round ratios)", lambda r, b: r["ratio_to_flax"]),
        (axes[1], "XLA temp memory / flax.linen", lambda r, b: r["temp_bytes"] / b["temp_bytes"]),
    ):
        for i, variant in enumerate(variants):
            pairs = [(rows[variant], rows[flax]) for rows in sizes.values() if variant in rows and flax in rows]
            vals = [value(r, b) for r, b in pairs]
            err = None
            if ax is axes[0]:  # interquartile range of the per-round ratios
                q = [np.percentile(np.asarray(r["samples"]) / np.asarray(b["samples"]), [25, 75]) for r, b in pairs]
                err = np.abs(np.array([[v - lo, hi - v] for v, (lo, hi) in zip(vals, q)]).T)
            ax.bar(np.arange(len(vals)) + i * width, vals, width, yerr=err, capsize=2, label=variant)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(np.arange(len(sizes)) + 0.4 - width / 2, list(sizes), fontsize=8)
        ax.set_title(title, fontsize=10)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(variants), fontsize=8)
    info = model["machine"]
    fig.suptitle(
        f"ResNet-18 training step: {info['device']}, {info['cpu']} ({info['cores']} cores), {info['date']}", fontsize=9
    )
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=60)
    plt.close(fig)


def _shape(shape) -> str:
    return "x".join(str(s) for s in shape)


def strategies_markdown(strat: dict) -> list[str]:
    methods, speed = strat["methods"], strat["speed"]
    title = "## Statistics strategies for the float32 training forward (XLA:CPU)" + (
        f": {strat['title']}" if strat.get("title") else ""
    )
    out = [title, "", _measured(strat["machine"]), ""]
    if strat.get("note"):
        out += [strat["note"], ""]
    out += [
        "Per-feature mean and variance of a float32 input, all axes but the last reduced, jitted "
        "(benchmarks/statistics_strategies.py describes each method). Statistics alone: median ms [IQR] and the "
        "ratio to `raw` (flax's fast variance); forward (statistics, normalization, running-average update): "
        "median ms [IQR], the ratio to flax.linen.BatchNorm's forward and to a jitted `x + 1` of the same array; "
        "ratios are medians over rounds of per-round ratios, all in the same interleaved shuffled rounds.",
        "",
    ]
    acc = strat["accuracy"]
    shapes = ", ".join(_shape(s["shape"]) for s in speed)
    out += [
        f"Summary, to choose from: the worst variance error over the four data sets below, and per shape ({shapes}) "
        "the forward's time relative to flax.linen's forward and the statistics' time relative to `raw`.",
        "",
        "| method | worst var rel. error | forward / flax.linen | statistics / raw |",
        "|---|---|---|---|",
    ]
    for name in methods:
        worst = max(acc["errors"][lab][name]["var_rel_err"] for lab in acc["errors"])
        fwd = ", ".join(f"{s['rows'][f'forward: {name}']['ratio']:.2f}" for s in speed)
        st = ", ".join(f"{s['rows'][name]['ratio']:.2f}" for s in speed)
        out.append(f"| {name} | {worst:.1e} | {fwd} | {st} |")
    out.append(
        f"| {strat['jbn']} | (as jbn.moments) | "
        + ", ".join(f"{s['rows'][strat['jbn']]['ratio']:.2f}" for s in speed)
        + " | |"
    )
    out.append(
        f"| {strat['copy']} | | " + ", ".join(f"{s['rows'][strat['copy']]['ratio']:.2f}" for s in speed) + " | |"
    )
    out += ["", "In full:", ""]
    head = (
        "| method | " + " | ".join(f"{_shape(s['shape'])} stats | {_shape(s['shape'])} forward" for s in speed) + " |"
    )
    out += [head, "|---" * (1 + 2 * len(speed)) + "|"]
    for name in methods:
        cells = []
        for s in speed:
            st, fw = s["rows"][name], s["rows"][f"forward: {name}"]
            cells.append(
                f"{1e3 * st['median_s']:.2f} [{1e3 * st['q25_s']:.2f}-{1e3 * st['q75_s']:.2f}] · {st['ratio']:.2f}x"
            )
            cells.append(f"{1e3 * fw['median_s']:.2f} · {fw['ratio']:.2f}x flax · {fw['ratio_to_copy']:.2f}x copy")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    for name in (strat["flax"], strat["jbn"], strat["copy"]):
        cells = []
        for s in speed:
            r = s["rows"][name]
            cells += [
                "",
                f"{1e3 * r['median_s']:.2f} [{1e3 * r['q25_s']:.2f}-{1e3 * r['q75_s']:.2f}] · "
                f"{r['ratio']:.2f}x flax · {r['ratio_to_copy']:.2f}x copy",
            ]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    labels = list(acc["errors"])
    out += [
        "",
        f"Accuracy: max over 4 features of |var - var64| / var64 (var64: float64 NumPy on the same float32 data), "
        f"{acc['rows_per_feature']} elements per feature (as 256x64x64x4 NHWC); the outlier is the first element "
        "of every feature.",
        "",
        "| method | " + " | ".join(lab.replace("|", "\\|") for lab in labels) + " |",
        "|---" * (1 + len(labels)) + "|",
    ]
    for name in methods:
        out.append(
            f"| {name} | " + " | ".join(f"{acc['errors'][lab][name]['var_rel_err']:.1e}" for lab in labels) + " |"
        )
    if strat.get("title"):  # a focused rerun: the notes below come once, with the full run
        return [*out, ""]
    out += [
        "",
        "What the compiled programs show (jax/jaxlib 0.10.2, XLA:CPU, read from `jit(...).lower(x).compile()"
        ".as_text()` at 256x7x7x512):",
        "",
        "- flax's raw sums are two reduction fusions, each reading `x`: flax reads `x` twice for its statistics "
        "too. shift_first compiles to the same structure (two fusions reading `x`; the shift a separate "
        "feature-sized slice), and so do two_pass (the mean, then the centred sum) and jbn.moments as of commit "
        "2b6b7ae (its corrected two-pass: the mean, then one fusion for both sums of deviations). No method here reads `x` "
        "once for both sums on XLA:CPU, so the gaps between them are the work per element inside the "
        "reductions (a subtraction of a broadcast shift in both shifted sums, in one of two_pass's) and noise.",
        "- In a training forward (64x32x32x64), plain two_pass shares one `x - mean` between its centred "
        "reduction and the normalization, and XLA:CPU writes that x-sized value to memory; with its own handles "
        "(an optimization barrier on x and the mean for the reduction) the forward compiles to flax's structure: "
        "two reductions reading `x`, then one loop reading `x` and writing `y`, no x-sized intermediate. "
        "jbn.moments at commit 84181de, inside the same forward, writes its mean broadcast to x's full shape "
        "(`wrapped_broadcast`, f32[64,32,32,64]) before its second reduction: one x-sized write and read more "
        "than flax (its statistics alone have no such buffer). At a1d91fd jbn.BatchNorm's forward no longer has "
        "it (its only x-sized buffer is `y`, as flax's); what remains is the work inside its reductions.",
        "- Written without separate handles (the shift indexed out of `x` in the same expression), XLA writes "
        "`x - shift` to memory in full and reads it back twice; the barrier handles in jbn and in these methods "
        "avoid that.",
        "- welford is one pass and order-independent but XLA:CPU does not vectorize a variadic reduce, and its "
        "running mean loses low bits at |mean|/std = 1e4.",
        "- Accuracy: with the first element 300 sigma out, a shift equal to it costs the variance ~1e-2 at 2^20 "
        "elements (the squared sums grow by (300 sigma)^2 per element, float32 keeps ~7 digits of them); a shift "
        "from the median of a sample is not moved by one outlier wherever it sits (it still depends on the order "
        "if outliers fill half the sampled rows); two passes do not depend on the order at all.",
        "",
    ]
    return out


def floor_markdown(floor: dict) -> list[str]:
    """The float32 training forward's floor on XLA:CPU (benchmarks/floor.py)."""
    speed = floor["speed"]
    names = list(speed[0]["rows"])
    out = [
        "## Floor of the float32 training forward (XLA:CPU)",
        "",
        _measured(floor["machine"]),
        "",
        "The work jbn's statistics do beyond flax's, timed alone (benchmarks/floor.py describes each row): the "
        "reductions relative to `sum(x)`, the forwards relative to flax.linen's (medians over rounds of per-round "
        "ratios). `floor of jbn's design` is, per round, flax's forward plus the extra cost of the two shifted "
        "reductions over the plain ones plus the base.",
        "",
        "| | " + " | ".join(_shape(s["shape"]) for s in speed) + " |",
        "|---" * (1 + len(speed)) + "|",
    ]
    for name in names:
        cells = []
        for s in speed:
            r = s["rows"][name]
            cells.append(
                f"{1e3 * r['median_s']:.2f} [{1e3 * r['q25_s']:.2f}-{1e3 * r['q75_s']:.2f}] · {r['ratio']:.2f}x"
            )
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*out, ""]
