"""The small networks the experiments train: an MLP and a conv net with a pluggable norm.

A network's hidden layers are Dense/Conv -> norm -> activation (or activation -> norm,
`placement="after"`). The norm is chosen by a `NormSpec`; jbn's layers do the batch
normalization, flax's GroupNorm is the batch-independent reference. Each hidden layer
`sow`s its norm input and its activation input into the `intermediates` collection, so an
experiment can read them with `mutable=["intermediates"]`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

import jbn

NORMS = (
    "none",
    "bn",
    "ghost",
    "renorm",
    "group",
    "noisy_bn",
    "bn_per_activation",
    "bn_per_activation_channel_affine",
    "flax_bn",
)
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "sigmoid": nn.sigmoid,
    "tanh": jnp.tanh,
    "linear": lambda x: x,
}
INITS = {
    "lecun": nn.initializers.lecun_normal(),  # variance 1/fan_in (flax's default)
    "he": nn.initializers.he_normal(),  # variance 2/fan_in, keeps ReLU signals at scale
}


@dataclasses.dataclass(frozen=True)
class NormSpec:
    """Which normalization a hidden layer uses, and its settings.

    Attributes:
      kind: one of NORMS. "bn" is jbn.BatchNorm; "ghost" is jbn.BatchNorm with
        `virtual_batch_size`; "renorm" is jbn.BatchRenorm; "group" is flax's GroupNorm;
        "noisy_bn" is jbn.BatchNorm followed, in training, by a random scale
        ~ U(1, noise_scale) and shift ~ U(-noise_shift, noise_shift) for every activation of
        every example, drawn afresh every step (the "noisy BatchNorm" of Santurkar et al. 2018), and in evaluation by the
        expected scale; "none" is the identity.
      momentum: running-average momentum of the batch-norm kinds.
      virtual_batch_size: ghost batch size ("ghost").
      group_size: channels per group ("group").
      r_max, d_max: Batch Renorm clipping limits ("renorm").
      renorm_ramp: None for fixed limits, or (begin, end) steps: plain BN (r_max=1,
        d_max=0) until `begin`, then both limits grow linearly to r_max and d_max at `end`
        (the shape of Ioffe 2017's schedule, `jbn.renorm_schedule`).
      noise_scale, noise_shift: noise ranges ("noisy_bn"): scale in [1, noise_scale],
        shift in [-noise_shift, noise_shift].
      use_scale, use_bias, epsilon: jbn.BatchNorm's options ("bn", "bn_per_activation").

    "flax_bn" is flax.linen.BatchNorm (the peer implementation, for the cost experiment).
    "bn_per_activation" is jbn.BatchNorm with one mean and variance per activation, i.e.
    every non-batch axis is a feature axis (for a conv activation (N, H, W, C): statistics
    over N only, for each (h, w, c)), instead of "bn"'s one per channel over N, H, W.
    "bn_per_activation_channel_affine" normalizes as "bn_per_activation" but its gamma and
    beta are one per channel, as "bn"'s are: the same parameters, only the statistics differ.
    """

    kind: str = "bn"
    momentum: float = 0.99
    virtual_batch_size: int = 8
    group_size: int = 8
    r_max: float = 3.0
    d_max: float = 5.0
    renorm_ramp: tuple[int, int] | None = None
    noise_scale: float = 1.25
    noise_shift: float = 0.5
    use_scale: bool = True
    use_bias: bool = True
    epsilon: float = 1e-5

    def __post_init__(self):
        if self.kind not in NORMS:
            raise ValueError(f"`kind`={self.kind!r}: use one of {', '.join(NORMS)}.")

    @property
    def normalizes(self) -> bool:
        return self.kind != "none"


def renorm_ramp(fractions, steps: int) -> tuple[int, int] | None:
    """`NormSpec.renorm_ramp` from config fractions of the run: [begin, end] -> steps;
    an empty list -> None (fixed limits)."""
    if not fractions:
        return None
    if len(fractions) != 2 or not 0 <= fractions[0] <= fractions[1]:
        raise ValueError(
            f"`renorm_ramp`={list(fractions)}: give [begin, end] fractions of the run with 0 <= begin <= end, or []."
        )
    return int(fractions[0] * steps), int(fractions[1] * steps)


def _scaled(init, scale: float):
    """`init` with its samples multiplied by `scale` (1 = unchanged)."""
    if scale == 1.0:
        return init
    return lambda key, shape, dtype=jnp.float32: scale * init(key, shape, dtype)


class Norm(nn.Module):
    """The normalization named by `spec`, applied to features on the last axis."""

    spec: NormSpec

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        s = self.spec
        if s.kind == "none":
            return x
        if s.kind == "bn_per_activation":
            return jbn.BatchNorm(
                use_running_average=not train,
                momentum=s.momentum,
                axis=tuple(range(1, x.ndim)),
                use_scale=s.use_scale,
                use_bias=s.use_bias,
                epsilon=s.epsilon,
            )(x)
        if s.kind == "bn_per_activation_channel_affine":
            y = jbn.BatchNorm(
                use_running_average=not train,
                momentum=s.momentum,
                axis=tuple(range(1, x.ndim)),
                use_scale=False,
                use_bias=False,
                epsilon=s.epsilon,
            )(x)
            channels, per_channel = (x.shape[-1],), (1,) * (x.ndim - 1) + (x.shape[-1],)
            if s.use_scale:
                y = y * self.param("scale", nn.initializers.ones, channels, y.dtype).reshape(per_channel)
            if s.use_bias:
                y = y + self.param("bias", nn.initializers.zeros, channels, y.dtype).reshape(per_channel)
            return y
        if s.kind in ("bn", "noisy_bn"):
            y = jbn.BatchNorm(
                use_running_average=not train,
                momentum=s.momentum,
                use_scale=s.use_scale,
                use_bias=s.use_bias,
                epsilon=s.epsilon,
            )(x)
            if s.kind == "noisy_bn" and not self.is_initializing():
                if train:
                    # one scale and one shift per activation AND per example (Santurkar et al. 2018)
                    u_scale, u_shift = jax.random.uniform(self.make_rng("noise"), (2, *x.shape), x.dtype)
                    y = y * (1 + (s.noise_scale - 1) * u_scale) + s.noise_shift * (2 * u_shift - 1)
                else:  # evaluation uses the noise's expectation, as dropout does
                    y = y * ((1 + s.noise_scale) / 2)
            return y
        if s.kind == "ghost":
            return jbn.BatchNorm(
                use_running_average=not train, momentum=s.momentum, virtual_batch_size=s.virtual_batch_size
            )(x)
        if s.kind == "renorm":
            r_max, d_max = s.r_max, s.d_max
            if s.renorm_ramp is not None:
                begin, end = s.renorm_ramp
                r_max = jbn.renorm_schedule(1.0, s.r_max, begin, end)
                d_max = jbn.renorm_schedule(0.0, s.d_max, begin, end)
            return jbn.BatchRenorm(use_running_average=not train, momentum=s.momentum, r_max=r_max, d_max=d_max)(x)
        if s.kind == "flax_bn":  # the peer, for timing comparisons
            return nn.BatchNorm(use_running_average=not train, momentum=s.momentum, epsilon=s.epsilon)(x)
        if s.kind == "group":
            return nn.GroupNorm(num_groups=None, group_size=min(s.group_size, x.shape[-1]))(x)
        raise AssertionError(s.kind)


class MLP(nn.Module):
    """A fully connected classifier.

    Attributes:
      widths: hidden layer widths, e.g. (100, 100, 100).
      num_classes: output logits.
      activation: a key of ACTIVATIONS.
      norm: the normalization of every hidden layer.
      placement: "before" (Dense -> norm -> activation, Ioffe & Szegedy) or "after"
        (Dense -> activation -> norm).
      dense_bias: whether hidden Dense layers have a bias; None = only when no norm
        directly follows them (a bias before a norm's mean subtraction is redundant).
      dropout: dropout rate, 0 for none.
      dropout_placement: "each" puts dropout on every hidden layer's output (so it feeds
        the next layer's norm); "last" only before the classifier, after the last norm;
        "before_last" only on the input of the last hidden Dense (one dropout layer that
        feeds the last norm: as much dropout as "last" when the widths are equal).
      weight_init: kernel initializer, a key of INITS.
      init_scale: multiplies the standard deviation of the hidden kernels' initializer.
    """

    widths: tuple[int, ...]
    num_classes: int
    activation: str = "relu"
    norm: NormSpec = NormSpec("none")
    placement: str = "before"
    dense_bias: bool | None = None
    dropout: float = 0.0
    dropout_placement: str = "each"
    weight_init: str = "lecun"
    init_scale: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, dropout: bool | None = None) -> jax.Array:
        """Logits (N, num_classes) of inputs x (N, ...) (flattened).

        Args:
          train: normalize with batch statistics (and update them when mutable).
          dropout: apply dropout; default `train`. False with train=True runs the norms in
            training mode without dropout (to re-estimate statistics as at test time).
        """
        act = ACTIVATIONS[self.activation]
        deterministic = not (train if dropout is None else dropout)
        bias = self.dense_bias
        if bias is None:
            bias = not (self.norm.normalizes and self.placement == "before")
        x = x.reshape(x.shape[0], -1)
        for i, width in enumerate(self.widths):
            before_this = self.dropout_placement == "each" or (
                self.dropout_placement == "before_last" and i == len(self.widths) - 1
            )
            if self.dropout > 0 and before_this and i > 0:
                x = nn.Dropout(self.dropout, deterministic=deterministic)(x)
            h = nn.Dense(
                width, use_bias=bias, kernel_init=_scaled(INITS[self.weight_init], self.init_scale), name=f"dense_{i}"
            )(x)
            if self.placement == "before":
                self.sow("intermediates", f"norm_input_{i}", h)
                h = Norm(self.norm, name=f"norm_{i}")(h, train)
                self.sow("intermediates", f"act_input_{i}", h)
                x = act(h)
            else:
                self.sow("intermediates", f"act_input_{i}", h)
                a = act(h)
                self.sow("intermediates", f"norm_input_{i}", a)
                x = Norm(self.norm, name=f"norm_{i}")(a, train)
        if self.dropout > 0 and self.dropout_placement in ("each", "last"):
            x = nn.Dropout(self.dropout, deterministic=deterministic)(x)
        return nn.Dense(self.num_classes, kernel_init=INITS[self.weight_init], name="head")(x)


class ConvNet(nn.Module):
    """A small conv net for 8x8 digit images (or 1-D sequences): conv -> norm -> ReLU
    blocks, 2x max-pooling after the blocks in `pool_after`, global average pooling and
    a Dense classifier.

    Attributes:
      channels: output channels of each 3x3 (or length-3) convolution.
      num_classes: output logits.
      norm: the normalization of every block.
      pool_after: indices of the blocks followed by 2x max-pooling.
      weight_init: kernel initializer of every conv and the classifier, a key of INITS.
    """

    channels: tuple[int, ...]
    num_classes: int
    norm: NormSpec = NormSpec("none")
    pool_after: tuple[int, ...] = (1,)
    weight_init: str = "lecun"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """x: (N, H, W, C) or (N, L, C); returns (N, num_classes) logits."""
        spatial = x.ndim - 2
        for i, c in enumerate(self.channels):
            init = INITS[self.weight_init]
            x = nn.Conv(c, (3,) * spatial, use_bias=not self.norm.normalizes, kernel_init=init, name=f"conv_{i}")(x)
            self.sow("intermediates", f"norm_input_{i}", x)
            x = nn.relu(Norm(self.norm, name=f"norm_{i}")(x, train))
            if i in self.pool_after:
                x = nn.max_pool(x, (2,) * spatial, strides=(2,) * spatial)
        x = x.mean(axis=tuple(range(1, 1 + spatial)))
        return nn.Dense(self.num_classes, kernel_init=INITS[self.weight_init], name="head")(x)
