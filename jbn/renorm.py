"""Batch Renormalization (Ioffe 2017), pure: jax and jax.lax only.

Training output: `y = scale * ((x - mu_B) / sigma_B * r + d) + bias` with
`sigma_B = sqrt(var_B + epsilon)`, `sigma = sqrt(running.var + epsilon)`,
`r = clip(sigma_B / sigma, 1 / r_max, r_max)`, `d = clip((mu_B - mu) / sigma, -d_max, d_max)`,
and r, d treated as constants by the gradient. With `r_max=1, d_max=0` it is batch norm.
Evaluation is batch norm's evaluation: the running statistics are the same `RunningStats`
(mean and variance, updated by `update_running_stats`), so a renorm checkpoint is a batch-norm
checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jbn import _options, _running
from jbn._batch_norm import evaluate_with_layout, without_nonfinite_padding
from jbn._fused import normalize_on_layout
from jbn._options import Axes, AxisName, Layout, Normalization, promoted
from jbn._running import apply_rule, check_running
from jbn._state import RunningStats
from jbn._statistics import batch_moments

Array = jax.Array
Limit = float | Callable[[Array], Array]


def renorm_schedule(init_value: float, end_value: float, begin_step: int, end_step: int) -> Callable[[Array], Array]:
    """A limit that stays at `init_value` until `begin_step`, moves linearly to `end_value`
    at `end_step`, and stays there: `schedule(step) -> float32 scalar`.

    Args:
      init_value, end_value: the limit before `begin_step` and from `end_step` on.
      begin_step, end_step: step counts (0-based, as kept in `batch_stats/step`), begin <= end.
    """
    if end_step < begin_step:
        raise ValueError(f"`end_step`={end_step} is before `begin_step`={begin_step}: give begin_step <= end_step.")
    span = max(end_step - begin_step, 1)

    def schedule(step):
        progress = jnp.clip((jnp.asarray(step, jnp.float32) - begin_step) / span, 0.0, 1.0)
        return jnp.float32(init_value) + (jnp.float32(end_value) - jnp.float32(init_value)) * progress

    return schedule


def paper_renorm_schedules() -> tuple[Callable[[Array], Array], Callable[[Array], Array]]:
    """`(r_max, d_max)` schedules of Ioffe (2017), Sec. 4.1: plain batch norm
    (r_max=1, d_max=0) for the first 5000 steps, then relaxed linearly to reach r_max=3 at
    step 40k and d_max=5 at step 25k."""
    return renorm_schedule(1.0, 3.0, 5_000, 40_000), renorm_schedule(0.0, 5.0, 5_000, 25_000)


def resolve_limit(limit: Limit, step: Any, name: str) -> Array | float:
    """A float limit as it is (checked), or a schedule evaluated at `step`. A schedule's
    value is checked when it is concrete; a traced one is clipped to its valid range
    (r_max >= 1, d_max >= 0), since it cannot be checked at trace time."""
    low = 1.0 if name == "r_max" else 0.0
    meaning = (
        "r is clipped to [1/r_max, r_max]; 1 gives batch norm"
        if name == "r_max"
        else "d is clipped to [-d_max, d_max]; 0 gives batch norm"
    )
    if callable(limit):
        if step is None:
            raise ValueError(f"`{name}` is a schedule of the step count: pass `step` (e.g. batch_stats['step']).")
        raw = limit(step)
        value = jnp.asarray(raw, jnp.float32)
        if value.shape != ():
            raise ValueError(f"`{name}` schedule returned shape {value.shape}: it must return a scalar.")
        if not isinstance(raw, jax.core.Tracer):  # a Python number, or an array computed eagerly
            with jax.ensure_compile_time_eval():
                bad = not bool(jnp.asarray(raw) >= low)  # NaN fails too
            if bad:
                raise ValueError(f"`{name}` schedule returned {raw} at step {step}: it must be >= {low:g} ({meaning}).")
        return jnp.maximum(value, low)
    if _options.is_bool(limit) or not isinstance(limit, (int, float, jnp.integer, jnp.floating)):
        raise TypeError(
            f"`{name}` must be a float or a callable of the step count, got {type(limit).__name__} {limit!r}."
        )
    if not limit >= low:  # NaN fails too
        raise ValueError(f"`{name}`={limit} must be >= {low:g} ({meaning}).")
    return float(limit)


def next_step(step: Array) -> Array:
    """`step + 1`, saturating at the dtype's maximum instead of wrapping to negative."""
    step = jnp.asarray(step)
    return jnp.where(step < jnp.iinfo(step.dtype).max, step + 1, step).astype(step.dtype)


