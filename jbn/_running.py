"""Running statistics: the rules that move `RunningStats` toward each batch's `Moments`
(Flax/Keras EMA, PyTorch's cumulative average, the debiased EMA, the unbiased variance).

Each rule is a frozen record with one method, `update(running, batch) -> RunningStats`,
and a `needs_count` flag (whether it keeps `RunningStats.count`). `running_average` builds
the rule of `batch_norm`'s options, checked once; a rule of your own (any object with
`update` and `needs_count`) goes where they go: `batch_norm(..., running_average=rule)`,
`jbn.BatchNorm(running_average=rule)`."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from jbn import _options
from jbn._options import promoted
from jbn._state import Moments, RunningStats
from jbn._statistics import real_dtype, stats_dtype

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class EMA:
    """Flax's and Keras' rule: `momentum * running + (1 - momentum) * batch`."""

    momentum: Any = 0.99
    needs_count = False

    def update(self, running: RunningStats, batch: Moments) -> RunningStats:
        # a rule that keeps the count weighs the batch by it (the debiased EMA)
        return advance(running, batch, self.momentum, counted=self.needs_count)


@dataclasses.dataclass(frozen=True)
class DebiasedEMA(EMA):
    """The bias-corrected EMA (`ema_t / (1 - momentum**t)`, `ema` starting from zero),
    kept in corrected form (see `update_running_stats`)."""

    needs_count = True


@dataclasses.dataclass(frozen=True)
class CumulativeAverage:
    """PyTorch's `momentum=None`: the average of every batch seen, each weighted equally."""

    needs_count = True

    def update(self, running: RunningStats, batch: Moments) -> RunningStats:
        return advance(running, batch, None, counted=True)


@dataclasses.dataclass(frozen=True)
class UnbiasedVariance:
    """`rule` fed the unbiased batch variance (Bessel's correction), as PyTorch tracks
    `running_var`."""

    rule: Any
    # a class attribute would shadow the wrapped rule's
    needs_count: bool = dataclasses.field(init=False, default=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "needs_count", bool(self.rule.needs_count))

    def update(self, running: RunningStats, batch: Moments) -> RunningStats:
        return self.rule.update(running, bessel_corrected(batch))


def running_average_rule(momentum: Any = 0.99, debias: Any = False, unbiased_running_var: Any = False) -> Any:
    """The rule of `batch_norm`'s running options, each checked once."""
    return rule_of(*_options.check_running_options(momentum, debias, unbiased_running_var, None))


def rule_of(momentum: Any, debias: bool, unbiased_running_var: bool, running_average: Any) -> Any:
    """The rule of checked running options (`jbn._options.check_running_options`):
    `running_average` when given, else the rule `momentum`, `debias` and
    `unbiased_running_var` name."""
    if running_average is not None:
        return running_average
    rule: Any = CumulativeAverage() if momentum is None else DebiasedEMA(momentum) if debias else EMA(momentum)
    return UnbiasedVariance(rule) if unbiased_running_var else rule


def check_running(running: Any, fshape: tuple[int, ...], axis: Any) -> RunningStats:
    """`running` as a `RunningStats` whose arrays have the feature shape and sane dtypes."""
    if not isinstance(running, RunningStats):
        raise TypeError(
            f"`running` must be a jbn.RunningStats(mean, var[, count]), got {type(running).__name__}: e.g. "
            f"jbn.RunningStats(mean=jnp.zeros({fshape}), var=jnp.ones({fshape}))."
        )
    return RunningStats(
        _options.check_feature_array(running.mean, fshape, "running.mean", axis),  # type: ignore[arg-type]
        _options.check_feature_array(running.var, fshape, "running.var", axis, kind="real"),  # type: ignore[arg-type]
        _options.check_feature_array(running.count, fshape, "running.count", axis, kind="count"),
    )


