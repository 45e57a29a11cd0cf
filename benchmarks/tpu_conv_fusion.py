"""A probe: where a convolution produces batch norm's input, as in every ResNet, what do exact
statistics cost on TPU v5e against flax's fast variance? Compiled deviceless, as
benchmarks/accelerators.py compiles its plans (nothing runs). Run in the accelerator
environment (writes benchmarks/RESULTS-tpu-conv-fusion.md and .json):

    .venv-accel/bin/python -m benchmarks.tpu_conv_fusion              # add --no-resnet to skip the ResNet-18 rows

Rows, each a training forward of `LAYERS` x (3x3 convolution, C -> C, then batch norm, then
relu) on a batch split over the 4 chips (the op-level plans of benchmarks/accelerators.py
have no convolution, so they cannot show this):

- `flax.linen.BatchNorm`: flax's module, default options (mean and mean of squares).
- `jbn.BatchNorm`: jbn's module (exact: one variadic reduction with Chan's merge on TPU).
- `sums about the running mean`: `jbn.moments(y, shift=running mean)`, the sums a psum can
  add up; exact only while the running mean is within a few standard deviations of the batch
  mean (not at initialization, where it is 0).
- `the same, guarded`: that, with a `lax.cond` that falls back to `jbn.moments(y)` where
  some feature's |batch mean - running mean|^2 exceeds 7 variances (the bound within which
  jbn's CPU formulation keeps its base): exact whatever the data.

And the ResNet-18 training step of benchmarks/accelerators.py (float32): flax, jbn, and jbn
with only its TPU statistics (`jbn._statistics.BATCH_FORMULATIONS["tpu"]`) replaced by flax's
fast-variance formula: a counterfactual that shows how much of jbn's excess the statistics
formulation alone accounts for.

Per row: kernels and bytes (benchmarks/plans.py: XLA's cost analysis on TPU), and how many
of the convolutions' fusions also reduce their output (the statistics computed as the
convolution writes it, with no second read).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import re
import time
from pathlib import Path

from benchmarks import plans

plans.environment()  # before JAX starts a backend

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from benchmarks import accelerators, machine, peers  # noqa: E402

TARGET = "TPU v5e"
LAYERS = 3
SHAPE = (128, 28, 28, 128)  # batch (split over the chips), height, width, channels
SHIFT_BOUND = 7.0  # |mean - shift|^2 <= 7 var: jbn's CPU formulation's bound on its base
HERE = Path(__file__).resolve().parent


def _conv(x: jax.Array, w: jax.Array) -> jax.Array:
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.cache
def _layer(make, channels: int, dtype) -> tuple:
    """(apply, params) of a peers.make_* layer, made once per (layer, channels, dtype), not per trace."""
    apply, params, _ = make(jnp.zeros((2, 1, 1, channels), dtype))
    return apply, params


def _module_norm(make):
    """A norm from a peers.make_* layer: (y, running mean, running var) -> (out, mean, var)."""

    def norm(y, mean, var):
        apply, params = _layer(make, y.shape[-1], y.dtype)
        out, state = apply(params, {"mean": mean, "var": var}, y, True)
        return out, state["mean"], state["var"]

    return norm


def _shifted(y, mean, var):
    import jbn

    stats = jbn.moments(y, axis=-1, shift=mean)
    return stats.mean, stats.var


def _guarded(y, mean, var):
    import jbn

    shifted = _shifted(y, mean, var)
    near = jnp.all(jnp.square(shifted[0] - mean) <= SHIFT_BOUND * shifted[1])

    def exact(y):
        s = jbn.moments(y, axis=-1)
        return s.mean, s.var

    return lax.cond(near, lambda y: shifted, exact, y)


def _functional_norm(statistics):
    """A norm from a statistics function, with flax's running average and normalize."""

    def norm(y, mean, var):
        m, v = statistics(y, mean, var)
        out = (y - m.astype(y.dtype)) * lax.rsqrt(v + peers.EPSILON).astype(y.dtype)
        momentum = peers.MOMENTUM
        return out, momentum * mean + (1 - momentum) * m, momentum * var + (1 - momentum) * v

    return norm


