"""Keras 3 wrapper: `jbn.keras.BatchNormalization`, a drop-in for `keras.layers.BatchNormalization`
on the JAX backend.

The same constructor arguments and defaults (`axis=-1, momentum=0.99, epsilon=1e-3, center,
scale, *_initializer, *_regularizer, *_constraint, renorm, renorm_clipping, renorm_momentum,
synchronized`), the same weights (`gamma`, `beta`, `moving_mean`, `moving_variance`, and with
`renorm` `moving_stddev`, `renorm_mean`, `renorm_stddev`; same names, shapes and order, built
by keras's own `build`), the same `call(inputs, training=None, mask=None)`, and
`get_config`/`from_config`. It subclasses keras's layer, so `isinstance(layer,
keras.layers.BatchNormalization)` holds and code that freezes BN layers by type keeps working.
The statistics and the normalization come from jbn's pure layer: accurate when
|mean| >> std, computed in float32 for narrow inputs, masks counted per feature.

The moving statistics are updated with `Variable.assign` inside `call`, as keras's own layer
does: eagerly it writes the variable; inside keras's jitted training step (a
`StatelessScope`) keras collects the new value and returns it with the other non-trainable
variables.

Beyond keras (see docs/guides/keras.md): `synchronized=True` on JAX (under
`keras.distribution` the batch is one sharded array, so the statistics are global either
way), ghost batches (`virtual_batch_size`, Keras 2's argument), and `recompute_batch_stats`,
the exact population statistics of a model's BN layers over a dataset.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import keras

from jbn import _options, _running, precise
from jbn import functional as F
from jbn._batch_norm import batch_norm_core, evaluate_with_layout, train_with_layout
from jbn._options import Layout, Normalization

__all__ = ["BatchNormalization", "batch_norm_layers", "recompute_batch_stats"]

_PACKAGE = "jbn"


def _check_backend() -> None:
    backend = keras.backend.backend()
    if backend != "jax":
        raise ValueError(
            f"jbn.keras.BatchNormalization runs on Keras's JAX backend, but the backend is {backend!r}: set "
            "KERAS_BACKEND=jax before importing keras, or use keras.layers.BatchNormalization on this backend."
        )


def _check_virtual_batch_size(virtual_batch_size: Any, renorm: bool) -> int | None:
    if virtual_batch_size is None:
        return None
    if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int) or virtual_batch_size < 1:
        raise ValueError(
            f"`virtual_batch_size`={virtual_batch_size!r} must be None or a positive int that divides the batch size."
        )
    if renorm:
        raise ValueError("`virtual_batch_size` with `renorm=True` is not supported: pass one of them, not both.")
    return virtual_batch_size


@keras.saving.register_keras_serializable(package=_PACKAGE)
class BatchNormalization(keras.layers.BatchNormalization):
    """Batch normalization for Keras 3 on the JAX backend, computed by jbn.

    Arguments, weights and call as `keras.layers.BatchNormalization` (see its documentation),
    with these differences:

    - `synchronized=True` is accepted on JAX. Under `keras.distribution` (`DataParallel`,
      or `ModelParallel` with a batch-sharded layout) the statistics are those of the whole
      global batch, with or without it.
    - The variance is accurate whatever |mean| / std (keras's float32 statistics lose
      digits when the mean is large against the spread), and never negative.
    - A feature that sees no valid element in a training batch (everything masked) keeps
      its moving statistics; keras moves them towards 0.
    - `mask` may also have the rank of `inputs` (any shape that broadcasts against them),
      besides keras's mask over all axes but the last.

    Args (beyond keras's):
      virtual_batch_size: ghost batch norm (Hoffer et al. 2017), Keras 2's argument: the
        batch (axis 0) is split into consecutive sub-batches of this size, each normalized
        with its own statistics; the batch size must be a multiple of it. The moving
        statistics move once per call, towards the mean of the sub-batch statistics.
        Not with `renorm`.
      axis_name: for custom training loops under `jax.shard_map`, `pmap` or `vmap`, where
        each call sees one part of the batch: the name (or tuple of names) bound there; the
        statistics are then those of every part together, weighted by their valid counts.
        Not needed under `keras.distribution` (nor allowed outside such a transform).
    """

    def __init__(
        self,
        axis: int = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-3,
        center: bool = True,
        scale: bool = True,
        beta_initializer: Any = "zeros",
        gamma_initializer: Any = "ones",
        moving_mean_initializer: Any = "zeros",
        moving_variance_initializer: Any = "ones",
        beta_regularizer: Any = None,
        gamma_regularizer: Any = None,
        beta_constraint: Any = None,
        gamma_constraint: Any = None,
        renorm: bool = False,
        renorm_clipping: dict | None = None,
        renorm_momentum: float = 0.99,
        synchronized: bool = False,
        virtual_batch_size: int | None = None,
        axis_name: str | tuple[str, ...] | None = None,
        **kwargs: Any,
    ):
        _check_backend()
        # keras's constructor rejects synchronized=True off TensorFlow; jbn supports it, so
        # keras checks everything else and the flag is kept here.
        super().__init__(
            axis=axis,
            momentum=momentum,
            epsilon=epsilon,
            center=center,
            scale=scale,
            beta_initializer=beta_initializer,
            gamma_initializer=gamma_initializer,
            moving_mean_initializer=moving_mean_initializer,
            moving_variance_initializer=moving_variance_initializer,
            beta_regularizer=beta_regularizer,
            gamma_regularizer=gamma_regularizer,
            beta_constraint=beta_constraint,
            gamma_constraint=gamma_constraint,
            renorm=renorm,
            renorm_clipping=renorm_clipping,
            renorm_momentum=renorm_momentum,
            synchronized=False,
            **kwargs,
        )
        self.synchronized = bool(synchronized)
        self.virtual_batch_size = _check_virtual_batch_size(virtual_batch_size, renorm)
        # A list after a JSON round trip of the config: jbn wants a name or a tuple of names.
        self.axis_name = tuple(axis_name) if isinstance(axis_name, list) else axis_name
        # While recompute_batch_stats runs: the population statistics merged so far.
        self._population: F.Moments | None = None

    def call(self, inputs: Any, training: Any = None, mask: Any = None) -> jax.Array:
        """Normalize `inputs`: with the batch statistics (and an update of the moving ones)
        when `training` and the layer is trainable, else with the moving statistics.

        Args:
          inputs: floating tensor of any rank.
          training: Python bool (None: inference), as keras passes it.
          mask: True (non-zero) where an element counts in the statistics: keras's shape
            (all axes of `inputs` but the last), or any shape of `inputs`' rank that
            broadcasts against it.

        Returns:
          the normalized tensor, in the layer's compute dtype.
        """
        x = jnp.asarray(inputs)
        mask = self._full_rank_mask(x, mask)
        training = bool(training and self.trainable)
        renormalizing = training and self.renorm
        if renormalizing:
            with jax.numpy_dtype_promotion("standard"):  # a choice of dtype (strict mode refuses bfloat16 with float32)
                dtype = jnp.promote_types(x.dtype, jnp.float32)  # float32 or wider until renorm's affine map
        else:
            dtype = self.compute_dtype
        # This call's arguments, checked once; the cores below trust them.
        x, gamma, beta, layout, how = _options.checked_arguments(
            x,
            self.gamma.value if self.scale else None,
            self.beta.value if self.center else None,
            axis=self.axis,
            mask=mask if training else None,  # inference reads no statistic of the batch
            axis_name=self.axis_name,
            axis_index_groups=None,
            epsilon=self.epsilon,
            dtype=dtype,
            training=training,
            virtual_batch_size=None if renormalizing else self.virtual_batch_size,
        )
        if not training:
            return evaluate_with_layout(x, gamma, beta, layout, self._moving(layout), how)
        y, updates = (self._renormalize if renormalizing else self._batch_normalize)(x, gamma, beta, layout, how)
        if self._population is not None:
            # recompute_batch_stats is running: the training output, the population grows, the
            # moving statistics stay as they are.
            self._population = precise.add_batch(
                self._population, x, axis=self.axis, mask=mask, axis_name=self.axis_name
            )
            return y
        for variable, value in updates:
            variable.assign(value)
        return y

    def _moving(self, layout: Layout) -> F.RunningStats:
        """The moving statistics as `RunningStats`, checked against this call's input."""
        moving = F.RunningStats(self.moving_mean.value, self.moving_variance.value)
        return _running.check_running(moving, layout.fshape, self.axis)

    def _batch_normalize(self, x: jax.Array, gamma: Any, beta: Any, layout: Layout, how: Normalization) -> tuple:
        """The training output and the (variable, new value) pairs of the moving statistics."""
        rule = F.running_average_rule(self.momentum)
        y, new = batch_norm_core(x, gamma, beta, self._moving(layout), layout, how, rule, training=True)
        return y, [(self.moving_mean, new.mean), (self.moving_variance, new.var)]

    def _full_rank_mask(self, x: jax.Array, mask: Any) -> jax.Array | None:
        """keras's mask covers every axis but the last (Masking's `(N, T)` for `(N, T, C)`):
        a trailing axis makes it broadcast against `x`. A mask of `x`'s rank passes as it is."""
        if mask is None:
            return None
        mask = jnp.asarray(mask)
        if mask.ndim == x.ndim - 1:
            mask = mask[..., None]
        elif mask.ndim != x.ndim:
            raise ValueError(
                f"`mask` of shape {tuple(mask.shape)} must have one axis less than `inputs` of shape "
                f"{tuple(x.shape)} (keras's mask over all axes but the last), or the same rank."
            )
        return mask if mask.dtype == jnp.bool_ else mask != 0

    def _renormalize(self, x: jax.Array, gamma: Any, beta: Any, layout: Layout, how: Normalization) -> tuple:
        """Batch Renorm as keras defines it: r and d measured against `renorm_mean` and
        `renorm_stddev` (moving averages of the batch mean and standard deviation with
        `renorm_momentum`), clipped by `renorm_clipping` to [rmin, rmax] and [-dmax, dmax],
        applied to jbn's batch-normalized output; `moving_variance` follows from
        `moving_stddev`. (jbn.batch_renorm measures r and d against the running variance
        with symmetric clipping, so it cannot hold keras's state.)"""
        x_hat, batch = train_with_layout(x, None, None, layout, how)  # in `how.out_dtype`: float32 or wider
        stddev = jnp.sqrt(batch.var + self.epsilon)
        renorm_mean = self.renorm_mean.value.astype(stddev.dtype)
        renorm_stddev = jnp.maximum(self.renorm_stddev.value.astype(stddev.dtype), jnp.sqrt(self.epsilon))
        clipping = self.renorm_clipping or {}
        r = jnp.clip((stddev / renorm_stddev), clipping.get("rmin"), clipping.get("rmax"))
        d = (batch.mean - renorm_mean) / renorm_stddev
        if clipping.get("dmax") is not None:
            d = jnp.clip(d, -clipping["dmax"], clipping["dmax"])
        r, d = jax.lax.stop_gradient(r), jax.lax.stop_gradient(d)
        shape = [1] * x.ndim
        shape[self.axis] = x.shape[self.axis]
        r_scale = r if gamma is None else r * gamma
        d_bias = d if gamma is None else d * gamma
        d_bias = d_bias if beta is None else d_bias + beta
        y = x_hat * r_scale.reshape(shape) + d_bias.reshape(shape)

        by_stddev = F.Moments(batch.mean, stddev, batch.count)  # the moving averages of the stddev
        renorm = F.running_average_rule(self.renorm_momentum).update(
            F.RunningStats(self.renorm_mean.value, self.renorm_stddev.value), by_stddev
        )
        moving = F.running_average_rule(self.momentum).update(
            F.RunningStats(self.moving_mean.value, self.moving_stddev.value), by_stddev
        )
        updates = [
            (self.renorm_mean, renorm.mean),
            (self.renorm_stddev, renorm.var),
            (self.moving_mean, moving.mean),
            (self.moving_stddev, moving.var),
            (self.moving_variance, jnp.maximum(moving.var * moving.var - self.epsilon, 0.0)),
        ]
        return y.astype(self.compute_dtype), updates

    def get_config(self) -> dict:
        """keras's configuration, with `synchronized` as given, `virtual_batch_size` and `axis_name`."""
        return {
            **super().get_config(),
            "synchronized": self.synchronized,
            "virtual_batch_size": self.virtual_batch_size,
            "axis_name": self.axis_name,
        }


def batch_norm_layers(model: keras.Layer) -> list[BatchNormalization]:
    """Every `jbn.keras.BatchNormalization` in `model` (itself included), nested models too."""
    return [layer for layer in model._flatten_layers(include_self=True) if isinstance(layer, BatchNormalization)]


def _inputs_of(batch: Any) -> Any:
    """The model inputs of one dataset element: `x` of keras's `(x, y[, sample_weight])`."""
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


def _population_of(layer: BatchNormalization) -> F.Moments:
    if layer._population is None:  # only if the model reset it during the pass
        raise RuntimeError(f"layer {layer.name} lost its population statistics during recompute_batch_stats.")
    return layer._population


def recompute_batch_stats(
    model: keras.Layer,
    dataset: Iterable,
    *,
    num_batches: int | None = None,
    progress: bool = True,
) -> keras.Layer:
    """Replace the moving mean and variance of every jbn BN layer of `model` with the exact
    statistics of the inputs it sees over `dataset`, the model running in training mode
    ("PreciseBN", Wu & Johnson 2021; PyTorch's `update_bn`).

    Each batch runs eagerly through `model(x, training=True)`; every
    `jbn.keras.BatchNormalization` gives its training output (ghost batches and renorm
    included, so each later layer sees what it sees in training) and merges the statistics
    of its whole input exactly (Chan's formula, masks counted) into its population; no
    weight changes during the pass. At the end `moving_mean` and
    `moving_variance` get the population's mean and biased variance. Layers with `renorm`
    get the same, and `moving_stddev = sqrt(moving_variance + epsilon)`.

    Args:
      model: a built Keras model (or layer) holding `jbn.keras.BatchNormalization` layers.
      dataset: an iterable of batches: model inputs, or keras's `(x, y[, sample_weight])`
        tuples (only `x` is used), e.g. a list, a generator, a `tf.data.Dataset`.
      num_batches: use at most this many batches (also the progress bar's total).
      progress: show a tqdm progress bar.

    Returns:
      `model`, whose moving statistics were replaced in place. A layer that saw no valid
      element keeps its statistics.

    Raises:
      ValueError: `model` holds no jbn BN layer, `dataset` gave no batch, or a layer
        saw no valid element over the whole pass (it is not run in training mode by the
        model, or every element it saw was masked).
    """
    layers = batch_norm_layers(model)
    if not layers:
        raise ValueError(
            "`model` holds no jbn.keras.BatchNormalization layer: use it in place of keras.layers.BatchNormalization."
        )
    for layer in layers:
        layer._population = precise.empty_population(layer.moving_mean.value)
    try:
        seen = 0
        for batch in precise.progress_bar(dataset, total=num_batches, enabled=progress):
            if num_batches is not None and seen >= num_batches:
                break
            model(_inputs_of(batch), training=True)
            seen += 1
        if seen == 0:
            raise ValueError("`dataset` gave no batch: pass an iterable with at least one batch.")
        populations = [_population_of(layer) for layer in layers]
    finally:
        for layer in layers:
            layer._population = None
    empty = [layer.name for layer, population in zip(layers, populations) if not bool(jnp.any(population.count > 0))]
    if empty:
        raise ValueError(
            f"layer(s) {', '.join(empty)} saw no valid element over {seen} batch(es): every element was masked, "
            "or the model does not call them in training mode (check `trainable` and the `training` argument)."
        )
    for layer, population in zip(layers, populations):
        mean, var = precise.finished(population, layer.moving_mean.value, layer.moving_variance.value)
        layer.moving_mean.assign(mean)
        layer.moving_variance.assign(var)
        if layer.renorm:
            layer.moving_stddev.assign(jnp.sqrt(var + layer.epsilon))
    return model
