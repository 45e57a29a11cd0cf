"""Argument checks: each takes a value the user passed and returns it canonical, or raises.

Every check runs on static information (shapes, dtypes, Python numbers), so a bad
argument fails when the function is traced, with a message that names the argument
and the fix. Nothing here knows about axes beyond shapes (that is `jbn._axes`).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp

INT32_MAX = 2**31 - 1


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
        stacklevel=4,
    )
