"""Float64 NumPy references for the hostile-input tests (tests/test_hostile.py), written
from the formulas, not from jbn. Features are the last axis; `valid` has x's shape.
"""

from __future__ import annotations

import numpy as np

from tests import reference as ref


def f64(a):
    return np.asarray(a, np.float64)


def masked_moments(x, valid):
    """(mean, biased var, count) per feature (last axis) over the valid elements; zeros when none."""
    return ref.moments(f64(x), -1, np.broadcast_to(valid, np.shape(x)))


def ema(old, batch, momentum, ok):
    """One EMA step where `ok`, else the old value."""
    return np.where(ok, momentum * f64(old) + (1 - momentum) * f64(batch), f64(old))


def renorm_train(x, scale, bias, running_mean, running_var, *, r_max, d_max, valid, epsilon=1e-5):
    """Batch Renormalization's training output (Ioffe 2017) with r and d as constants:
    y = scale * (xhat * r + d) + bias. Returns (y, r, d, batch mean, batch var)."""
    mean, var, _ = masked_moments(x, valid)
    sigma_b = np.sqrt(var + epsilon)
    sigma = np.sqrt(f64(running_var) + epsilon)
    r = np.clip(sigma_b / sigma, 1 / r_max, r_max)
    d = np.clip((mean - f64(running_mean)) / sigma, -d_max, d_max)
    xhat = (f64(x) - mean) / sigma_b
    return f64(scale) * (xhat * r + d) + f64(bias), r, d, mean, var


def renorm_grads(x, scale, dy, *, r, d, valid, epsilon=1e-5):
    """(dx, dscale, dbias) of sum(dy * y) for Batch Renorm: with r, d constant, y is batch norm
    with scale * r and bias scale * d + bias, so dx is batch norm's with that scale."""
    dx, _, dbias = ref.batch_norm_grads(f64(x), f64(scale) * r, dy, axis=-1, epsilon=epsilon, mask=valid)
    mean, var, _ = masked_moments(x, valid)
    xhat = (f64(x) - mean) / np.sqrt(var + epsilon)
    reduce = tuple(range(np.ndim(x) - 1))
    return dx, (f64(dy) * (xhat * r + d)).sum(reduce), dbias


def ghost_running(x, valid, size, running_mean, running_var, *, momentum, unbiased):
    """Ghost batch norm's running update from the float64 formulas: sub-batch g is rows
    [g*size, (g+1)*size) of axis 1 of `x` (shape (participants, n, C)) on every participant.
    Per feature, a sub-batch counts when its variance is defined: at least one valid element
    (biased), at least two (unbiased, Bessel's n / (n - 1)). The update uses the mean of
    the counted sub-batches' means and of their variances; a feature with no counted
    sub-batch keeps its running statistics."""
    x, valid = f64(x), np.broadcast_to(valid, x.shape)
    groups = x.shape[1] // size
    means, variances, used = [], [], []
    for g in range(groups):
        rows = slice(g * size, (g + 1) * size)
        sub = x[:, rows].reshape(-1, x.shape[-1])
        mean, var, count = masked_moments(sub, valid[:, rows].reshape(sub.shape))
        if unbiased:
            var = np.where(count > 1, var * count / np.maximum(count - 1, 1), 0.0)
        means.append(mean), variances.append(var), used.append(count >= (2 if unbiased else 1))
    used = np.array(used)
    n = np.maximum(used.sum(0), 1)
    mean = np.where(used, means, 0).sum(0) / n
    var = np.where(used, variances, 0).sum(0) / n
    ok = used.any(0)
    return ema(running_mean, mean, momentum, ok), ema(running_var, var, momentum, ok)


def spacing(value, dtype):
    """The gap between `dtype` numbers at |value| (one ulp); `dtype` is ml_dtypes' bfloat16
    or NumPy's float16."""
    return float(np.spacing(np.abs(np.asarray(value, np.float64)).astype(dtype)).astype(np.float64))
