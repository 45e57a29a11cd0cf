"""The test batch shared by the single-process and multi-process sync-BN tests, and its
expected results: single-device batch norm on the concatenated (masked) batch, from the
float64 NumPy reference in tests/reference.py (written from the formulas, not from jbn).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from tests import reference as ref

FEATURES = 3
MOMENTUM = 0.9
EPSILON = 1e-5


class Reference(NamedTuple):
    y: np.ndarray
    mean: np.ndarray  # running mean after the step
    var: np.ndarray  # running var after the step
    dx: np.ndarray
    dscale: np.ndarray
    dbias: np.ndarray


class Batch(NamedTuple):
    """A global batch split over `devices` participants along axis 0.

    x: (devices * per_device, T, FEATURES); mask: (devices * per_device, T), rank x.ndim - 1;
    w: x-shaped weights of the loss sum(where(mask, y, 0) * w); scale, bias, running mean,
    running var: (FEATURES,).
    """

    x: np.ndarray
    mask: np.ndarray
    w: np.ndarray
    scale: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    var: np.ndarray


def make_batch(devices: int, per_device: int = 3, steps: int = 2, *, seed: int = 0, offset: float = 0.0) -> Batch:
    """Uneven masks: participant 0 holds only padding, participant 1 a single valid element,
    participant 2 only valid elements, the rest about 60 %. Padded elements hold large
    finite garbage, so any leak of padding into the statistics shows."""
    rs = np.random.RandomState(seed)
    shape = (devices * per_device, steps, FEATURES)
    x = (offset + rs.randn(*shape) * np.array([1.0, 2.0, 0.5]) + np.array([0.5, -1.0, 3.0])).astype(np.float32)
    mask = rs.rand(*shape[:2]) < 0.6
    per = mask.reshape(devices, per_device, steps)
    per[0] = False
    per[1] = False
    per[1, 0, 0] = True
    per[2] = True
    mask = per.reshape(shape[:2])
    x[~mask] = 1e6
    w = rs.randn(*shape).astype(np.float32)
    scale = (1.0 + 0.2 * rs.randn(FEATURES)).astype(np.float32)
    bias = rs.randn(FEATURES).astype(np.float32)
    mean = rs.randn(FEATURES).astype(np.float32)
    var = (1.0 + rs.rand(FEATURES)).astype(np.float32)
    return Batch(x, mask, w, scale, bias, mean, var)


def reference(b: Batch, *, momentum: float = MOMENTUM, epsilon: float = EPSILON) -> Reference:
    """Single-device batch norm of the whole batch `b` (all participants concatenated), and
    the gradients of the loss sum(where(mask, y, 0) * w)."""
    y, mean, var = ref.batch_norm(
        b.x, b.scale, b.bias, b.mean, b.var, training=True, momentum=momentum, epsilon=epsilon, mask=b.mask
    )
    dy = b.mask[..., None] * b.w.astype(np.float64)
    dx, dscale, dbias = ref.batch_norm_grads(b.x, b.scale, dy, epsilon=epsilon, mask=b.mask)
    return Reference(y=y, mean=mean, var=var, dx=dx, dscale=dscale, dbias=dbias)


def slice_batch(b: Batch, start: int, stop: int) -> Batch:
    """Rows start:stop of the per-example arrays; the parameters stay."""
    return b._replace(x=b.x[start:stop], mask=b.mask[start:stop], w=b.w[start:stop])


def grouped_reference(b: Batch, groups: int, **kw) -> Reference:
    """Batch norm within each of `groups` equal consecutive slices of the batch: y and dx
    concatenated, running statistics stacked (groups, FEATURES), parameter gradients summed
    (the loss is the sum over all groups)."""
    size = b.x.shape[0] // groups
    parts = [reference(slice_batch(b, i * size, (i + 1) * size), **kw) for i in range(groups)]
    return Reference(
        y=np.concatenate([p.y for p in parts]),
        mean=np.stack([p.mean for p in parts]),
        var=np.stack([p.var for p in parts]),
        dx=np.concatenate([p.dx for p in parts]),
        dscale=sum(p.dscale for p in parts),
        dbias=sum(p.dbias for p in parts),
    )


def check(got, ref: Reference, mask: np.ndarray, *, rtol=2e-5, atol=2e-5):
    """Compare (y, mean, var, dx, dscale, dbias) with the float64 reference."""
    y, mean, var, dx, dscale, dbias = (np.asarray(g) for g in got)
    for name, value in zip(("y", "mean", "var", "dx", "dscale", "dbias"), (y, mean, var, dx, dscale, dbias)):
        assert np.all(np.isfinite(value)), f"{name} is not finite"
    np.testing.assert_allclose(y[mask], ref.y[mask], rtol=rtol, atol=atol, err_msg="y")
    np.testing.assert_allclose(mean, ref.mean, rtol=rtol, atol=atol, err_msg="running mean")
    np.testing.assert_allclose(var, ref.var, rtol=rtol, atol=atol, err_msg="running var")
    np.testing.assert_allclose(dx, ref.dx, rtol=rtol, atol=atol, err_msg="dx")
    np.testing.assert_array_equal(dx[~mask], 0.0, err_msg="padded positions must get zero input gradient")
    np.testing.assert_allclose(dscale, ref.dscale, rtol=rtol, atol=atol, err_msg="dscale")
    np.testing.assert_allclose(dbias, ref.dbias, rtol=rtol, atol=atol, err_msg="dbias")
