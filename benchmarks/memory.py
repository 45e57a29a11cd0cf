"""Memory of a training step: XLA's temporary buffers for a deep conv-BN-ReLU net, and
what one BN block saves for the backward pass.

Every library gets the same network (3x3 convolutions via `lax.conv_general_dilated`,
NHWC, no conv bias, a mean-square loss) with its own batch norm in between; only the
batch-norm layer (and, for jbn's fused variants, the activation inside it) differs.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import print_saved_residuals

from benchmarks import peers


def normal(shape, dtype, seed, std=1.0, mean=0.0) -> jax.Array:
    """Random input from NumPy (jax.random would compile a generator per shape)."""
    return jnp.asarray((np.random.default_rng(seed).normal(size=shape) * std + mean).astype(np.float32)).astype(dtype)


class Variant(NamedTuple):
    label: str
    make: Callable  # x -> (apply, params, state), as in benchmarks.peers
    relu_after: bool  # apply jax.nn.relu after the layer (False: the layer has its own)


VARIANTS = (
    Variant("jbn, activation='relu' (fused)", lambda x: peers.make_jbn(x, activation="relu"), False),
    Variant("jbn + jax.nn.relu", peers.make_jbn, True),
    Variant(
        "jbn, leaky_relu(0.01), save_output_only",
        lambda x: peers.make_jbn(x, activation="leaky_relu", save_output_only=True),
        False,
    ),
    Variant("jbn (fused=False) + jax.nn.relu", lambda x: peers.make_jbn(x, fused=False), True),
    Variant("flax.linen + jax.nn.relu", peers.make_flax_linen, True),
    Variant("flax.nnx + jax.nn.relu", peers.make_flax_nnx, True),
    Variant("haiku + jax.nn.relu", peers.make_haiku, True),
    Variant("equinox + jax.nn.relu", peers.make_equinox, True),
)


def library_of(variant: Variant) -> str:
    """The library a variant's label names first ("haiku + jax.nn.relu" -> "haiku")."""
    return variant.label.split(",")[0].split(" ")[0]


def _block(variant: Variant, x):
    apply, params, state = variant.make(x)

    def block(params, state, h):
        h, state = apply(params, state, h, True)
        return (jax.nn.relu(h) if variant.relu_after else h), state

    return block, params, state


def deep_net_temp_bytes(variant: Variant, shape, dtype, layers: int) -> int:
    """`temp_size_in_bytes` of the compiled training step (loss, gradients of conv
    weights and BN parameters, new BN state) of `layers` conv-BN-activation blocks."""
    x = normal(shape, dtype, seed=0)
    channels = shape[-1]
    block, params, state = _block(variant, x)
    weights = [
        normal((3, 3, channels, channels), dtype, seed=1 + i, std=math.sqrt(2 / (9 * channels))) for i in range(layers)
    ]
    bn_params = [params] * layers
    bn_states = [state] * layers

    def loss(weights, bn_params, bn_states, x):
        h, new_states = x, []
        for w, p, s in zip(weights, bn_params, bn_states):
            h = lax.conv_general_dilated(h, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
            h, s = block(p, s, h)
            new_states.append(s)
        return jnp.mean(jnp.square(h.astype(jnp.float32))), new_states

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    compiled = step.lower(weights, bn_params, bn_states, x).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


class Residual(NamedTuple):
    dtype: str
    shape: tuple[int, ...]
    source: str

    @property
    def nbytes(self) -> int:
        bits = int(re.sub(r"\D", "", self.dtype) or 8)  # f32 -> 32, bf16 -> 16, bool -> 8
        return math.prod(self.shape) * max(bits, 8) // 8


def saved_residuals(f, *args) -> list[Residual]:
    """What `jax.vjp(f, *args)` keeps for the backward pass, parsed from
    `jax.ad_checkpoint.print_saved_residuals` (the public way to list them)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(f, *args)
    found = []
    for line in out.getvalue().splitlines():
        m = re.match(r"^\s*(\w+)\[([\d,\s]*)\]\s*(.*)$", line)
        if m:
            dims = tuple(int(d) for d in m.group(2).split(",") if d.strip())
            found.append(Residual(m.group(1), dims, m.group(3)))
    return found


def block_residuals(variant: Variant, shape, dtype) -> list[Residual]:
    """Residuals of one BN(+activation) block in training, differentiated with respect
    to its input and parameters."""
    x = normal(shape, dtype, seed=0)
    block, params, state = _block(variant, x)
    # The state goes in as an argument (flax.nnx cannot update a variable created outside the trace).
    return saved_residuals(lambda x, p, s: block(p, s, x)[0], x, params, state)


def activation_sized(residuals: list[Residual], shape) -> list[Residual]:
    size = math.prod(shape)
    return [r for r in residuals if math.prod(r.shape) == size]


def describe_residuals(residuals: list[Residual], shape) -> str:
    big = activation_sized(residuals, shape)
    if not big:
        return "none"
    # "output of sub from /long/path/normalization.py:205:6 (_normalize)" -> "... normalization.py:205 (_normalize)"
    short = lambda source: re.sub(r"/\S*/([^/\s]+\.py):(\d+):\d+", r"\1:\2", source)  # noqa: E731
    return ", ".join(f"{r.dtype} ({short(r.source)})" if r.source else r.dtype for r in big)


def as_mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f}"


def summary(variant: Variant, shape, dtype, layers: int) -> dict:
    residuals = block_residuals(variant, shape, dtype)
    big = activation_sized(residuals, shape)
    return {
        "label": variant.label,
        "temp_bytes": deep_net_temp_bytes(variant, shape, dtype, layers),
        "activation_residuals": len(big),
        "activation_residual_bytes": sum(r.nbytes for r in big),
        "residual_bytes": sum(r.nbytes for r in residuals),
        "residuals": describe_residuals(residuals, shape),
    }


__all__ = ["VARIANTS", "Variant", "block_residuals", "deep_net_temp_bytes", "saved_residuals", "summary"]
