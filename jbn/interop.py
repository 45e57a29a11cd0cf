"""Move batch-norm weights between jbn (= flax layout) and PyTorch or Keras.

jbn's variables for one layer are `{'params': {'scale', 'bias'}, 'batch_stats': {'mean', 'var'}}`
(plus `batch_stats/count` when the layer keeps one), each of the feature shape (C,). The
feature axis is a call argument in all three libraries, so the arrays need no transposing:
PyTorch's NCHW `BatchNorm2d` is `jbn.BatchNorm(axis=1)` on the same input, or
`jbn.BatchNorm(axis=-1)` on the input moved to NHWC.

Conventions that differ, and what to set on the jbn side to train the same way:

| | jbn / flax | PyTorch | Keras 3 |
|---|---|---|---|
| momentum | `new = m*old + (1-m)*batch`, 0.99 | `new = (1-m)*old + m*batch`, 0.1 | as jbn, 0.99 |
| cumulative average | `momentum=None` | `momentum=None` | - |
| running variance | biased batch variance | UNBIASED (n/(n-1)) | biased |
| epsilon | 1e-5 | 1e-5 | 1e-3 |
| batch counter | `batch_stats/count` (kept when a checkpoint brings one) | `num_batches_tracked` | - |

So a PyTorch layer `BatchNorm2d(C, momentum=0.1, eps=1e-5)` is
`jbn.BatchNorm(axis=1, momentum=momentum_from_torch(0.1), epsilon=1e-5, unbiased_running_var=True)`.
`running_var` is copied as it is both ways: it is what PyTorch normalizes with in
evaluation, so the evaluation outputs match whatever it estimates.

torch and keras are not imported by this module unless a function needs them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np


def momentum_from_torch(momentum: float | None) -> float | None:
    """PyTorch's momentum (weight of the NEW batch, default 0.1) as jbn's (weight of the old
    value, 0.9). None (cumulative average) stays None."""
    return None if momentum is None else 1.0 - float(momentum)


def momentum_to_torch(momentum: float | None) -> float | None:
    """jbn's/flax's/Keras' momentum as PyTorch's: `1 - momentum`; None stays None."""
    return None if momentum is None else 1.0 - float(momentum)


def _numpy(v: Any) -> np.ndarray:
    """A COPY as a NumPy array: jax on CPU may alias a NumPy buffer, and torch updates its
    buffers in place, so a view would change under the converted variables."""
    if hasattr(v, "detach"):  # a torch tensor
        v = v.detach().cpu().numpy()
    return np.array(np.asarray(v))


def from_torch(state_dict_or_module: Any, prefix: str = "", *, count: bool | None = None) -> dict:
    """jbn variables from a PyTorch batch-norm layer or its state dict.

    Args:
      state_dict_or_module: a `torch.nn.BatchNorm1d/2d/3d` (or `SyncBatchNorm`), any module
        containing one, or a state dict (torch tensors or arrays).
      prefix: the layer's key prefix in the state dict, e.g. "layer1.0.bn1." (a trailing
        dot is added when missing); "" for a layer's own state dict.
      count: whether to return `num_batches_tracked` as `batch_stats/count` (int32, broadcast
        to the feature shape). None (default): whenever the state dict has
        `num_batches_tracked` (every PyTorch >= 0.4.1 layer that tracks running statistics),
        and always for a module with `momentum=None`. A state dict does not say whether the
        layer used `momentum=None`, whose cumulative average NEEDS the count, so it is kept; a
        jbn layer with a float momentum carries a count it did not create without reading it
        (it only counts the batches, as PyTorch does), and `to_torch` gives it back as
        `num_batches_tracked`. False: exactly flax's `batch_stats/{mean, var}` (e.g. to merge
        into a tree made by `init`; `num_batches_tracked` is then lost). True: keep it, 0 when
        the state dict has none.

    Returns:
      `{'params': {'scale', 'bias'}, 'batch_stats': {'mean', 'var'[, 'count']}}` as float32
      (count int32) jax arrays (`params` entries are left out for `affine=False`).
    """
    if prefix and not prefix.endswith("."):
        prefix += "."
    cumulative = False  # a module with momentum=None: the count is needed even if missing
    if hasattr(state_dict_or_module, "state_dict"):
        module = state_dict_or_module
        layer = module.get_submodule(prefix[:-1]) if prefix else module
        cumulative = getattr(layer, "momentum", 0.1) is None
        state = module.state_dict()
    else:
        state = state_dict_or_module
    count = (cumulative or prefix + "num_batches_tracked" in state) if count is None else bool(count)

    def get(name):
        return state.get(prefix + name)

    if get("running_mean") is None or get("running_var") is None:
        found = sorted({k[: -len("running_mean")] for k in state if k.endswith("running_mean")})
        raise ValueError(
            f"no '{prefix}running_mean'/'{prefix}running_var' in the state dict: pass the `prefix` of a batch-norm "
            f"layer that tracks running statistics (found: {found or 'none'})."
        )
    out = {"params": {}, "batch_stats": {}}  # type: ignore[var-annotated]
    for torch_name, name in (("weight", "scale"), ("bias", "bias")):
        if get(torch_name) is not None:
            out["params"][name] = jnp.asarray(_numpy(get(torch_name)), jnp.float32)
    mean = jnp.asarray(_numpy(get("running_mean")), jnp.float32)
    out["batch_stats"]["mean"] = mean
    out["batch_stats"]["var"] = jnp.asarray(_numpy(get("running_var")), jnp.float32)
    if count:
        tracked = get("num_batches_tracked")
        tracked = 0 if tracked is None else int(_numpy(tracked))
        if not 0 <= tracked <= np.iinfo(np.int32).max:
            raise ValueError(
                f"'{prefix}num_batches_tracked'={tracked} does not fit batch_stats/count (int32): pass count=False "
                "to leave it out (it matters only for momentum=None)."
            )
        out["batch_stats"]["count"] = jnp.full(mean.shape, tracked, jnp.int32)
    if not out["params"]:
        del out["params"]
    return out


def to_torch(variables: Mapping, prefix: str = "", *, num_batches_tracked: int | None = None) -> OrderedDict[str, Any]:
    """A PyTorch state dict for one batch-norm layer from its jbn variables.

    Args:
      variables: `{'params': {'scale', 'bias'}, 'batch_stats': {'mean', 'var'[, 'count']}}`
        of one layer (e.g. `{c: v['BatchNorm_0'] for c, v in model_variables.items()}`).
      prefix: prepended to every key (e.g. "bn1.").
      num_batches_tracked: the value to store; default the largest `batch_stats/count`, or
        0 when there is none (PyTorch reads it only with `momentum=None`).

    Returns:
      An OrderedDict of float32 torch tensors (`weight`, `bias` when present,
      `running_mean`, `running_var`) and int64 `num_batches_tracked`, for
      `layer.load_state_dict(...)` (use `strict=False` for an `affine=False` mismatch).
    """
    import torch

    if prefix and not prefix.endswith("."):
        prefix += "."
    params = variables.get("params", {})
    stats = variables["batch_stats"]
    out = OrderedDict()

    def tensor(v):
        return torch.from_numpy(np.array(v, dtype=np.float32))

    if "scale" in params:
        out[prefix + "weight"] = tensor(params["scale"])
    if "bias" in params:
        out[prefix + "bias"] = tensor(params["bias"])
    out[prefix + "running_mean"] = tensor(stats["mean"])
    out[prefix + "running_var"] = tensor(stats["var"])
    if num_batches_tracked is None:
        num_batches_tracked = int(np.max(np.asarray(stats["count"]))) if "count" in stats else 0
    out[prefix + "num_batches_tracked"] = torch.tensor(num_batches_tracked, dtype=torch.long)
    return out


_KERAS_NAMES = {
    "gamma": ("params", "scale"),
    "beta": ("params", "bias"),
    "moving_mean": ("batch_stats", "mean"),
    "moving_variance": ("batch_stats", "var"),
}


def from_keras(layer_or_weights: Any, *, scale: bool = True, center: bool = True) -> dict:
    """jbn variables from a Keras 3 `BatchNormalization` layer or its `get_weights()` list.

    Args:
      layer_or_weights: a built `keras.layers.BatchNormalization`, or the list
        `[gamma, beta, moving_mean, moving_variance]` (gamma absent when `scale=False`,
        beta absent when `center=False`, as `get_weights()` gives them).
      scale, center: for a list only: whether it holds gamma / beta (a layer says itself).

    Returns:
      `{'params': {'scale', 'bias'}, 'batch_stats': {'mean', 'var'}}`, float32. Keras and
      jbn share the momentum convention and the biased variance; Keras' default epsilon is
      1e-3 (jbn's 1e-5), so pass `epsilon=layer.epsilon` to the jbn layer. Renorm layers'
      extra Keras variables are not converted (their evaluation uses only these four).
    """
    if hasattr(layer_or_weights, "weights"):
        named = {w.name.split("/")[-1].split(":")[0]: _numpy(w) for w in layer_or_weights.weights}
    else:
        weights = list(layer_or_weights)
        names = (["gamma"] if scale else []) + (["beta"] if center else []) + ["moving_mean", "moving_variance"]
        if len(weights) != len(names):
            raise ValueError(
                f"`layer_or_weights` has {len(weights)} arrays, but scale={scale}, center={center} means {len(names)} "
                f"({', '.join(names)}): pass the layer itself, or set `scale`/`center` as the layer was built."
            )
        named = dict(zip(names, map(_numpy, weights)))
    if "moving_mean" not in named or "moving_variance" not in named:
        raise ValueError(
            f"no moving_mean/moving_variance among {sorted(named)}: pass a built BatchNormalization layer."
        )
    out = {"params": {}, "batch_stats": {}}  # type: ignore[var-annotated]
    for keras_name, (collection, name) in _KERAS_NAMES.items():
        if keras_name in named:
            out[collection][name] = jnp.asarray(named[keras_name], jnp.float32)
    if not out["params"]:
        del out["params"]
    return out


def to_keras(variables: Mapping) -> list[np.ndarray]:
    """The `set_weights()` list of a Keras 3 `BatchNormalization` layer (built with
    `scale`/`center` matching `params/scale` and `params/bias`) from one layer's jbn variables:
    `[gamma, beta, moving_mean, moving_variance]` as float32 NumPy arrays."""
    params = variables.get("params", {})
    stats = variables["batch_stats"]
    out = [np.array(params[name], np.float32) for name in ("scale", "bias") if name in params]
    return out + [np.array(stats["mean"], np.float32), np.array(stats["var"], np.float32)]