def bessel_corrected(batch: Moments) -> Moments:
    """The batch variance times `count / (count - 1)` (Bessel's correction), as PyTorch
    tracks in `running_var`. A feature with a count of 1 or less gets a NaN variance,
    so that `update_running_stats` leaves it unchanged."""
    count = batch.count.astype(batch.var.dtype)
    # the factor first: var * count may overflow where the corrected variance does not
    var = jnp.where(count > 1, batch.var * (count / jnp.maximum(count - 1, 1)), jnp.nan)
    return Moments(batch.mean, var, batch.count)


def counted_momentum(momentum: Any, t: Array) -> Array:
    """The weight of the old value at the t-th update (t >= 1): `(t - 1) / t` for the
    cumulative average; `m (1 - m^(t-1)) / (1 - m^t)` for the debiased EMA, which is 0 at
    t = 1 and tends to m. `momentum` may be traced."""
    if momentum is None:
        return (t - 1) / t
    if isinstance(momentum, float):
        if momentum >= 1:
            return jnp.ones_like(t)  # momentum 1 never moves, debiased or not
        if momentum <= 0:
            return jnp.zeros_like(t)
        log_m = math.log(momentum)
        # 1 - m^k as -expm1(k log m): no cancellation when m is close to 1.
        return momentum * -jnp.expm1((t - 1) * log_m) / -jnp.expm1(t * log_m)
    m = jnp.asarray(momentum, t.dtype)
    inside = (m > 0) & (m < 1)
    log_m = jnp.log(jnp.where(inside, m, 0.5))  # type: ignore[assignment]
    weight = m * jnp.expm1((t - 1) * log_m) / jnp.expm1(t * log_m)
    return jnp.where(inside, weight, jnp.where(m >= 1, 1.0, 0.0).astype(t.dtype))


def state_dtype(old, new) -> jnp.dtype:
    """The dtype of an updated running statistic: a narrow state (bfloat16, float16)
    keeps its dtype; a float64 (x64) or complex batch widens a float32 state, as flax."""
    wide = promoted(old, new)
    return wide if wide != promoted(old, jnp.float32) else jnp.dtype(old)


def coefficient_dtype(running: RunningStats, batch: Moments) -> jnp.dtype:
    """The dtype of every coefficient of the running update: the (real) dtype the update is
    computed in, float32 or wider, so that a float64 state is float64-accurate."""
    dtypes = (running.mean.dtype, running.var.dtype, batch.mean.dtype, batch.var.dtype)
    return real_dtype(stats_dtype(*dtypes))


def mix(old: Array, new: Array, keep: Any, ok: Array) -> Array:
    """`keep * old + (1 - keep) * new` where `ok`, else `old`, computed in float32 or wider.

    A state narrower than float32 rounds the mix back to its own dtype; where that
    rounding would undo a move (the step is below half its resolution: at momentum 0.99
    a bfloat16 mean stalls near 0.4 on its way to 0.5), it moves one unit in the last
    place toward the batch instead, so the state keeps converging."""
    out_dtype = state_dtype(old.dtype, new.dtype)
    compute = stats_dtype(old.dtype, new.dtype)
    o, n, keep = old.astype(compute), new.astype(compute), jnp.asarray(keep, compute)
    mixed = keep * o + (1 - keep) * n
    out = mixed.astype(out_dtype)
    if jnp.issubdtype(out_dtype, jnp.floating) and jnp.finfo(out_dtype).bits < 32:
        stalled = (out == old) & (mixed != o)
        # The step is outside the differentiated path (`nextafter` has no derivative rule; a
        # one-ulp move carries none): gradients flow through the mix as they would unrounded.
        step = jnp.nextafter(*jax.lax.stop_gradient((old, n.astype(out_dtype))))
        out = jnp.where(stalled, step, out)
    return jnp.where(ok, out, old.astype(out_dtype))


