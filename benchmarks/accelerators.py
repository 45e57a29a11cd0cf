"""The accelerator plans: jbn and its peers compiled for TPU v5e (4 chips) and for NVIDIA
H100 and H200 on a machine without any of them (see benchmarks/plans.py), and what each
compiled program moves through HBM. Run from its own environment (`make bench-accelerators`):

    .venv-accel/bin/python -m benchmarks.accelerators              # everything: RESULTS-accelerators.md/.json/.png
    .venv-accel/bin/python -m benchmarks.accelerators --targets H100 --shapes 64x32x32x64 --no-resnet --out /tmp/a

Cases: the op-level shapes of benchmarks/run.py and 256x56x56x64, float32 and bfloat16,
training forward, training forward+backward (`jax.vjp` with an output cotangent) and eval
forward, each library's layer as in benchmarks/peers.py; and one SGD-momentum training step of
flax's ImageNet-example ResNet-18 (benchmarks/model.py's network, 224x224 images, 1000
classes) at batch 128. Inputs (and cotangents, images, labels) are split along the batch over
the TPU's 4 chips; parameters and state are replicated. Nothing here runs or times anything.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks import plans

plans.environment()  # before JAX starts a backend

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import machine, peers  # noqa: E402
from benchmarks import model as resnet  # noqa: E402

SHAPES = ((64, 32, 32, 64), (128, 16, 16, 256), (256, 7, 7, 512), (4096, 1024), (256, 56, 56, 64))
DTYPES = ("float32", "bfloat16")
CASES = ("train_fwd", "train_fwd_bwd", "eval_fwd")
FLAX = "flax.linen"
LIBRARIES = {
    "jbn": lambda x: peers.make_jbn(x),
    "jbn (fused=False)": lambda x: peers.make_jbn(x, fused=False),
    FLAX: lambda x: peers.make_flax_linen(x),
    "flax.linen (use_fast_variance=False)": lambda x: peers.make_flax_linen(x, use_fast_variance=False),
    "haiku": peers.make_haiku,
    "equinox": peers.make_equinox,
}
# ResNet-18 variants: benchmarks/model.py's variant and the fields every batch norm gets.
RESNET_VARIANTS = {
    "jbn": ("jbn (drop-in)", {}),
    "jbn (fused=False)": ("jbn (drop-in)", {"fused": False}),
    "jbn, relu fused": ("jbn, relu fused", {}),
    FLAX: (FLAX, {}),
    "flax.linen (use_fast_variance=False)": (FLAX, {"use_fast_variance": False}),
}
RESNET = resnet.Size(128, 224, 224, 64, "imagenet")
RESNET_CLASSES = 1000
RESNET_DTYPES = ("float32", "bfloat16")
# XLA's TPU compiler takes about a minute of an idle 2-core CPU for one ResNet-18 step over 4
# chips (6-7 minutes when contended; 10-15 s for a GPU): by default only jbn's and flax's on TPU.
TPU_RESNET_VARIANTS = ("jbn", FLAX)
TPU_RESNET_DTYPES = ("float32", "bfloat16")
DEFAULT_OUT = Path(__file__).resolve().parent


def op_plan(library: str, shape, dtype: str, case: str, target_name: str) -> dict:
    """Figures of one library's layer, one case, compiled for one target."""
    mesh = plans.target(target_name).mesh
    dt = jnp.dtype(dtype)
    # Parameters need only the rank and C: initialized on a small array, not the full batch.
    apply, params, state = LIBRARIES[library](jnp.zeros((2,) + (1,) * (len(shape) - 2) + (shape[-1],), dt))
    x = jax.ShapeDtypeStruct(tuple(shape), dt)
    data = plans.abstract((x, x) if case == "train_fwd_bwd" else (x,), mesh, batch_sharded=True)
    weights = plans.abstract((params, state), mesh, batch_sharded=False)
    return plans.compile_plan(peers.layer_steps(apply)[case], (*weights, *data), target_name)


def resnet_step(variant: str, dtype: str):
    """(step, abstract state, abstract images, abstract labels) of the ResNet-18 training step."""
    import optax

    name, fields = RESNET_VARIANTS[variant]
    model = resnet.make_model(name, RESNET, jnp.dtype(dtype), classes=RESNET_CLASSES, **fields)
    images = jax.ShapeDtypeStruct((RESNET.batch, RESNET.height, RESNET.width, 3), jnp.float32)
    labels = jax.ShapeDtypeStruct((RESNET.batch,), jnp.int32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(images.shape, images.dtype), True))
    optimizer = optax.sgd(resnet.LEARNING_RATE, momentum=resnet.SGD_MOMENTUM)
    state = (variables["params"], variables["batch_stats"], jax.eval_shape(optimizer.init, variables["params"]))
    return resnet.training_step(model, optimizer), state, images, labels


