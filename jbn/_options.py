"""The arguments of a call, checked once (past 400 lines: one concept, every argument's check and the records they build).

Each public entry point, and each framework wrapper in one place, turns the user's arguments
into records here: `Layout` (which axes are features, which are reduced, the mask, the axis
names) and `Normalization` (how to normalize), and checks the running-average options. The
core (`jbn._batch_norm`, `jbn._fused`, `jbn._statistics`, `jbn._running`) trusts these
records and never checks again. Every check runs on static information (shapes, dtypes, Python
numbers), so a bad argument fails when the function is traced, with a message that names the
argument and the fix.

Read top-down: the values checks, the axes and `Layout`, the output dtype and the activation,
then `Normalization` and `checked_arguments`, which builds both records.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jbn._state import RunningAverage

Array = jax.Array

Axes = int | Sequence[int]
AxisName = Hashable | tuple[Hashable, ...] | None


class OneValuePerFeatureWarning(UserWarning):
    """Training saw one value per feature: its batch variance is 0, the output is the bias.

    flax computes this case (a batch of one example without spatial axes, a last partial
    batch of one, per-example `vmap`); so does jbn, and tells you once per trace. Filter it
    with `warnings.filterwarnings("ignore", category=jbn.OneValuePerFeatureWarning)` or
    make it an error with `"error"`.
    """


@contextlib.contextmanager
def quiet_one_value(quiet: bool):
    """Silences `OneValuePerFeatureWarning` when `quiet` (initialization on a dummy
    example trains nothing, so it has nothing to warn about)."""
    if not quiet:
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OneValuePerFeatureWarning)
        yield


# Values: each check takes what the user passed and returns it canonical, or raises.


def is_index(a: Any) -> bool:
    """A Python or NumPy integer, not a bool (True would silently mean axis 1)."""
    return isinstance(a, (int, jnp.integer)) and not isinstance(a, (bool, jnp.bool_))


def is_bool(v: Any) -> bool:
    return isinstance(v, (bool, jnp.bool_))


def check_input(x: Any, name: str = "x") -> jax.Array:
    """`x` as an array of a floating or complex dtype."""
    x = jnp.asarray(x)
    if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.complexfloating)):
        raise TypeError(
            f"`{name}` has dtype {x.dtype}, but batch norm needs a floating (or complex) input: "
            f"cast it first, e.g. {name}.astype(jnp.float32)."
        )
    return x


def check_output_dtype(dtype: Any) -> Any:
    """None, or a floating/complex dtype."""
    if dtype is None:
        return None
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        raise TypeError(f"`dtype`={dtype!r} is not a dtype: pass e.g. jnp.float32, or None.") from None
    if not (jnp.issubdtype(dt, jnp.floating) or jnp.issubdtype(dt, jnp.complexfloating)):
        raise TypeError(
            f"`dtype`={dtype!r} is not a floating dtype: a normalized output needs one, e.g. jnp.float32 "
            "or jnp.bfloat16 (or None for flax's promotion of the input and the parameters)."
        )
    return dt


def concrete_number(value: Any, name: str) -> float | None:
    """`value` as a Python float when it is known at trace time (a Python or NumPy number,
    or a concrete 0-d array); None when it is traced. Anything else is a TypeError."""
    if is_bool(value):
        raise TypeError(f"`{name}` must be a number, got the bool {value!r}.")
    if isinstance(value, (int, float, jnp.integer, jnp.floating)):
        return float(value)
    if isinstance(value, jax.core.Tracer):
        return None
    dtype = getattr(value, "dtype", None)
    if (
        getattr(value, "shape", None) == ()
        and dtype is not None
        and jnp.issubdtype(dtype, jnp.number)
        and not jnp.issubdtype(dtype, jnp.complexfloating)
    ):
        return float(value)
    raise TypeError(f"`{name}` must be a real number (a Python float), got {type(value).__name__} {value!r}.")


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
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(
            f"`epsilon`={epsilon} must be finite and > 0 (it keeps 1/sqrt(var + epsilon) finite and meaningful); "
            "the usual value is 1e-5."
        )
    return value


def check_flag(value: Any, name: str) -> bool:
    """A static Python (or NumPy) bool: `training="yes"` or an array is a mistake."""
    if not is_bool(value):
        raise TypeError(f"`{name}` must be a Python bool (it is static), got {type(value).__name__} {value!r}.")
    return bool(value)


def check_negative_slope(value: Any) -> float:
    if is_bool(value) or not isinstance(value, (int, float, jnp.integer, jnp.floating)):
        raise TypeError(f"`negative_slope` must be a Python number (it is static), got {value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"`negative_slope`={value} must be finite, e.g. 0.01.")
    return float(value)


def check_feature_array(
    v: Any, fshape: tuple[int, ...], name: str, axis: Any, *, kind: str = "inexact"
) -> jax.Array | None:
    """`v` (scale, bias, a running statistic) must have exactly the feature shape.

    kind: "inexact" (floating or complex: scale, bias, shift), "real" (floating: a running
    mean may also be complex, see `check_running`), "count" (integer, non-negative)."""
    if v is None:
        return None
    v = jnp.asarray(v)
    if v.shape != fshape:
        raise ValueError(
            f"`{name}` has shape {v.shape}, but the input's feature shape along axis={axis!r} is "
            f"{fshape}: pass a `{name}` of shape {fshape}, or set `axis` to the feature axis of the input "
            f"(for existing module variables, re-initialize them for this input)."
        )
    floating = jnp.issubdtype(v.dtype, jnp.floating)
    if kind == "real" and not floating:
        raise TypeError(f"`{name}` has dtype {v.dtype}: it must be floating, e.g. {name}.astype(jnp.float32).")
    if kind == "inexact" and not (floating or jnp.issubdtype(v.dtype, jnp.complexfloating)):
        raise TypeError(f"`{name}` has dtype {v.dtype}: it must be floating, e.g. {name}.astype(jnp.float32).")
    if kind == "count":
        if not jnp.issubdtype(v.dtype, jnp.integer) or is_bool(v.dtype.type(0)):
            raise TypeError(
                f"`{name}` has dtype {v.dtype}: it counts batches, so it must be an integer array, "
                f"e.g. jnp.zeros({fshape}, jnp.int32)."
            )
        if not isinstance(v, jax.core.Tracer):
            with jax.ensure_compile_time_eval():
                negative = bool(jnp.any(v < 0))
            if negative:
                raise ValueError(f"`{name}` has negative entries: a count of batches starts at 0.")
    return v


def check_axis_index_groups(groups: Any, axis_name: Any, size: int) -> tuple[tuple[int, ...], ...] | None:
    """pmap-style groups as a tuple of tuples of ints that split range(size) evenly."""
    if groups is None:
        return None
    if axis_name is None:
        raise ValueError("`axis_index_groups` needs an `axis_name`: pass the pmap axis name the groups refer to.")
    example = "e.g. [[0, 1, 2, 3], [4, 5, 6, 7]]"
    if isinstance(groups, (str, bytes)) or not hasattr(groups, "__iter__"):
        raise TypeError(f"`axis_index_groups` must be a list of lists of ints, {example}; got {groups!r}.")
    out = []
    for g in groups:
        if isinstance(g, (str, bytes)) or not hasattr(g, "__iter__") or not all(is_index(i) for i in g):
            raise TypeError(f"`axis_index_groups` must be a list of lists of ints, {example}; got {groups!r}.")
        out.append(tuple(int(i) for i in g))
    groups = tuple(out)
    sizes = {len(g) for g in groups}
    members = sorted(i for g in groups for i in g)
    if len(sizes) != 1 or members != list(range(size)):
        raise ValueError(
            f"`axis_index_groups`={groups} must split the {size} indices of axis {axis_name!r} into groups of "
            f"equal size, each index exactly once, {example}."
        )
    return groups


def check_virtual_batch_size(size: Any, shape: tuple[int, ...], features: tuple[int, ...]) -> int:
    """The number of sub-batches; ghost batches split the leading (batch) axis."""
    if not is_index(size) or size < 1:
        raise ValueError(f"`virtual_batch_size`={size!r} must be a positive int (or None for one batch).")
    size = int(size)
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


# Axes: which are features, which are reduced, how a mask lines up, which names synchronize.


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


# The output dtype and the activation.


def promoted(*dtypes) -> jnp.dtype:
    """The dtype JAX's standard promotion gives `dtypes`: jbn's documented rule for the
    dtypes it chooses (statistics, output), applied whatever `jax_numpy_dtype_promotion`
    says, since jbn then casts explicitly (its arithmetic never promotes implicitly)."""
    with jax.numpy_dtype_promotion("standard"):
        return jnp.dtype(jnp.result_type(*dtypes))


def output_dtype(dtype: Any, x: Array, scale: Array | None, bias: Array | None) -> jnp.dtype:
    """`dtype` when given; else flax's promotion of the input and the parameters (a
    bfloat16 input with float32 parameters gives float32)."""
    if dtype is not None:
        return jnp.dtype(dtype)
    return promoted(x.dtype, *(p.dtype for p in (scale, bias) if p is not None))


ACTIVATIONS = ("identity", "relu", "leaky_relu")

# Invertible ones: the output alone determines the pre-activation.
INVERTIBLE = ("identity", "leaky_relu")


def check_activation(activation: Any, negative_slope: Any, save_output_only: bool = False) -> str:
    """The canonical activation name; raises on an unknown name or a bad slope."""
    name = "identity" if activation is None else activation
    if name not in ACTIVATIONS:
        raise ValueError(
            f"`activation`={activation!r} is not supported: use None (or 'identity'), 'relu' or 'leaky_relu' "
            "(or apply your own activation after batch norm)."
        )
    if not isinstance(negative_slope, (int, float)) or isinstance(negative_slope, bool):
        raise TypeError(f"`negative_slope` must be a Python number (it is static), got {negative_slope!r}.")
    if save_output_only:
        if name not in INVERTIBLE:
            raise ValueError(
                f"`save_output_only=True` recovers the normalized input from the output, which needs an invertible "
                f"activation, but `activation`={activation!r} is not: use 'identity' or 'leaky_relu', or set "
                "save_output_only=False (the default, which saves the input instead)."
            )
        if name == "leaky_relu" and not negative_slope > 0:
            raise ValueError(
                f"`save_output_only=True` with 'leaky_relu' needs `negative_slope` > 0 to invert the activation, "
                f"got {negative_slope}: use a positive slope such as 0.01, or save_output_only=False."
            )
    return name


# The records of one call.


def check_params(scale: Any, bias: Any, x: Array, fshape: tuple[int, ...], axis: Axes) -> tuple:
    """scale and bias: feature-shaped, floating (complex only for a complex input)."""
    out = []
    for value, name in ((scale, "scale"), (bias, "bias")):
        v = check_feature_array(value, fshape, name, axis)
        if v is not None and jnp.iscomplexobj(v) and not jnp.iscomplexobj(x):
            raise TypeError(f"`{name}` is complex ({v.dtype}) but `x` is real: pass a real `{name}`.")
        out.append(v)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Normalization:
    """How to normalize, checked once by `checked_arguments` (a frozen, hashable record): the
    epsilon (a Python float, or a traced value), the output dtype, the canonical
    activation name and its slope, whether training keeps only the output for the
    backward pass, whether it uses the fused derivative rule, and the number of ghost
    batches the leading axis is split into (None: one batch)."""

    epsilon: Any
    out_dtype: Any
    activation: str = "identity"
    negative_slope: float = 0.01
    save_output_only: bool = False
    fused: bool = True
    ghost_groups: int | None = None


def checked_arguments(
    x,
    scale,
    bias,
    *,
    axis,
    mask,
    axis_name,
    axis_index_groups,
    training=True,
    **normalization,
) -> tuple[jax.Array, Any, Any, Layout, Normalization]:
    """The arguments shared by the entry points, checked once: (x, scale, bias, layout,
    how to normalize); `normalization`: the keywords of `checked_normalization` (epsilon,
    dtype, activation, ...). In training, warns once when the batch (or each ghost batch)
    holds one value per feature."""
    x, layout = checked_layout(
        x, axis=axis, mask=mask, axis_name=axis_name, axis_index_groups=axis_index_groups, training=training
    )
    return (x, *checked_normalization(x, scale, bias, layout, axis=axis, training=training, **normalization))


def checked_layout(x, *, axis, mask, axis_name, axis_index_groups, training=True) -> tuple[jax.Array, Layout]:
    """`checked_arguments`' first half: x and its layout (a module needs the feature shape to
    create its parameters before it can pass them)."""
    x = check_input(x)
    synced = training  # evaluation uses no statistics of the batch: its axis names need not be bound
    return x, resolve(x, axis, mask, axis_name if synced else None, axis_index_groups if synced else None)


def checked_normalization(
    x,
    scale,
    bias,
    layout: Layout,
    *,
    axis,
    epsilon,
    dtype,
    activation=None,
    negative_slope=0.01,
    save_output_only=False,
    fused=True,
    training=True,
    virtual_batch_size=None,
) -> tuple[Any, Any, Layout, Normalization]:
    """`checked_arguments`' second half, on the x and layout of `checked_layout`: (scale, bias,
    layout, how to normalize)."""
    epsilon = check_epsilon(epsilon)
    save_output_only = check_flag(save_output_only, "save_output_only")
    fused = check_flag(fused, "fused")
    negative_slope = check_negative_slope(negative_slope)
    scale, bias = check_params(scale, bias, x, layout.fshape, axis)
    act = check_activation(activation, negative_slope, save_output_only and training)
    if act != "identity" and jnp.iscomplexobj(x):
        raise ValueError(f"`activation`={activation!r} needs a real input; `x` is {x.dtype}.")
    ghost_groups = None
    if training and virtual_batch_size is not None:
        ghost_groups = check_virtual_batch_size(virtual_batch_size, layout.shape, layout.features)
        warn_if_one_value_per_feature(layout.split_leading(ghost_groups), layout.shape[0] // ghost_groups)
    elif training:
        warn_if_one_value_per_feature(layout)
    how = Normalization(
        epsilon=epsilon,
        out_dtype=output_dtype(check_output_dtype(dtype), x, scale, bias),
        activation=act,
        negative_slope=negative_slope,
        save_output_only=save_output_only,
        fused=fused,
        ghost_groups=ghost_groups,
    )
    return scale, bias, layout, how


def warn_if_one_value(
    values_per_feature: Any, shape: tuple, axis: Any, *, virtual_batch_size: int | None = None
) -> None:
    """One `OneValuePerFeatureWarning` when training sees exactly one value per feature
    (per sub-batch with ghost batches). A symbolic batch size (jax.export) is not known
    to be 1, so it gets no warning."""
    try:
        one = values_per_feature == 1
        one = bool(one)
    except Exception:  # symbolic dimension: InconclusiveDimensionOperation
        return
    if not one:
        return
    where = f" in each sub-batch of `virtual_batch_size`={virtual_batch_size}" if virtual_batch_size else ""
    warnings.warn(
        f"`x` of shape {tuple(shape)} gives one value per feature along axis={axis!r}{where} in training: its batch "
        "variance is 0, so the output is the bias and the running variance moves toward 0 (as in flax). Train with "
        "more than one example, synchronize with `axis_name`, or use the running statistics "
        "(training=False / use_running_average=True).",
        OneValuePerFeatureWarning,
        stacklevel=5,
    )


def warn_if_one_value_per_feature(layout: Layout, virtual_batch_size: int | None = None) -> None:
    per_participant = element_count(layout.shape, layout.reduce)
    warn_if_one_value(
        per_participant * participants(layout), layout.shape, layout.axis, virtual_batch_size=virtual_batch_size
    )


def check_rule(rule: Any) -> Any:
    """A rule passed as `running_average=`: it must have `update` and `needs_count`."""
    if not isinstance(rule, RunningAverage):
        raise TypeError(
            f"`running_average` must be a rule with `update(running, batch) -> RunningStats` and a `needs_count` "
            f"bool (e.g. jbn.EMA(0.9)), got {type(rule).__name__} {rule!r}."
        )
    return rule


def check_running_options(momentum: Any, debias: Any, unbiased_running_var: Any, running_average: Any) -> tuple:
    """The running-average options of a call, checked once: (momentum, debias,
    unbiased_running_var, running_average); `running_average`, when given, replaces the
    other three (`jbn._running.rule_of` builds the rule from them)."""
    if running_average is not None:
        return momentum, debias, unbiased_running_var, check_rule(running_average)
    momentum = check_momentum(momentum)
    debias = check_flag(debias, "debias")
    return momentum, debias, check_flag(unbiased_running_var, "unbiased_running_var"), None