def update_running_stats(
    running: RunningStats,
    batch: Moments,
    momentum: float | None = 0.99,
    *,
    debias: bool = False,
    unbiased_running_var: bool = False,
) -> RunningStats:
    """Move the running statistics towards the batch statistics, feature-wise.

    With a float `momentum` and `debias=False` (the default, Flax's and Keras' rule):
    `momentum * running + (1 - momentum) * batch`.

    With `momentum=None`, the cumulative average of every batch seen so far, each batch
    weighted equally (PyTorch's `momentum=None`): after t batches the running value is
    `(b_1 + ... + b_t) / t`, computed as `((t - 1) * running + batch) / t`.

    With `debias=True`, the bias-corrected EMA (as optax's Adam corrects its moments):
    the value stored is `ema_t / (1 - momentum**t)` where `ema` starts from zero, so the
    initial `mean=0, var=1` never pull the estimate and the first batch replaces them.
    It is kept in already-corrected form, `new = a_t * running + (1 - a_t) * batch` with
    `a_t = momentum * (1 - momentum**(t - 1)) / (1 - momentum**t)`, so `mean`/`var` are
    always usable as they are (by Flax too) and no correction happens at evaluation.

    Both need `running.count` (int32, feature shape, start at zeros). Whenever
    `running.count` is given it counts the batches that updated each feature and comes
    back incremented (like PyTorch's `num_batches_tracked`), saturating at its dtype's
    maximum instead of wrapping.

    A feature whose batch saw no valid element, or whose batch mean or variance is NaN or
    inf, keeps its previous running mean, variance and count: one bad batch must not
    poison the statistics used at evaluation (the normalized output still carries the
    NaN, so the loss shows it). The update is computed in float32 or wider; the result
    keeps the dtypes of `running`, except that float64 (x64) or complex batch statistics
    widen a float32 state, as in flax.

    Args:
      running: the current `RunningStats`.
      batch: the batch `Moments` (count after mask and across devices).
      momentum: in [0, 1] (may be traced), or None for the cumulative average.
      debias: bias-correct the EMA (ignored with `momentum=None`, which is unbiased).
      unbiased_running_var: track the unbiased batch variance `var * n / (n - 1)`, as
        PyTorch does in `running_var` (n = elements per feature in the batch); a feature
        with n <= 1 is left unchanged. Normalization in training still uses the biased one.
    """
    rule = running_average_rule(momentum, debias, unbiased_running_var)
    if not isinstance(running, RunningStats):
        raise TypeError(f"`running` must be a jbn.RunningStats(mean, var[, count]), got {type(running).__name__}.")
    return apply_rule(rule, running, batch)


def apply_rule(rule: Any, running: RunningStats, batch: Moments) -> RunningStats:
    """`rule.update` once the running state has the count the rule keeps."""
    if rule.needs_count and running.count is None:
        raise ValueError(
            f"the running average {rule!r} keeps a count of batches (`momentum=None` or `debias=True`): pass "
            "RunningStats(mean, var, count=jnp.zeros(mean.shape, jnp.int32)) (the modules create "
            "batch_stats/count for you)."
        )
    return rule.update(running, batch)


def advance(running: RunningStats, batch: Moments, momentum: Any, *, counted: bool) -> RunningStats:
    """One step of the built-in rules: `keep * running + (1 - keep) * batch` where the
    batch is usable (`keep` = `momentum`, or the counted weight of the cumulative and
    debiased averages), the count advanced wherever it is kept."""
    count = running.count
    ok = (batch.count > 0) & jnp.isfinite(batch.mean) & jnp.isfinite(batch.var)
    if count is not None:  # counts batches whenever it is kept, like PyTorch's num_batches_tracked
        ok = jnp.broadcast_to(ok, count.shape)
        limit = jnp.iinfo(count.dtype).max
        count = jnp.where(ok & (count < limit), count + 1, count).astype(count.dtype)
    keep = momentum
    if counted:
        keep = counted_momentum(momentum, jnp.maximum(count, 1).astype(coefficient_dtype(running, batch)))  # type: ignore[arg-type]
    return RunningStats(mix(running.mean, batch.mean, keep, ok), mix(running.var, batch.var, keep, ok), count)
