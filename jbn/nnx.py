"""Flax NNX wrappers: `jbn.nnx.BatchNorm` and `jbn.nnx.BatchRenorm`.

They mirror `flax.nnx.BatchNorm`: the same constructor arguments and defaults, the same
state (`scale`, `bias` as `nnx.Param`; `mean`, `var` as `nnx.BatchStat`), `train()` /
`eval()` / `nnx.view(..., use_running_average=...)` switching, and they call the pure layer.
"""
from __future__ import annotations

from collections.abc import Iterable
from types import MappingProxyType
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import initializers

from tqdm.auto import tqdm

from jbn import _checks
from jbn.functional import Moments, RunningStats, batch_norm, merge_moments, moments, needs_batch_count
from jbn.precise import POPULATION_VARIABLES
from jbn.renorm import Limit, batch_renorm

Initializer = Callable[..., jax.Array]


def _use_running_average(call_value: bool | None, attribute: bool | None) -> bool:
    value = call_value if call_value is not None else attribute
    if value is None:
        raise ValueError(
            "No `use_running_average` was given: pass it to the constructor, to the call, or switch the model "
            "with model.train() / model.eval()."
        )
    return bool(value)


class _Normalization(nnx.Module):
    """State and switching shared by the two modules."""

    def __init__(
        self,
        num_features: int | tuple[int, ...],
        *,
        use_running_average: bool | None,
        axis,
        momentum,
        epsilon,
        dtype,
        param_dtype,
        use_bias,
        use_scale,
        bias_init,
        scale_init,
        axis_name,
        axis_index_groups,
        debias,
        unbiased_running_var,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any],
        scale_metadata: Mapping[str, Any],
    ):
        fshape = (num_features,) if isinstance(num_features, int) else tuple(num_features)
        momentum = _checks.check_momentum(momentum)
        epsilon = _checks.check_epsilon(epsilon)
        self.mean = nnx.BatchStat(jnp.zeros(fshape, jnp.float32))
        self.var = nnx.BatchStat(jnp.ones(fshape, jnp.float32))
        if needs_batch_count(momentum, debias):
            self.count = nnx.BatchStat(jnp.zeros(fshape, jnp.int32))
        else:
            self.count = nnx.data(None)
        self.scale: nnx.Param | None
        self.scale = nnx.Param(scale_init(rngs.params(), fshape, param_dtype), **scale_metadata) if use_scale else nnx.data(None)
        self.bias: nnx.Param | None
        self.bias = nnx.Param(bias_init(rngs.params(), fshape, param_dtype), **bias_metadata) if use_bias else nnx.data(None)

        self.num_features = num_features
        self.use_running_average = use_running_average
        self.axis = axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.debias = debias
        self.unbiased_running_var = unbiased_running_var

    def _running(self) -> RunningStats:
        return RunningStats(self.mean[...], self.var[...], None if self.count is None else self.count[...])

    def _affine(self):
        return (None if self.scale is None else self.scale[...]), (None if self.bias is None else self.bias[...])

    def _store(self, new: RunningStats) -> None:
        # The running statistics are state, never differentiated.
        self.mean[...] = jax.lax.stop_gradient(new.mean)
        self.var[...] = jax.lax.stop_gradient(new.var)
        if self.count is not None:
            self.count[...] = new.count

    def _capture(self, x, mask) -> bool:
        """In a `recompute_batch_stats` pass, merge this batch's statistics into the
        population state and return True; otherwise return False."""
        if getattr(self, "population_count", None) is None:
            return False
        population = [getattr(self, name) for name in POPULATION_VARIABLES]
        batch = moments(x, axis=self.axis, mask=mask, axis_name=self.axis_name, axis_index_groups=self.axis_index_groups)
        merged = merge_moments(Moments(*(v[...] for v in population)), batch)
        for v, new in zip(population, merged):
            v[...] = jax.lax.stop_gradient(new).astype(v[...].dtype)
        return True

    def set_view(self, use_running_average: bool | None = None):
        """Used by `nnx.view`: set `use_running_average` when given."""
        if use_running_average is not None:
            self.use_running_average = use_running_average


