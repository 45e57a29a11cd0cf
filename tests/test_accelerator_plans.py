"""jbn's compiled plans on TPU v5e (4 chips, input split along the batch) and H100, against
flax.linen.BatchNorm's (default options) in the same case: HBM bytes and kernels, as
benchmarks/plans.py reads them from a deviceless compilation. Compile properties, not
timings. They need libtpu and the CUDA plugin, so they run in the accelerator environment:

    make accel-env && JAX_PLATFORMS=cpu .venv-accel/bin/python -m pytest -q tests/test_accelerator_plans.py

(.ci/run does this); in the main environment they skip, saying so.

Cases: every op-level shape of benchmarks/accelerators.py, float32 and bfloat16, training
forward and training forward+backward (the cases the targets name; eval forward is one
elementwise pass in every library), and the ResNet-18 training step on H100. The ResNet-18
step on TPU is left to the benchmark: XLA's TPU compiler takes 6-7 minutes per variant here.

Targets: bytes <= flax's and kernels <= flax's + 1 per op-level case; ResNet-18 bytes <= flax's.
Where jbn does not meet one yet, the case is a strict expected failure whose reason gives the
numbers measured when it was marked (RECORDED): it turns red when the target is met (then the
mark goes). A plan getting worse inside a mark would not show, so
`test_marked_cases_are_no_worse_than_recorded` holds each marked case to its recorded numbers.
"""

from __future__ import annotations

import functools

import pytest

from benchmarks import plans

WHY_NOT = plans.available()
if WHY_NOT is not None:
    pytest.skip(WHY_NOT, allow_module_level=True)

from benchmarks import accelerators, tpu_conv_fusion  # noqa: E402  (sets the deviceless environment)

# The plans compare jbn with flax.linen.BatchNorm, whose bfloat16 path mixes bfloat16 and float32 implicitly:
# the programs are compiled as their users run them, under JAX's default promotion rules.
pytestmark = pytest.mark.script_not_strict(
    "flax.linen.BatchNorm (the baseline of every plan) mixes bfloat16 and float32 by implicit promotion"
)

TARGETS = ("TPU v5e", "H100")
CASES = ("train_fwd", "train_fwd_bwd")
SHAPES = accelerators.SHAPES
DTYPES = ("float32", "bfloat16")
FLAX = accelerators.FLAX

