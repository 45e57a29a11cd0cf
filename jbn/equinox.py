"""equinox wrapper: `jbn.equinox.BatchNorm`, a drop-in for `equinox.nn.BatchNorm`.

The same constructor (`input_size, axis_name, eps, channelwise_affine, momentum,
inference, dtype, mode`), the same parameters (`weight`, `bias`), the same calling
convention: per example, `(y, state) = bn(x, state)` with `x` of shape
`(input_size, *spatial)` under `jax.vmap(..., axis_name=...)` (or pmap/shard_map, or a
tuple of names for both; shard_map then with check_vma=False, since jax rejects one psum
over a checked mesh axis and a vmap axis, for equinox's pmean too), state in `eqx.nn.State` from `eqx.nn.make_with_state`,
switched with `eqx.nn.inference_mode`. The statistics come from jbn's pure layer:
accurate when |mean| >> std, an optional per-example `mask`, and count-weighted across
the named axes. This module only keeps the state: each call checks its arguments once
(`jbn._options.checked_arguments`) and calls jbn's trusting cores with the records.

Where the numbers differ from equinox 0.13 (see docs/guides/equinox.md):
- `mode="batch"` at inference: equinox divides the EMA of the variance, which starts at
  1, by `1 - momentum**t`, so its variance is too large by `momentum**t / (1 - momentum**t)`
  (99 after one step at momentum 0.99). jbn keeps the debiased EMA of the variance itself.
- `mode="ema"` at inference before any training step: equinox's running variance starts
  at 0 (x / sqrt(eps)), jbn's at 1.
- The state holds (mean, var) under equinox's `ema_state_index` / `batch_state_index`
  and a per-feature count of batches under `count_index` (equinox keeps a flag or a
  scalar counter instead), so serialised states do not load across the two.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from jbn import _options, _running
from jbn import functional as F
from jbn._batch_norm import batch_norm_core, evaluate_with_layout, normalized_with
from jbn._statistics import batch_moments
from jbn.accumulation import accumulate, apply_accumulated, empty_accumulator

_MODES = ("ema", "batch")


class BatchNorm(eqx.nn.StatefulLayer):
    """Batch normalization over the named batch axes, per example, the equinox way.

    Training (`inference=False`) computes the statistics of the batch (over the spatial
    axes of this example and across every example bound to `axis_name`) and updates the
    running statistics; inference normalizes with the running statistics.

    `mode="batch"` normalizes training batches with their own statistics (as flax,
    PyTorch and haiku do); `mode="ema"` normalizes them with the running statistics right
    after the update (equinox's older behaviour and its default, "legacy").

    Attributes mirror `equinox.nn.BatchNorm`; `weight` and `bias` have shape
    `(input_size,)` (None without `channelwise_affine`).
    """

    weight: jax.Array | None
    bias: jax.Array | None
    # The running (mean, var), under equinox's names: `ema_state_index` in mode "ema",
    # `batch_state_index` in mode "batch" (the other is None); `count_index`: batches seen
    # per feature. `running_stats(state)` reads the three as one `RunningStats`.
    ema_state_index: eqx.nn.StateIndex | None
    batch_state_index: eqx.nn.StateIndex | None
    count_index: eqx.nn.StateIndex
    # With accumulation=True: the merged statistics of the micro-batches since the last
    # `apply_accumulation` (jbn.accumulation); None otherwise.
    accumulator_index: eqx.nn.StateIndex | None
    inference: bool
    # Static: a replicated model (jax.device_put, pmap, jit) has no string leaf (equinox #1074).
    axis_name: Hashable | tuple[Hashable, ...] | None = eqx.field(static=True)
    input_size: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    channelwise_affine: bool = eqx.field(static=True)
    momentum: float | None = eqx.field(static=True)
    mode: str = eqx.field(static=True)
    debias: bool | None = eqx.field(static=True)
    unbiased_running_var: bool = eqx.field(static=True)
    axis_index_groups: tuple[tuple[int, ...], ...] | None = eqx.field(static=True)
    fused: bool = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        axis_name: Hashable | Sequence[Hashable] | None,
        eps: float = 1e-5,
        channelwise_affine: bool = True,
        momentum: float | None = 0.99,
        inference: bool = False,
        dtype: Any = None,
        mode: str = "legacy",
        *,
        debias: bool | None = None,
        unbiased_running_var: bool = False,
        axis_index_groups: Sequence[Sequence[int]] | None = None,
        fused: bool = True,
        accumulation: bool = False,
    ):
        """Arguments as in `equinox.nn.BatchNorm`, plus jbn's options.

        Args:
          input_size: number of channels (the size of axis 0 of each example).
          axis_name: the name bound by `jax.vmap`/`pmap`/`shard_map` over the batch, or a
            tuple (or list) of names to reduce over several. None: each call's `x` is the
            whole batch (no collective).
          eps: added to the variance, > 0.
          channelwise_affine: learn `weight` (ones) and `bias` (zeros) per channel.
          momentum: in [0, 1], `new = momentum * old + (1 - momentum) * batch`; None: the
            cumulative average of every batch seen (each batch weighted equally).
          inference: use the running statistics (True) or the batch (False); toggled by
            `eqx.nn.inference_mode` or overridden at the call.
          dtype: dtype of `weight`, `bias` and the running statistics; default float32
            (float64 under x64).
          mode: "batch", "ema", or "legacy" (= "ema" with a warning, as in equinox).
          debias: how the EMA starts. None (default): as equinox in each mode
            ("ema": the first batch replaces the initial statistics, then the plain
            EMA; "batch": the bias-corrected EMA). True: the bias-corrected EMA
            (`ema_t / (1 - momentum**t)`, from the first batch on). False: the plain EMA
            from mean 0, var 1 (flax's rule). Ignored with `momentum=None`.
          unbiased_running_var: track `var * n / (n - 1)` in the running variance, as
            PyTorch does.
          axis_index_groups: groups of indices along `axis_name`, e.g. [[0, 1], [2, 3]];
            statistics are global within each group. With several names the indices count
            every participant together (example b of n on device d is d * n + b).
          fused: in mode "batch", train with jbn's fused custom derivative (less memory
            and a faster backward pass; the same gradients). False: plain autodiff of the
            jnp computation. Both work under every transform, including a gradient taken
            through `lax.scan` or through a jitted call from outside the vmap.
          accumulation: gradient accumulation (mode "batch"; see `jbn.accumulation`):
            training calls normalize with their batch's statistics and merge them exactly
            into an accumulator in the state, leaving the running statistics alone;
            `jbn.equinox.apply_accumulation(model, state)` then updates them ONCE.
        """
        if mode == "legacy":
            mode = "ema"
            warnings.warn(
                "jbn.equinox.BatchNorm: no `mode` given, so it is 'ema' as in equinox (training batches are "
                "normalized with the running statistics). Pass mode='batch' to normalize them with their own "
                "statistics, as flax and PyTorch do, or mode='ema' to keep this and silence the warning.",
                UserWarning,
                stacklevel=2,
            )
        if mode not in _MODES:
            raise ValueError(f"`mode`={mode!r} must be 'batch', 'ema' or 'legacy' (= 'ema').")
        if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
            raise ValueError(f"`input_size`={input_size!r} must be a positive int: the number of channels of x.")
        if debias is not None and not isinstance(debias, bool):
            raise TypeError(f"`debias`={debias!r} must be None, True or False.")
        if isinstance(axis_name, list):
            axis_name = tuple(axis_name)  # static fields must be hashable
        if axis_index_groups is not None:
            axis_index_groups = tuple(tuple(int(i) for i in g) for g in axis_index_groups)
        dtype = jnp.zeros((), float).dtype if dtype is None else jnp.dtype(dtype)  # float32, or float64 under x64
        if channelwise_affine:
            self.weight = jnp.ones((input_size,), dtype)
            self.bias = jnp.zeros((input_size,), dtype)
        else:
            self.weight = None
            self.bias = None
        # count: batches seen per feature. It starts the EMA in each mode and is kept
        # whatever the options, so that switching them later needs no new state.
        stats_index = eqx.nn.StateIndex((jnp.zeros((input_size,), dtype), jnp.ones((input_size,), dtype)))
        self.ema_state_index = stats_index if mode == "ema" else None
        self.batch_state_index = stats_index if mode == "batch" else None
        self.count_index = eqx.nn.StateIndex(jnp.zeros((input_size,), jnp.int32))
        if accumulation and mode != "batch":
            raise ValueError(f"`accumulation=True` needs mode='batch' (got mode={mode!r}): set mode='batch'.")
        empty = empty_accumulator(jnp.zeros((input_size,), dtype)) if accumulation else None
        self.accumulator_index = None if empty is None else eqx.nn.StateIndex(tuple(empty))
        self.inference = inference
        self.axis_name = axis_name
        self.input_size = input_size
        self.eps = eps
        self.channelwise_affine = channelwise_affine
        self.momentum = momentum
        self.mode = mode
        self.debias = debias
        self.unbiased_running_var = unbiased_running_var
        self.axis_index_groups = axis_index_groups
        self.fused = bool(fused)

    def __call__(
        self,
        x: jax.Array,
        state: eqx.nn.State,
        *,
        key: Any = None,
        inference: bool | None = None,
        mask: jax.Array | None = None,
    ) -> tuple[jax.Array, eqx.nn.State]:
        """Normalize one example.

        Args:
          x: shape `(input_size, *spatial)`, any number of spatial axes.
          state: the `eqx.nn.State` holding this layer's running statistics.
          key: ignored (the equinox layer API).
          inference: overrides `self.inference` when not None.
          mask: optional, True where an element counts: a scalar for the whole example
            (False = padding), or any shape that broadcasts against `x` (e.g. `(T,)` for
            `x` of shape `(input_size, T)`). Masked elements reach neither the statistics
            nor the gradients, whatever they hold.

        Returns:
          `(y, state)`: `y` has `x`'s shape; in training `state` holds the updated running
          statistics, in inference it comes back unchanged.
        """
        del key
        if inference is None:
            inference = self.inference
        if x.ndim < 1 or x.shape[0] != self.input_size:
            raise ValueError(
                f"`x` of shape {tuple(x.shape)} must be one example of shape (input_size={self.input_size}, *spatial): "
                "call the layer per example under jax.vmap(..., axis_name=...)."
            )
        if mask is not None and jnp.ndim(mask) == 0:
            mask = jnp.reshape(mask, (1,) * x.ndim)  # one flag for the whole example
        traced = isinstance(inference, jax.core.Tracer)
        if traced and self.accumulator_index is not None:
            raise TypeError("`inference` must be a Python bool for a layer built with accumulation=True.")
        training = traced or not inference
        # This call's arguments, checked once; the cores below trust them.
        running = self.running_stats(state)
        rules = self._rules() if training else ()
        with _options.quiet_one_value(self.mode == "ema"):  # "ema" normalizes with the running statistics
            x, weight, bias, layout, how = _options.checked_arguments(
                x,
                self.weight,
                self.bias,
                axis=0,
                mask=mask if training else None,  # inference reads no statistic of the batch
                axis_name=self.axis_name,
                axis_index_groups=self.axis_index_groups,
                epsilon=self.eps,
                dtype=self._out_dtype(x, running),
                fused=self.fused,
                training=training,
            )
        running = _running.check_running(running, layout.fshape, 0)
        # Inference: the running statistics, no mask, no axis names.
        inference_layout = layout._replace(valid=None, names=None, groups=None)
        if not training:
            return evaluate_with_layout(x, weight, bias, inference_layout, running, how), state
        if traced:
            # jax.device_put(model) turns the Python bool into an array, which jit traces:
            # choose at run time (both branches compile; the flag is the same on every example).
            y, new = jax.lax.cond(
                inference,
                lambda x: (evaluate_with_layout(x, weight, bias, inference_layout, running, how), running),
                lambda x: self._train(x, weight, bias, layout, how, running, rules),
                x,
            )
        else:
            y, new = self._train(x, weight, bias, layout, how, running, rules)
        if self.accumulator_index is not None:
            held = F.Moments(*state.get(self.accumulator_index))
            return y, state.set(self.accumulator_index, tuple(accumulate(held, batch_moments(x, layout))))
        return y, self._with_running_stats(state, jax.lax.stop_gradient(new))

    def _stats_index(self) -> eqx.nn.StateIndex:
        index = self.ema_state_index if self.mode == "ema" else self.batch_state_index
        assert index is not None  # __init__ sets the one of `mode`
        return index

    def running_stats(self, state: eqx.nn.State) -> F.RunningStats:
        """This layer's running statistics in `state`: `RunningStats(mean, var, count)`,
        `count` the batches seen per feature. (mean, var) is also `state.get(index)` for
        `index` = `ema_state_index` (mode "ema") or `batch_state_index` (mode "batch"):
        the statistics that inference normalizes with (in mode "batch" equinox keeps there
        the EMA before its bias correction; jbn keeps the corrected one)."""
        mean, var = state.get(self._stats_index())
        return F.RunningStats(mean, var, state.get(self.count_index))

    def _with_running_stats(self, state: eqx.nn.State, running: F.RunningStats) -> eqx.nn.State:
        state = state.set(self._stats_index(), (running.mean, running.var))
        return state.set(self.count_index, running.count)

    def _out_dtype(self, x: jax.Array, running: F.RunningStats) -> Any:
        with jax.numpy_dtype_promotion("standard"):  # a choice of dtype, not an implicit promotion
            return jnp.promote_types(x.dtype, running.mean.dtype)  # as equinox: the wider of x and the state

    def _rules(self) -> tuple:
        """The running-average rules of this layer's options, checked once: mode "batch"
        and an "ema" layer with `debias` or `momentum=None` use one; equinox's start in
        mode "ema" uses two, the filling rule (momentum 0) and the moving one."""
        debias = (self.debias is None or self.debias) if self.mode == "batch" else bool(self.debias)
        momentum, debias, unbiased, _ = _options.check_running_options(
            self.momentum, debias, self.unbiased_running_var, None
        )
        rule = _running.rule_of(momentum, debias, unbiased, None)
        if self.mode == "batch" or self.debias is not None or momentum is None:
            return (rule,)
        return (_running.rule_of(0.0, False, unbiased, None), rule)

    def _train(self, x, weight, bias, layout, how, running: F.RunningStats, rules: tuple) -> tuple:
        """The training output and the new running statistics, on checked arguments."""
        if self.mode == "batch":
            return batch_norm_core(x, weight, bias, running, layout, how, rules[0], training=True)
        new = self._ema_update(running, batch_moments(x, layout), rules)
        return normalized_with(x, layout, new, weight, bias, how), new

    def _ema_update(self, running: F.RunningStats, batch: F.Moments, rules: tuple) -> F.RunningStats:
        """The running update of mode "ema"."""
        if len(rules) == 1:
            return _running.apply_rule(rules[0], running, batch)
        # equinox's start: a feature's first batch replaces the initial statistics (a
        # per-feature count, so a feature that saw only padding waits for real data).
        filled, moved = (_running.apply_rule(rule, running, batch) for rule in rules)
        first = running.count == 0
        return F.RunningStats(
            jnp.where(first, filled.mean, moved.mean), jnp.where(first, filled.var, moved.var), moved.count
        )


def apply_accumulation(model: Any, state: eqx.nn.State) -> eqx.nn.State:
    """`state` with the running statistics of every jbn layer of `model` built with
    `accumulation=True` updated ONCE with what it accumulated (its own momentum and
    options, as a training step on the whole batch would), and its accumulator emptied."""
    layers = [m for m in jax.tree.leaves(model, is_leaf=lambda m: isinstance(m, BatchNorm)) if isinstance(m, BatchNorm)]
    for layer in layers:
        index = layer.accumulator_index
        if index is None:
            continue
        held = F.Moments(*state.get(index))
        new = apply_accumulated(
            layer.running_stats(state),
            held,
            layer.momentum,
            debias=layer.debias is None or layer.debias,
            unbiased_running_var=layer.unbiased_running_var,
        )
        state = layer._with_running_stats(state, new)
        state = state.set(index, tuple(empty_accumulator(new.mean)))
    return state
