"""Ways to compute per-feature mean and variance under jit, timed side by side, with
their accuracy on adversarial data: evidence for choosing jbn's training forward.

    .venv/bin/python -m benchmarks.statistics_strategies                 # writes benchmarks/strategies.json
    .venv/bin/python -m benchmarks.statistics_strategies --rounds 2 --shapes 8x4x4x8 --accuracy-rows 4096 --out /tmp/s

Every method reduces all axes but the last (features last, as the op-level suite).
Methods (the statistics in float32 from a float32 input):

- raw: `mean(x)`, `mean(x*x) - mean^2` (flax's `use_fast_variance`); loses the variance
  to cancellation when |mean| >> std.
- jbn.moments: the library as installed (a corrected two-pass since commit 3a0fb26;
  sums around the first element before, as shift_first).
- shift_first: the same method written here (kept fixed while jbn changes): sums of
  `x - s` and `(x - s)^2` around s = the first row, each reduction on its own handle of
  `x` (an optimization barrier), so that XLA:CPU fuses the subtraction into both.
- sample_mean / sample_median: the same sums around the mean (median) of K rows taken
  at a fixed stride through the batch: one outlier moves a mean shift by 1/K of its
  distance and a median shift not at all. sample_median3: the median of 3 such rows by
  a min/max network (no sort).
- blocked: B contiguous blocks of rows, each summed around its own first row, merged
  with Chan's formula; an outlier first costs only its block's accuracy.
- two_pass: the mean, then `mean((x - mean)^2)`: exact whatever the order, reads x twice.
  "two_pass (own handles)": the same with the second reduction on its own handles of x
  and the mean (an optimization barrier), so that a following normalization does not
  share one `x - mean` with it (shared, XLA:CPU writes it to memory in full).
- welford: one variadic `lax.reduce` over (count, mean, M2) with Chan's merge as the
  reducer: one pass, order-independent, but XLA:CPU does not vectorize it.

Each method also runs as a full training forward (statistics, then
`(x - mean) * scale * rsqrt(var + eps) + bias` and the running-average update), next to
flax.linen.BatchNorm's and jbn.BatchNorm's forwards and a jitted `x + 1` copy, all in
the same interleaved shuffled rounds (benchmarks/timing.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks import machine, memory, peers, report, timing

SHAPES = ((64, 32, 32, 64), (128, 16, 16, 256), (256, 7, 7, 512), (4096, 1024))
SAMPLE_ROWS = 32
BLOCKS = 32
EPSILON = 1e-5
MOMENTUM = 0.99
DEFAULT_OUT = Path(__file__).resolve().parent


def _rows(x):
    """x as (rows, features): a free reshape for features-last layouts."""
    return x.reshape(-1, x.shape[-1])


def _handles(n, a):
    """n handles on `a` that XLA cannot merge (one barrier, n outputs): each reduction
    then fuses its own `x - s` instead of sharing one written to memory."""
    return lax.optimization_barrier((a,) * n)


def _shifted(x2, s):
    """(mean, var) from one pass of sums of `x - s` and `(x - s)^2` over rows."""
    (xa, xb), (sa, sb) = _handles(2, x2), _handles(2, lax.stop_gradient(s))
    n = x2.shape[0]
    d1 = jnp.sum(xa - sa, axis=0) / n
    d2 = jnp.sum(jnp.square(xb - sb), axis=0) / n
    return s + d1, jnp.maximum(d2 - d1 * d1, 0)


def _sample(x2, k):
    stride = max(x2.shape[0] // k, 1)
    return x2[::stride][:k]


def raw(x):
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axes)
    return mean, jnp.maximum(jnp.mean(x * x, axes) - mean * mean, 0)


def jbn_moments(x):
    import jbn

    m = jbn.moments(x)
    return m.mean, m.var


def shift_first(x):
    x2 = _rows(x)
    return _shifted(x2, x2[0])


def sample_mean(x, k=SAMPLE_ROWS):
    x2 = _rows(x)
    return _shifted(x2, jnp.mean(_sample(x2, k), axis=0))


def sample_median(x, k=SAMPLE_ROWS):
    x2 = _rows(x)
    return _shifted(x2, jnp.median(_sample(x2, k), axis=0))


def sample_median3(x):
    """Around the median of three rows (first, one third, two thirds in): a min/max
    network, no sort; one outlier among the three does not move it."""
    x2 = _rows(x)
    n = x2.shape[0]
    a, b, c = x2[0], x2[n // 3], x2[(2 * n) // 3]
    return _shifted(x2, jnp.maximum(jnp.minimum(a, b), jnp.minimum(jnp.maximum(a, b), c)))


def _blocks(rows, most=BLOCKS):
    b = 1
    while b * 2 <= most and rows % (b * 2) == 0:
        b *= 2
    return b


def blocked(x, most=BLOCKS):
    x2 = _rows(x)
    b = _blocks(x2.shape[0], most)
    x3 = x2.reshape(b, -1, x2.shape[-1])
    m = x3.shape[1]
    (xa, xb), (sa, sb) = _handles(2, x3), _handles(2, lax.stop_gradient(x3[:, :1]))
    d1 = jnp.sum(xa - sa, axis=1) / m  # (b, C): block mean - block shift
    d2 = jnp.sum(jnp.square(xb - sb), axis=1) / m
    means = sa[:, 0] + d1
    m2 = m * jnp.maximum(d2 - d1 * d1, 0)  # per-block sums of squared deviations
    mean = jnp.mean(means, axis=0)
    var = (jnp.sum(m2, axis=0) + m * jnp.sum(jnp.square(means - mean), axis=0)) / x2.shape[0]
    return mean, var


def two_pass(x):
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axes)
    return mean, jnp.mean(jnp.square(x - mean), axes)


def two_pass_handles(x):
    """two_pass with the centred reduction on its own handles of `x` and the mean: in a
    forward, the normalization's `x - mean` is then a different value, and XLA:CPU fuses
    each subtraction into its consumer instead of writing one shared `x - mean` to memory."""
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axes)
    xb, mb = lax.optimization_barrier((x, lax.stop_gradient(mean)))
    return mean, jnp.mean(jnp.square(xb - mb), axes)


def welford(x):
    x2 = _rows(x)

    def merge(a, b):
        (na, ma, qa), (nb, mb, qb) = a, b
        n = na + nb
        w = jnp.where(n > 0, nb / jnp.maximum(n, 1), 0)
        d = mb - ma
        return n, ma + d * w, qa + qb + d * d * na * w

    zero = jnp.zeros((), x2.dtype)
    n, mean, q = lax.reduce((jnp.ones_like(x2), x2, jnp.zeros_like(x2)), (zero, zero, zero), merge, (0,))
    return mean, q / n


METHODS = {
    "raw (flax fast variance)": raw,
    "jbn.moments (installed)": jbn_moments,
    "shift_first": shift_first,
    f"sample_mean (K={SAMPLE_ROWS})": sample_mean,
    f"sample_median (K={SAMPLE_ROWS})": sample_median,
    "sample_median3": sample_median3,
    f"blocked (B<={BLOCKS})": blocked,
    "two_pass": two_pass,
    "two_pass (own handles)": two_pass_handles,
    "welford (variadic reduce)": welford,
}
RAW = "raw (flax fast variance)"
FLAX = "flax.linen.BatchNorm forward"
JBN = "jbn.BatchNorm forward"
COPY = "copy (jitted x + 1)"


def forward_with(stats):
    """A training forward (output, new running statistics) using `stats` for the batch."""

    def forward(x, scale, bias, running_mean, running_var):
        mean, var = stats(x)
        inv = scale * lax.rsqrt(var + EPSILON)
        y = ((x - mean) * inv + bias).astype(x.dtype)
        return y, (MOMENTUM * running_mean + (1 - MOMENTUM) * mean, MOMENTUM * running_var + (1 - MOMENTUM) * var)

    return forward


def time_shape(shape, rounds, log, methods=None) -> dict:
    methods = methods or METHODS
    x = memory.normal(shape, "float32", seed=0, std=2.0, mean=1.0)
    ct = memory.normal(shape, "float32", seed=1)
    c = shape[-1]
    scale, bias = jnp.ones((c,)), jnp.zeros((c,))
    running = (jnp.zeros((c,)), jnp.ones((c,)))
    calls = {}
    for name, fn in methods.items():
        stats = jax.jit(fn).lower(x).compile()
        fwd = jax.jit(forward_with(fn)).lower(x, scale, bias, *running).compile()
        calls[name] = lambda f=stats: jax.block_until_ready(f(x))
        calls[f"forward: {name}"] = lambda f=fwd: jax.block_until_ready(f(x, scale, bias, *running))
    calls[FLAX] = peers.jax_layer("flax.linen", x, ct).train_fwd
    calls[JBN] = peers.jax_layer("jbn", x, ct).train_fwd
    copy = jax.jit(lambda a: a + 1)
    calls[COPY] = lambda: jax.block_until_ready(copy(x))
    results = timing.interleaved(calls, rounds)
    rows = {}
    for name, t in results.items():
        base = results[RAW] if name in methods else results[FLAX]
        rows[name] = {
            "median_s": t.median,
            "q25_s": t.q25,
            "q75_s": t.q75,
            "samples": t.samples.tolist(),
            "ratio": timing.paired_ratio(t, base),
            "ratio_to_copy": timing.paired_ratio(t, results[COPY]),
        }
    log(
        f"  {'x'.join(map(str, shape))}: "
        + ", ".join(f"{k} {v['ratio']:.2f}" for k, v in rows.items() if k in methods or k.startswith("forward:"))
    )
    return {"shape": list(shape), "rows": rows}


def adversarial_inputs(rows: int, features: int = 4) -> dict[str, np.ndarray]:
    """float32 data, `rows` elements per feature, features last."""
    g = np.random.default_rng(7).normal(size=(rows, features))
    outlier = g.copy()
    outlier[0] = 300.0  # 300 sigma, the FIRST element of every feature
    shifted = g + 1e4
    both = shifted.copy()
    both[0] = 1e4 + 300.0
    return {
        "N(1, 2^2)": (1 + 2 * g).astype(np.float32),
        "|mean|/std = 1e4": shifted.astype(np.float32),
        "300-sigma outlier first": outlier.astype(np.float32),
        "|mean|/std = 1e4 and outlier first": both.astype(np.float32),
    }


def accuracy(rows: int, methods=None) -> dict:
    """Max over features of |var - var64| / var64 (var64: float64 two-pass NumPy on the same
    float32 data), and of |mean - mean64| / std64."""
    out = {}
    for label, data in adversarial_inputs(rows).items():
        ref = data.astype(np.float64)
        mean64, var64 = ref.mean(axis=0), ref.var(axis=0)
        x = jnp.asarray(data.reshape(-1, 64, 64, data.shape[-1]) if rows % 4096 == 0 else data)
        out[label] = {}
        for name, fn in (methods or METHODS).items():
            mean, var = (np.asarray(v, np.float64) for v in jax.jit(fn)(x))
            out[label][name] = {
                "var_rel_err": float(np.max(np.abs(var - var64) / var64)),
                "mean_err_in_std": float(np.max(np.abs(mean - mean64) / np.sqrt(var64))),
            }
    return {"rows_per_feature": rows, "errors": out}


def parse_shape(text):
    return tuple(int(s) for s in text.lower().split("x"))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="*", type=parse_shape, default=list(SHAPES))
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--accuracy-rows", type=int, default=2**20, help="elements per feature in the accuracy test")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for strategies.json")
    parser.add_argument("--note", default="")
    parser.add_argument("--no-render", action="store_true", help="write strategies.json only (not RESULTS.md)")
    parser.add_argument("--methods", nargs="*", default=None, help=f"a subset of {list(METHODS)} (raw always runs)")
    args = parser.parse_args(argv)
    unknown = set(args.methods or ()) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {list(METHODS)}")
    methods = {k: v for k, v in METHODS.items() if args.methods is None or k in args.methods or k == RAW}
    info = {**machine.describe(), "versions": machine.versions(), "rounds": args.rounds}
    given = list(argv if argv is not None else sys.argv[1:])
    if "--note" in given:
        i = given.index("--note")
        del given[i : i + 2]
    info["command"] = " ".join(["python -m benchmarks.statistics_strategies", *given])
    log = lambda m: print(m, flush=True)  # noqa: E731
    acc = accuracy(args.accuracy_rows, methods)
    log(
        "  accuracy: "
        + json.dumps({k: {m: f"{e['var_rel_err']:.1e}" for m, e in v.items()} for k, v in acc["errors"].items()})
    )
    speed = [time_shape(s, args.rounds, log, methods) for s in args.shapes]
    results = {
        "machine": info,
        "methods": list(methods),
        "speed": speed,
        "accuracy": acc,
        "note": args.note,
        "flax": FLAX,
        "jbn": JBN,
        "copy": COPY,
        "raw": RAW,
    }
    report.save(results, args.out, "strategies.json", render_report=not args.no_render)
    return results


if __name__ == "__main__":
    main()
