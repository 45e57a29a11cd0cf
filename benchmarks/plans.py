"""Compiling for TPU v5e and NVIDIA H100/H200 on a machine without them (deviceless
ahead-of-time compilation), and what the compiled program says it will do.

    JAX_PLATFORMS=cpu JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1  (set by `environment()`)

A `Target` holds a mesh of devices that exist only as a description: libtpu's `v5e:2x2`
topology (4 chips) or the CUDA plugin's one-device topology made from a GPU target config
(benchmarks/h100.textproto, h200.textproto: each card's published figures). `jax.jit(f)
.lower(ShapeDtypeStructs on that mesh).compile()` then runs XLA's TPU or GPU compiler here.

Figures of a compiled plan (`figures`):
- `kernels`: instructions of the ENTRY computation that launch work (fusions, custom calls,
  copies, collectives, ...); parameters, constants, tuples, get-tuple-element, bitcasts and the
  `-done` half of async pairs are free.
- `hbm_bytes`: on TPU, XLA's own cost analysis (`bytes accessed`, per chip); on GPU, where the
  cost analysis is not available, each kernel charged its operands plus its results. That GPU
  figure is an upper bound: a kernel that reads a slice of an operand is charged the whole of it,
  and an operand that stays in L2 between kernels is charged again.
- `model_bytes`: the per-kernel charge on either target (on TPU: to compare with the cost analysis).
- `estimated_s`: TPU's cost-model time (`optimal_seconds`); None on GPU.
- `temp_bytes`: the compiled program's temporary buffers (XLA's memory analysis).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, NamedTuple

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

HERE = Path(__file__).resolve().parent
TPU_TOPOLOGY = "v5e:2x2"
GPU_CONFIGS = {"H100": HERE / "h100.textproto", "H200": HERE / "h200.textproto"}
TARGETS = ("TPU v5e", "H100", "H200")
AXIS = "batch"

FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all", "partition-id", "replica-id"}
ITEMSIZE = {
    "pred": 1,
    "s4": 1,
    "u4": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
    "token": 0,
}
ARRAY_TYPE = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\]")
OPERAND = re.compile(r"%([\w.\-]+)")


def environment() -> None:
    """What deviceless compilation needs, set before any JAX backend starts: arrays stay on
    the CPU, the CUDA plugin starts without a CUDA runtime, libtpu does not look for a TPU host."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # libtpu otherwise locks /tmp for one process
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    jax.config.update("jax_platforms", "cpu")  # where jax was imported first (e.g. by a conftest)


def available() -> str | None:
    """None where libtpu and the CUDA plugin import here; else why not (and how to get them)."""
    missing = []
    for module in ("libtpu", "jax_cuda12_plugin"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if not missing:
        return None
    return (
        f"{' and '.join(missing)} not installed: the accelerator plans compile in their own environment "
        "(.venv-accel): `make test-accelerators` runs these tests there, `make bench-accelerators` the benchmark"
    )


class Target(NamedTuple):
    name: str  # "TPU v5e", "H100", "H200"
    platform: str  # "tpu" or "cuda"
    mesh: jax.sharding.Mesh  # one axis, AXIS, over the target's chips
    description: str  # what the figures describe (topology, card)


_TARGETS: dict[str, Target] = {}


def target(name: str) -> Target:
    """The deviceless mesh of one target (made once per process)."""
    if name in _TARGETS:
        return _TARGETS[name]
    from jax.experimental import topologies

    if name == "TPU v5e":
        topology = topologies.get_topology_desc(topology_name=TPU_TOPOLOGY, platform="tpu")
        devices = len(topology.devices)
        description = f"TPU v5e, topology {TPU_TOPOLOGY} ({devices} chips), libtpu's deviceless topology"
        made = Target(name, "tpu", topologies.make_mesh(topology, (devices,), (AXIS,)), description)
    elif name in GPU_CONFIGS:
        config = GPU_CONFIGS[name].read_text()
        topology = topologies.get_topology_desc(platform="cuda", target_config=config, topology="1x1x1")
        description = f"{name}, one device, target config benchmarks/{GPU_CONFIGS[name].name}"
        made = Target(name, "cuda", topologies.make_mesh(topology, (1,), (AXIS,)), description)
    else:
        raise ValueError(f"target {name!r}: choose from {TARGETS}")
    _TARGETS[name] = made
    return made


def abstract(tree: Any, mesh, batch_sharded: bool) -> Any:
    """ShapeDtypeStructs of `tree`'s leaves on `mesh`: split along axis 0 over the mesh
    (`batch_sharded`) or replicated."""

    def one(leaf):
        spec = P(AXIS) if batch_sharded and getattr(leaf, "ndim", 0) > 0 else P()
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=NamedSharding(mesh, spec))

    return jax.tree.map(one, tree)


