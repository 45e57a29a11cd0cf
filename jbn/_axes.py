"""Axis bookkeeping: which axes are features, which are reduced, how a mask lines up with
the input, which named axes a call synchronizes over; and `Layout`, all of it resolved once.

Every public entry point of the pure layer calls `resolve` once; the internals take the
`Layout` it returns and never re-check.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jbn._validate import check_axis_index_groups, is_index

Axes = int | Sequence[int]
AxisName = Hashable | tuple[Hashable, ...] | None


class Layout(NamedTuple):
    """One call's axes, resolved from the user's arguments.

    Attributes:
      axis: the feature axes as the user wrote them (for error messages).
      features: sorted non-negative feature axes.
      reduce: the other axes, sorted.
      shape: the input's shape.
      valid: the mask as a bool array of the input's rank (size 1 where it does not
        vary), or None.
      names: the bound axis names to synchronize over, as a tuple, or None.
      groups: `axis_index_groups` as a tuple of tuples of ints, or None.
    """

    axis: Any
    features: tuple[int, ...]
    reduce: tuple[int, ...]
    shape: tuple[int, ...]
    valid: jax.Array | None = None
    names: tuple[Hashable, ...] | None = None
    groups: tuple[tuple[int, ...], ...] | None = None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def fshape(self) -> tuple[int, ...]:
        return feature_shape(self.shape, self.features)

    @classmethod
    def of(
        cls,
        axis: Any,
        features: tuple[int, ...],
        shape: Sequence[Any],
        valid: jax.Array | None = None,
        names: tuple[Hashable, ...] | None = None,
        groups: tuple[tuple[int, ...], ...] | None = None,
    ) -> Layout:
        """The layout that reduces every axis of `shape` but the (canonical) `features`;
        `axis` is what the user wrote, kept for messages."""
        return cls(axis, features, reduction_axes(len(shape), features), tuple(shape), valid, names, groups)

    def split_leading(self, n_groups: int) -> Layout:
        """Ghost batches: the leading axis split into (n_groups, size), the group axis one
        more feature axis; same names and groups, no mask (the caller reshapes its own)."""
        shape = (n_groups, self.shape[0] // n_groups) + tuple(self.shape[1:])
        features = (0,) + tuple(a + 1 for a in self.features)
        return Layout.of(self.axis, features, shape, None, self.names, self.groups)

    def local(self, features: tuple[int, ...], shape: Sequence[Any], valid: jax.Array | None) -> Layout:
        """This layout's statistics kept apart along more `features` of a reshaped input
        `shape` (each shard's own rows), without synchronization."""
        return Layout.of(self.axis, features, shape, valid)


def resolve(
    x: jax.Array, axis: Axes, mask: Any = None, axis_name: AxisName = None, axis_index_groups: Any = None
) -> Layout:
    """The `Layout` of a call on `x` (already an array)."""
    features = feature_axes(x.ndim, axis)
    names = normalize_axis_name(axis_name)
    size = bound_axis_size(names) if names is not None else 0
    groups = check_axis_index_groups(axis_index_groups, names, size)
    valid = broadcast_mask(mask, x.shape, features)
    written = axis if isinstance(axis, Hashable) else tuple(axis)  # static in the fused rule: hashable
    return Layout.of(written, features, x.shape, valid, names, groups)


def feature_axes(ndim: int, axis: Axes, *, name: str = "axis") -> tuple[int, ...]:
    """The feature axes as sorted non-negative ints; raises if any is out of range."""
    if ndim == 0:
        raise ValueError(
            f"the input is a scalar (rank 0), so `{name}` has no feature axis to name: give `x` a batch axis and "
            "a feature axis, e.g. shape (N, C) with axis=-1."
        )
    example = f"e.g. {name}=-1 or {name}=(1, 2)"
    if is_index(axis) or isinstance(axis, (bool, float)):
        axes: tuple = (axis,)
    else:
        try:
            axes = tuple(axis)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(f"`{name}` must be an int or a tuple of ints, got {axis!r}: {example}.") from None
    if not axes:
        raise ValueError(f"`{name}` is empty: name at least one feature axis, e.g. {name}=-1.")
    out = []
    for a in axes:
        if not is_index(a):
            raise TypeError(f"`{name}` must be an int or a tuple of ints, got {axis!r}: {example}.")
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


def reduction_axes(ndim: int, features: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(a for a in range(ndim) if a not in features)


def feature_shape(shape: Sequence[Any], features: tuple[int, ...]) -> tuple[Any, ...]:
    return tuple(shape[a] for a in features)


def element_count(shape: Sequence[Any], axes: Sequence[int]) -> Any:
    """Elements over `axes` (an int, or a symbolic dimension under jax.export)."""
    return math.prod((shape[a] for a in axes), start=1)


def expand_features(v: jax.Array, ndim: int, features: tuple[int, ...]) -> jax.Array:
    """Reshape a feature-shaped array so that it broadcasts against the input."""
    shape = [1] * ndim
    for a, size in zip(features, v.shape):
        shape[a] = size
    return v.reshape(shape)


def promoted(*dtypes) -> jnp.dtype:
    """The dtype JAX's standard promotion gives `dtypes`: jbn's documented rule for the
    dtypes it chooses (statistics, output), applied whatever `jax_numpy_dtype_promotion`
    says, since jbn then casts explicitly (its arithmetic never promotes implicitly)."""
    with jax.numpy_dtype_promotion("standard"):
        return jnp.dtype(jnp.result_type(*dtypes))


def stats_dtype(*dtypes) -> jnp.dtype:
    """float32 (complex64 for complex inputs), or wider when an input is wider (x64)."""
    return promoted(promoted(*dtypes), jnp.float32)


def real_dtype(dtype) -> jnp.dtype:
    """The real counterpart of a (possibly complex) floating dtype: the variance's dtype."""
    return jnp.finfo(dtype).dtype


def _dim_eq(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # symbolic dimensions that cannot be compared
        return False


def _broadcasts(shape: Sequence[Any], x_shape: Sequence[Any]) -> bool:
    return all(_dim_eq(m, 1) or _dim_eq(m, s) for m, s in zip(shape, x_shape))


def broadcast_mask(mask: Any, x_shape: tuple[int, ...], features: tuple[int, ...]) -> jax.Array | None:
    """The mask as a bool array of `x`'s rank (size 1 where it does not vary).

    NumPy's broadcasting against `x` first, as flax reads masks (`(C,)` masks features
    of an `(N, C)` input). Only where that cannot apply, a mask of rank
    `x.ndim - len(features)` covers the non-feature axes (`(N, T)` for `(N, T, C)`).
    Where both readings apply and differ, the mask is ambiguous: a ValueError.
    """
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    ndim = len(x_shape)
    numpy_shape = convenience_shape = None
    if mask.ndim <= ndim:
        padded = (1,) * (ndim - mask.ndim) + tuple(mask.shape)
        numpy_shape = padded if _broadcasts(padded, x_shape) else None
    if mask.ndim == ndim - len(features) and mask.ndim < ndim:
        sizes = iter(mask.shape)
        expanded = tuple(1 if a in features else next(sizes) for a in range(ndim))
        convenience_shape = expanded if _broadcasts(expanded, x_shape) else None
    if numpy_shape is not None and convenience_shape is not None and numpy_shape != convenience_shape:
        raise ValueError(
            f"`mask` of shape {mask.shape} is ambiguous for an input of shape {x_shape}: by NumPy's broadcasting "
            f"(flax's reading) it lines up as {numpy_shape}, by jbn's non-feature-axes reading as "
            f"{convenience_shape}. Give it the input's rank: mask.reshape({numpy_shape}) for the first, "
            f"mask.reshape({convenience_shape}) for the second."
        )
    shape = numpy_shape if numpy_shape is not None else convenience_shape
    if shape is None:
        non_feature = tuple(s for i, s in enumerate(x_shape) if i not in features)
        raise ValueError(
            f"`mask` has shape {mask.shape}, which does not broadcast against the input of shape {x_shape}: "
            f"give it a shape that broadcasts by NumPy's rules (e.g. {tuple(x_shape)} or one with 1s), or the "
            f"shape of the input without its feature axes, {non_feature}."
        )
    return mask.reshape(shape).astype(bool)


def normalize_axis_name(axis_name: AxisName) -> tuple[Hashable, ...] | None:
    if axis_name is None:
        return None
    return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)


def axis_name_arg(names: tuple[Hashable, ...]) -> Any:
    """The form lax collectives take: a single name, or a tuple of several."""
    return names if len(names) > 1 else names[0]


class UnboundAxisNameError(ValueError, NameError):
    """An `axis_name` that no enclosing transform binds: a ValueError (jbn's errors for bad
    arguments) and a NameError (what JAX and equinox raise for it)."""


def bound_axis_size(names: tuple[Hashable, ...]) -> int:
    """Number of participants along `names`; a clear error when a name is not bound."""
    try:
        return int(jax.lax.axis_size(axis_name_arg(names)))
    except jax.errors.InconclusiveDimensionOperation:
        raise ValueError(
            f"`axis_name`={axis_name_arg(names)!r} names a vmapped axis of symbolic size (jax.export with a "
            "symbolic batch): JAX cannot export a collective over it (lax.psum, lax.all_gather and lax.axis_size "
            "need its size as a constant). Export with a concrete batch size, or call the layer once on the whole "
            "batch with axis_name=None."
        ) from None
    except NameError as e:
        raise UnboundAxisNameError(
            f"`axis_name`={axis_name_arg(names)!r} is not bound here ({e}). "
            "Call the function inside the transform that binds it: jax.pmap(..., axis_name=NAME), "
            "jax.shard_map over a mesh with that axis, or jax.vmap(..., axis_name=NAME). "
            "Under plain jax.jit with batch-sharded arrays no axis_name is needed: pass axis_name=None "
            "and XLA makes the reductions global."
        ) from None


def participants(layout: Layout) -> int:
    """How many participants one statistic spans: the group size, or all of `names`."""
    if layout.names is None:
        return 1
    if layout.groups is not None:
        return len(layout.groups[0])
    return bound_axis_size(layout.names)


def varying_axes(v: Any) -> frozenset:
    """The manual axes along which `v`'s value varies (empty outside shard_map, or when
    shard_map does not check them)."""
    aval = jax.typeof(v)
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))


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
