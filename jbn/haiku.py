"""haiku wrapper: `jbn.haiku.BatchNorm`, a drop-in for `haiku.BatchNorm` (dm-haiku 0.0.17).

The same constructor (`create_scale, create_offset, decay_rate, eps, scale_init,
offset_init, axis, cross_replica_axis, cross_replica_axis_index_groups, data_format,
name`), the same call (`inputs, is_training, test_local_stats=False, scale=None,
offset=None`), and the same parameters and state, by name, shape and meaning:

    params  <name>/scale, <name>/offset                 shape: the input's with 1 on reduced axes
    state   <name>/~/mean_ema/{counter, hidden, average}  haiku's ExponentialMovingAverage,
            <name>/~/var_ema/{counter, hidden, average}   debiased as Adam: average = hidden / (1 - d**t)

so a haiku checkpoint runs here and continues training in haiku afterwards. The numbers
come from jbn's pure layer; this module only reads and writes haiku's parameters and state, and
checks each call's arguments once (`jbn._options.checked_arguments`) for jbn's trusting cores.

Where it differs from haiku (docs/guides/haiku.md lists them with examples):
- Statistics in float32 (or wider) whatever the input dtype; a new state for a bfloat16 or
  float16 input is float32 (haiku keeps it in the input dtype). The variance is jbn's
  accurate one, never negative (haiku's E[x^2] - E[x]^2 cancels, and can go negative).
- The state returned by `init` is the neutral prior: `average` of mean 0 and var 1 with
  `counter` 0 (haiku stores the init batch's statistics, so evaluating before the first
  training step normalizes with a dummy batch's numbers), and `init` with
  `is_training=False` works (haiku raises "No value for 'average'").
- A batch whose statistics are NaN or inf (or a feature with no valid element) leaves the
  moving averages of that feature unchanged (haiku stores the NaN).
- `cross_replica_axis` may name a `jax.vmap`/`hk.vmap` axis: examples normalize together
  and the state comes back the same for every example. Under sharded `jit` the
  statistics are global with no axis name.
- `mask=` (keyword): count-weighted statistics over the valid elements only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from jbn import _options
from jbn import functional as F
from jbn._batch_norm import normalized_with, train_with_layout
from jbn._options import quiet_one_value

Initializer = Callable[[Sequence[int], Any], jax.Array]


class _MovingAverageState(hk.Module):
    """The three states of one `hk.ExponentialMovingAverage` (counter, hidden, average),
    under its module name, with a neutral initial average instead of none."""

    def __init__(self, initial_average: Initializer, name: str):
        super().__init__(name=name)
        self.initial_average = initial_average

    def read(self, shape: tuple[int, ...], dtype: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
        counter = hk.get_state("counter", (), jnp.int32, init=jnp.zeros)
        hidden = hk.get_state("hidden", shape, dtype, init=jnp.zeros)
        average = hk.get_state("average", shape, dtype, init=self.initial_average)
        return counter, hidden, average

    def write(self, counter: jax.Array, hidden: jax.Array, average: jax.Array) -> None:
        hk.set_state("counter", counter)
        hk.set_state("hidden", hidden)
        hk.set_state("average", average)

    @property
    def average(self) -> jax.Array:
        """The debiased moving average, as `hk.ExponentialMovingAverage.average`."""
        return hk.get_state("average")


def _check_unit_interval(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not 0 <= value <= 1:
        raise ValueError(f"`{name}`={value!r} must be a float in [0, 1] (e.g. 0.99): the weight of the old average.")
    return float(value)


def _check_eps(value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.floating))
        or not (math.isfinite(value) and value > 0)
    ):
        raise ValueError(f"`eps`={value!r} must be a finite float > 0 (e.g. 1e-5), added to the variance.")
    return float(value)


def _statistics_dtypes(dtype: Any) -> tuple[Any, Any]:
    """(mean, var) dtypes of a new state for inputs of `dtype`: float32 or wider."""
    with jax.numpy_dtype_promotion("standard"):  # a choice of dtype (strict mode refuses bfloat16 with float32)
        mean = jnp.promote_types(dtype, jnp.float32)
    return mean, jnp.real(jnp.zeros((), mean)).dtype


def _bound(names: Any) -> bool:
    """Whether every axis name in `names` (None, a name or a tuple) is bound here."""
    try:
        for name in () if names is None else names if isinstance(names, tuple) else (names,):
            jax.lax.axis_size(name)
    except NameError:
        return False
    return True


def _feature_shaped(value: Any, w_shape: tuple[int, ...], fshape: tuple[int, ...]) -> jax.Array | None:
    """A call-time `scale`/`offset` as a feature-shaped array, when it is one per feature
    (it broadcasts to the parameter shape); None when it varies along a reduced axis
    (conditional normalization: one scale per example)."""
    value = jnp.asarray(value)
    try:
        fits = value.ndim <= len(w_shape) and np.broadcast_shapes(value.shape, w_shape) == w_shape
    except ValueError:
        fits = False
    return jnp.broadcast_to(value, w_shape).reshape(fshape) if fits else None


class BatchNorm(hk.Module):
    """Batch normalization with haiku's interface and jbn's statistics.

    In training (`is_training=True`) the input is normalized with its batch statistics
    (reduced over every axis but the channel axis, or over `axis`; global over
    `cross_replica_axis`), and the moving averages `mean_ema`/`var_ema` move towards them.
    In evaluation it is normalized with the moving averages, or with the batch statistics
    when `test_local_stats=True` (no update).

    Parameters `scale` and `offset` have the input's shape with 1 on the reduced axes and
    the input's dtype, as in haiku. The state has that shape and float32 (or wider) dtype.
    """

    def __init__(
        self,
        create_scale: bool,
        create_offset: bool,
        decay_rate: float,
        eps: float = 1e-5,
        scale_init: Initializer | None = None,
        offset_init: Initializer | None = None,
        axis: Sequence[int] | None = None,
        cross_replica_axis: Hashable | Sequence[Hashable] | None = None,
        cross_replica_axis_index_groups: Sequence[Sequence[int]] | None = None,
        data_format: str = "channels_last",
        name: str | None = None,
        *,
        fused: bool = True,
    ):
        """Arguments as in `haiku.BatchNorm`, plus jbn's `fused`.

        Args:
          create_scale: learn a `scale` parameter (else pass `scale` at call time, or none).
          create_offset: learn an `offset` parameter (else pass `offset` at call time, or none).
          decay_rate: in [0, 1], the weight of the old moving average at each update.
          eps: > 0, added to the variance.
          scale_init: initializer of `scale` (default ones); only with `create_scale=True`.
          offset_init: initializer of `offset` (default zeros); only with `create_offset=True`.
          axis: the axes to reduce (statistics are computed over them); default: every
            axis but the channel axis.
          cross_replica_axis: a name (or names) bound by `jax.pmap`, `shard_map`,
            `jax.vmap` or `hk.vmap`: statistics are global across it, weighted by each
            participant's valid count.
          cross_replica_axis_index_groups: groups of indices along `cross_replica_axis`,
            each normalized on its own, e.g. [[0, 1], [2, 3]].
          data_format: "channels_last" (default), "channels_first", or a layout string such
            as "NHWC"/"NCHW" (see `hk.get_channel_index`).
          name: the module name (default "batch_norm").
          fused: train with jbn's fused derivative rule (default True: same numbers, less
            memory, a faster backward pass; also under `hk.vmap` differentiated through
            `lax.scan` or a jitted function) or differentiate the plain computation (False).
        """
        super().__init__(name=name)
        if not create_scale and scale_init is not None:
            raise ValueError(
                "Cannot set `scale_init` if `create_scale=False`: drop scale_init or set create_scale=True."
            )
        if not create_offset and offset_init is not None:
            raise ValueError(
                "Cannot set `offset_init` if `create_offset=False`: drop offset_init or set create_offset=True."
            )
        if cross_replica_axis is None and cross_replica_axis_index_groups is not None:
            raise ValueError(
                "`cross_replica_axis` name must be specified if `cross_replica_axis_index_groups` are used: pass "
                "the axis name the groups index."
            )
        if isinstance(cross_replica_axis, list):
            cross_replica_axis = tuple(cross_replica_axis)
        self.create_scale = bool(create_scale)
        self.create_offset = bool(create_offset)
        self.decay_rate = _check_unit_interval(decay_rate, "decay_rate")
        # The rules of the two moving averages, built once from the checked decay rate:
        # `average` is the debiased EMA, `hidden` the plain EMA from zero.
        self.debiased_average = F.DebiasedEMA(self.decay_rate)
        self.plain_average = F.EMA(self.decay_rate)
        self.eps = _check_eps(eps)
        self.scale_init = scale_init or jnp.ones
        self.offset_init = offset_init or jnp.zeros
        self.axis = None if axis is None else tuple(int(a) for a in axis)
        self.cross_replica_axis = cross_replica_axis
        self.cross_replica_axis_index_groups = cross_replica_axis_index_groups
        self.channel_index = hk.get_channel_index(data_format)
        self.fused = bool(fused)
        self.mean_ema = _MovingAverageState(jnp.zeros, name="mean_ema")
        self.var_ema = _MovingAverageState(jnp.ones, name="var_ema")

    def _feature_axes(self, ndim: int) -> tuple[int, ...]:
        """The axes that are not reduced, sorted, non-negative."""
        if self.axis is None:
            channel = self.channel_index + ndim if self.channel_index < 0 else self.channel_index  # as haiku
            return tuple(i for i in range(ndim) if i == channel)
        for a in self.axis:
            if not -ndim <= a < ndim:
                raise ValueError(
                    f"`axis`={list(self.axis)} names axis {a}, out of range for an input of rank {ndim}: "
                    "list the axes to reduce, each in [-rank, rank)."
                )
        reduced = {a % ndim for a in self.axis}
        return tuple(i for i in range(ndim) if i not in reduced)

    def __call__(
        self,
        inputs: jax.Array,
        is_training: bool,
        test_local_stats: bool = False,
        scale: jax.Array | None = None,
        offset: jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """Normalize `inputs`.

        Args:
          inputs: an array of any rank (integer inputs are normalized as floats).
          is_training: normalize with the batch statistics and update the moving
            averages (True), or normalize with the moving averages (False). A Python bool.
          test_local_stats: with `is_training=False`, normalize with the batch statistics
            instead, without updating anything.
          scale, offset: applied after normalizing, when the module does not create them;
            any shape that broadcasts against `inputs` (one per feature, or per example
            for conditional normalization).
          mask: optional, True where an element counts (broadcasts against `inputs`, as
            in `jbn.moments`): padding reaches neither the statistics nor the gradients.

        Returns:
          The normalized array, `inputs`'s shape.
        """
        if self.create_scale and scale is not None:
            raise ValueError("Cannot pass `scale` at call time if `create_scale=True`.")
        if self.create_offset and offset is not None:
            raise ValueError("Cannot pass `offset` at call time if `create_offset=True`.")
        x = jnp.asarray(inputs)
        if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.complexfloating)):
            x = x.astype(jnp.result_type(float))  # haiku's mean of integers is a float
        features = self._feature_axes(x.ndim)
        w_shape = tuple(n if i in features else 1 for i, n in enumerate(x.shape))  # haiku's parameter shape
        fshape = tuple(x.shape[i] for i in features) or (1,)
        scale, late_scale = self._parameter("scale", self.create_scale, self.scale_init, scale, x, w_shape, fshape)
        offset, late_offset = self._parameter(
            "offset", self.create_offset, self.offset_init, offset, x, w_shape, fshape
        )
        mean_dtype, var_dtype = _statistics_dtypes(x.dtype)
        mean_state = self.mean_ema.read(w_shape, mean_dtype)
        var_state = self.var_ema.read(w_shape, var_dtype)
        if not features:
            # Every axis reduced: jbn's layer wants a feature axis, so add one of size 1.
            x, features = x[None], (0,)
            mask = None if mask is None else jnp.asarray(mask)[None]
        batch_stats = bool(is_training or test_local_stats)
        # haiku's init often runs outside the map that binds the axis names, on a dummy
        # batch; it returns the initial state whatever this call computes, so there it
        # synchronizes only over names that are bound and does not warn.
        initializing = hk.running_init()
        synced = batch_stats and (not initializing or _bound(self.cross_replica_axis))
        # This call's arguments, checked once; the cores below trust them.
        with quiet_one_value(initializing):
            x, scale, offset, layout, how = _options.checked_arguments(
                x,
                scale,
                offset,
                axis=features,
                mask=mask if batch_stats else None,  # the moving averages read no statistic of the batch
                axis_name=self.cross_replica_axis if synced else None,
                axis_index_groups=self.cross_replica_axis_index_groups if synced else None,
                epsilon=self.eps,
                dtype=None,
                fused=self.fused,
                training=batch_stats,
            )
        if batch_stats:
            y, batch = train_with_layout(x, scale, offset, layout, how)
            if is_training:
                self._update(mean_state, var_state, batch, fshape)
        else:
            mean = _options.check_feature_array(mean_state[2].reshape(fshape), fshape, "mean", features)
            var = _options.check_feature_array(var_state[2].reshape(fshape), fshape, "var", features)
            y = normalized_with(x, layout, F.RunningStats(mean, var), scale, offset, how)  # type: ignore[arg-type]
        y = y.reshape(jnp.shape(inputs))  # drops the unit axis added above
        if late_scale is not None:
            y = y * late_scale
        if late_offset is not None:
            y = y + late_offset
        return y

    def _parameter(self, name, create, init, given, x, w_shape, fshape) -> tuple[Any, Any]:
        """(feature-shaped value for jbn's layer or None, value to apply after it or None)."""
        if create:
            return hk.get_parameter(name, w_shape, x.dtype, init).reshape(fshape), None
        if given is None:
            return None, None
        value = _feature_shaped(given, w_shape, fshape)
        return (value, None) if value is not None else (None, given)

    def _update(self, mean_state, var_state, batch: F.Moments, fshape: tuple[int, ...]) -> None:
        """Both moving averages, haiku's layout kept: `average` is jbn's debiased EMA
        (Adam's correction, kept corrected), `hidden` the plain EMA from zero."""
        (counter, mean_hidden, mean_average), (_, var_hidden, var_average) = mean_state, var_state
        batch = jax.lax.stop_gradient(batch)
        average = self.debiased_average.update(
            F.RunningStats(
                mean_average.reshape(fshape), var_average.reshape(fshape), jnp.broadcast_to(counter, fshape)
            ),
            batch,
        )
        hidden = self.plain_average.update(
            F.RunningStats(mean_hidden.reshape(fshape), var_hidden.reshape(fshape)), batch
        )
        # One counter per moving average, as haiku: it advances when any feature was updated.
        assert average.count is not None  # kept by the debiased rule
        counter = jnp.max(average.count).astype(counter.dtype)
        shape = mean_average.shape
        self.mean_ema.write(counter, hidden.mean.reshape(shape), average.mean.reshape(shape))
        self.var_ema.write(counter, hidden.var.reshape(shape), average.var.reshape(shape))
