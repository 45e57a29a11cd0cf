"""Where the float32 training forward's floor lies on XLA:CPU: the price of each piece of
work jbn's statistics do beyond flax's, timed side by side.

    .venv/bin/python -m benchmarks.floor                     # writes benchmarks/floor.json, then RESULTS.md
    .venv/bin/python -m benchmarks.floor --rounds 2 --shapes 8x4x4x8 --out /tmp/f

flax's statistics are two plain reductions, `sum(x)` and `sum(x * x)`. jbn's accuracy
promise (a variance exact to float32 whatever |mean|/std and the order of the elements)
needs a base `s` near the mean, known before the sums, and the sums of `x - s` and
`((x - s) r)^2` around it, with `r = 1/sqrt(n)` per feature so that the squares' sum
stays finite wherever the variance is representable: each reduction then has
per-feature operands, and the base is the mean of every 8th slice of `x`
(jbn._statistics.sample_mean). Timed here in the same interleaved, shuffled rounds
(benchmarks/timing.py), per shape:

- the reductions alone (`s` an input, so nothing else is measured with them), and the
  squares without `r` to show what the scaling costs;
- the base alone: the mean of every 8th slice;
- two one-pass forms of both shifted sums that XLA:CPU might have read `x` once for: a
  variadic `lax.reduce` over the pair, and one reduction over `stack([d, d*d])`;
- flax.linen's and jbn's training forwards and a jitted `x + 1`.

The floor of jbn's design is flax's forward plus, per round, the extra cost of the two
shifted reductions over the plain ones plus the base:
`floor = flax + (sum(x - s) - sum(x)) + (sum(((x - s) r)^2) - sum(x * x)) + base`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks import machine, memory, peers, report, timing

SHAPES = ((64, 32, 32, 64), (128, 16, 16, 256), (256, 7, 7, 512), (4096, 1024))
DEFAULT_OUT = Path(__file__).resolve().parent
SAMPLE_STRIDE = 8

PLAIN_SUM = "sum(x)"
PLAIN_SQUARES = "sum(x * x)"
SHIFTED_SUM = "sum(x - s)"
SHIFTED_SQUARES = "sum((x - s)^2)"
SCALED_SQUARES = "sum(((x - s) r)^2)"
BASE = "base: mean of every 8th slice"
VARIADIC = "both shifted sums, one variadic reduce"
STACKED = "both shifted sums, one reduce of stack([d, d^2])"
FLAX = "flax.linen.BatchNorm forward"
JBN = "jbn.BatchNorm forward"
COPY = "copy (jitted x + 1)"


def _axes(x):
    return tuple(range(x.ndim - 1))


def _variadic(x, s, r):
    d = x - s
    zero = jnp.zeros((), x.dtype)
    return lax.reduce((d, d * d), (zero, zero), lambda a, b: (a[0] + b[0], a[1] + b[1]), _axes(x))


def _stacked(x, s, r):
    d = x - s
    return jnp.sum(jnp.stack([d, d * d]), axis=tuple(a + 1 for a in _axes(x)))


REDUCTIONS = {
    PLAIN_SUM: lambda x, s, r: jnp.sum(x, _axes(x)),
    PLAIN_SQUARES: lambda x, s, r: jnp.sum(x * x, _axes(x)),
    SHIFTED_SUM: lambda x, s, r: jnp.sum(x - s, _axes(x)),
    SHIFTED_SQUARES: lambda x, s, r: jnp.sum(jnp.square(x - s), _axes(x)),
    # jbn's: r = 1/sqrt(n) per feature keeps the sum finite wherever the variance is.
    SCALED_SQUARES: lambda x, s, r: jnp.sum(jnp.square((x - s) * r), _axes(x)),
    BASE: lambda x, s, r: jnp.mean(x[::SAMPLE_STRIDE], _axes(x)),
    VARIADIC: _variadic,
    STACKED: _stacked,
}


def floor_samples(t: dict[str, timing.Timing]) -> np.ndarray:
    """Per round: flax's forward plus the extra work of jbn's statistics (see the doc)."""
    s = {k: v.samples for k, v in t.items()}
    extra = (s[SHIFTED_SUM] - s[PLAIN_SUM]) + (s[SCALED_SQUARES] - s[PLAIN_SQUARES]) + s[BASE]
    return s[FLAX] + extra


def time_shape(shape, rounds, log) -> dict:
    x = memory.normal(shape, "float32", seed=0, std=2.0, mean=1.0)
    ct = memory.normal(shape, "float32", seed=1)
    s = jnp.mean(x[::SAMPLE_STRIDE], _axes(x))
    r = jnp.full_like(s, 1 / np.sqrt(np.prod(shape[:-1])))
    calls = {}
    for name, fn in REDUCTIONS.items():
        compiled = jax.jit(fn).lower(x, s, r).compile()
        calls[name] = lambda f=compiled: jax.block_until_ready(f(x, s, r))
    calls[FLAX] = peers.jax_layer("flax.linen", x, ct).train_fwd
    calls[JBN] = peers.jax_layer("jbn", x, ct).train_fwd
    copy = jax.jit(lambda a: a + 1)
    calls[COPY] = lambda: jax.block_until_ready(copy(x))
    t = timing.interleaved(calls, rounds)
    floor = timing.Timing(floor_samples(t))
    rows = {}
    for name, v in [*t.items(), ("floor of jbn's design", floor)]:
        base = t[PLAIN_SUM] if name in REDUCTIONS else t[FLAX]
        rows[name] = {
            "median_s": v.median,
            "q25_s": v.q25,
            "q75_s": v.q75,
            "ratio": timing.paired_ratio(v, base),
            "samples": v.samples.tolist(),
        }
    log(f"  {'x'.join(map(str, shape))}: " + ", ".join(f"{k} {r['ratio']:.2f}" for k, r in rows.items()))
    return {"shape": list(shape), "rows": rows}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="*", type=lambda t: tuple(int(v) for v in t.split("x")), default=SHAPES)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for floor.json")
    parser.add_argument("--no-render", action="store_true", help="write floor.json only (not RESULTS.md)")
    args = parser.parse_args(argv)
    info = {**machine.describe(), "versions": machine.versions(), "rounds": args.rounds}
    info["command"] = " ".join(["python -m benchmarks.floor", *(argv if argv is not None else sys.argv[1:])])
    speed = [time_shape(tuple(s), args.rounds, lambda m: print(m, flush=True)) for s in args.shapes]
    results = {"machine": info, "speed": speed, "reductions": list(REDUCTIONS)}
    report.save(results, args.out, "floor.json", render_report=not args.no_render)
    return results


if __name__ == "__main__":
    main()
