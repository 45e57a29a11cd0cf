"""Float64 NumPy batch norm, written from the textbook formulas (two-pass variance): the
suite's one reference module.

It shares no code with jbn: every number the tests check comes from here or from a
real peer (flax, PyTorch), never from the code under test. Sections: moments and the
normalization (any feature axes, masks, complex inputs); the running averages (EMA,
cumulative, debiased; ghost sub-batches); Batch Renormalization; the spacing of narrow dtypes.
Where a function says nothing else, features are the last axis.
"""

from __future__ import annotations

import numpy as np


def f64(a):
    return np.asarray(a, np.float64)


# ------------------------------------------------------------ moments and the normalization


def canonical_axes(ndim, axis):
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(sorted(a % ndim for a in axes))


def full_mask(mask, shape, features):
    """The mask broadcast to `shape` as float64 weights (1 = counts): by NumPy's rules, or
    where those cannot apply, a mask of rank len(shape) - len(features) covers the
    non-feature axes."""
    if mask is None:
        return np.ones(shape)
    mask = np.asarray(mask)
    try:
        return np.broadcast_to(mask, shape).astype(np.float64)
    except ValueError:
        if mask.ndim != len(shape) - len(features):
            raise
    return np.broadcast_to(np.expand_dims(mask, features), shape).astype(np.float64)


def moments(x, axis=-1, mask=None):
    """Per-feature (mean, biased var, count) of the valid elements; zeros when none is valid."""
    x = np.asarray(x, np.complex128 if np.iscomplexobj(x) else np.float64)
    features = canonical_axes(x.ndim, axis)
    reduce = tuple(a for a in range(x.ndim) if a not in features)
    w = full_mask(mask, x.shape, features)
    xs = np.where(w > 0, x, 0.0)
    count = w.sum(reduce)
    safe = np.maximum(count, 1)
    mean = np.where(count > 0, xs.sum(reduce) / safe, 0.0)
    # one refinement step: the mean of the deviations from the rounded mean corrects it,
    # so that the reference's mean of float64 data is right to its last bits
    mean = mean + np.where(count > 0, np.where(w > 0, x - np.expand_dims(mean, reduce), 0.0).sum(reduce) / safe, 0.0)
    centered = np.where(w > 0, x - np.expand_dims(mean, reduce), 0.0)
    var = np.where(count > 0, (np.abs(centered) ** 2).sum(reduce) / safe, 0.0)  # complex: |x - mean|^2
    return mean, var, count


def expand(v, ndim, features):
    shape = [1] * ndim
    for a, s in zip(features, np.shape(v)):
        shape[a] = s
    return np.reshape(v, shape)


def normalize(x, mean, var, scale=None, bias=None, axis=-1, epsilon=1e-5):
    x = np.asarray(x, np.complex128 if np.iscomplexobj(x) else np.float64)
    f = canonical_axes(x.ndim, axis)
    y = (x - expand(mean, x.ndim, f)) / np.sqrt(expand(np.asarray(var, np.float64), x.ndim, f) + epsilon)
    if scale is not None:
        y = y * expand(np.asarray(scale, np.float64), x.ndim, f)
    if bias is not None:
        y = y + expand(np.asarray(bias, np.float64), x.ndim, f)
    return y


def batch_norm_training(x, scale=None, bias=None, *, axis=-1, epsilon=1e-5, mask=None):
    """The training output with the batch's own statistics: (y, mean, biased var, count)."""
    mean, var, count = moments(x, axis, mask)
    return normalize(x, mean, var, scale, bias, axis, epsilon), mean, var, count


def batch_norm(x, scale, bias, running_mean, running_var, *, training, axis=-1, momentum=0.99, epsilon=1e-5, mask=None):
    """Returns (y, new_running_mean, new_running_var)."""
    running_mean = np.asarray(running_mean, np.float64)
    running_var = np.asarray(running_var, np.float64)
    if not training:
        return normalize(x, running_mean, running_var, scale, bias, axis, epsilon), running_mean, running_var
    y, mean, var, count = batch_norm_training(x, scale, bias, axis=axis, epsilon=epsilon, mask=mask)
    ok = (count > 0) & np.isfinite(mean) & np.isfinite(var)
    new_mean = np.where(ok, momentum * running_mean + (1 - momentum) * mean, running_mean)
    new_var = np.where(ok, momentum * running_var + (1 - momentum) * var, running_var)
    return y, new_mean, new_var