NORMS = {
    accelerators.FLAX: _module_norm(peers.make_flax_linen),
    "jbn": _module_norm(peers.make_jbn),
    "sums about the running mean": _functional_norm(_shifted),
    "the same, guarded": _functional_norm(_guarded),
}


def conv_stack(norm):
    """The training forward of LAYERS x (conv, norm, relu): (x, weights, means, vars) ->
    (out, new means, new vars)."""

    def forward(x, weights, means, variances):
        new_means, new_vars = [], []
        for w, mean, var in zip(weights, means, variances):
            y, m, v = norm(_conv(x, w.astype(x.dtype)), mean, var)
            new_means.append(m)
            new_vars.append(v)
            x = jax.nn.relu(y)
        return x, new_means, new_vars

    return forward


def conv_fusions(hlo: str) -> tuple[int, int]:
    """(fusions of the entry computation that convolve, those of them that also reduce)."""
    computations = {}
    for match in re.finditer(r"^%?([\w.\-]+) \([^\n]*\{\n(.*?)\n\}", hlo, re.S | re.M):
        computations[match.group(1)] = match.group(2)

    def body(name: str, seen: frozenset = frozenset()) -> str:
        text = computations.get(name, "")
        nested = [body(n, seen | {name}) for n in re.findall(r"calls=%([\w.\-]+)", text) if n not in seen]
        return text + "".join(nested)

    entry = hlo[hlo.index("\nENTRY ") :]
    entry = entry[: entry.index("\n}\n")]
    convolving = reducing = 0
    for called in re.findall(r" fusion\([^\n]*?calls=%([\w.\-]+)", entry):
        text = body(called)
        if " convolution(" in text:
            convolving += 1
            reducing += " reduce(" in text
    return convolving, reducing


def stack_plan(name: str, dtype: str) -> dict:
    mesh = plans.target(TARGET).mesh
    dt = jnp.dtype(dtype)
    channels = SHAPE[-1]
    x = jax.ShapeDtypeStruct(SHAPE, dt, sharding=NamedSharding(mesh, P(plans.AXIS)))
    replicated = NamedSharding(mesh, P())
    weights = [jax.ShapeDtypeStruct((3, 3, channels, channels), jnp.float32, sharding=replicated)] * LAYERS
    stats = [jax.ShapeDtypeStruct((channels,), jnp.float32, sharding=replicated)] * LAYERS
    compiled = jax.jit(conv_stack(NORMS[name])).lower(x, weights, stats, stats).compile()
    figures = plans.figures(compiled, TARGET)
    convolving, reducing = conv_fusions(compiled.as_text())
    return {**figures, "conv_fusions": convolving, "conv_fusions_reducing": reducing}


def fast_variance(x, layout, dtype):
    """flax's statistics (mean, then mean of squares minus the squared mean): the counterfactual."""
    from jbn._state import Moments
    from jbn._statistics import valid_count

    xs = x.astype(dtype)
    mean = jnp.mean(xs, axis=layout.reduce)
    return Moments(
        mean, jnp.maximum(jnp.mean(xs * xs, axis=layout.reduce) - mean * mean, 0), valid_count(layout, dtype)
    )


@contextlib.contextmanager
def tpu_statistics(formulation):
    from jbn import _statistics

    saved = _statistics.BATCH_FORMULATIONS.get("tpu")
    _statistics.BATCH_FORMULATIONS["tpu"] = lambda: formulation
    try:
        yield
    finally:
        if saved is None:
            del _statistics.BATCH_FORMULATIONS["tpu"]
        else:
            _statistics.BATCH_FORMULATIONS["tpu"] = saved


