"""jbn for flax NNX: the layers and the passes over a model's layers (past 400 lines: the passes own the layers' state).

`jbn.nnx.BatchNorm` and `jbn.nnx.BatchRenorm` mirror `flax.nnx.BatchNorm`: the same
constructor arguments and defaults, the same state (`scale`, `bias` as `nnx.Param`; `mean`,
`var` as `nnx.BatchStat`), `train()` / `eval()` / `nnx.view(..., use_running_average=...)`
switching; each call checks its arguments once and calls the pure layer's trusting cores.
`recompute_batch_stats` and the gradient-accumulation passes add variables to the layers,
which the layers' call reads, and remove them: apart, each half would import the other's
private names (as jbn.keras and jbn.equinox, this module holds its framework's passes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import initializers

from jbn import _options, _running, accumulation, precise
from jbn._batch_norm import batch_norm_core
from jbn._state import Moments, RunningStats
from jbn.renorm import Limit, batch_renorm_core, next_step, resolve_limit

Initializer = Callable[..., jax.Array]


def _feature_shape(num_features: Any) -> tuple[int, ...]:
    sizes = (num_features,) if not isinstance(num_features, (tuple, list)) else tuple(num_features)
    if sizes and all(_options.is_index(n) for n in sizes) and not all(n > 0 for n in sizes):
        raise ValueError(f"`num_features`={num_features!r} must be positive: the size of the feature axis, e.g. 64.")
    if not sizes or not all(_options.is_index(n) for n in sizes):
        raise TypeError(
            f"`num_features` must be a positive int (or a tuple of them, one per feature axis), got {num_features!r}: "
            "e.g. nnx.BatchNorm(64, rngs=rngs) for 64 channels."
        )
    return tuple(int(n) for n in sizes)


def _as_stored(value: jax.Array, variable: Any) -> jax.Array:
    """`value` in the dtype that `variable` holds, cast explicitly: what an in-place write
    casts to implicitly (for a complex batch's mean and a real `param_dtype` state, its real
    part, as flax keeps it)."""
    dtype = variable[...].dtype
    if jnp.iscomplexobj(value) and not jnp.issubdtype(dtype, jnp.complexfloating):
        value = jnp.real(value)
    return value.astype(dtype)


class _Normalization(nnx.Module):
    """State, switching and the pure call shared by the two modules."""

    def __init__(
        self,
        num_features,
        *,
        rngs: nnx.Rngs,
        use_scale: bool,
        use_bias: bool,
        scale_init: Initializer,
        bias_init: Initializer,
        param_dtype: Any,
        scale_metadata: Mapping[str, Any],
        bias_metadata: Mapping[str, Any],
        use_running_average: bool | None,
        axis: Any,
        momentum: float | None,
        epsilon: float,
        dtype: Any,
        axis_name: Any,
        axis_index_groups: Any,
        debias: bool,
        unbiased_running_var: bool,
        running_average: Any,
    ):
        fshape = _feature_shape(num_features)
        # checked here, once: a bad option fails when the layer is built
        running_options = _options.check_running_options(momentum, debias, unbiased_running_var, running_average)
        self.rule = _running.rule_of(*running_options)
        self.epsilon = _options.check_epsilon(epsilon)
        self.momentum = running_options[0]
        self.use_running_average = use_running_average
        self.axis = axis
        self.dtype = dtype
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.debias = debias
        self.unbiased_running_var = unbiased_running_var
        self.running_average = running_average
        self.mean = nnx.BatchStat(jnp.zeros(fshape, jnp.float32))
        self.var = nnx.BatchStat(jnp.ones(fshape, jnp.float32))
        self.count = nnx.BatchStat(jnp.zeros(fshape, jnp.int32)) if self.rule.needs_count else nnx.data(None)
        self.scale: nnx.Param | None
        self.bias: nnx.Param | None
        self.scale = (
            nnx.Param(scale_init(rngs.params(), fshape, param_dtype), **scale_metadata) if use_scale else nnx.data(None)
        )
        self.bias = (
            nnx.Param(bias_init(rngs.params(), fshape, param_dtype), **bias_metadata) if use_bias else nnx.data(None)
        )
        self.num_features = num_features
        self.param_dtype = param_dtype
        self.use_scale = use_scale
        self.use_bias = use_bias

    def _call_pure(self, core, x, use_running_average: bool | None, mask, normalization: dict, **core_options):
        """One call: the records of `jbn._options.checked_arguments` from this layer's
        options (and its own `normalization` options), then the trusting `core` with the
        rule built at construction (and the core's own `core_options`)."""
        value = use_running_average if use_running_average is not None else self.use_running_average
        if value is None:
            raise ValueError(
                "No `use_running_average` was given: pass it to the constructor, to the call, or switch the model "
                "with model.train() / model.eval()."
            )
        training = not bool(value)
        running = RunningStats(self.mean[...], self.var[...], None if self.count is None else self.count[...])
        scale = None if self.scale is None else self.scale[...]
        bias = None if self.bias is None else self.bias[...]
        x, scale, bias, layout, how = _options.checked_arguments(
            x,
            scale,
            bias,
            axis=self.axis,
            mask=mask,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            epsilon=self.epsilon,
            dtype=self.dtype,
            training=training,
            **normalization,
        )
        running = _running.check_running(running, layout.fshape, self.axis)
        y, new = core(x, scale, bias, running, layout, how, self.rule, training=training, **core_options)
        stored = training and not self._capture(x, mask)
        if stored:
            # The running statistics are state, never differentiated.
            self.mean[...] = _as_stored(jax.lax.stop_gradient(new.mean), self.mean)
            self.var[...] = _as_stored(jax.lax.stop_gradient(new.var), self.var)
            if self.count is not None:
                self.count[...] = new.count
        return y, stored

    def _capture(self, x, mask) -> bool:
        """In a `recompute_batch_stats` pass, merge this batch's statistics into the
        population state and return True; otherwise return False."""
        if getattr(self, "population_count", None) is None:
            return False
        population = [getattr(self, name) for name in precise.POPULATION_VARIABLES]
        merged = precise.add_batch(
            Moments(*(v[...] for v in population)),
            x,
            axis=self.axis,
            mask=mask,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
        )
        for v, value in zip(population, merged):
            v[...] = value
        return True

    def set_view(self, use_running_average: bool | None = None):
        """Class method used by ``nnx.view``.

        Args:
          use_running_average: if True, normalize with the stored running statistics;
            if False, with the statistics of each batch (and update the stored ones).
        """
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
      dtype: output dtype (default flax's promotion of the input and the parameters).
      param_dtype: dtype of scale and bias.
      use_bias, use_scale: learn a bias / a scale.
      bias_init, scale_init: their initializers.
      axis_name: name(s) bound by pmap/shard_map/vmap to synchronize the statistics over.
      axis_index_groups: pmap-style groups along `axis_name`.
      use_fast_variance, promote_dtype: accepted for compatibility; jbn's variance is
        fast and accurate, and its dtype handling is the pure layer's (statistics in
        float32 or wider, output in `dtype` or flax's promotion).
      rngs: `nnx.Rngs` for the initializers.
      bias_metadata, scale_metadata: metadata for the `nnx.Param`s.
    jbn's extras:
      virtual_batch_size: ghost batch norm (see `jbn.batch_norm`).
      debias: bias-corrected EMA (creates a `count` BatchStat).
      unbiased_running_var: track the unbiased batch variance, as PyTorch does.
      activation, negative_slope, save_output_only, fused: the fused activation, the
        memory-saving mode and the choice of derivative rule (see `jbn.batch_norm`).
      running_average: a running-average rule object (see `jbn.batch_norm`); when given,
        it replaces `momentum`, `debias` and `unbiased_running_var`.
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
        running_average: Any = None,
    ):
        super().__init__(
            num_features,
            rngs=rngs,
            use_scale=use_scale,
            use_bias=use_bias,
            scale_init=scale_init,
            bias_init=bias_init,
            param_dtype=param_dtype,
            scale_metadata=scale_metadata,
            bias_metadata=bias_metadata,
            use_running_average=use_running_average,
            axis=axis,
            momentum=momentum,
            epsilon=epsilon,
            dtype=dtype,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            debias=debias,
            unbiased_running_var=unbiased_running_var,
            running_average=running_average,
        )
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype
        self.virtual_batch_size = virtual_batch_size
        self.activation = activation
        self.negative_slope = negative_slope
        self.save_output_only = save_output_only
        self.fused = fused

    def __call__(self, x, use_running_average: bool | None = None, *, mask: jax.Array | None = None):
        """Normalize `x` (features on `axis`); `mask` as in `jbn.moments`. In training the
        running statistics are updated in place."""
        y, _ = self._call_pure(
            batch_norm_core,
            x,
            use_running_average,
            mask,
            dict(
                virtual_batch_size=self.virtual_batch_size,
                activation=self.activation,
                negative_slope=self.negative_slope,
                save_output_only=self.save_output_only,
                fused=self.fused,
            ),
        )
        return y


class BatchRenorm(_Normalization):
    """Batch Renormalization (Ioffe 2017) for flax NNX: `jbn.batch_renorm` as a layer.

    Arguments as `BatchNorm` (without `virtual_batch_size` and the fused options), plus
    `r_max` (>= 1) and `d_max` (>= 0), floats or schedules of the step count
    (`jbn.renorm_schedule`). The state adds `step` (an int32 `nnx.BatchStat`), the number
    of training calls so far (saturating at 2**31 - 1).
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
        running_average: Any = None,
    ):
        super().__init__(
            num_features,
            rngs=rngs,
            use_scale=use_scale,
            use_bias=use_bias,
            scale_init=scale_init,
            bias_init=bias_init,
            param_dtype=param_dtype,
            scale_metadata=scale_metadata,
            bias_metadata=bias_metadata,
            use_running_average=use_running_average,
            axis=axis,
            momentum=momentum,
            epsilon=epsilon,
            dtype=dtype,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            debias=debias,
            unbiased_running_var=unbiased_running_var,
            running_average=running_average,
        )
        self.r_max = r_max
        self.d_max = d_max
        self.step = nnx.BatchStat(jnp.zeros((), jnp.int32))

    def __call__(self, x, use_running_average: bool | None = None, *, mask: jax.Array | None = None):
        """Renormalize `x`; in training the running statistics and `step` are updated."""
        step = self.step[...]
        y, stored = self._call_pure(
            batch_renorm_core,
            x,
            use_running_average,
            mask,
            dict(fused=False),
            r_max=resolve_limit(self.r_max, step, "r_max"),
            d_max=resolve_limit(self.d_max, step, "d_max"),
        )
        if stored:
            self.step[...] = next_step(self.step[...])
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
    modes = [
        (m, {a: getattr(m, a) for a in ("use_running_average", "deterministic") if hasattr(m, a)})
        for _, m in nnx.iter_modules(model)
    ]
    for layer in layers:
        for name, value in zip(precise.POPULATION_VARIABLES, precise.empty_population(layer.mean[...])):
            setattr(layer, name, nnx.BatchStat(value))
    call = call or (lambda m, b: m(b))
    step = nnx.jit(lambda m, b: call(m, b))
    model.train()
    seen = 0
    try:
        for batch in precise.progress_bar(batches, total=num_batches, enabled=progress):
            if num_batches is not None and seen >= num_batches:
                break
            step(model, batch)
            seen += 1
        if seen == 0:
            raise ValueError("`batches` gave no batch: pass an iterable with at least one input batch.")
        for layer in layers:
            population = Moments(*(getattr(layer, name)[...] for name in precise.POPULATION_VARIABLES))
            layer.mean[...], layer.var[...] = precise.finished(population, layer.mean[...], layer.var[...])
    finally:
        for layer in layers:
            for name in precise.POPULATION_VARIABLES:
                delattr(layer, name)
        for module, attributes in modes:
            for name, value in attributes.items():
                setattr(module, name, value)
    return model


def _layers(model: nnx.Module) -> list:
    layers = [m for _, m in nnx.iter_modules(model) if isinstance(m, _Normalization)]
    if not layers:
        raise ValueError("`model` contains no jbn.nnx.BatchNorm / BatchRenorm layer: nothing to accumulate.")
    return layers


def start_accumulation(model: nnx.Module) -> nnx.Module:
    """Gradient accumulation (see `jbn.accumulation`), in place: from now on each jbn layer
    of `model` called in training mode normalizes the micro-batch with its own statistics
    and merges them exactly into an accumulator, leaving its running statistics alone."""
    for layer in _layers(model):
        for name, value in zip(accumulation.ACCUMULATOR_VARIABLES, accumulation.empty_accumulator(layer.mean[...])):
            setattr(layer, name, nnx.BatchStat(value))
    return model


def apply_accumulation(model: nnx.Module) -> nnx.Module:
    """In place: each layer's running statistics updated ONCE with what it accumulated (its
    own `momentum`, `debias`, `unbiased_running_var`), and its accumulator emptied."""
    for layer in _layers(model):
        held = [getattr(layer, name) for name in accumulation.ACCUMULATOR_VARIABLES]
        count = None if layer.count is None else layer.count[...]
        new = accumulation.apply_accumulated(
            RunningStats(layer.mean[...], layer.var[...], count),
            Moments(*(v[...] for v in held)),
            layer.momentum,
            debias=layer.debias,
            unbiased_running_var=layer.unbiased_running_var,
        )
        layer.mean[...], layer.var[...] = new.mean, new.var
        if layer.count is not None:
            layer.count[...] = new.count
        for v, value in zip(held, accumulation.empty_accumulator(new.mean)):
            v[...] = value
    return model


def stop_accumulation(model: nnx.Module) -> nnx.Module:
    """In place: the accumulators removed (apply them first: what they hold is dropped)."""
    for layer in _layers(model):
        for name in accumulation.ACCUMULATOR_VARIABLES:
            delattr(layer, name)
    return model