def batch_norm_grads(x, scale, dy, *, axis=-1, epsilon=1e-5, mask=None):
    """Training-mode gradients (dx, dscale, dbias) for cotangent dy, from the chain rule:

    y = scale * (x - mu) / sqrt(var + eps) + bias over ALL positions, where mu and var
    are the statistics of the valid positions only.
    """
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    f = canonical_axes(x.ndim, axis)
    reduce = tuple(a for a in range(x.ndim) if a not in f)
    w = full_mask(mask, x.shape, f)
    mean, var, count = moments(x, axis, mask)
    inv = 1.0 / np.sqrt(var + epsilon)
    centered = x - expand(mean, x.ndim, f)
    xhat = centered * expand(inv, x.ndim, f)
    g = np.ones_like(mean) if scale is None else np.asarray(scale, np.float64)
    dxhat = dy * expand(g, x.ndim, f)
    dvar = -0.5 * (dxhat * centered).sum(reduce) * inv**3
    dmean = -(dxhat.sum(reduce)) * inv
    n = np.maximum(count, 1)
    dx = dxhat * expand(inv, x.ndim, f) + w * (
        expand(dvar * 2 / n, x.ndim, f) * np.where(w > 0, centered, 0) + expand(dmean / n, x.ndim, f)
    )
    return dx, (dy * xhat).sum(reduce), dy.sum(reduce)


def mask_is_ambiguous(mask_shape, x_shape, features):
    """True when a mask of rank x.ndim - len(features) broadcasts against x by NumPy's
    rules AND that reading differs from the non-feature-axes reading."""
    mask_shape, x_shape = tuple(mask_shape), tuple(x_shape)
    if len(mask_shape) != len(x_shape) - len(features):
        return False
    try:
        np.broadcast_shapes(mask_shape, x_shape)
    except ValueError:
        return False
    if np.broadcast_shapes(mask_shape, x_shape) != x_shape:
        return False
    numpy_reading = (1,) * (len(x_shape) - len(mask_shape)) + mask_shape
    sizes = iter(mask_shape)
    feature_reading = tuple(1 if a in features else next(sizes) for a in range(len(x_shape)))
    feature_reading_applies = all(m in (1, s) for m, s in zip(feature_reading, x_shape))
    return feature_reading_applies and numpy_reading != feature_reading


def activation(y, kind=None, negative_slope=0.01):
    """The activation applied after the normalization: None/"identity", "relu", "leaky_relu"."""
    if kind in (None, "identity"):
        return y
    return np.where(y >= 0, y, 0.0 if kind == "relu" else negative_slope * y)


# ------------------------------------------------------------ running averages


def old_weight(momentum, t, debias):
    """The weight of the old running value at the t-th counted update (t >= 1): the EMA's
    `momentum`; `(t - 1) / t` for the cumulative average (momentum None); for the debiased
    EMA, the weight that keeps `ema_t / (1 - momentum^t)` (ema started at 0)."""
    if momentum is None:
        return (t - 1) / t
    if not debias:
        return momentum * np.ones_like(t)
    if momentum >= 1:
        return np.ones_like(t)
    if momentum <= 0:
        return np.zeros_like(t)
    return momentum * (1 - momentum ** (t - 1)) / (1 - momentum**t)


def running_update(old_mean, old_var, old_count, mean, var, ok, *, momentum, debias=False):
    """One update of the running statistics, feature-wise, where `ok` (the batch had valid
    elements and finite statistics); elsewhere the old values (and count) stay.
    Returns (mean, var, count); count is None when not kept."""
    counted = momentum is None or debias
    count = None
    keep = momentum
    if old_count is not None:
        count = np.where(ok & (old_count < 2**31 - 1), old_count + 1, old_count)
    if counted:
        keep = old_weight(momentum, np.maximum(count, 1).astype(np.float64), debias)
    new_mean = np.where(ok, keep * old_mean + (1 - keep) * mean, old_mean)
    new_var = np.where(ok, keep * old_var + (1 - keep) * var, old_var)
    return new_mean, new_var, count