# Not met yet, as measured when marked (benchmarks/RESULTS-accelerators.json of the same code): per
# (target, case, shape, dtype, property), (jbn's bytes / flax's, jbn's kernels, flax's kernels).
RECORDED: dict[tuple[str, str, str, str, str], tuple[float, int, int]] = {
    ("TPU v5e", "train_fwd", "128x16x16x256", "bfloat16", "bytes"): (1.00184, 13, 9),
    ("TPU v5e", "train_fwd", "128x16x16x256", "bfloat16", "kernels"): (1.00184, 13, 9),
    ("TPU v5e", "train_fwd", "128x16x16x256", "float32", "bytes"): (1.00092, 13, 9),
    ("TPU v5e", "train_fwd", "128x16x16x256", "float32", "kernels"): (1.00092, 13, 9),
    ("TPU v5e", "train_fwd", "256x56x56x64", "bfloat16", "bytes"): (1.00006, 12, 9),
    ("TPU v5e", "train_fwd", "256x56x56x64", "bfloat16", "kernels"): (1.00006, 12, 9),
    ("TPU v5e", "train_fwd", "256x56x56x64", "float32", "bytes"): (1.00003, 12, 9),
    ("TPU v5e", "train_fwd", "256x56x56x64", "float32", "kernels"): (1.00003, 12, 9),
    ("TPU v5e", "train_fwd", "256x7x7x512", "bfloat16", "bytes"): (1.00399, 11, 9),
    ("TPU v5e", "train_fwd", "256x7x7x512", "bfloat16", "kernels"): (1.00399, 11, 9),
    ("TPU v5e", "train_fwd", "256x7x7x512", "float32", "bytes"): (1.002, 11, 9),
    ("TPU v5e", "train_fwd", "256x7x7x512", "float32", "kernels"): (1.002, 11, 9),
    ("TPU v5e", "train_fwd", "4096x1024", "bfloat16", "bytes"): (1.01214, 11, 9),
    ("TPU v5e", "train_fwd", "4096x1024", "bfloat16", "kernels"): (1.01214, 11, 9),
    ("TPU v5e", "train_fwd", "4096x1024", "float32", "bytes"): (1.0061, 11, 9),
    ("TPU v5e", "train_fwd", "4096x1024", "float32", "kernels"): (1.0061, 11, 9),
    ("TPU v5e", "train_fwd", "64x32x32x64", "bfloat16", "bytes"): (1.0007, 12, 9),
    ("TPU v5e", "train_fwd", "64x32x32x64", "bfloat16", "kernels"): (1.0007, 12, 9),
    ("TPU v5e", "train_fwd", "64x32x32x64", "float32", "bytes"): (1.00035, 12, 9),
    ("TPU v5e", "train_fwd", "64x32x32x64", "float32", "kernels"): (1.00035, 12, 9),
    ("TPU v5e", "train_fwd_bwd", "128x16x16x256", "bfloat16", "bytes"): (1.00126, 23, 18),
    ("TPU v5e", "train_fwd_bwd", "128x16x16x256", "bfloat16", "kernels"): (1.00126, 23, 18),
    ("TPU v5e", "train_fwd_bwd", "256x56x56x64", "bfloat16", "bytes"): (1.00005, 22, 18),
    ("TPU v5e", "train_fwd_bwd", "256x56x56x64", "bfloat16", "kernels"): (1.00005, 22, 18),
    ("TPU v5e", "train_fwd_bwd", "256x7x7x512", "bfloat16", "bytes"): (1.00303, 22, 17),
    ("TPU v5e", "train_fwd_bwd", "256x7x7x512", "bfloat16", "kernels"): (1.00303, 22, 17),
    ("TPU v5e", "train_fwd_bwd", "4096x1024", "bfloat16", "bytes"): (1.00877, 22, 17),
    ("TPU v5e", "train_fwd_bwd", "4096x1024", "bfloat16", "kernels"): (1.00877, 22, 17),
    ("TPU v5e", "train_fwd_bwd", "64x32x32x64", "bfloat16", "bytes"): (1.00062, 22, 18),
    ("TPU v5e", "train_fwd_bwd", "64x32x32x64", "bfloat16", "kernels"): (1.00062, 22, 18),
}


@functools.cache
def op_plan(library: str, target: str, case: str, shape: tuple[int, ...], dtype: str) -> dict:
    return accelerators.op_plan(library, shape, dtype, case, target)


@functools.cache
def resnet_plan(library: str, target: str, dtype: str) -> dict:
    return accelerators.resnet_plan(library, dtype, target)


def shape_id(shape) -> str:
    return "x".join(map(str, shape))


def cases(prop: str):
    for target in TARGETS:
        for case in CASES:
            for shape in SHAPES:
                for dtype in DTYPES:
                    key = (target, case, shape_id(shape), dtype, prop)
                    marks = []
                    if key in RECORDED:
                        ratio, mine, theirs = RECORDED[key]
                        marks.append(
                            pytest.mark.xfail(
                                strict=True,
                                reason=f"not met yet: jbn {ratio:.4f}x flax's bytes, {mine} kernels against {theirs}",
                            )
                        )
                    yield pytest.param(target, case, shape, dtype, marks=marks, id="-".join(key[:4]))


@pytest.mark.parametrize("target, case, shape, dtype", list(cases("bytes")))
def test_jbn_moves_no_more_hbm_bytes_than_flax(target, case, shape, dtype):
    jbn, flax = op_plan("jbn", target, case, shape, dtype), op_plan(FLAX, target, case, shape, dtype)
    assert jbn["hbm_bytes"] <= flax["hbm_bytes"], (jbn["hbm_bytes"] / flax["hbm_bytes"], jbn, flax)


@pytest.mark.parametrize("target, case, shape, dtype", list(cases("kernels")))
def test_jbn_launches_at_most_one_kernel_more_than_flax(target, case, shape, dtype):
    jbn, flax = op_plan("jbn", target, case, shape, dtype), op_plan(FLAX, target, case, shape, dtype)
    assert jbn["kernels"] <= flax["kernels"] + 1, (jbn["kernels"], flax["kernels"])


