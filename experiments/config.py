"""Experiment configs: a YAML mapping checked against the experiment's `DEFAULTS`.

Every key of a config file must be a key of `DEFAULTS`, and its value must have the
default's type (an int is accepted where a float is expected; a list's items must have the
type of the default list's items). Keys the file leaves out keep their default. The `criteria:` block is not a setting: it
is checked by `experiments.protocol.validate` and cannot be overridden. Overrides
from the command line (`key=value`, the value read as YAML) go through the same checks.
"""

from __future__ import annotations

import copy
import difflib
import pathlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from experiments import protocol

CRITERIA = "criteria"  # every experiment config's pre-registered criteria (experiments/protocol.py)
# Config keys holding the seeds of the judged runs (initialization and data order). Not moved:
# data_seed and split_seed (which examples form the data set and its test split) and
# tuning_seeds (the runs that choose learning rates), so a rerun asks the same question.
JUDGED_SEED_KEYS = ("seeds", "order_seeds", "ghost_seeds", "init_seed", "draw_order_seed")


class ConfigError(ValueError):
    """A config file or override that does not fit the experiment's DEFAULTS."""


# PyYAML (YAML 1.1) reads `1e-3` as a string; accept such strings where a float is expected.
_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _coerce(value: Any, default: Any, where: str, key: str) -> Any:
    """`value` converted to the type of `default`, or a ConfigError naming `key` and `where`."""

    def fail(expected: str):
        raise ConfigError(
            f"{where}: key '{key}' must be {expected} (its default is {default!r}), got {_type_name(value)} {value!r}."
        )

    if default is None:  # a default of None accepts any scalar
        if isinstance(value, (list, dict)):
            fail("a scalar or null")
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer")
        return value
    if isinstance(default, float):
        if isinstance(value, str) and _FLOAT.match(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail("a number")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            fail("a string")
        return value
    if isinstance(default, list):
        if not isinstance(value, list):
            fail("a list")
        if not default:
            return list(value)
        return [_coerce(v, default[0], where, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(default, dict):
        if not isinstance(value, dict):
            fail("a mapping")
        return resolve(default, value, where=where, prefix=f"{key}.")
    raise ConfigError(f"{where}: key '{key}' has a default of unsupported type {_type_name(default)}.")


def _unknown(key: str, known: Iterable[str], where: str, prefix: str = "") -> ConfigError:
    known = sorted(known)
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
    return ConfigError(
        f"{where}: unknown key '{prefix}{key}'.{hint} Known keys: {', '.join(prefix + k for k in known)}."
    )


def resolve(defaults: Mapping[str, Any], values: Mapping[str, Any], *, where: str, prefix: str = "") -> dict:
    """`defaults` updated with `values`, every key and type checked.

    Args:
      defaults: the experiment's DEFAULTS.
      values: the keys to change (a config file's mapping).
      where: what `values` came from (a file path), named in every error.
      prefix: for nested mappings, the dotted path of the parent key.
    """
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where}: a config must be a mapping of key: value, got {_type_name(values)}.")
    out = copy.deepcopy(dict(defaults))
    for key, value in values.items():
        if key == CRITERIA and not prefix:  # the protocol's block, not a setting (see experiments/protocol.py)
            try:
                out[CRITERIA] = protocol.validate(value, where)
            except protocol.CriteriaError as e:
                raise ConfigError(str(e)) from None
            continue
        if not isinstance(key, str) or key not in defaults:
            raise _unknown(str(key), defaults, where, prefix)
        out[key] = _coerce(value, defaults[key], where, prefix + key)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`'a.b=value'` -> (['a', 'b'], value read as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--override {text!r}: write it as key=value, e.g. --override steps=100.")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--override {text!r}: the key before '=' is empty.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--override {text!r}: the value is not valid YAML ({e}).") from None
    return key.split("."), value


def apply_overrides(config: Mapping[str, Any], defaults: Mapping[str, Any], overrides: Iterable[str]) -> dict:
    """`config` with each `key=value` override applied and checked against `defaults`."""
    out = copy.deepcopy(dict(config))
    for text in overrides:
        path, value = parse_override(text)
        nested: dict = {}
        cursor = nested
        for part in path[:-1]:
            cursor = cursor.setdefault(part, {})
        cursor[path[-1]] = value
        where = f"--override {text}"
        if path[0] == CRITERIA:
            raise ConfigError(
                f"{where}: the criteria are fixed in the config file before a run and cannot be overridden; "
                "edit the file and record the old version under the criterion's `history`."
            )
        for key, sub in nested.items():
            if key not in defaults:
                raise _unknown(key, defaults, where)
            if isinstance(sub, dict) and isinstance(out[key], dict):
                out[key] = resolve(defaults[key], {**out[key], **sub}, where=where, prefix=f"{key}.")
            else:
                out[key] = _coerce(sub, defaults[key], where, key)
    return out


def load(path: str | pathlib.Path, defaults: Mapping[str, Any], overrides: Iterable[str] = ()) -> dict:
    """Read the YAML file at `path`, check it against `defaults`, apply `overrides`.

    Returns the resolved config: every key of `defaults`, with the file's and the
    overrides' values in place. Raises ConfigError naming the key and the file.
    """
    path = pathlib.Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror}).") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e}).") from None
    config = resolve(defaults, {} if values is None else values, where=str(path))
    return apply_overrides(config, defaults, overrides)


def dump(config: Mapping[str, Any]) -> str:
    """The config as YAML, keys in their DEFAULTS order."""
    return yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=None)