def type_bytes(text: str) -> int:
    """Bytes of an HLO type, e.g. `f32[16,64]{1,0}` or a tuple of such."""
    total = 0
    for dtype, dims in ARRAY_TYPE.findall(text):
        size = ITEMSIZE.get(dtype)
        if size is None:
            continue
        count = 1
        for d in filter(None, dims.split(",")):
            count *= int(d)
        total += size * count
    return total


def _closing(text: str, start: int) -> int:
    """Index just past the parenthesis that closes the one at `start`."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced HLO: {text[start : start + 80]!r}")


class Instruction(NamedTuple):
    name: str
    type: str
    opcode: str
    operands: tuple[str, ...]


def entry_instructions(hlo: str) -> list[Instruction]:
    """The instructions of the ENTRY computation of an HLO module's text."""
    start = hlo.index("\nENTRY ")
    body = hlo[hlo.index("{\n", start) + 2 :]
    out = []
    for line in body.splitlines():
        line = line.strip()
        if line == "}":
            break
        if " = " not in line:
            continue
        lhs, rest = line.split(" = ", 1)
        name = lhs.removeprefix("ROOT ").strip().lstrip("%")
        if rest.startswith("("):
            end = _closing(rest, 0)
            type_text, rest = rest[:end], rest[end:].lstrip()
        else:
            type_text, rest = rest.split(" ", 1)
        opcode = rest[: rest.index("(")]
        args = rest[rest.index("(") : _closing(rest, rest.index("("))]
        out.append(Instruction(name, type_text, opcode, tuple(OPERAND.findall(args))))
    return out


def is_kernel(opcode: str) -> bool:
    return opcode not in FREE and not opcode.endswith("-done")


def kernel_model(hlo: str) -> tuple[int, int]:
    """(kernels, bytes): each ENTRY kernel charged its operands plus its results."""
    instructions = entry_instructions(hlo)
    sizes = {i.name: type_bytes(i.type) for i in instructions}
    kernels = [i for i in instructions if is_kernel(i.opcode)]
    charged = sum(sizes[i.name] + sum(sizes.get(o, 0) for o in i.operands) for i in kernels)
    return len(kernels), charged


def figures(compiled, target_name: str) -> dict:
    """The figures of one compiled plan (see the module doc)."""
    kernels, model = kernel_model(compiled.as_text())
    out = {"kernels": kernels, "model_bytes": model, "hbm_bytes": model, "estimated_s": None}
    cost = compiled.cost_analysis()
    if isinstance(cost, list):  # older JAX: one dict per program
        cost = cost[0] if cost else None
    if target_name.startswith("TPU") and cost:
        out["hbm_bytes"] = int(cost["bytes accessed"])
        seconds = cost.get("optimal_seconds")
        out["estimated_s"] = float(seconds) if seconds is not None and seconds >= 0 else None  # < 0: no estimate
    memory = compiled.memory_analysis()
    out["temp_bytes"] = int(memory.temp_size_in_bytes) if memory is not None else None
    return out


def compile_plan(fn, args: tuple, target_name: str) -> dict:
    """Figures of `jax.jit(fn)` compiled for one target on abstract `args` (ShapeDtypeStructs
    carrying shardings on that target's mesh)."""
    compiled = jax.jit(fn).lower(*args).compile()
    return figures(compiled, target_name)
