"""Axis bookkeeping and argument checks shared by the pure layer and the modules.

Every check runs on static information (shapes, dtypes, Python numbers), so a bad
argument fails when the function is traced, with a message that names the argument
and the fix.
"""
from __future__ import annotations

import math
from typing import Any, Hashable, Sequence

import jax
import jax.numpy as jnp

Axes = int | Sequence[int]
AxisName = Hashable | tuple[Hashable, ...] | None


def feature_axes(ndim: int, axis: Axes, *, name: str = "axis") -> tuple[int, ...]:
    """The feature axes as sorted non-negative ints; raises if any is out of range."""
    if ndim == 0:
        raise ValueError(
            f"the input is a scalar (rank 0), so `{name}` has no feature axis to name: give `x` a batch axis and "
            "a feature axis, e.g. shape (N, C) with axis=-1."
        )
    axes = (axis,) if _is_index(axis) or isinstance(axis, (bool, float)) else _as_tuple(axis, name)
    if not axes:
        raise ValueError(f"`{name}` is empty: name at least one feature axis, e.g. {name}=-1.")
    out = []
    for a in axes:
        if not _is_index(a):
            raise TypeError(f"`{name}` must be an int or a tuple of ints, got {axis!r}: e.g. {name}=-1 or {name}=(1, 2).")
        a = int(a)
        if not -ndim <= a < ndim:
            raise ValueError(
                f"`{name}`={axis!r} is out of range for an input of rank {ndim}: "
                f"use values in [{-ndim}, {ndim - 1}] (e.g. -1 for NHWC, 1 for NCHW)."
            )
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"`{name}`={axis!r} names the same axis twice.")
    return tuple(sorted(out))


def _is_index(a: Any) -> bool:
    """A Python or NumPy integer, not a bool (True would silently mean axis 1)."""
    return isinstance(a, (int, jnp.integer)) and not isinstance(a, (bool, jnp.bool_))


def _as_tuple(axis: Any, name: str) -> tuple:
    try:
        return tuple(axis)
    except TypeError:
        raise TypeError(f"`{name}` must be an int or a tuple of ints, got {axis!r}: e.g. {name}=-1 or {name}=(1, 2).") from None


def reduction_axes(ndim: int, features: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(a for a in range(ndim) if a not in features)


def feature_shape(shape: Sequence[int], features: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape[a] for a in features)


def expand_features(v: jax.Array, ndim: int, features: tuple[int, ...]) -> jax.Array:
    """Reshape a feature-shaped array so that it broadcasts against the input."""
    shape = [1] * ndim
    for a, size in zip(features, v.shape):
        shape[a] = size
    return v.reshape(shape)


def check_floating(x: Any, name: str = "x") -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"`{name}` has dtype {x.dtype}, but batch norm needs a floating input: "
            f"cast it first, e.g. {name}.astype(jnp.float32)."
        )
    return x


def stats_dtype(*dtypes) -> jnp.dtype:
    """float32, or wider when an input is wider (float64 under x64)."""
    return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def check_feature_array(v: Any, fshape: tuple[int, ...], name: str, axis: Axes) -> jax.Array | None:
    """`v` (scale, bias, a running statistic) must have exactly the feature shape."""
    if v is None:
        return None
    v = jnp.asarray(v)
    if v.shape != fshape:
        raise ValueError(
            f"`{name}` has shape {v.shape}, but the input's feature shape along axis={axis!r} is "
            f"{fshape}: pass a `{name}` of shape {fshape}, or set `axis` to the feature axis of the input "
            f"(for existing module variables, re-initialize them for this input)."
        )
    return v


def concrete_number(value: Any, name: str) -> float | None:
    """`value` as a Python float when it is known at trace time (a Python or NumPy number,
    or a concrete 0-d array); None when it is traced. Anything else is a TypeError."""
    if isinstance(value, (bool, jnp.bool_)):
        raise TypeError(f"`{name}` must be a number, got the bool {value!r}.")
    if isinstance(value, (int, float, jnp.integer, jnp.floating)):
        return float(value)
    if isinstance(value, jax.core.Tracer):
        return None
    dtype = getattr(value, "dtype", None)
    if getattr(value, "shape", None) == () and dtype is not None and jnp.issubdtype(dtype, jnp.number):
        return float(value)
    raise TypeError(f"`{name}` must be a number (a Python float), got {type(value).__name__} {value!r}.")


def check_momentum(momentum: Any) -> float | None:
    """The momentum as a Python float (None stays None: the cumulative average); a traced
    momentum is returned as it is, since its value cannot be checked at trace time."""
    if momentum is None:
        return None
    value = concrete_number(momentum, "momentum")
    if value is None:
        return momentum
    if not 0.0 <= value <= 1.0:
        raise ValueError(
            f"`momentum`={momentum} is outside [0, 1]. jbn uses the Flax/Keras convention "
            f"new = momentum * old + (1 - momentum) * batch, so PyTorch's momentum=0.1 is 0.9 here."
        )
    return value


def check_epsilon(epsilon: Any) -> float:
    """The epsilon as a Python float (a traced epsilon is returned as it is)."""
    value = concrete_number(epsilon, "epsilon")
    if value is None:
        return epsilon
    if not value > 0:
        raise ValueError(f"`epsilon`={epsilon} must be > 0 (it keeps 1/sqrt(var + epsilon) finite); the usual value is 1e-5.")
    return value


