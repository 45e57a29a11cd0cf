"""Keep batch-norm scale and bias out of weight decay (a mask for optax).

Decaying BN's scale pulls it to zero for nothing: the layer after BN is invariant to the
scale of the weights before it, and the scale/bias of BN are few, so the usual practice
(Goyal et al. 2017; He et al. 2019 "Bag of tricks") is to decay only the kernels.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import jax

_NORM_PARAMS = frozenset({"scale", "bias"})


def _key(entry: Any) -> Any:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return entry


def _norm_layers(params: Any, batch_stats: Any, path: tuple = ()) -> set[tuple]:
    """Paths of the mappings whose only entries are `scale` and/or `bias` (and, when
    `batch_stats` is given, that have running statistics at the same path)."""
    found = set()  # type: ignore[var-annotated]
    if not isinstance(params, Mapping):
        return found
    keys = set(params.keys())
    if keys and keys <= _NORM_PARAMS and not any(isinstance(params[k], Mapping) for k in keys):
        if batch_stats is None or _has_running_stats(batch_stats, path):
            found.add(path)
        return found
    for k, v in params.items():
        found |= _norm_layers(v, batch_stats, path + (k,))
    return found


def _has_running_stats(batch_stats: Any, path: tuple) -> bool:
    node = batch_stats
    for k in path:
        if not isinstance(node, Mapping) or k not in node:
            return False
        node = node[k]
    return isinstance(node, Mapping) and "mean" in node and "var" in node


def weight_decay_mask(params: Any, batch_stats: Any = None) -> Any:
    """A tree of bools like `params`: True for the parameters to decay, False for the
    scale and bias of normalization layers.

    Args:
      params: the model's parameters, nested mappings: flax linen `variables['params']`, or
        flax NNX `nnx.state(model, nnx.Param)`.
      batch_stats: optional `variables['batch_stats']`. Given, only layers with running
        statistics (batch norm) are left out; without it, every layer whose parameters are
        exactly `scale` and/or `bias` (BatchNorm, LayerNorm, GroupNorm, RMSNorm...) is.

    Use it as optax's mask, directly (it is a callable of the params) or evaluated:

        optax.adamw(1e-3, weight_decay=1e-4, mask=jbn.weight_decay_mask)
        optax.chain(optax.add_decayed_weights(1e-4, mask=jbn.weight_decay_mask), optax.sgd(0.1, 0.9))
    """
    skip = _norm_layers(params, batch_stats)

    def decay(path, leaf):
        # a prefix, not the parent: in an nnx.State the leaf sits one level below, inside its Param
        keys = tuple(_key(k) for k in path)
        return not any(keys[:i] in skip for i in range(len(keys)))

    return jax.tree_util.tree_map_with_path(decay, params)


def optax_mask(params: Any, batch_stats: Any = None) -> Any:
    """Deprecated alias of `weight_decay_mask` (the name said who reads the mask, not what
    it holds); it will be removed in the next release."""
    warnings.warn(
        "jbn.optax_mask is deprecated: use jbn.weight_decay_mask (same arguments).", DeprecationWarning, stacklevel=2
    )
    return weight_decay_mask(params, batch_stats)
