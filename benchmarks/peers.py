"""The batch-norm layers under test, each behind the same small interface.

A `Layer` holds one library's batch norm for one input shape and dtype: its parameters
and state, and three jitted steps over the same input:

- `train_fwd(x)`: training-mode forward (batch statistics, updated running statistics);
- `eval_fwd(x)`: evaluation-mode forward (running statistics);
- `train_fwd_bwd(x, ct)`: training forward plus backward, as `jax.vjp` with the given
  output cotangent `ct` (not a loss, which would add passes of its own); returns the
  output, the new state and the gradients of input and parameters.

JAX layers use the library's default layout, features last (`axis=-1`); equinox's
BatchNorm, which normalizes per example under `vmap`, sees the same memory as rows of
features (`x.reshape(-1, C)` vmapped with an axis name). bfloat16 runs feed bfloat16 and
ask each library for a bfloat16 output with float32 parameters where it allows it
(haiku and equinox keep parameters in the input dtype or their `dtype`, see NOTES).
PyTorch's BatchNorm2d/1d runs on CPU in channels-last memory (the same layout).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

EPSILON = 1e-5
MOMENTUM = 0.99  # Flax convention; PyTorch's 1 - 0.99 = 0.01

NOTES = {
    "jbn": "jbn.BatchNorm(dtype=input dtype) (linen module), the fused derivative rule (the default).",
    "jbn (fused=False)": "jbn.BatchNorm(dtype=input dtype, fused=False): the same math by plain autodiff.",
    "flax.linen": "flax.linen.BatchNorm(dtype=input dtype).",
    "flax.nnx": "flax.nnx.BatchNorm(dtype=input dtype), split/merged into a pure function.",
    "haiku": "haiku.BatchNorm(create_scale=True, create_offset=True, decay_rate=0.99); its parameters take the "
    "input dtype (bfloat16 in bfloat16 runs).",
    "equinox": "equinox.nn.BatchNorm(mode='batch', dtype=input dtype) under vmap over rows of features; "
    "its parameters and running statistics take `dtype` (bfloat16 in bfloat16 runs).",
    "torch": "torch.nn.BatchNorm2d (BatchNorm1d for dense) on CPU, channels-last memory, module cast to the "
    "input dtype; forwards under torch.no_grad(), backward via y.backward(ct).",
}


class Layer(NamedTuple):
    """Zero-argument callables that run one step to completion (results ready)."""

    train_fwd: Callable[[], Any]
    eval_fwd: Callable[[], Any]
    train_fwd_bwd: Callable[[], Any]


def _ready(fn, *args):
    return lambda: jax.block_until_ready(fn(*args))


def layer_steps(apply):
    """The three benchmarked steps over `apply(params, state, x, train) -> (y, new_state)`:
    {"train_fwd", "eval_fwd", "train_fwd_bwd"}, not jitted (timed here, compiled deviceless in
    benchmarks/accelerators.py)."""

    def train_fwd(params, state, x):
        return apply(params, state, x, True)

    def eval_fwd(params, state, x):
        return apply(params, state, x, False)[0]

    def train_fwd_bwd(params, state, x, ct):
        y, vjp, new_state = jax.vjp(lambda x, p: apply(p, state, x, True), x, params, has_aux=True)
        dx, dparams = vjp(ct)
        return y, new_state, dx, dparams

    return {"train_fwd": train_fwd, "eval_fwd": eval_fwd, "train_fwd_bwd": train_fwd_bwd}


def _jax_layer(apply, params, state, x, ct) -> Layer:
    """`apply(params, state, x, train) -> (y, new_state)`; jit the three steps."""
    steps = layer_steps(apply)
    return Layer(
        _ready(jax.jit(steps["train_fwd"]), params, state, x),
        _ready(jax.jit(steps["eval_fwd"]), params, state, x),
        _ready(jax.jit(steps["train_fwd_bwd"]), params, state, x, ct),
    )


# ------------------------------------------------------------------ JAX libraries
# Each `make_*` returns (apply, params, state) for features of size C.


def make_jbn(x, **fields):
    import jbn

    module = jbn.BatchNorm(momentum=MOMENTUM, epsilon=EPSILON, dtype=x.dtype, **fields)  # as flax's row
    variables = module.init(jax.random.key(0), x, use_running_average=False)

    def apply(params, state, x, train):
        y, updates = module.apply(
            {"params": params, "batch_stats": state}, x, use_running_average=not train, mutable=["batch_stats"]
        )
        return y, updates["batch_stats"]

    return apply, variables["params"], variables["batch_stats"]


def make_flax_linen(x, **fields):
    from flax import linen as nn

    module = nn.BatchNorm(momentum=MOMENTUM, epsilon=EPSILON, dtype=x.dtype, **fields)
    variables = module.init(jax.random.key(0), x, use_running_average=False)

    def apply(params, state, x, train):
        y, updates = module.apply(
            {"params": params, "batch_stats": state}, x, use_running_average=not train, mutable=["batch_stats"]
        )
        return y, updates["batch_stats"]

    return apply, variables["params"], variables["batch_stats"]


def make_flax_nnx(x):
    from flax import nnx

    layer = nnx.BatchNorm(x.shape[-1], momentum=MOMENTUM, epsilon=EPSILON, dtype=x.dtype, rngs=nnx.Rngs(0))
    graphdef, params, state = nnx.split(layer, nnx.Param, nnx.BatchStat)

    def apply(params, state, x, train):
        # Fresh variables in the current trace: nnx refuses to update one created outside.
        module = nnx.merge(graphdef, params, jax.tree.map(lambda a: a, state))
        y = module(x, use_running_average=not train)
        return y, nnx.state(module, nnx.BatchStat)

    return apply, params, state


def make_haiku(x):
    import haiku as hk

    def forward(x, train):
        return hk.BatchNorm(create_scale=True, create_offset=True, decay_rate=MOMENTUM, eps=EPSILON)(x, train)

    model = hk.transform_with_state(forward)
    params, state = model.init(jax.random.key(0), x, True)

    def apply(params, state, x, train):
        return model.apply(params, state, None, x, train)

    return apply, params, state


def make_equinox(x):
    import equinox as eqx

    channels = x.shape[-1]
    layer, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        channels, axis_name="batch", eps=EPSILON, momentum=MOMENTUM, mode="batch", dtype=x.dtype
    )
    params, static = eqx.partition(layer, eqx.is_inexact_array)

    def apply(params, state, x, train):
        module = eqx.combine(params, static)
        rows = x.reshape(-1, channels)
        y, state = jax.vmap(
            lambda r, s: module(r, s, inference=not train), axis_name="batch", in_axes=(0, None), out_axes=(0, None)
        )(rows, state)
        return y.reshape(x.shape), state

    return apply, params, state


JAX_LIBRARIES: dict[str, Callable] = {
    "jbn": make_jbn,
    "jbn (fused=False)": lambda x: make_jbn(x, fused=False),
    "flax.linen": make_flax_linen,
    "flax.nnx": make_flax_nnx,
    "haiku": make_haiku,
    "equinox": make_equinox,
}


def jax_layer(name: str, x: jax.Array, ct: jax.Array) -> Layer:
    apply, params, state = JAX_LIBRARIES[name](x)
    return _jax_layer(apply, params, state, x, ct)


# ------------------------------------------------------------------ PyTorch


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def torch_layer(x: np.ndarray, ct: np.ndarray, dtype: str) -> Layer:
    """BatchNorm2d for NHWC inputs (given to torch as NCHW in channels-last memory),
    BatchNorm1d for (N, C)."""
    import torch

    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]

    def to_torch(a):
        t = torch.from_numpy(np.array(a, np.float32)).to(tdtype)  # a writable copy
        if t.ndim == 4:
            t = t.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
        return t

    channels = x.shape[-1]
    cls = torch.nn.BatchNorm2d if x.ndim == 4 else torch.nn.BatchNorm1d
    bn = cls(channels, eps=EPSILON, momentum=1 - MOMENTUM).to(tdtype)
    tx, tct = to_torch(x), to_torch(ct)
    txg = tx.clone().requires_grad_(True)

    def train_fwd():
        bn.train()
        with torch.no_grad():
            return bn(tx)

    def eval_fwd():
        bn.eval()
        with torch.no_grad():
            return bn(tx)

    def train_fwd_bwd():
        bn.train()
        txg.grad = None
        bn.zero_grad(set_to_none=True)
        y = bn(txg)
        y.backward(tct)
        return y

    return Layer(train_fwd, eval_fwd, train_fwd_bwd)


MODULES = {"haiku": "haiku", "equinox": "equinox", "torch": "torch", "flax.nnx": "flax.nnx"}


def available(name: str) -> bool:
    """Whether a library's package imports here (jbn and flax.linen always must)."""
    module = MODULES.get(name)
    if module is None:
        return True
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def elements(shape) -> int:
    return math.prod(shape)