def ema(old, batch, momentum, ok):
    """One EMA step where `ok`, else the old value."""
    return np.where(ok, momentum * f64(old) + (1 - momentum) * f64(batch), f64(old))


def ghost_statistics(x, valid, size, *, unbiased):
    """Ghost batch norm's batch statistics from the float64 formulas: sub-batch g is rows
    [g*size, (g+1)*size) of axis 1 of `x` (shape (participants, n, C)) on every participant.
    Per feature, a sub-batch counts when its variance is defined: at least one valid element
    (biased), at least two (unbiased, Bessel's n / (n - 1)). Returns the per-sub-batch
    (means, variances, counts), each (sub-batches, C), and what the running update uses: the
    mean of the counted sub-batches' means and of their variances, and whether any counted."""
    x, valid = f64(x), np.broadcast_to(valid, x.shape)
    means, variances, counts, used = [], [], [], []
    for g in range(x.shape[1] // size):
        rows = slice(g * size, (g + 1) * size)
        sub = x[:, rows].reshape(-1, x.shape[-1])
        mean, var, count = moments(sub, -1, valid[:, rows].reshape(sub.shape))
        counts.append(count)
        if unbiased:
            var = np.where(count > 1, var * count / np.maximum(count - 1, 1), 0.0)
        means.append(mean), variances.append(var), used.append(count >= (2 if unbiased else 1))
    used = np.array(used)
    n = np.maximum(used.sum(0), 1)
    mean = np.where(used, means, 0).sum(0) / n
    var = np.where(used, variances, 0).sum(0) / n
    return (np.array(means), np.array(variances), np.array(counts)), (mean, var, used.any(0))


def ghost_running(x, valid, size, running_mean, running_var, *, momentum, unbiased):
    """Ghost batch norm's running update (`ghost_statistics`): the EMA of the counted
    sub-batches' mean statistics; a feature with no counted sub-batch keeps its running ones."""
    _, (mean, var, ok) = ghost_statistics(x, valid, size, unbiased=unbiased)
    return ema(running_mean, mean, momentum, ok), ema(running_var, var, momentum, ok)


# ------------------------------------------------------------ Batch Renormalization


def renorm_train(x, scale, bias, running_mean, running_var, *, r_max, d_max, valid, epsilon=1e-5):
    """Batch Renormalization's training output (Ioffe 2017) with r and d as constants:
    y = scale * (xhat * r + d) + bias. Returns (y, r, d, batch mean, batch var)."""
    mean, var, _ = moments(x, -1, np.broadcast_to(valid, np.shape(x)))
    sigma_b = np.sqrt(var + epsilon)
    sigma = np.sqrt(f64(running_var) + epsilon)
    r = np.clip(sigma_b / sigma, 1 / r_max, r_max)
    d = np.clip((mean - f64(running_mean)) / sigma, -d_max, d_max)
    xhat = (f64(x) - mean) / sigma_b
    return f64(scale) * (xhat * r + d) + f64(bias), r, d, mean, var


def renorm_grads(x, scale, dy, *, r, d, valid, epsilon=1e-5):
    """(dx, dscale, dbias) of sum(dy * y) for Batch Renorm: with r, d constant, y is batch norm
    with scale * r and bias scale * d + bias, so dx is batch norm's with that scale."""
    dx, _, dbias = batch_norm_grads(f64(x), f64(scale) * r, dy, axis=-1, epsilon=epsilon, mask=valid)
    mean, var, _ = moments(x, -1, np.broadcast_to(valid, np.shape(x)))
    xhat = (f64(x) - mean) / np.sqrt(var + epsilon)
    reduce = tuple(range(np.ndim(x) - 1))
    return dx, (f64(dy) * (xhat * r + d)).sum(reduce), dbias


# ------------------------------------------------------------ narrow dtypes


def spacing(value, dtype):
    """The gap between `dtype` numbers at |value| (one ulp); `dtype` is ml_dtypes' bfloat16
    or NumPy's float16."""
    return float(np.spacing(np.abs(np.asarray(value, np.float64)).astype(dtype)).astype(np.float64))