def broadcast_mask(mask: Any, x_shape: tuple[int, ...], features: tuple[int, ...]) -> jax.Array | None:
    """The mask as a bool array of `x`'s rank (size 1 where it does not vary).

    A mask of `x`'s rank broadcasts against `x`; a mask of rank `x.ndim - len(features)`
    broadcasts against `x` without its feature axes (e.g. (N, T) for an (N, T, C) batch).
    """
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    ndim = len(x_shape)
    if mask.ndim == ndim - len(features):
        mask = jnp.expand_dims(mask, features)
    elif mask.ndim != ndim:
        raise ValueError(
            f"`mask` has shape {mask.shape}, which does not broadcast against the input of shape {x_shape}: "
            f"give it the input's rank ({ndim}) or the input's rank without the feature axes "
            f"({ndim - len(features)}), e.g. shape {tuple(s for i, s in enumerate(x_shape) if i not in features)}."
        )
    for m, s in zip(mask.shape, x_shape):
        if m not in (1, s):
            raise ValueError(
                f"`mask` has shape {mask.shape}, which does not broadcast against the input of shape {x_shape}: "
                f"each mask dimension must equal the input's or be 1."
            )
    return mask.astype(bool)


def normalize_axis_name(axis_name: AxisName) -> tuple[Hashable, ...] | None:
    if axis_name is None:
        return None
    return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)


def sharded_in_type(x: jax.Array) -> bool:
    """True when `x`'s type says it is split over a mesh axis (Explicit axes, the default of
    `jax.make_mesh`, under plain jit). Auto-sharded arrays and shard_map/pmap/vmap
    locals have no sharded axis in their type."""
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    return spec is not None and any(s is not None for s in spec)


def split_axes(x: jax.Array, axes: Sequence[int]) -> tuple[int, ...]:
    """Those of `axes` along which `x`'s type says it is split over mesh axes."""
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    if spec is None:
        return ()
    return tuple(a for a in axes if a < len(spec) and spec[a] is not None)


def mesh_axes_size(mesh: Any, entry: Any) -> int:
    """Number of shards of one PartitionSpec entry (a mesh axis name or a tuple of them)."""
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(mesh.shape[n] for n in names)


def bound_axis_size(axis_name: tuple[Hashable, ...]) -> int:
    """Number of participants along `axis_name`; a clear error when a name is not bound."""
    try:
        return int(jax.lax.axis_size(axis_name if len(axis_name) > 1 else axis_name[0]))
    except NameError as e:
        raise ValueError(
            f"`axis_name`={axis_name if len(axis_name) > 1 else axis_name[0]!r} is not bound here ({e}). "
            "Call the function inside the transform that binds it: jax.pmap(..., axis_name=NAME), "
            "jax.shard_map over a mesh with that axis, or jax.vmap(..., axis_name=NAME). "
            "Under plain jax.jit with batch-sharded arrays no axis_name is needed: pass axis_name=None "
            "and XLA makes the reductions global."
        ) from None


def check_axis_index_groups(groups: Any, axis_name: tuple[Hashable, ...] | None, size: int) -> tuple[tuple[int, ...], ...] | None:
    if groups is None:
        return None
    if axis_name is None:
        raise ValueError("`axis_index_groups` needs an `axis_name`: pass the pmap axis name the groups refer to.")
    groups = tuple(tuple(int(i) for i in g) for g in groups)
    sizes = {len(g) for g in groups}
    members = sorted(i for g in groups for i in g)
    if len(sizes) != 1 or members != list(range(size)):
        raise ValueError(
            f"`axis_index_groups`={groups} must split the {size} indices of axis {axis_name!r} into groups of "
            f"equal size, each index exactly once, e.g. [[0, 1, 2, 3], [4, 5, 6, 7]]."
        )
    return groups


def element_count(shape: Sequence[int], axes: Sequence[int]) -> int:
    return math.prod(shape[a] for a in axes)


def check_values_per_feature(shape, features, axis, axis_name, *, virtual_batch_size=None,
                             axis_index_groups=None) -> None:
    """Training needs more than one value per feature (per sub-batch with ghost batches,
    per group with `axis_index_groups`)."""
    per_participant = element_count(shape, reduction_axes(len(shape), features))
    names = normalize_axis_name(axis_name)
    if names is None:
        participants = 1
    elif axis_index_groups is not None:
        participants = len(tuple(axis_index_groups)[0])
    else:
        participants = bound_axis_size(names)
    if per_participant * participants > 1:
        return
    if virtual_batch_size is not None:
        raise ValueError(
            f"`virtual_batch_size`={virtual_batch_size} gives one value per feature in each sub-batch, so its "
            "variance is undefined: use a virtual_batch_size of at least 2 (or more elements per example)."
        )
    how_many = "no values" if per_participant * participants == 0 else "one value"
    raise ValueError(
        f"`x` of shape {tuple(shape)} gives {how_many} per feature along axis={axis!r}, so its batch variance is "
        "undefined: train with more than one example, synchronize over devices with `axis_name`, "
        "or normalize with the running statistics (training=False / use_running_average=True)."
    )


def check_virtual_batch_size(size: Any, shape: tuple[int, ...], features: tuple[int, ...]) -> int:
    """The number of sub-batches; ghost batches split the leading (batch) axis."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"`virtual_batch_size`={size!r} must be a positive int (or None for one batch).")
    if len(shape) < 2 or 0 in features:
        raise ValueError(
            f"`virtual_batch_size` splits the leading batch axis of the input, but for an input of shape {tuple(shape)} "
            f"axis 0 is {'a feature axis' if 0 in features else 'the only axis'}: put the batch first, e.g. (N, C) "
            "or (N, H, W, C) with axis=-1."
        )
    if shape[0] % size:
        raise ValueError(
            f"`virtual_batch_size`={size} does not divide the batch size {shape[0]} (leading axis of the input "
            f"{tuple(shape)}): use a batch size that is a multiple of it, or a virtual_batch_size that divides "
            f"{shape[0]}."
        )
    return shape[0] // size
