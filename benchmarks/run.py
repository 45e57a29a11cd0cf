"""Run the batch-norm benchmark suite and write RESULTS.md and a PNG chart.

    .venv/bin/python -m benchmarks.run            # full suite (writes benchmarks/RESULTS.md, benchmarks/results.png)
    .venv/bin/python -m benchmarks.run --quick    # fewer rounds
    .venv/bin/python -m benchmarks.run --out /tmp/b --shapes 8x4x4x8 --dtypes float32 --rounds 2 --layers 2

All libraries run side by side in one process; within each (shape, dtype, case) every
library (and a jitted `x + 1` copy of the same array) runs once per round, in a shuffled
order and after a 20 ms pause (see benchmarks/timing.py), and the report gives the median
and the interquartile range over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import machine, memory, peers, report, timing

CASES = ("train_fwd", "eval_fwd", "train_fwd_bwd")
# Minimal memory traffic of each case in element reads + writes per activation element:
# training forward reads x twice (statistics, then normalization) and writes y; evaluation
# reads x and writes y; the backward pass reads x and dy twice and writes dx.
MIN_TRAFFIC = {"train_fwd": 3, "eval_fwd": 2, "train_fwd_bwd": 8}
SHAPES = ((64, 32, 32, 64), (128, 16, 16, 256), (256, 7, 7, 512), (4096, 1024))
DTYPES = ("float32", "bfloat16")
LIBRARIES = ("jbn", "jbn (fused=False)", "flax.linen", "flax.nnx", "haiku", "equinox", "torch")
COPY = "copy (jitted x + 1)"
MEMORY_SHAPE = (32, 32, 32, 32)
MEMORY_LAYERS = 8
DEFAULT_OUT = Path(__file__).resolve().parent


def parse_shape(text: str) -> tuple[int, ...]:
    return tuple(int(s) for s in text.lower().split("x"))


def time_cases(shapes, dtypes, libraries, rounds, progress, checkpoint=None) -> list[dict]:
    """One row per (shape, dtype, case, library): seconds per call over the rounds;
    `checkpoint(rows)` after each (shape, dtype), so a run stopped early keeps them."""
    rows = []
    use_torch = "torch" in libraries and peers.torch_available() and jax.default_backend() == "cpu"
    for shape in shapes:
        for dtype in dtypes:
            x = memory.normal(shape, dtype, seed=0, std=2.0, mean=1.0)
            ct = memory.normal(shape, dtype, seed=1)
            layers = {name: peers.jax_layer(name, x, ct) for name in libraries if name in peers.JAX_LIBRARIES}
            if use_torch:
                layers["torch"] = peers.torch_layer(
                    np.asarray(x.astype(jnp.float32)), np.asarray(ct.astype(jnp.float32)), dtype
                )
            copy = jax.jit(lambda a: a + 1)
            for case in CASES:
                calls = {name: getattr(layer, case) for name, layer in layers.items()}
                calls[COPY] = lambda copy=copy, x=x: jax.block_until_ready(copy(x))
                results = timing.interleaved(calls, rounds)
                for name, t in results.items():
                    rows.append(
                        {
                            "shape": list(shape),
                            "dtype": dtype,
                            "case": case,
                            "library": name,
                            "samples": t.samples.tolist(),
                            "median_s": t.median,
                            "q25_s": t.q25,
                            "q75_s": t.q75,
                            "ratio_to_flax": (
                                timing.paired_ratio(t, results["flax.linen"]) if "flax.linen" in results else None
                            ),
                        }
                    )
                progress.update(1)
            if checkpoint is not None:
                checkpoint(rows)
    return rows


def memory_rows(dtypes, shape, layers, variants, progress) -> list[dict]:
    rows = []
    for dtype in dtypes:
        for variant in variants:
            row = memory.summary(variant, shape, jnp.dtype(dtype), layers)
            row.update(dtype=dtype, shape=list(shape), layers=layers)
            rows.append(row)
            progress.update(1)
    return rows


class _NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n):
        pass


def _progress(total, disable):
    """tqdm's bar where tqdm is installed (it is optional for the device run)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoProgress()
    return tqdm(total=total, desc="benchmarks", disable=disable)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="7 rounds instead of 15")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per case (overrides --quick)")
    parser.add_argument("--shapes", nargs="*", type=parse_shape, default=None, help="e.g. 64x32x32x64 4096x1024")
    parser.add_argument("--dtypes", nargs="*", default=list(DTYPES))
    parser.add_argument("--libraries", nargs="*", default=list(LIBRARIES))
    parser.add_argument("--memory-shape", type=parse_shape, default=MEMORY_SHAPE)
    parser.add_argument("--layers", type=int, default=MEMORY_LAYERS, help="blocks in the memory benchmark's net")
    parser.add_argument(
        "--memory-variants",
        nargs="*",
        type=int,
        default=None,
        help="indices into benchmarks.memory.VARIANTS to measure (default all; none to skip)",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="folder for RESULTS.md, results.png, results.json"
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--note", default="", help="a line for the top of RESULTS.md (e.g. how busy the machine was)")
    args = parser.parse_args(argv)

    rounds = args.rounds or (7 if args.quick else 15)
    shapes = args.shapes or list(SHAPES)
    unknown = set(args.libraries) - set(LIBRARIES)
    if unknown:
        parser.error(f"unknown libraries {sorted(unknown)}; choose from {LIBRARIES}")
    # Optional peers (haiku, equinox, torch) are skipped where not importable: the device
    # run works from a plain python3 holding jax and flax only.
    skipped = [name for name in args.libraries if not peers.available(name)]
    libraries = [name for name in args.libraries if name not in skipped]
    info = machine.describe()
    info["versions"] = machine.versions()
    info["rounds"] = rounds
    given = list(argv if argv is not None else sys.argv[1:])
    if "--note" in given:  # the note is printed on its own
        i = given.index("--note")
        del given[i : i + 2]
    info["command"] = " ".join(["python -m benchmarks.run", *given])
    variants = memory.VARIANTS if args.memory_variants is None else [memory.VARIANTS[i] for i in args.memory_variants]
    variants = [v for v in variants if peers.available(memory.library_of(v))]
    info["skipped"] = skipped
    total = len(shapes) * len(args.dtypes) * len(CASES) + len(args.dtypes) * len(variants)
    args.out.mkdir(parents=True, exist_ok=True)
    partial = args.out / "results.partial.json"  # the speed rows so far (benchmarks/device.py reads it)

    def bundle(speed, mem):
        return {
            "machine": info,
            "speed": speed,
            "memory": mem,
            "min_traffic": MIN_TRAFFIC,
            "copy": COPY,
            "note": args.note,
        }

    with _progress(total, args.no_progress) as progress:
        speed = time_cases(
            shapes,
            args.dtypes,
            libraries,
            rounds,
            progress,
            checkpoint=lambda rows: partial.write_text(json.dumps(bundle(rows, []))),
        )
        mem = memory_rows(args.dtypes, args.memory_shape, args.layers, variants, progress)
    results = bundle(speed, mem)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    partial.unlink(missing_ok=True)
    report.write(results, args.out, args.note)
    return results


if __name__ == "__main__":
    os.environ.setdefault("KERAS_BACKEND", "jax")
    main()