def resnet_plan(variant: str, dtype: str, target_name: str) -> dict:
    mesh = plans.target(target_name).mesh
    step, state, images, labels = resnet_step(variant, dtype)
    args = (plans.abstract(state, mesh, False), *plans.abstract((images, labels), mesh, True))
    return plans.compile_plan(step, args, target_name)


def jobs(targets, shapes, dtypes, cases, libraries, resnet_variants, resnet_dtypes, tpu_resnet) -> list[dict]:
    """Every (target, case, library) to compile, as the keys of its row; `tpu_resnet`:
    (variants, dtypes) of the ResNet-18 step on TPU. The op-level cases first, the TPU's
    ResNet-18 steps (minutes each) last."""
    out = [
        dict(target=target_name, shape=list(shape), dtype=dtype, case=case, library=library)
        for target_name in targets
        for shape in shapes
        for dtype in dtypes
        for case in cases
        for library in libraries
    ]
    for target_name in sorted(targets, key=lambda t: t.startswith("TPU")):
        variants, step_dtypes = resnet_variants, resnet_dtypes
        if target_name.startswith("TPU"):
            variants, step_dtypes = [v for v in resnet_variants if v in tpu_resnet[0]], tpu_resnet[1]
        out += [
            dict(target=target_name, shape=None, dtype=dtype, case="resnet18_step", library=variant)
            for dtype in step_dtypes
            for variant in variants
        ]
    return out


def run_job(job: dict) -> dict:
    start = time.perf_counter()
    if job["case"] == "resnet18_step":
        figures = resnet_plan(job["library"], job["dtype"], job["target"])
    else:
        figures = op_plan(job["library"], job["shape"], job["dtype"], job["case"], job["target"])
    return {**job, **figures, "compile_s": time.perf_counter() - start}


def parse_shape(text: str) -> tuple[int, ...]:
    return tuple(int(s) for s in text.lower().split("x"))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", nargs="*", default=list(plans.TARGETS), choices=plans.TARGETS)
    parser.add_argument("--shapes", nargs="*", type=parse_shape, default=list(SHAPES))
    parser.add_argument("--dtypes", nargs="*", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=CASES)
    parser.add_argument("--libraries", nargs="*", default=list(LIBRARIES), choices=list(LIBRARIES))
    parser.add_argument("--resnet-variants", nargs="*", default=list(RESNET_VARIANTS), choices=list(RESNET_VARIANTS))
    parser.add_argument("--resnet-dtypes", nargs="*", default=list(RESNET_DTYPES), choices=RESNET_DTYPES)
    parser.add_argument(
        "--tpu-resnet-variants", nargs="*", default=list(TPU_RESNET_VARIANTS), choices=list(RESNET_VARIANTS)
    )
    parser.add_argument("--tpu-resnet-dtypes", nargs="*", default=list(TPU_RESNET_DTYPES), choices=RESNET_DTYPES)
    parser.add_argument("--no-resnet", action="store_true", help="op-level cases only")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for RESULTS-accelerators.md/.json/.png")
    parser.add_argument("--log", type=Path, default=Path("build/bench-accelerators.log"), help="one line per plan")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    why = plans.available()
    if why is not None:
        parser.error(why)

    from benchmarks import accelerators_report

    resnet_variants = [] if args.no_resnet else args.resnet_variants
    todo = jobs(
        args.targets,
        args.shapes,
        args.dtypes,
        args.cases,
        args.libraries,
        resnet_variants,
        args.resnet_dtypes,
        (args.tpu_resnet_variants, args.tpu_resnet_dtypes),
    )
    info = {**machine.describe(), "versions": machine.versions()}
    info["versions"]["libtpu"] = _version("libtpu")
    info["versions"]["jax-cuda12-plugin"] = _version("jax-cuda12-plugin")
    info["command"] = " ".join(["python -m benchmarks.accelerators", *(argv if argv is not None else sys.argv[1:])])
    info["targets"] = {name: plans.target(name).description for name in args.targets}
    args.out.mkdir(parents=True, exist_ok=True)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    results = {"machine": info, "rows": rows}
    started = time.perf_counter()
    with args.log.open("w") as log, _progress(len(todo), args.no_progress) as progress:
        for job in todo:
            row = run_job(job)
            rows.append(row)
            log.write(json.dumps(row) + "\n")
            log.flush()
            progress.update(1)
            (args.out / "RESULTS-accelerators.partial.json").write_text(json.dumps(results))
    info["total_s"] = round(time.perf_counter() - started, 1)
    (args.out / "RESULTS-accelerators.json").write_text(json.dumps(results, indent=1))
    (args.out / "RESULTS-accelerators.partial.json").unlink(missing_ok=True)
    accelerators_report.write(results, args.out)
    return results


def _version(package: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _progress(total: int, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="accelerator plans", disable=disable, file=sys.stderr)


if __name__ == "__main__":
    main()