def batch_renorm(
    x: Array,
    scale: Array | None,
    bias: Array | None,
    running: RunningStats,
    *,
    training: bool,
    r_max: Limit = 3.0,
    d_max: Limit = 5.0,
    step: Array | int | None = None,
    axis: Axes = -1,
    momentum: float | None = 0.99,
    epsilon: float = 1e-5,
    mask: Array | None = None,
    axis_name: AxisName = None,
    axis_index_groups: Any = None,
    dtype: Any = None,
    debias: bool = False,
    unbiased_running_var: bool = False,
    running_average: Any = None,
) -> tuple[Array, RunningStats]:
    """Batch renormalization of `x` and the next running statistics.

    Args:
      x: floating input of any rank.
      scale, bias: feature-shaped affine parameters, or None.
      running: `RunningStats` (feature-shaped); r and d are measured against it.
      training: renormalize with batch statistics and update `running` (True), or
        normalize with `running` (False, identical to `batch_norm`'s evaluation). Static.
      r_max: >= 1, or a schedule `step -> r_max` (see `renorm_schedule`).
      d_max: >= 0, or a schedule `step -> d_max`.
      step: the step count the schedules read (int or int array); needed only for them.
      axis, mask, axis_name, axis_index_groups, epsilon, dtype: as in `batch_norm`.
      momentum, debias, unbiased_running_var: the running update, as in `batch_norm`
        (the running variance is averaged, not the standard deviation as in the paper, so
        that the state is exactly batch norm's).
      running_average: a running-average rule object, as in `batch_norm`.

    Returns:
      `(y, new_running)`: `y` has `x`'s shape.
    """
    training = _options.check_flag(training, "training")
    running_options = _options.check_running_options(momentum, debias, unbiased_running_var, running_average)
    x, scale, bias, layout, how = _options.checked_arguments(
        x,
        scale,
        bias,
        axis=axis,
        mask=mask,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        epsilon=epsilon,
        dtype=dtype,
        fused=False,
        training=training,
    )
    rule = _running.rule_of(*running_options)
    running = check_running(running, layout.fshape, axis)
    limits = dict(r_max=resolve_limit(r_max, step, "r_max"), d_max=resolve_limit(d_max, step, "d_max"))
    return batch_renorm_core(x, scale, bias, running, layout, how, rule, training=training, **limits)


def batch_renorm_core(
    x: Array,
    scale,
    bias,
    running: RunningStats,
    layout: Layout,
    how: Normalization,
    rule: Any,
    *,
    r_max: Array | float,
    d_max: Array | float,
    training: bool,
) -> tuple[Array, RunningStats]:
    """`batch_renorm` on checked arguments (as `jbn._batch_norm.batch_norm_core`), with the
    limits resolved by `resolve_limit`."""
    if jnp.iscomplexobj(x):
        raise TypeError(f"`x` is complex ({x.dtype}): batch renormalization supports real inputs; use batch_norm.")
    epsilon, out_dtype = how.epsilon, how.out_dtype
    if not training:
        return evaluate_with_layout(x, scale, bias, layout, running, how), running

    x = without_nonfinite_padding(x, layout.valid)
    stats = batch_moments(x, layout)
    compute = stats.mean.dtype
    sigma_batch = jnp.sqrt(stats.var + epsilon)
    sigma = jnp.sqrt(running.var.astype(compute) + epsilon)
    r = lax.stop_gradient(jnp.clip(sigma_batch / sigma, 1 / r_max, r_max))
    d = lax.stop_gradient(jnp.clip((stats.mean - running.mean.astype(compute)) / sigma, -d_max, d_max))
    # scale * (xhat * r + d) + bias == xhat * (scale * r) + (scale * d + bias): batch norm's
    # normalize with a corrected affine map; r = 1, d = 0 leave scale and bias exactly as they are.
    wide = promoted(compute, *(p.dtype for p in (scale, bias) if p is not None))  # explicit: strict promotion
    r, d = r.astype(wide), d.astype(wide)
    r_scale = r if scale is None else scale.astype(wide) * r
    d_bias = d if scale is None else scale.astype(wide) * d
    d_bias = d_bias if bias is None else bias.astype(wide) + d_bias
    y = normalize_on_layout(x, layout, stats.mean, stats.var, r_scale, d_bias, epsilon=epsilon, out_dtype=out_dtype)
    new = apply_rule(rule, running, stats)
    return y, new