class BatchNorm(_Normalization):
    """Batch normalization for flax NNX, a drop-in for `flax.nnx.BatchNorm`.

    Args (as `flax.nnx.BatchNorm`):
      num_features: size of the feature axis (or a tuple for several feature axes).
      use_running_average: normalize with the stored statistics (eval) instead of the
        batch's (train); `train()` sets it to False, `eval()` to True.
      axis: feature axis (or tuple) of the input.
      momentum: `new = momentum * old + (1 - momentum) * batch`; None: cumulative average
        (creates a `count` BatchStat).
      epsilon: added to the variance.
      dtype: output dtype (default: the input's).
      param_dtype: dtype of scale and bias.
      use_bias, use_scale: learn a bias / a scale.
      bias_init, scale_init: their initializers.
      axis_name: name(s) bound by pmap/shard_map/vmap to synchronize the statistics over.
      axis_index_groups: pmap-style groups along `axis_name`.
      use_fast_variance, promote_dtype: accepted for compatibility; jbn's variance is
        one-pass and accurate, and its dtype handling is the pure layer's (statistics in
        float32 or wider, output in `dtype` or the input's dtype).
      rngs: `nnx.Rngs` for the initializers.
      bias_metadata, scale_metadata: metadata for the `nnx.Param`s.
    jbn's extras:
      virtual_batch_size: ghost batch norm (see `jbn.batch_norm`).
      debias: bias-corrected EMA (creates a `count` BatchStat).
      unbiased_running_var: track the unbiased batch variance, as PyTorch does.
      activation, negative_slope, save_output_only, fused: the fused activation, the
        memory-saving mode and the choice of training path (see `jbn.batch_norm`).
    """

    def __init__(
        self,
        num_features: int | tuple[int, ...],
        *,
        use_running_average: bool | None = False,
        axis: int | tuple[int, ...] = -1,
        momentum: float | None = 0.99,
        epsilon: float = 1e-5,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = initializers.zeros_init(),
        scale_init: Initializer = initializers.ones_init(),
        axis_name: Any = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: Any = None,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
        virtual_batch_size: int | None = None,
        debias: bool = False,
        unbiased_running_var: bool = False,
        activation: str | None = None,
        negative_slope: float = 0.01,
        save_output_only: bool = False,
        fused: bool = True,
    ):
        super().__init__(
            num_features, use_running_average=use_running_average, axis=axis, momentum=momentum, epsilon=epsilon,
            dtype=dtype, param_dtype=param_dtype, use_bias=use_bias, use_scale=use_scale, bias_init=bias_init,
            scale_init=scale_init, axis_name=axis_name, axis_index_groups=axis_index_groups, debias=debias,
            unbiased_running_var=unbiased_running_var, rngs=rngs, bias_metadata=bias_metadata,
            scale_metadata=scale_metadata,
        )
        self.use_fast_variance = use_fast_variance
        self.virtual_batch_size = virtual_batch_size
        self.activation = activation
        self.negative_slope = negative_slope
        self.save_output_only = save_output_only
        self.fused = fused

    def __call__(self, x, use_running_average: bool | None = None, *, mask: jax.Array | None = None):
        """Normalize `x` (features on `axis`); `mask` as in `jbn.moments`. In training the
        running statistics are updated in place."""
        use_running_average = _use_running_average(use_running_average, self.use_running_average)
        scale, bias = self._affine()
        y, new = batch_norm(
            x, scale, bias, self._running(), training=not use_running_average, axis=self.axis,
            momentum=self.momentum, epsilon=self.epsilon, mask=mask, axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups, dtype=self.dtype, virtual_batch_size=self.virtual_batch_size,
            debias=self.debias, unbiased_running_var=self.unbiased_running_var, activation=self.activation,
            negative_slope=self.negative_slope, save_output_only=self.save_output_only, fused=self.fused,
        )
        if not use_running_average and not self._capture(x, mask):
            self._store(new)
        return y


