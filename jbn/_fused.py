"""The normalization of batch norm (past 400 lines: one concept, the arithmetic from the
statistics to the output and its derivative): `normalize_on_layout` and the activations it
can apply, and the fused training path, one `jax.custom_jvp` for statistics, normalization
and activation, whose tangent rule transposes into a lean backward pass.

Why: differentiated by plain autodiff, batch norm keeps several activation-sized float32
tensors alive for the backward pass (the centred input, its square, the normalized
output) and reads them back. Here the tangent rule is written so that

- it is linear in the tangents of `x`, `scale` and `bias`, and runs inside a
  `jax.checkpoint` that saves nothing: reverse mode (`grad`, `vjp`) keeps only the
  checkpoint's primal inputs, i.e. the input `x` (in its own dtype) or, with
  `save_output_only=True`, the output `y` (for an invertible activation the normalized
  input is recovered from `y`: In-Place Activated BatchNorm, Rota Bulo et al. 2018), plus
  the per-feature mean, inverse standard deviation, scale, bias and the mask;
- its transpose is the textbook fused backward: two per-feature reductions `sum(g)` and
  `sum(g * x_hat)` (`g` the cotangent before the activation, `x_hat` the normalized
  input), then one elementwise pass `dx = k g + valid (c0 + c1 x_hat)`. Each of the three
  passes gets its own handle on the saved arrays, so that XLA:CPU fuses the
  recomputation of `x_hat` into each (see jbn._statistics.separate_uses); with an output narrower than
  the compute dtype (bfloat16, float16), each pass also gets its own handle on the
  output's cotangent and casts it inside its fusion (`kept_apart`);
- under `axis_name` the two input-tangent sums travel in one psum, whose transpose is the
  one collective of the backward pass; a replicated scale and bias (shard_map with
  `check_vma=True`) get their summed cotangents from one more transpose of an explicit
  `pcast`, which JAX turns into one psum of the two per-feature sums together.

Forward mode (`jax.jvp`, `jax.jacfwd`, `jax.linearize`) uses the same rule directly;
higher orders (grad of grad, Hessian-vector products) differentiate it like any jnp code.
Collectives, masks and vma types follow JAX's own rules, since JAX derives the backward
pass by transposition: gradients are those of the unfused layer in every setting.
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax._src import core as jax_core  # extend_axis_env_nd: no public equivalent (see _names_bound)

from jbn import _statistics
from jbn._options import Layout, bound_axis_size, reduction_axes
from jbn._state import Moments
from jbn._statistics import expand_features, kept_apart, real_dtype, separate_uses, stats_dtype, varying_axes

Array = jax.Array


class FusedConfig(NamedTuple):
    """Static description of one fused call (hashable: a nondiff argument)."""

    axis: Any  # as the user wrote it (hashable)
    features: tuple[int, ...]
    names: tuple[Hashable, ...] | None
    sizes: tuple[int, ...] | None  # each name's size where the call is traced (see _names_bound)
    groups: tuple[tuple[int, ...], ...] | None
    epsilon: float
    out_dtype: Any
    activation: str
    negative_slope: float
    save_output_only: bool


def can_fuse(x: Array, epsilon: Any) -> bool:
    """The fused path needs a static epsilon and real data (a complex variance's
    derivative is not in the rule below; complex inputs use plain autodiff)."""
    static_eps = isinstance(epsilon, (int, float)) and not isinstance(epsilon, bool)
    return static_eps and not jnp.iscomplexobj(x)


def fused_batch_norm(
    x: Array,
    scale: Array | None,
    bias: Array | None,
    layout: Layout,
    *,
    epsilon: float,
    out_dtype: Any,
    activation: str,
    negative_slope: float,
    save_output_only: bool,
) -> tuple[Array, Moments]:
    """Training-mode batch norm (+ activation) with the fused derivative rule, on checked
    arguments. Returns the output and the batch `Moments` (mean and var
    differentiable, count not)."""
    if save_output_only and scale is not None and not isinstance(scale, jax.core.Tracer):
        with jax.ensure_compile_time_eval():  # scale is concrete: evaluate now, not in the traced program
            has_zero = bool(jnp.any(jnp.asarray(scale) == 0))
        if has_zero:
            raise ValueError(
                "`save_output_only=True` recovers the normalized input as (z - bias) / scale, but `scale` has "
                "zeros (e.g. a zero-initialized last scale of a residual block): use save_output_only=False "
                "for this layer."
            )
    cfg = FusedConfig(
        layout.axis,
        layout.features,
        layout.names,
        None if layout.names is None else tuple(bound_axis_size((n,)) for n in layout.names),
        layout.groups,
        float(epsilon),
        jnp.dtype(out_dtype),
        activation,
        float(negative_slope),
        bool(save_output_only),
    )
    y, mean, var, count = _fused(cfg, x, scale, bias, layout.valid)
    return y, Moments(mean, var, lax.stop_gradient(count))


def _layout(cfg: FusedConfig, x: Array, valid: Array | None) -> Layout:
    return Layout.of(cfg.axis, cfg.features, x.shape, valid, cfg.names, cfg.groups)


def _primal(cfg: FusedConfig, x, scale, bias, valid):
    layout = _layout(cfg, x, valid)
    stats = _statistics.batch_moments(x, layout)
    y = normalize_on_layout(
        x,
        layout,
        stats.mean,
        stats.var,
        scale,
        bias,
        epsilon=cfg.epsilon,
        out_dtype=cfg.out_dtype,
        activation=cfg.activation,
        negative_slope=cfg.negative_slope,
    )
    return y, stats


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _fused(cfg: FusedConfig, x, scale, bias, valid):
    y, stats = _primal(cfg, x, scale, bias, valid)
    return y, stats.mean, stats.var, stats.count


@_fused.defjvp
def _fused_jvp(cfg: FusedConfig, primals, tangents):
    with _names_bound(cfg):
        return _jvp_body(cfg, primals, tangents)


def _names_bound(cfg: FusedConfig) -> Any:
    """A context in which `cfg.names` are bound with the sizes seen by the primal call.

    Why: under `vmap(axis_name=...)`, JAX batches this rule lazily and may trace it after
    the vmap has returned (a gradient through `lax.scan`, `jit` or `remat` from outside
    the vmap; `linearize`; second order). The batching of the rule's collectives is still
    right then (they are routed by the vmap's own trace), but the axis name is no longer in
    JAX's table of bound names, which `lax.axis_size`, `lax.axis_index` and the
    collectives' checks consult. The names are bound again here, with the same sizes;
    names that are still bound (pmap, shard_map, a vmap in progress) are left alone."""
    if cfg.names is None or cfg.sizes is None:
        return contextlib.nullcontext()
    unbound = [(n, s) for n, s in zip(cfg.names, cfg.sizes) if not _is_bound(n)]
    if not unbound:
        return contextlib.nullcontext()
    return jax_core.extend_axis_env_nd(unbound)


def _is_bound(name: Hashable) -> bool:
    try:
        lax.axis_size(name)
    except NameError:
        return False
    return True


def _jvp_body(cfg: FusedConfig, primals, tangents):
    x, scale, bias, valid = primals
    dx, dscale, dbias, _ = tangents  # the mask is boolean: no tangent
    y, stats = _primal(cfg, x, scale, bias, valid)
    compute = compute_dtype(x, stats.mean, scale, bias)
    inv = lax.rsqrt(stats.var.astype(compute) + cfg.epsilon)
    count = jnp.broadcast_to(stats.count, inv.shape).astype(compute)
    saved, mean = (y, None) if cfg.save_output_only else (x, stats.mean)
    args = (saved, mean, inv, scale, bias, valid, count, dx, dscale, dbias)
    dy, dmean, dvar = _recomputed(cfg)(*args)
    primal_out = (y, stats.mean, stats.var, stats.count)
    return primal_out, (dy, dmean.astype(stats.mean.dtype), dvar.astype(stats.var.dtype), jnp.zeros_like(stats.count))


def _recomputed(cfg: FusedConfig):
    """`_tangent` in a `jax.checkpoint` that saves nothing, without the checkpoint's own
    barrier against common subexpressions: on XLA:GPU and XLA:TPU a barrier on the saved `x`
    (or `y`) hides that the forward's output and the backward's last pass read the same array
    (read twice instead of once, in one fusion), and one on the incoming cotangent keeps the
    activation's backward before this layer (a relu's mask) from fusing into the passes that
    read it (written out in full instead). On CPU the same barriers are put in explicitly
    (`_cpu_barriers`, on the inputs of the recomputation and, transposed, on the cotangents),
    where XLA:CPU would otherwise merge the recomputation with the forward pass."""

    def behind_barriers(*args):
        recomputed_from, linear = args[:7], args[7:]
        return _cpu_barriers(_tangent(cfg, *_cpu_barriers(recomputed_from), *linear))

    return jax.checkpoint(behind_barriers, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)


def _cpu_barriers(tree):
    """Each array of `tree` behind its own optimization barrier on CPU (one per array keeps
    each one's device-variance type under shard_map); elsewhere the arrays themselves."""
    leaves, treedef = jax.tree.flatten(tree)
    out = lax.platform_dependent(
        *leaves, cpu=lambda *a: [lax.optimization_barrier(v) for v in a], default=lambda *a: list(a)
    )
    return jax.tree.unflatten(treedef, out)


def _tangent(cfg: FusedConfig, saved, mean, inv, scale, bias, valid, count, dx, dscale, dbias):
    """The tangents of (y, mean, var), linear in (dx, dscale, dbias).

    With `x_hat = (x - mean) inv`, `k = scale inv`, sums over the valid elements
    `s1 = sum(dx)`, `s2 = sum(dx x_hat)` (global under `axis_name`) and `1/n` per feature:
      d mean = s1 / n,  d var = 2 s2 / (n inv),
      dz = k dx + x_hat (dscale - k s2 / n) + (dbias - k s1 / n),  dy = act'(z) dz.
    `dz` is written as three terms, each with its own handle on the saved arrays, so that
    the transpose computes `sum(g x_hat)`, `sum(g)` and `k g` in three fused passes."""
    ndim, features = saved.ndim, cfg.features
    reduce = reduction_axes(ndim, features)
    compute = inv.dtype
    per_element = jnp.where(count > 0, 1 / jnp.maximum(count, 1), 0)
    k = inv if scale is None else inv * scale.astype(compute)

    def expand(v):
        return expand_features(v.astype(compute), ndim, features)

    # Feature-shaped constants travel with `inv`, so that XLA cannot fold them back into
    # scalars that it would then write out at full size (see `cotangent`).
    constants = (
        inv,
        jnp.zeros_like(inv),
        jnp.full_like(inv, 1 - cfg.negative_slope),
        jnp.full_like(inv, 1 / cfg.negative_slope if cfg.negative_slope else 0),
        jnp.ones_like(inv),
    )
    uses = separate_uses(3, saved, mean, scale, bias, constants)
    # XLA:CPU recomputes a cheap per-feature value inside every element of the loop that
    # broadcasts it, but computes an "expensive" one (a division) once: the per-feature
    # coefficients of the last pass are divided by an opaque 1 (exact) to be computed once.
    one = uses[0][-1][-1]
    k = k / one

    def pieces(saved, mean, scale, bias, constants):
        """(x_hat, z, act'(.)) recomputed from x, or from y with save_output_only."""
        inv, zero, gap, reciprocal, _ = (expand(c) for c in constants)
        s = saved.astype(compute)
        if cfg.save_output_only:
            z = inverse(s, cfg.activation, cfg.negative_slope, zero=zero, reciprocal=reciprocal)
            x_hat = z
            if bias is not None:
                x_hat = x_hat - expand(bias)
            if scale is not None:
                x_hat = x_hat / expand(scale)  # scale == 0 gives NaN gradients for that feature
        else:
            x_hat = (s - expand(mean)) * inv
        if valid is not None:
            # Padding may hold anything (NaN, inf, or 3e38 whose x_hat overflows): a non-finite
            # x_hat there is taken as 0, so that no 0 * inf reaches a sum and the gradients are
            # those of the same batch padded with zeros (finite padding keeps its own x_hat).
            x_hat = jnp.where(valid | jnp.isfinite(x_hat), x_hat, 0)
        if not cfg.save_output_only:
            z = x_hat if scale is None else x_hat * expand(scale)
            z = z if bias is None else z + expand(bias)
        if valid is not None:
            z = jnp.where(valid | jnp.isfinite(z), z, 0)  # act'(z) of padding: never NaN

        def through_activation(t):
            return cotangent(t, z, cfg.activation, cfg.negative_slope, zero=zero, gap=gap)

        return x_hat, through_activation

    dx = dx.astype(compute)
    x_hat0, act0 = pieces(*uses[0])
    x_hat1, act1 = pieces(*uses[1])
    _, act2 = pieces(*uses[2])
    valid_dx = dx if valid is None else jnp.where(valid, dx, 0)
    s1, s2 = jnp.sum(valid_dx, axis=reduce) / one, jnp.sum(valid_dx * x_hat0, axis=reduce) / one
    if cfg.names is not None:  # both sums in one collective
        s1, s2 = _statistics.psum_in_groups(jnp.stack([s1, s2]), cfg.names, cfg.groups)
    s1, s2 = s1 * per_element, s2 * per_element
    d_mean, d_var = s1, 2 * s2 / inv
    a, b = -k * s2, -k * s1
    if dscale is not None:
        a = a + dscale.astype(compute)
    if dbias is not None:
        b = b + dbias.astype(compute)
    # Where the data varies over manual axes that the per-feature terms do not (shard_map
    # with checks), say so once for both: the transpose is then one psum of the two sums.
    missing = tuple(varying_axes(x_hat1) - varying_axes(a) - varying_axes(b))
    if missing:
        a, b = lax.pcast(jnp.stack([a, b]), missing, to="varying")
    # The third term is made full-size here, so that its transpose sums the cotangent in
    # the compute dtype (a sum of the narrow cotangent would round); as a sum with zeros
    # like `dx`, it is split over devices as `dx` is (a plain broadcast of a replicated
    # vector would be replicated, and its transpose would gather the cotangent).
    terms = (act0(expand(k) * dx), act1(x_hat1 * expand(a)), act2(jnp.zeros_like(dx) + expand(b)))
    if jnp.dtype(cfg.out_dtype) == compute:
        return sum(terms), d_mean, d_var
    # A narrower output: each term is cast on its own, behind its own barrier. Transposed,
    # each pass of the backward then casts its own handle on the output's cotangent
    # inside its fusion; one cast shared by the three passes would be written out in full
    # (an activation-sized float32 array). In forward mode the price is that the output
    # tangent is the sum of the three terms rounded to `out_dtype` (a few of its ulps).
    dy = sum(kept_apart(*(t.astype(cfg.out_dtype) for t in terms)))
    return dy, d_mean, d_var


# Normalization, and the activations batch norm can apply to its output, with what the fused
# backward pass needs from them: the derivative as a function of the pre-activation, and (for the
# invertible ones) the pre-activation recovered from the output. Names (checked by
# `jbn._options.check_activation`): "identity", "relu" (`max(z, 0)`, derivative 0 at 0 as in
# `jax.nn.relu`), "leaky_relu" (`z` where `z >= 0`, else `negative_slope * z`, as in
# `jax.nn.leaky_relu`).


def compute_dtype(x: Array, *arrays: Array | None) -> jnp.dtype:
    """The arithmetic's dtype: float32 or wider (complex for complex data)."""
    return stats_dtype(x.dtype, *(a.dtype for a in arrays if a is not None))


def normalize_on_layout(
    x, layout: Layout, mean, var, scale, bias, *, epsilon, out_dtype, activation="identity", negative_slope=0.01
) -> Array:
    """`normalize` (then the activation, in the compute dtype) on checked arguments."""
    compute = compute_dtype(x, mean, scale, bias)

    def expand(v):
        return expand_features(v.astype(compute), len(layout.shape), layout.features)

    multiplier = lax.rsqrt(var.astype(real_dtype(compute)) + epsilon).astype(compute)
    if scale is not None:
        multiplier = multiplier * scale.astype(compute)
    y = (x.astype(compute) - expand(mean)) * expand(multiplier)
    if bias is not None:
        y = y + expand(bias)
    return activate(y, activation, negative_slope).astype(out_dtype)


def activate(z: Array, name: str, negative_slope: float) -> Array:
    """The activation `name` of `z`."""
    # max/min rather than a select: XLA:CPU fuses these into a following reduction.
    if name == "relu":
        return jnp.maximum(z, 0)
    if name == "leaky_relu":
        return jnp.maximum(z, 0) + negative_slope * jnp.minimum(z, 0)
    return z


def cotangent(
    dy: Array, z: Array, name: str, negative_slope: float, *, zero: Any = 0, gap: Any = None, nan_safe: bool = False
) -> Array:
    """The cotangent of the pre-activation `z` given the cotangent `dy` of the output.

    At `z == 0`: relu' = 0 and leaky_relu' = 1, as `jax.nn.relu`/`jax.nn.leaky_relu`.
    The default form is arithmetic (sign/min/max): XLA:CPU fuses it into a following
    reduction, where it does not fuse a comparison or select; it gives NaN where `z` is
    NaN. `zero` is the 0 it compares against: an array that broadcasts against `z` (a
    per-feature vector) lets XLA:CPU fuse it as well, where a scalar constant shared by
    several reductions is written out at full size; `gap` (default `1 - negative_slope`)
    likewise. `nan_safe=True` uses comparisons
    instead, which give 0/1 (or the slope) for a NaN `z`, as `jax.nn` does.
    """
    if name == "identity":
        return dy
    if nan_safe:
        if name == "relu":
            return jnp.where(z > 0, dy, 0)
        return jnp.where(z >= 0, dy, negative_slope * dy)
    if name == "relu":
        return dy * jnp.sign(jnp.maximum(z, zero))  # 1 where z > 0, else 0
    # dy where z >= 0, slope * dy where z < 0 (sign(min(z, 0)) is -1 there, else 0).
    gap = 1 - negative_slope if gap is None else gap
    return dy + gap * dy * jnp.sign(jnp.minimum(z, zero))


def inverse(y: Array, name: str, negative_slope: float, *, zero: Any = 0, reciprocal: Any = None) -> Array:
    """The pre-activation `z` with `apply(z) == y`, for an invertible activation. The
    sign of `y` equals the sign of `z` when the slope is positive, so the branch is known.
    `zero` and `reciprocal` (default `1 / negative_slope`) as `zero` in `cotangent`."""
    if name == "leaky_relu":
        reciprocal = 1 / negative_slope if reciprocal is None else reciprocal
        return jnp.maximum(y, zero) + jnp.minimum(y, zero) * reciprocal
    return y
