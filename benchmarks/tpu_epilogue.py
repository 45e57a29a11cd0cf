"""A probe: would a Pallas (Mosaic) kernel for the per-feature epilogue bring jbn's
TPU v5e training forward (4 chips, batch-sharded `jit` on an Auto mesh) within one kernel
of flax.linen.BatchNorm's, and within its HBM bytes? Compiled deviceless, as
benchmarks/accelerators.py compiles its plans (nothing runs). Run in the accelerator
environment:

    .venv-accel/bin/python -m benchmarks.tpu_epilogue                       # the two default cases
    .venv-accel/bin/python -m benchmarks.tpu_epilogue --shapes 256x7x7x512:float32 --kernels

Rows, each the training forward (`train_fwd`) of one (shape, dtype):

- `flax.linen`, `jbn`: the layers of benchmarks/accelerators.py.
- `jbn, merge in Pallas`: jbn with only `jbn._accelerator_moments._chan_reduce` replaced (for
  the grouped case): the gathered groups' (mean hi, mean lo, M2 hi, M2 lo) merged, and the
  mean (rounded to one float) and the variance formed, in ONE Pallas kernel inside the
  `shard_map` of the all-gather. The running average and the normalize coefficients stay
  jbn's own code, which XLA:TPU then fuses into one kernel.
- `jbn, exchange in Pallas`: as the previous row, but the exchange too is in the kernel:
  each device's four (1, C) partial results go straight from the reduce into ONE Pallas
  kernel that sends them to every other device by remote DMA (after a barrier) and merges
  them (`_remote_dma_merge`): no stack, no all-gather. Mosaic only: its interpret mode
  (`pltpu.InterpretParams()`) runs on CPU devices (checked on 4, against the jnp merge: the
  mean bit-identical, the variance within 1.2e-7 relative), but not inside
  `lax.platform_dependent` ("Lowering rule for `cond` returns incorrect set of output
  tokens": the interpreter's ordered effects), so jbn could not dispatch to it as it
  dispatches today. Never run on a TPU.
- `synthetic, epilogue in Pallas`: not jbn, an upper bound of what the idea can reach: jbn's
  grouped reduce, the stack and the one all-gather, then everything per-feature (the merge,
  flax's running average with momentum 0.99, the coefficients `scale * rsqrt(var + eps)` and
  `bias - mean * that`) in ONE Pallas kernel with 1-D operands and results, then
  `x * a + b`. Its running average is hard-coded (no count, no rule object, no narrow-state
  rounding) and it has no derivative rule: a measurement, not a layer.

Bytes: XLA's cost analysis (`bytes accessed`, benchmarks/plans.py) does not count a Mosaic
kernel's traffic; each custom call is charged here its operands plus its results
as /work/shared/ACCELERATORS.md advises. On CPU the merge-in-Pallas and synthetic kernels run
in Pallas's interpret mode (chosen by `lax.platform_dependent`): jbn's TPU formulation with
the merge in Pallas gave, on 4 CPU devices, the same mean and variance bit for bit as
without it.

What it showed (jax 0.10.2, libtpu 0.0.42, 2026-12-05; kernels, then bytes / flax's, cost
analysis and with the custom calls charged):

| case | flax | jbn | merge in Pallas | exchange in Pallas | synthetic, epilogue in Pallas |
|---|---|---|---|---|---|
| 64x32x32x64 float32 | 9 | 12, 1.00045 | 11, 1.00023 / 1.00030 | 9, 0.99998 / 1.00001 | 10, 1.00015 / 1.00025 |
| 4096x1024 bfloat16 | 9 | 12, 1.01987 | 11, 1.00717 / 1.01214 | 9, 0.99945 / 1.00110 | 10, 1.00469 / 1.01131 |

Over all ten op-level shapes/dtypes of benchmarks/accelerators.py: merge in Pallas 11-12
kernels; exchange in Pallas 9 (10 at 128x16x16x256), cost-analysis bytes 0.99945-1.00000 of
flax's but 1.0000007-1.0011 once its kernel is charged; the synthetic row 10 kernels, bytes
1.00002-1.0113 charged. With an all-gather, bytes cannot reach flax's: flax all-reduces 2
floats per feature, jbn all-gathers 4 per group (16 per feature on 4 chips) and its reduce
writes 5 results to flax's 2; at 4096x1024 bfloat16 the stack and the all-gather alone are
charged 114,688 bytes against 53,248 for flax's all-reduce and its whole per-feature fusion.
Without it (remote DMA) the reduce's extra results and the kernel's own operands still
leave jbn 0.0011x above flax there.

Since then jbn's own exchange gathers the groups' values as one flat vector (the `jbn` column
above is the stacked exchange of its time): 12 kernels and 1.00035, 11 kernels and 1.01214 in those two cases.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from typing import Any

from benchmarks import plans

plans.environment()  # before JAX starts a backend

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import tpu as pltpu  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from benchmarks import accelerators, peers  # noqa: E402
from jbn import _accelerator_moments as am  # noqa: E402

TARGET = "TPU v5e"
MOMENTUM = peers.MOMENTUM
EPSILON = peers.EPSILON
DEFAULT_CASES = ("64x32x32x64:float32", "4096x1024:bfloat16")


def _merged(rows: jax.Array, total: int, groups: int) -> tuple[jax.Array, ...]:
    """(count, mean hi, mean lo, M2 hi, M2 lo) of the groups' rows (groups, 4, C), merged in
    the tree of `_grouped_reduce`, with its merge."""
    merge = am._merger(1 / max(total, 1))
    count = jnp.full(rows.shape[2:], total // groups, rows.dtype)
    parts = [(count, *(rows[g, i] for i in range(4))) for g in range(groups)]
    while len(parts) > 1:
        merged = [merge(parts[i], parts[i + 1]) for i in range(0, len(parts) - 1, 2)]
        parts = merged + parts[len(parts) - len(parts) % 2 :]
    return parts[0]


def _pallas(kernel, outputs: int, features: int, *args: jax.Array):
    """`kernel` as one Pallas call with `outputs` float32 (features,) results: Mosaic on TPU,
    interpret mode elsewhere."""
    out_shape = tuple(jax.ShapeDtypeStruct((features,), jnp.float32) for _ in range(outputs))

    def call(interpret: bool, *a):
        return pl.pallas_call(kernel, out_shape=out_shape, interpret=interpret)(*a)

    return lax.platform_dependent(*args, tpu=lambda *a: call(False, *a), default=lambda *a: call(True, *a))


def _group_partials(xs: jax.Array, reduce: tuple[int, ...], total: int, groups: int) -> jax.Array:
    """Each device group's (mean hi, mean lo, M2 hi, M2 lo) stacked: (groups, 4, C), as
    `_grouped_reduce` computes them."""
    zero = jnp.zeros((), xs.dtype)
    xg = xs.reshape((groups, xs.shape[0] // groups) + xs.shape[1:])
    operands = (jnp.ones_like(xg), xg, jnp.zeros_like(xg), jnp.zeros_like(xg), jnp.zeros_like(xg))
    _, hi, lo, q, r = lax.reduce(operands, (zero,) * 5, am._merger(1 / max(total, 1)), tuple(a + 1 for a in reduce))
    return jnp.stack((hi, lo, q, r), axis=1).reshape(groups, 4, -1)


def _gathered(fn, mesh, stacked: jax.Array, *replicated: jax.Array):
    """`fn(all groups' rows, *replicated)` inside one shard_map over the whole mesh."""
    axes = tuple(mesh.axis_names)

    def body(v, *rest):
        return fn(lax.all_gather(v, axes, axis=0, tiled=True), *rest)

    specs = (P(axes),) + (P(),) * len(replicated)
    return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=False)(stacked, *replicated)


def chan_reduce_merge_in_pallas(x, valid, reduce, dtype):
    """`_chan_reduce` with the grouped case's merge, mean and variance in one Pallas kernel
    (the mean returned as one float, its low part zero)."""
    groups = am._device_groups(x, valid, reduce)
    if groups <= 1:
        return _ORIGINAL_CHAN_REDUCE(x, valid, reduce, dtype)
    total = am.element_count(x.shape, reduce)
    stacked = _group_partials(x.astype(dtype), reduce, total, groups)
    features = stacked.shape[-1]

    def kernel(rows_ref, mean_ref, var_ref):
        count, hi, lo, q, r = _merged(rows_ref[...], total, groups)
        mean_ref[...] = hi + lo
        var_ref[...] = (q + r) * (total / jnp.where(count > 0, count, 1))

    fshape = tuple(d for a, d in enumerate(x.shape) if a not in reduce)
    mean, var = _gathered(lambda rows: _pallas(kernel, 2, features, rows), jax.typeof(x).sharding.mesh, stacked)
    count = jnp.full(fshape, total, dtype)
    return count, mean.reshape(fshape), jnp.zeros(fshape, dtype), var.reshape(fshape)


_ORIGINAL_CHAN_REDUCE = am._chan_reduce


@contextlib.contextmanager
def replaced(chan_reduce):
    """jbn, traced with `chan_reduce` in place of `_chan_reduce`."""
    am._chan_reduce = chan_reduce
    try:
        yield
    finally:
        am._chan_reduce = _ORIGINAL_CHAN_REDUCE


def _remote_dma_merge(parts: tuple[jax.Array, ...], axis, groups: int, total: int, interpret: Any = False):
    """Inside a shard_map over `axis`: this device's (mean hi, mean lo, M2 hi, M2 lo), (1, C)
    each, sent to every other device by remote DMA into the same slot of a (groups, 4, C)
    VMEM buffer (after a barrier, so that each peer has entered the kernel), then all groups
    merged: (mean, var), 1-D. One Pallas kernel: no stack, no all-gather. `interpret`:
    False for Mosaic, `pltpu.InterpretParams()` to run it on CPU devices."""
    features = parts[0].shape[-1]

    def kernel(hi_ref, lo_ref, q_ref, r_ref, mean_ref, var_ref, rows, send_sem, recv_sem):
        me = lax.axis_index(axis)
        rows[me] = jnp.concatenate([hi_ref[...], lo_ref[...], q_ref[...], r_ref[...]], axis=0)
        barrier = pltpu.get_barrier_semaphore()
        peers = [lax.rem(me + k, groups) for k in range(1, groups)]
        for peer in peers:
            pl.semaphore_signal(barrier, 1, device_id=(peer,), device_id_type=pl.DeviceIdType.MESH)
        pl.semaphore_wait(barrier, groups - 1)
        copies = [
            pltpu.make_async_remote_copy(
                rows.at[me], rows.at[me], send_sem, recv_sem, device_id=(peer,), device_id_type=pl.DeviceIdType.MESH
            )
            for peer in peers
        ]
        for copy in copies:
            copy.start()
        for copy in copies:
            copy.wait_send()
        for copy in copies:
            copy.wait_recv()
        count, hi, lo, q, r = _merged(rows[...], total, groups)
        mean_ref[...] = hi + lo
        var_ref[...] = (q + r) * (total / jnp.where(count > 0, count, 1))

    return pl.pallas_call(
        kernel,
        out_shape=tuple(jax.ShapeDtypeStruct((features,), jnp.float32) for _ in range(2)),
        scratch_shapes=[
            pltpu.VMEM((groups, 4, features), jnp.float32),
            pltpu.SemaphoreType.DMA,
            pltpu.SemaphoreType.DMA,
        ],
        compiler_params=pltpu.CompilerParams(collective_id=0),
        interpret=interpret,
    )(*parts)


def chan_reduce_remote_dma(x, valid, reduce, dtype):
    """`_chan_reduce` with the grouped case's exchange and merge in one Pallas kernel
    (`_remote_dma_merge`; Mosaic only: see the module doc)."""
    groups = am._device_groups(x, valid, reduce)
    if groups <= 1:
        return _ORIGINAL_CHAN_REDUCE(x, valid, reduce, dtype)
    total = am.element_count(x.shape, reduce)
    stacked = _group_partials(x.astype(dtype), reduce, total, groups)
    mesh = jax.typeof(x).sharding.mesh
    axes = tuple(mesh.axis_names)
    parts = tuple(stacked[:, i] for i in range(4))  # unstacked again: XLA keeps the reduce's four results
    mean, var = jax.shard_map(
        lambda *p: _remote_dma_merge(p, axes[0], groups, total),
        mesh=mesh,
        in_specs=(P(axes),) * 4,
        out_specs=(P(), P()),
        check_vma=False,
    )(*parts)
    fshape = tuple(d for a, d in enumerate(x.shape) if a not in reduce)
    count = jnp.full(fshape, total, dtype)
    return count, mean.reshape(fshape), jnp.zeros(fshape, dtype), var.reshape(fshape)


def synthetic_train_fwd(params, state, x):
    """The synthetic row (see the module doc): features last, every other axis reduced, the
    batch split over the mesh's devices."""
    reduce = tuple(range(x.ndim - 1))
    features = x.shape[-1]
    mesh = jax.typeof(x).sharding.mesh
    groups = math.prod(mesh.axis_sizes)
    total = am.element_count(x.shape, reduce)
    xs = x.astype(jnp.float32)
    stacked = _group_partials(xs, reduce, total, groups)

    def kernel(rows_ref, scale_ref, bias_ref, mean_ref, var_ref, new_mean_ref, new_var_ref, a_ref, b_ref):
        count, hi, lo, q, r = _merged(rows_ref[...], total, groups)
        var = (q + r) * (total / jnp.where(count > 0, count, 1))
        ok = (count > 0) & jnp.isfinite(hi + lo) & jnp.isfinite(var)
        old_mean, old_var = mean_ref[...], var_ref[...]
        new_mean_ref[...] = jnp.where(ok, MOMENTUM * old_mean + (1 - MOMENTUM) * (hi + lo), old_mean)
        new_var_ref[...] = jnp.where(ok, MOMENTUM * old_var + (1 - MOMENTUM) * var, old_var)
        a = scale_ref[...] * lax.rsqrt(var + EPSILON)
        a_ref[...] = a
        b_ref[...] = bias_ref[...] - (hi * a + lo * a)

    per_feature = (params["scale"], params["bias"], state["mean"], state["var"])
    new_mean, new_var, a, b = _gathered(
        lambda rows, *rest: _pallas(kernel, 4, features, rows, *rest),
        mesh,
        stacked,
        *(v.astype(jnp.float32) for v in per_feature),
    )
    return (xs * a + b).astype(x.dtype), {"mean": new_mean, "var": new_var}


