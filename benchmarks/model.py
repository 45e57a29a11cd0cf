"""Model-level benchmark: one jitted SGD-momentum training step of a ResNet-18 with
each batch-norm variant, its step time and XLA's temporary memory.

    .venv/bin/python -m benchmarks.model                      # default CPU sizes, writes benchmarks/model.json
    .venv/bin/python -m benchmarks.model --preset gpu         # larger sizes for an accelerator
    .venv/bin/python -m benchmarks.model --sizes 4x16x16:4 --rounds 2 --out /tmp/m   # tiny

The network is ResNet-18 (four stages of two basic blocks, 3x3 convolutions, NHWC, a
1x1 projection with its own batch norm where a stage changes width or stride, global
average pooling, a dense head), written here. Only the batch-norm layers differ
between variants; every variant starts from the same parameters (same module paths,
same seed), so their first steps compute the same numbers (checked in the tests).

A size is `BATCHxHEIGHTxWIDTH:BASE_WIDTH[:stem]`: stage widths BASE x (1, 2, 4, 8);
stem `cifar` (3x3 conv, stride 1, no pooling) or `imagenet` (7x7 conv, stride 2, 3x3
max-pool, stride 2).
"""

from __future__ import annotations

import argparse
import math
import sys
import zlib
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import machine, report, timing

MOMENTUM = 0.9  # batch-norm running-average decay, as flax's ImageNet example
EPSILON = 1e-5
LEARNING_RATE = 0.1
SGD_MOMENTUM = 0.9
CLASSES = 10
VARIANTS = {
    "flax.linen": "flax.linen.BatchNorm, then jax.nn.relu where the block has one",
    "jbn (drop-in)": "jbn.BatchNorm with flax's fields, then jax.nn.relu",
    "jbn, relu fused": "jbn.BatchNorm(activation='relu') where a relu follows; plain jbn.BatchNorm elsewhere",
    "jbn, relu fused + save_output_only": (
        "as 'relu fused', and save_output_only=True on the batch norms without an activation "
        "(the second of each block and the projection's); relu does not allow it"
    ),
}
FLAX = "flax.linen"
CPU_SIZES = ("64x32x32:8", "32x32x32:16", "16x64x64:16:imagenet")
GPU_SIZES = ("128x32x32:64", "64x128x128:64:imagenet")
DEFAULT_OUT = Path(__file__).resolve().parent


class Size(NamedTuple):
    batch: int
    height: int
    width: int
    base: int
    stem: str = "cifar"

    @property
    def name(self) -> str:
        return f"{self.batch}x{self.height}x{self.width}:{self.base}" + (
            "" if self.stem == "cifar" else f":{self.stem}"
        )


def parse_size(text: str) -> Size:
    parts = text.split(":")
    if len(parts) not in (2, 3) or len(parts[0].split("x")) != 3:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected BATCHxHEIGHTxWIDTH:BASE_WIDTH[:cifar|imagenet]")
    batch, height, width = (int(v) for v in parts[0].split("x"))
    stem = parts[2] if len(parts) == 3 else "cifar"
    if stem not in ("cifar", "imagenet"):
        raise argparse.ArgumentTypeError(f"size {text!r}: stem must be 'cifar' or 'imagenet', got {stem!r}")
    return Size(batch, height, width, int(parts[1]), stem)


