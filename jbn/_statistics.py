"""`moments`: the per-feature statistics of a batch, on one device, over bound axis
names (one collective), or over the shards of a batch-sharded array under plain jit."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jbn import _accelerator_moments, _axes, _collectives, _merge, _sharded, _validate
from jbn._axes import Axes, AxisName, Layout
from jbn._state import Moments

Array = jax.Array


def batch_moments(x: Array, layout: Layout, shift: Array | None = None) -> Moments:
    """`moments` on a resolved layout (`x` checked, `shift` checked and feature-shaped)."""
    dtype = _axes.stats_dtype(x.dtype)
    if shift is not None:
        dtype = _axes.stats_dtype(x.dtype, shift.dtype)  # moments() widened the shift to this
        count, s1, s2 = _merge.shifted_sums(x, layout, shift, dtype)
        if layout.names is not None:
            count = jnp.broadcast_to(count, layout.fshape)
            parts = [count, s2] + ([s1.real, s1.imag] if jnp.iscomplexobj(s1) else [s1])
            summed = _collectives.psum_in_groups(jnp.stack(parts), layout.names, layout.groups)
            count, s2 = summed[0], summed[1]
            s1 = lax.complex(summed[2], summed[3]) if jnp.iscomplexobj(s1) else summed[2]
        return _merge.from_shifted_sums(count, s1, s2, shift)
    if layout.names is None and _axes.sharded_in_type(x):
        by_shard = _sharded.moments_by_shard(x, layout, dtype)
        if by_shard is not None:
            return by_shard
    local = _accelerator_moments.local_moments(x, layout, dtype)  # the formulation of the target platform
    if layout.names is None:
        return local.moments()
    gathered = _collectives.gather(_merge.stack_participant(local), layout.names, layout.groups)
    return _merge.chan_merge(_merge.unstack_participants(gathered, 1, jnp.iscomplexobj(local.base)))


def moments(
    x: Array,
    *,
    axis: Axes = -1,
    mask: Array | None = None,
    axis_name: AxisName = None,
    axis_index_groups: Any = None,
    shift: Array | None = None,
) -> Moments:
    """Per-feature mean and biased variance of `x`, in float32 or wider.

    Args:
      x: floating or complex input of any rank (complex: complex mean, real variance
        `mean(|x - mean|^2)`, as flax).
      axis: feature axis or axes; every other axis is reduced.
      mask: True where an element counts. Broadcasts against `x` by NumPy's rules (as
        flax: a `(C,)` mask masks features of `(N, C)`). Where NumPy's rules cannot apply, a
        mask of rank `x.ndim - len(axis)` covers the non-feature axes (`(N, T)` for
        `(N, T, C)`); where both apply and differ, a ValueError asks for the full rank.
      axis_name: name (or tuple of names) bound by pmap, shard_map or vmap; the statistics
        are then those of the global batch, weighted by each participant's valid count,
        from one collective (an all-gather of per-participant (count, mean, var)).
      axis_index_groups: pmap-style groups of indices along `axis_name`, e.g.
        [[0, 1, 2, 3], [4, 5, 6, 7]]; statistics are global within each group. Works under
        pmap, shard_map and vmap.
      shift: optional. Without it (the default, right for nearly everyone) each
        participant computes its mean, then the mean squared deviation from it: exact
        whatever the order of the elements and accurate when |mean| >> std. With a
        feature-shaped `shift`, EQUAL on every participant, the statistics come instead
        from one psum of sums shifted by it (less data than the all-gather when there are
        very many participants); the variance is then accurate only while
        |mean - shift| is small against std: a running mean is a good shift once trained,
        a bad one at initialization (it starts at 0).

    Returns:
      `Moments(mean, var, count)`: feature-shaped mean and var; count broadcastable to them.
    """
    x = _validate.check_input(x)
    layout = _axes.resolve(x, axis, mask, axis_name, axis_index_groups)
    if shift is not None:
        shift = _validate.check_feature_array(shift, layout.fshape, "shift", axis)
        shift = lax.stop_gradient(shift.astype(_axes.stats_dtype(x.dtype, shift.dtype)))  # type: ignore[union-attr]
    return batch_moments(x, layout, shift)
