"""Float64 NumPy references for the variants' tests, written from the formulas (not from jbn).

Shapes: `x` is (N, ..., C) with the features last unless a function says otherwise.
"""

import numpy as np


def f64(a):
    return np.asarray(a, dtype=np.float64)


def batch_moments(x, valid=None):
    """Per-feature mean and biased variance over every axis but the last; `valid` (x's shape
    without the feature axis, or x's shape) selects the elements that count."""
    x = f64(x)
    c = x.shape[-1]
    if valid is None:
        flat = x.reshape(-1, c)
        return flat.mean(0), flat.var(0), np.full(c, flat.shape[0], np.float64)
    valid = np.broadcast_to(valid if valid.ndim == x.ndim else valid[..., None], x.shape).reshape(-1, c)
    flat = x.reshape(-1, c)
    n = valid.sum(0).astype(np.float64)
    mean = np.array([flat[valid[:, j], j].mean() if n[j] else 0.0 for j in range(c)])
    var = np.array([flat[valid[:, j], j].var() if n[j] else 0.0 for j in range(c)])
    return mean, var, n


def bn_train(x, gamma, beta, eps, valid=None):
    """Training-mode batch norm over all axes but the last: (y, mean, biased var, count)."""
    mean, var, n = batch_moments(x, valid)
    y = (f64(x) - mean) / np.sqrt(var + eps)
    if gamma is not None:
        y = y * f64(gamma)
    if beta is not None:
        y = y + f64(beta)
    return y, mean, var, n


def bn_eval(x, gamma, beta, mean, var, eps):
    y = (f64(x) - f64(mean)) / np.sqrt(f64(var) + eps)
    if gamma is not None:
        y = y * f64(gamma)
    if beta is not None:
        y = y + f64(beta)
    return y


def bn_backward(x, gamma, cotangent, eps, r=None):
    """d/dx of sum(cotangent * y) for y = gamma * (r * xhat + d) + beta with r, d constants,
    xhat = (x - mean) / sqrt(var + eps) over all axes but the last (the textbook BN backward)."""
    x, g = f64(x), f64(cotangent)
    c = x.shape[-1]
    flat, gf = x.reshape(-1, c), g.reshape(-1, c)
    mean, var = flat.mean(0), flat.var(0)
    inv = 1.0 / np.sqrt(var + eps)
    xhat = (flat - mean) * inv
    dxhat = gf * f64(gamma) * (1.0 if r is None else f64(r))
    dx = inv * (dxhat - dxhat.mean(0) - xhat * (dxhat * xhat).mean(0))
    return dx.reshape(x.shape)
