"""The fused training path of batch norm: one `jax.custom_vjp` for statistics,
normalization and activation, with a hand-written backward pass.

Why: differentiated by plain autodiff, batch norm keeps several activation-sized float32
tensors alive for the backward pass (the centred input, its square, the normalized
output) and reads them back. Here the backward pass keeps only

- default: the input `x` (in its own dtype), the per-feature mean and inverse standard
  deviation, the (feature-shaped) scale and bias, and the mask if any;
- `save_output_only=True`: the output `y` instead of `x` (and no mean): for an
  invertible activation (identity, leaky_relu) the normalized input is recovered from
  `y`, so a following layer that saves `y` anyway shares it (In-Place Activated
  BatchNorm, Rota Bulo et al. 2018).

and computes, per feature, two reductions `sum(dz)` and `sum(dz * x_hat)` (`dz` is the
cotangent before the activation, `x_hat` the normalized input), then one elementwise
pass

    dx = scale * inv * dz + valid * (c0 + c1 * x_hat)

where `c0`, `c1` are feature-shaped and also carry the cotangents of the returned batch
mean and variance. Under `axis_name` the two reductions travel in one `psum` (with
`axis_index_groups`, one psum of per-participant slots, as the statistics do).

Gradients are exact for `x`, `scale` and `bias`, with or without a mask: padded
positions take no part in the statistics, so their gradient is `scale * inv * dz` (zero
when the loss ignores them), and NaN/inf in the padding does not leak into any gradient
through a zero cotangent. The backward pass is written in differentiable jnp code, so
reverse-over-reverse (`grad` of `grad`, Hessian-vector products with `jax.jvp` of a
`grad`) works. Plain forward mode (`jax.jvp`, `jax.jacfwd` of the layer itself) does not
work through a custom VJP: pass `fused=False` to `batch_norm` for that.

Collectives: under `shard_map` with `check_vma=True` the returned statistics are
device-invariant and so are the cotangents that come back for them; under `pmap`,
`vmap` with an axis name or `check_vma=False`, JAX treats a `psum` as "sum, then
broadcast", whose transpose sums the cotangents again. The backward pass follows
whichever rule applies, so its gradients are those that autodiff of the unfused layer
gives in the same setting.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Hashable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jbn import _activations, _checks
from jbn._fusion import separate_uses
from jbn.functional import Moments, _psum_in_groups, moments, normalize

Array = jax.Array

# How a psum over the bound axis names behaves under differentiation (see module doc).
NO_COLLECTIVE = "none"
CHECKED = "checked"  # shard_map with check_vma=True: statistics are invariant values
UNCHECKED = "unchecked"  # pmap, vmap(axis_name=...), shard_map(check_vma=False)


class _Config(NamedTuple):
    """Static description of one fused call (hashable: it is a nondiff argument)."""

    features: tuple[int, ...]
    epsilon: float
    axis_name: tuple[Hashable, ...] | None
    groups: tuple[tuple[int, ...], ...] | None
    collective: str
    x_dtype: Any
    out_dtype: Any
    activation: str
    negative_slope: float
    save_output_only: bool


def varying_axes(v: Any) -> frozenset:
    """The manual axes along which `v`'s value varies (empty outside shard_map, or when
    shard_map does not check them)."""
    aval = jax.typeof(v)
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))


def collective_kind(names: tuple[Hashable, ...] | None) -> str | None:
    """Which differentiation rule a psum over `names` follows here; None for a mix of
    checked and unchecked names, which the fused path does not handle."""
    if names is None:
        return NO_COLLECTIVE
    _checks.bound_axis_size(names)  # a clear error for an unbound name
    checked = [n for n in names if n in varying_axes(lax.axis_index(n))]
    if not checked:
        return UNCHECKED
    return CHECKED if len(checked) == len(names) else None


def can_fuse(epsilon: Any, names: tuple[Hashable, ...] | None) -> bool:
    """The fused path needs a static epsilon and one differentiation rule for all names."""
    static_eps = isinstance(epsilon, (int, float)) and not isinstance(epsilon, bool)
    return static_eps and collective_kind(names) is not None


def fused_batch_norm(
    x: Array,
    scale: Array | None,
    bias: Array | None,
    *,
    features: tuple[int, ...],
    epsilon: float,
    valid: Array | None,
    names: tuple[Hashable, ...] | None,
    groups: tuple[tuple[int, ...], ...] | None,
    dtype: Any,
    activation: str,
    negative_slope: float,
    save_output_only: bool,
) -> tuple[Array, Moments]:
    """Training-mode batch norm (+ activation) with the fused backward pass.

    Arguments are already checked by the caller (`jbn.functional`): `features` are sorted
    non-negative feature axes, `valid` a bool mask of `x`'s rank or None, `names` a tuple
    of bound axis names or None, `activation` a canonical name. Returns the output and the
    batch `Moments` (mean and var differentiable, count not).
    """
    kind = collective_kind(names)
    if kind == CHECKED:
        # The batch varies over every named axis; a replicated `x` is made varying so that
        # the custom VJP sees one type (the transpose of this cast sums its cotangent).
        missing = tuple(n for n in names if n not in varying_axes(x))
        if missing:
            x = lax.pcast(x, missing, to="varying")
    if save_output_only and scale is not None and not isinstance(scale, jax.core.Tracer):
        with jax.ensure_compile_time_eval():  # scale is concrete: evaluate now, not in the traced program
            has_zero = bool(jnp.any(jnp.asarray(scale) == 0))
        if has_zero:
            raise ValueError(
                "`save_output_only=True` recovers the normalized input as (z - bias) / scale, but `scale` has "
                "zeros (e.g. a zero-initialized last scale of a residual block): use save_output_only=False "
                "for this layer."
            )
    cfg = _Config(
        features=features,
        epsilon=float(epsilon),
        axis_name=names,
        groups=groups,
        collective=kind,
        x_dtype=jnp.dtype(x.dtype),
        out_dtype=jnp.dtype(x.dtype if dtype is None else dtype),
        activation=activation,
        negative_slope=float(negative_slope),
        save_output_only=bool(save_output_only),
    )
    y, mean, var, count = _fused(cfg, x, scale, bias, valid)
    return y, Moments(mean, var, lax.stop_gradient(count))


# ----------------------------------------------------------------------- the custom VJP


def _forward(cfg: _Config, x, scale, bias, valid):
    """Statistics (the pure layer's `moments`), output, and the inverse std."""
    stats = moments(x, axis=cfg.features, mask=valid, axis_name=cfg.axis_name, axis_index_groups=cfg.groups)
    params = [p.dtype for p in (scale, bias) if p is not None]
    compute = _checks.stats_dtype(x.dtype, stats.mean.dtype, *params)
    z = normalize(x, stats.mean, stats.var, scale, bias, axis=cfg.features, epsilon=cfg.epsilon, dtype=compute)
    y = _activations.apply(z, cfg.activation, cfg.negative_slope).astype(cfg.out_dtype)
    inv = lax.rsqrt(stats.var.astype(compute) + cfg.epsilon)
    return y, stats, inv


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(cfg: _Config, x, scale, bias, valid):
    y, stats, _ = _forward(cfg, x, scale, bias, valid)
    return y, stats.mean, stats.var, stats.count


def _fused_fwd(cfg: _Config, x, scale, bias, valid):
    y, stats, inv = _forward(cfg, x, scale, bias, valid)
    if cfg.save_output_only:
        saved, mean = y, None  # x_hat comes back from y; the mean is not needed
    else:
        saved, mean = x, stats.mean
    residuals = (saved, mean, inv, stats.count, scale, bias, valid)
    return (y, stats.mean, stats.var, stats.count), residuals


def _fused_bwd(cfg: _Config, residuals, cotangents):
    saved, mean, inv, count, scale, bias, valid = residuals
    dy, g_mean, g_var, _ = cotangents  # the count is piecewise constant: no gradient
    ndim, features = saved.ndim, cfg.features
    reduce = _checks.reduction_axes(ndim, features)
    compute = inv.dtype

    def expand(v):
        return _checks.expand_features(v.astype(compute), ndim, features)

    def pieces(saved, dy, mean, scale, bias, per_feature):
        """(dz, x_hat): the cotangent before the activation and the normalized input,
        from x or from y. Rebuilt for each of the three passes below; constants come in
        as feature-shaped arrays (see `_activations.cotangent`)."""
        inv, zero, gap, reciprocal = per_feature
        s = saved.astype(compute)
        zero = expand(zero)
        if cfg.save_output_only:
            z = _activations.inverse(s, cfg.activation, cfg.negative_slope, zero=zero, reciprocal=expand(reciprocal))
            x_hat = z
            if bias is not None:
                x_hat = x_hat - expand(bias)
            if scale is not None:
                x_hat = x_hat / expand(scale)  # scale == 0 gives NaN gradients for that feature
        else:
            x_hat = (s - expand(mean)) * expand(inv)
            z = x_hat
            if scale is not None:
                z = z * expand(scale)
            if bias is not None:
                z = z + expand(bias)
        dz = _activations.cotangent(
            dy.astype(compute), z, cfg.activation, cfg.negative_slope, zero=zero, gap=expand(gap),
            nan_safe=valid is not None,
        )
        return dz, x_hat

    # Each pass gets its own handle on the inputs, so that XLA fuses the recomputation
    # into each pass instead of writing x_hat or dz to memory (see jbn._fusion).
    zero = jnp.zeros(inv.shape, compute)
    gap = jnp.full(inv.shape, 1 - cfg.negative_slope, compute)
    reciprocal = jnp.full(inv.shape, 1 / cfg.negative_slope if cfg.negative_slope else 0, compute)
    # (The constants travel with `inv`, so that XLA cannot fold them back into scalars.)
    uses = separate_uses(3, saved, dy, mean, scale, bias, (inv, zero, gap, reciprocal))

    # The two per-feature reductions (local), then global in one psum.
    dz, _ = pieces(*uses[0])
    sum_dz = jnp.sum(dz, axis=reduce)
    dz, x_hat = pieces(*uses[1])
    dz_x_hat = dz * x_hat
    if valid is not None:
        # Padding may hold NaN/inf (so x_hat does there); a zero cotangent adds nothing.
        dz_x_hat = jnp.where(dz == 0, 0, dz_x_hat)
    sum_dz_x_hat = jnp.sum(dz_x_hat, axis=reduce)
    g_mean = g_mean.astype(compute)
    g_var = g_var.astype(compute)
    if cfg.collective == NO_COLLECTIVE:
        total_dz, total_dz_x_hat = sum_dz, sum_dz_x_hat
    elif cfg.collective == CHECKED and cfg.groups is None:
        # Invariant statistics get invariant (already summed) cotangents.
        total_dz, total_dz_x_hat = _psum_in_groups(jnp.stack([sum_dz, sum_dz_x_hat]), cfg.axis_name, None)
    else:
        # psum = sum then broadcast: its transpose sums the cotangents of its outputs too
        # (within each group; under checked shard_map, grouped statistics vary by group).
        stacked = jnp.stack([sum_dz, sum_dz_x_hat, g_mean, g_var])
        total_dz, total_dz_x_hat, g_mean, g_var = _psum_in_groups(stacked, cfg.axis_name, cfg.groups)

    # dx = k dz + valid * (c0 + c1 x_hat): the batch-norm backward formula
    # k (dz - sum(dz)/n - x_hat sum(dz x_hat)/n), plus d mean/dx = 1/n and
    # d var/dx = 2 (x - mean)/n = 2 x_hat / (inv n) for the returned statistics.
    n = jnp.broadcast_to(count.astype(compute), inv.shape)
    per_element = jnp.where(n > 0, 1 / jnp.maximum(n, 1), 0)
    k = inv if scale is None else inv * scale.astype(compute)
    c0 = (g_mean - k * total_dz) * per_element
    c1 = (2 * g_var / inv - k * total_dz_x_hat) * per_element
    dz, x_hat = pieces(*uses[2])
    through_stats = expand(c0) + expand(c1) * x_hat
    if valid is not None:
        through_stats = jnp.where(valid, through_stats, 0)
    dx = (expand(k) * dz + through_stats).astype(cfg.x_dtype)

    d_scale = None if scale is None else _param_cotangent(cfg, scale, sum_dz_x_hat, total_dz_x_hat)
    d_bias = None if bias is None else _param_cotangent(cfg, bias, sum_dz, total_dz)
    return dx, d_scale, d_bias, None


def _param_cotangent(cfg: _Config, param: Array, local: Array, total: Array) -> Array:
    """The cotangent of scale or bias: the sum over the batch this participant sees, then
    summed over every manual axis along which that sum varies but the parameter does not
    (what autodiff's implicit `pvary` of an invariant parameter would transpose to);
    under pmap-like rules (no such types) the participant's own sum."""
    extra = varying_axes(local) - varying_axes(param)
    if not extra:
        ct = local
    elif cfg.collective == CHECKED and cfg.groups is None and set(cfg.axis_name) <= extra:
        ct = total  # the backward psum already summed over `axis_name`
        rest = tuple(a for a in extra if a not in cfg.axis_name)
        if rest:
            ct = lax.psum(ct, rest)
    else:
        ct = lax.psum(local, tuple(extra))
    return ct.astype(param.dtype)


_fused.defvjp(_fused_fwd, _fused_bwd)