def make_model(variant: str, size: Size, dtype=jnp.float32, blocks: int = 2, classes: int = CLASSES, **fields):
    """The ResNet linen module for one variant: ResNet-18 with the default 2 blocks per
    stage (1 makes a ResNet-10, for quick smoke runs). `fields` go to every batch-norm
    layer (e.g. use_fast_variance=False for flax, fused=False for jbn). flax is imported
    here, lazily."""
    from flax import linen as nn

    import jbn

    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r}: choose from {list(VARIANTS)}")

    class Norm(nn.Module):
        """Batch norm followed by `activation` (None or 'relu'), as the variant does it."""

        activation: str | None

        @nn.compact
        def __call__(self, x, train: bool):
            common = dict(use_running_average=not train, momentum=MOMENTUM, epsilon=EPSILON, dtype=dtype, **fields)
            if variant == FLAX:
                y = nn.BatchNorm(**common)(x)
            elif variant == "jbn (drop-in)":
                y = jbn.BatchNorm(**common)(x)
            else:
                save = variant.endswith("save_output_only") and self.activation is None
                return jbn.BatchNorm(activation=self.activation, save_output_only=save, **common)(x)
            return nn.relu(y) if self.activation == "relu" else y

    def conv(features, kernel, strides=1):
        pad = (kernel - 1) // 2
        return nn.Conv(
            features, (kernel, kernel), strides, padding=((pad, pad), (pad, pad)), use_bias=False, dtype=dtype
        )

    class Block(nn.Module):
        features: int
        strides: int

        @nn.compact
        def __call__(self, x, train: bool):
            h = Norm("relu")(conv(self.features, 3, self.strides)(x), train)
            h = Norm(None)(conv(self.features, 3)(h), train)
            skip = x
            if self.strides != 1 or x.shape[-1] != self.features:
                skip = Norm(None)(conv(self.features, 1, self.strides)(x), train)
            return nn.relu(h + skip)

    class ResNet18(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            if size.stem == "imagenet":
                x = Norm("relu")(conv(size.base, 7, 2)(x), train)
                x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
            else:
                x = Norm("relu")(conv(size.base, 3)(x), train)
            for stage, mult in enumerate((1, 2, 4, 8)):
                for i in range(blocks):
                    x = Block(size.base * mult, 2 if (stage > 0 and i == 0) else 1)(x, train)
            x = jnp.mean(x, axis=(1, 2))
            return nn.Dense(classes, dtype=dtype)(x)

    return ResNet18()


def batch(size: Size, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.normal(size=(size.batch, size.height, size.width, 3)).astype(np.float32))
    labels = jnp.asarray(rng.integers(0, CLASSES, size=size.batch).astype(np.int32))
    return images, labels


def init_variables(model, images) -> dict:
    """The model's variables from NumPy: He-normal kernels (fan-in scaled), zero biases,
    unit scales, running mean 0 and variance 1. Each kernel is seeded by its path, so
    every variant gets the same numbers. Why not `model.init`: on CPU, running it eagerly
    or compiling it costs 10-15 s of CPU for a ResNet-18 (its random-number graph), more
    than compiling the training step."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=True))

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if name.endswith("['kernel']"):
            fan_in = math.prod(leaf.shape[:-1])
            gain = 1.0 if len(leaf.shape) == 2 else 2.0  # the dense head has no relu after it
            rng = np.random.default_rng(zlib.crc32(name.encode()))
            return jnp.asarray(rng.normal(size=leaf.shape) * math.sqrt(gain / fan_in), leaf.dtype)
        ones = name.endswith(("['scale']", "['var']"))
        return jnp.ones(leaf.shape, leaf.dtype) if ones else jnp.zeros(leaf.shape, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def make_step(variant: str, size: Size, blocks: int = 2):
    """(jitted step, initial state, images, labels); step(state, images, labels) ->
    (new state, loss), state = (params, batch_stats, optimizer state)."""
    import optax

    model = make_model(variant, size, blocks=blocks)
    images, labels = batch(size)
    variables = init_variables(model, images)
    optimizer = optax.sgd(LEARNING_RATE, momentum=SGD_MOMENTUM)
    state = (variables["params"], variables["batch_stats"], optimizer.init(variables["params"]))
    return jax.jit(training_step(model, optimizer)), state, images, labels


def training_step(model, optimizer):
    """step(state, images, labels) -> (new state, loss): one SGD step of `model` on the softmax
    cross-entropy, state = (params, batch_stats, optimizer state). Not jitted (the caller chooses how)."""
    import optax

    def step(state, images, labels):
        params, stats, opt_state = state

        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": stats}, images, train=True, mutable=["batch_stats"]
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()
            return loss, updates["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), stats, opt_state), loss

    return step


def memory_of(compiled) -> dict:
    analysis = compiled.memory_analysis()
    out = {"temp_bytes": int(analysis.temp_size_in_bytes)}
    peak = getattr(analysis, "peak_memory_in_bytes", None)
    if peak is not None:
        out["peak_bytes"] = int(peak)
    return out


def measure(sizes, variants, rounds: int, log=print, blocks: int = 2) -> list[dict]:
    """One row per (size, variant): step seconds per round, temp memory, first loss."""
    rows = []
    for size in sizes:
        calls, info = {}, {}
        for variant in variants:
            step, state, images, labels = make_step(variant, size, blocks)
            compiled = step.lower(state, images, labels).compile()
            _, loss = compiled(state, images, labels)
            info[variant] = {**memory_of(compiled), "first_loss": float(loss)}
            # Every call restarts from the same state: the work per step is what matters here.
            calls[variant] = lambda c=compiled, s=state, i=images, t=labels: jax.block_until_ready(c(s, i, t))
            log(f"  {size.name} {variant}: compiled, temp {info[variant]['temp_bytes'] / 2**20:.1f} MiB")
        results = timing.interleaved(calls, rounds)
        for variant, t in results.items():
            rows.append(
                {
                    "size": size.name,
                    "batch": size.batch,
                    "image": [size.height, size.width],
                    "base_width": size.base,
                    "stem": size.stem,
                    "blocks_per_stage": blocks,
                    "variant": variant,
                    "samples": t.samples.tolist(),
                    "median_s": t.median,
                    "q25_s": t.q25,
                    "q75_s": t.q75,
                    "ratio_to_flax": timing.paired_ratio(t, results[FLAX]) if FLAX in results else None,
                    **info[variant],
                }
            )
        log(f"  {size.name}: " + ", ".join(f"{v} {1e3 * results[v].median:.1f} ms" for v in variants))
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--preset", choices=("cpu", "gpu"), default="cpu", help="default sizes (when --sizes is not given)"
    )
    parser.add_argument(
        "--sizes", nargs="*", type=parse_size, default=None, help="e.g. 32x32x32:16 16x64x64:16:imagenet"
    )
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument(
        "--blocks", type=int, default=2, help="basic blocks per stage: 2 is ResNet-18 (1: quick smoke runs)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for model.json and model.png")
    parser.add_argument("--note", default="", help="a line for RESULTS.md (e.g. how busy the machine was)")
    parser.add_argument("--no-render", action="store_true", help="write model.json only (not RESULTS.md)")
    args = parser.parse_args(argv)
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    sizes = args.sizes or [parse_size(s) for s in (GPU_SIZES if args.preset == "gpu" else CPU_SIZES)]
    info = {**machine.describe(), "versions": machine.versions(), "rounds": args.rounds}
    given = list(argv if argv is not None else sys.argv[1:])
    if "--note" in given:
        i = given.index("--note")
        del given[i : i + 2]
    info["command"] = " ".join(["python -m benchmarks.model", *given])
    if args.blocks < 1:
        parser.error(f"--blocks must be >= 1, got {args.blocks}")
    rows = measure(sizes, args.variants, args.rounds, log=lambda m: print(m, flush=True), blocks=args.blocks)
    results = {"machine": info, "rows": rows, "variants": {v: VARIANTS[v] for v in args.variants}, "note": args.note}
    report.save(results, args.out, "model.json", render_report=not args.no_render)
    return results


if __name__ == "__main__":
    main()