class BatchRenorm(_Normalization):
    """Batch Renormalization (Ioffe 2017) for flax NNX; calls `jbn.batch_renorm`.

    Arguments as `BatchNorm` (without `virtual_batch_size`), plus `r_max` (>= 1) and `d_max`
    (>= 0), floats or schedules of the step count (`jbn.renorm_schedule`). The state adds
    `step` (an int32 `nnx.BatchStat`), the number of training calls so far.
    """

    def __init__(
        self,
        num_features: int | tuple[int, ...],
        *,
        use_running_average: bool | None = False,
        axis: int | tuple[int, ...] = -1,
        momentum: float | None = 0.99,
        epsilon: float = 1e-5,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = initializers.zeros_init(),
        scale_init: Initializer = initializers.ones_init(),
        axis_name: Any = None,
        axis_index_groups: Any = None,
        r_max: Limit = 3.0,
        d_max: Limit = 5.0,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
        debias: bool = False,
        unbiased_running_var: bool = False,
    ):
        super().__init__(
            num_features, use_running_average=use_running_average, axis=axis, momentum=momentum, epsilon=epsilon,
            dtype=dtype, param_dtype=param_dtype, use_bias=use_bias, use_scale=use_scale, bias_init=bias_init,
            scale_init=scale_init, axis_name=axis_name, axis_index_groups=axis_index_groups, debias=debias,
            unbiased_running_var=unbiased_running_var, rngs=rngs, bias_metadata=bias_metadata,
            scale_metadata=scale_metadata,
        )
        self.step = nnx.BatchStat(jnp.zeros((), jnp.int32))
        self.r_max = r_max
        self.d_max = d_max

    def __call__(self, x, use_running_average: bool | None = None, *, mask: jax.Array | None = None):
        """Renormalize `x`; in training the running statistics and `step` are updated."""
        use_running_average = _use_running_average(use_running_average, self.use_running_average)
        scale, bias = self._affine()
        y, new = batch_renorm(
            x, scale, bias, self._running(), training=not use_running_average, r_max=self.r_max,
            d_max=self.d_max, step=self.step[...], axis=self.axis, momentum=self.momentum, epsilon=self.epsilon,
            mask=mask, axis_name=self.axis_name, axis_index_groups=self.axis_index_groups, dtype=self.dtype,
            debias=self.debias, unbiased_running_var=self.unbiased_running_var,
        )
        if not use_running_average and not self._capture(x, mask):
            self._store(new)
            self.step[...] = self.step[...] + 1
        return y


def recompute_batch_stats(
    model: nnx.Module,
    batches: Iterable,
    *,
    call: Callable[[nnx.Module, Any], Any] | None = None,
    num_batches: int | None = None,
    progress: bool = True,
) -> nnx.Module:
    """Exact population statistics for every jbn NNX layer of `model`, in place (the NNX
    counterpart of `jbn.recompute_batch_stats`; see it for the definition).

    The model runs in training mode (`model.train()`; the previous `use_running_average` and
    `deterministic` attributes are restored afterwards) over `batches` under `nnx.jit`; each
    jbn layer merges its batch statistics exactly (Chan) and changes nothing else, then its
    `mean`/`var` are replaced by the mean and biased variance of all it saw. Parameters are
    not changed.

    Args:
      model: an NNX module containing `jbn.nnx.BatchNorm` / `BatchRenorm` layers.
      batches: an iterable of inputs.
      call: `call(model, batch)` runs the model (default `model(batch)`).
      num_batches: use at most this many batches.
      progress: show a tqdm progress bar.

    Returns:
      `model`, updated in place.
    """
    layers = [m for _, m in nnx.iter_modules(model) if isinstance(m, _Normalization)]
    if not layers:
        raise ValueError("`model` contains no jbn.nnx.BatchNorm / BatchRenorm layer: nothing to recompute.")
    modes = [(m, {a: getattr(m, a) for a in ("use_running_average", "deterministic") if hasattr(m, a)})
             for _, m in nnx.iter_modules(model)]
    for layer in layers:
        zeros = jnp.zeros(layer.mean[...].shape, jnp.promote_types(layer.mean[...].dtype, jnp.float32))
        for name in POPULATION_VARIABLES:
            setattr(layer, name, nnx.BatchStat(zeros))
    call = call or (lambda m, b: m(b))
    step = nnx.jit(lambda m, b: call(m, b))
    model.train()
    seen = 0
    try:
        for batch in tqdm(batches, total=num_batches, desc="recompute_batch_stats", unit="batch", disable=not progress):
            if num_batches is not None and seen >= num_batches:
                break
            step(model, batch)
            seen += 1
        if seen == 0:
            raise ValueError("`batches` gave no batch: pass an iterable with at least one input batch.")
        for layer in layers:
            population = Moments(*(getattr(layer, name)[...] for name in POPULATION_VARIABLES))
            seen_any = population.count > 0
            layer.mean[...] = jnp.where(seen_any, population.mean, layer.mean[...]).astype(layer.mean[...].dtype)
            layer.var[...] = jnp.where(seen_any, population.var, layer.var[...]).astype(layer.var[...].dtype)
    finally:
        for layer in layers:
            for name in POPULATION_VARIABLES:
                delattr(layer, name)
        for module, attributes in modes:
            for name, value in attributes.items():
                setattr(module, name, value)
    return model