# The ResNet-18 step on H100, where not met yet: jbn's bytes / flax's, as measured when marked (met in both
# dtypes: 0.977x in float32, 0.958x in bfloat16).
RESNET_RECORDED: dict[str, float] = {}


@pytest.mark.parametrize(
    "dtype",
    [
        pytest.param(
            d,
            marks=[pytest.mark.xfail(strict=True, reason=f"not met yet: jbn {RESNET_RECORDED[d]:.3f}x flax's bytes")]
            if d in RESNET_RECORDED
            else [],
        )
        for d in DTYPES
    ],
)
def test_resnet18_step_on_h100_moves_no_more_bytes_than_flax(dtype):
    jbn, flax = resnet_plan("jbn", "H100", dtype), resnet_plan(FLAX, "H100", dtype)
    assert jbn["hbm_bytes"] <= flax["hbm_bytes"], jbn["hbm_bytes"] / flax["hbm_bytes"]


def test_marked_cases_are_no_worse_than_recorded():
    """An expected failure would hide a plan getting worse: each marked case is held to the
    ratio measured when it was marked (bytes within 0.5%, kernels not more)."""
    worse = []
    for (target, case, shape, dtype, prop), (ratio, mine, _) in RECORDED.items():
        shape_tuple = tuple(int(s) for s in shape.split("x"))
        jbn = op_plan("jbn", target, case, shape_tuple, dtype)
        flax = op_plan(FLAX, target, case, shape_tuple, dtype)
        now = jbn["hbm_bytes"] / flax["hbm_bytes"]
        if (prop == "bytes" and now > ratio * 1.005) or (prop == "kernels" and jbn["kernels"] > mine):
            worse.append((target, case, shape, dtype, prop, ratio, now, mine, jbn["kernels"]))
    for dtype, ratio in RESNET_RECORDED.items():
        jbn, flax = resnet_plan("jbn", "H100", dtype), resnet_plan(FLAX, "H100", dtype)
        if jbn["hbm_bytes"] / flax["hbm_bytes"] > ratio * 1.005:
            worse.append(("H100", "resnet18_step", dtype, ratio, jbn["hbm_bytes"] / flax["hbm_bytes"]))
    stack, flax_stack = conv_stack_plan("jbn"), conv_stack_plan(FLAX)
    if stack["hbm_bytes"] / flax_stack["hbm_bytes"] > CONV_STACK_RECORDED * 1.005:
        worse.append(("TPU v5e", "conv stack", CONV_STACK_RECORDED, stack["hbm_bytes"] / flax_stack["hbm_bytes"]))
    assert not worse, worse


# Where a convolution produces batch norm's input (benchmarks/tpu_conv_fusion.py: 3 x (conv, norm, relu),
# training forward, float32): XLA:TPU computes flax's two add-reductions in the fusion that writes the
# convolution's output; jbn's exact statistics (one variadic reduction with Chan's merge) are a kernel of
# their own that reads that output again. The reason the ResNet-18 step on TPU is above flax's bytes.


CONV_STACK_RECORDED = 1.2403  # jbn's bytes / flax's on the probe's conv stack, when marked


@functools.cache
def conv_stack_plan(norm: str) -> dict:
    return tpu_conv_fusion.stack_plan(norm, "float32")


@pytest.mark.parametrize("norm", [FLAX, "sums about the running mean"])
def test_add_reductions_are_computed_as_the_convolution_writes_its_output_on_tpu(norm):
    """The probe's reading of the plan, on the statistics XLA:TPU does fuse (flax's, and sums
    shifted by a vector known before the convolution)."""
    plan = conv_stack_plan(norm)
    assert plan["conv_fusions"] == plan["conv_fusions_reducing"] == tpu_conv_fusion.LAYERS, plan


@pytest.mark.xfail(
    strict=True,
    reason=f"not met yet: 0 of 3 convolution fusions reduce, jbn {CONV_STACK_RECORDED}x flax's bytes, 31 kernels "
    "against 19 "
    "(XLA:TPU fuses no variadic reduction with a merge of its own into a convolution)",
)
def test_jbn_statistics_are_computed_as_the_convolution_writes_its_output_on_tpu():
    plan = conv_stack_plan("jbn")
    assert plan["conv_fusions"] == plan["conv_fusions_reducing"] == tpu_conv_fusion.LAYERS, plan