RESNET_ROWS = {
    accelerators.FLAX: (accelerators.FLAX, contextlib.nullcontext),
    "jbn": ("jbn", contextlib.nullcontext),
    "jbn, flax's fast variance as its TPU statistics": ("jbn", lambda: tpu_statistics(fast_variance)),
}


def resnet_row(name: str, dtype: str) -> dict:
    variant, context = RESNET_ROWS[name]
    with context():
        return accelerators.resnet_plan(variant, dtype, TARGET)


def write(results: dict, out: Path) -> None:
    (out / "RESULTS-tpu-conv-fusion.json").write_text(json.dumps(results, indent=1))
    info = results["machine"]
    lines = [
        "# Exact statistics where a convolution produces the input: TPU v5e, compiled deviceless",
        "",
        f"Written by `{info['command']}` (benchmarks/tpu_conv_fusion.py, whose docstring says what each row is); "
        "nothing here ran on a TPU. Bytes: XLA's cost analysis (`bytes accessed`, per chip; 4 chips, the batch split "
        "over them). A `lax.cond` is charged its costlier branch by the cost analysis.",
        "",
        f"Versions: {', '.join(f'{k} {v}' for k, v in info['versions'].items())}. Compiled on: {info.get('cpu', '?')}.",
        "",
    ]
    for dtype, rows in results["conv_stack"].items():
        title = (
            f"{LAYERS} x (3x3 convolution, batch norm, relu), {'x'.join(map(str, SHAPE))}, {dtype}, training forward"
        )
        fused = {name: f"{row['conv_fusions_reducing']} of {row['conv_fusions']}" for name, row in rows.items()}
        lines += _table(title, "statistics", rows, ("convolution fusions that also reduce", fused))
    for dtype, rows in results.get("resnet", {}).items():
        lines += _table(f"ResNet-18 training step (batch 128, 224x224), {dtype}", "variant", rows)
    (out / "RESULTS-tpu-conv-fusion.md").write_text("\n".join(lines))


def _table(title: str, first: str, rows: dict, extra: tuple[str, dict] | None = None) -> list[str]:
    """A section: each row's kernels, bytes and bytes over flax's, and optionally one more column."""
    flax = rows[accelerators.FLAX]
    head = f"| {first} | kernels | bytes | / flax's |" + (f" {extra[0]} |" if extra else "")
    lines = [f"## {title}", "", head, "|---" * head.count(" |") + "|"]
    for name, row in rows.items():
        cells = f"| {name} | {row['kernels']} | {row['hbm_bytes']:,} | {row['hbm_bytes'] / flax['hbm_bytes']:.4f} |"
        lines.append(cells + (f" {extra[1][name]} |" if extra else ""))
    return [*lines, ""]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    parser.add_argument("--resnet-dtypes", nargs="*", default=["float32"])
    parser.add_argument("--no-resnet", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    why = plans.available()
    if why is not None:
        parser.error(why)
    info = {**machine.describe(), "versions": machine.versions()}
    info["versions"]["libtpu"] = accelerators._version("libtpu")
    info["command"] = " ".join(["python -m benchmarks.tpu_conv_fusion", *(argv if argv is not None else [])])
    started = time.perf_counter()
    results: dict = {"machine": info, "conv_stack": {}, "resnet": {}}
    for dtype in args.dtypes:
        results["conv_stack"][dtype] = {name: stack_plan(name, dtype) for name in NORMS}
        print(dtype, {k: (v["kernels"], v["hbm_bytes"]) for k, v in results["conv_stack"][dtype].items()}, flush=True)
    for dtype in [] if args.no_resnet else args.resnet_dtypes:
        results["resnet"][dtype] = {name: resnet_row(name, dtype) for name in RESNET_ROWS}
        print(dtype, {k: (v["kernels"], v["hbm_bytes"]) for k, v in results["resnet"][dtype].items()}, flush=True)
    info["total_s"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    write(results, args.out)
    return results


if __name__ == "__main__":
    main()