REPLACED = {"jbn, merge in Pallas": chan_reduce_merge_in_pallas, "jbn, exchange in Pallas": chan_reduce_remote_dma}
ROWS = ("flax.linen", "jbn", *REPLACED, "synthetic, epilogue in Pallas")


def plan(row: str, shape: tuple[int, ...], dtype: str) -> dict:
    """Figures of one row's training forward (benchmarks/plans.py), plus `kernel_list`
    (opcode, bytes charged), `custom_call_bytes` and `compile_s`."""
    mesh = plans.target(TARGET).mesh
    dt = jnp.dtype(dtype)
    library = "flax.linen" if row == "flax.linen" else "jbn"
    apply, params, state = accelerators.LIBRARIES[library](jnp.zeros((2,) + (1,) * (len(shape) - 2) + (shape[-1],), dt))
    step = synthetic_train_fwd if row.startswith("synthetic") else peers.layer_steps(apply)["train_fwd"]
    data = plans.abstract((jax.ShapeDtypeStruct(shape, dt),), mesh, batch_sharded=True)
    weights = plans.abstract((params, state), mesh, batch_sharded=False)
    start = time.perf_counter()
    with replaced(REPLACED[row]) if row in REPLACED else contextlib.nullcontext():
        compiled = jax.jit(step).lower(*weights, *data).compile()
    seconds = time.perf_counter() - start
    out = plans.figures(compiled, TARGET)
    instructions = plans.entry_instructions(compiled.as_text())
    sizes = {i.name: plans.type_bytes(i.type) for i in instructions}
    kernels = [
        (i.opcode, sizes[i.name] + sum(sizes.get(o, 0) for o in i.operands))
        for i in instructions
        if plans.is_kernel(i.opcode)
    ]
    out["kernel_list"] = kernels
    out["custom_call_bytes"] = sum(b for op, b in kernels if op == "custom-call")
    out["compile_s"] = round(seconds, 1)
    return out


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--shapes", nargs="*", default=list(DEFAULT_CASES), help="SHAPE:DTYPE, e.g. 64x32x32x64:float32"
    )
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=ROWS)
    parser.add_argument("--kernels", action="store_true", help="also list each plan's kernels")
    args = parser.parse_args(argv)
    why = plans.available()
    if why is not None:
        parser.error(why)
    results = []
    print("| case | row | kernels | bytes / flax's | with custom calls charged | compile s |")
    print("|---|---|---|---|---|---|")
    for case in args.shapes:
        text, dtype = case.split(":")
        shape = tuple(int(s) for s in text.split("x"))
        flax = plan("flax.linen", shape, dtype)
        for row in args.rows:
            got = flax if row == "flax.linen" else plan(row, shape, dtype)
            ratio = got["hbm_bytes"] / flax["hbm_bytes"]
            charged = (got["hbm_bytes"] + got["custom_call_bytes"]) / (flax["hbm_bytes"] + flax["custom_call_bytes"])
            print(f"| {text} {dtype} | {row} | {got['kernels']} | {ratio:.5f} | {charged:.5f} | {got['compile_s']} |")
            if args.kernels:
                print("|  |  | " + ", ".join(f"{op} {b}" for op, b in got["kernel_list"]) + " |  |  |  |")
            results.append({"shape": list(shape), "dtype": dtype, "row": row, **got})
    return results


if __name__ == "__main__":
    main()
