"""One builder from a TOML table (a dict) to a frozen config dataclass, used by every config:
the run's `RunConfig` tables, each stage's config, and nested configs such as a stage's
`train` table.

`from_table(cls, values, where, base=None)`:
- a key that is not a field of `cls` is an error naming the key and the allowed fields;
- a table given for a field that holds a dataclass overrides that field's default instance (so
  `train = {epochs = 1}` keeps the stage's other training defaults);
- a value whose type does not match the field's annotation (a string where an int is wanted, a
  float for an int, a bool for a number) is an error naming the key, the value and the type;
- lists become tuples (configs are frozen);
- errors the dataclass raises itself (`__post_init__` range checks) are prefixed with `where`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any


class ConfigError(ValueError):
    """A config table that does not fit its dataclass: names the key, the value and what was
    expected."""


def _optional_dataclass(tp: Any) -> type | None:
    for cand in (tp, *typing.get_args(tp)):
        if isinstance(cand, type) and dataclasses.is_dataclass(cand):
            return cand
    return None


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _type_name(tp: Any) -> str:
    if tp in _WORDS:
        return _WORDS[tp]
    if typing.get_origin(tp) in (tuple, list) or tp in (tuple, list):
        return "a list"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def check_type(value: Any, tp: Any, where: str, *, classes: bool = False) -> None:
    """Raise `ConfigError` unless `value` fits the annotation `tp` (int, float, bool, str,
    Optional/Union of them, tuples and Mappings loosely; anything else is not checked, unless
    `classes`: then any other class in `tp` (`Path`, a DataFrame) is checked with isinstance)."""
    if tp is Any or tp is None:
        return
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                check_type(value, a, where, classes=classes)
                return
            except ConfigError as e:
                errors.append(e)
        names = " or ".join(_type_name(a) for a in args if a is not type(None))
        unset = " (or left out)" if type(None) in args else ""
        raise ConfigError(f"{where} must be {names}{unset}, got {value!r}")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where} must be one of {list(allowed)}, got {value!r}")
        return
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
    elif origin in (tuple, list) or tp in (tuple, list):
        if not isinstance(value, (tuple, list)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        args = typing.get_args(tp)
        if args and (len(args) == 2 and args[1] is Ellipsis):
            for i, v in enumerate(value):
                check_type(v, args[0], f"{where}[{i}]")
    elif origin is not None and isinstance(origin, type) and issubclass(origin, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a table, got {value!r}")
    elif classes and origin is None and isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where} must be {_type_name(tp)}, got {value!r}")


def from_table(cls: type, values: Mapping[str, Any], where: str, base: Any = None) -> Any:
    """`cls(**values)` for a config dataclass `cls`, checked as the module docstring says.
    `base`: an instance of `cls` whose values are the defaults."""
    if isinstance(values, cls):
        return values
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where} must be a table, got {values!r}")
    if not dataclasses.is_dataclass(cls):
        try:
            return cls(**values)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: {e}") from None
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - unresolvable annotations: check nothing but the keys
        hints = {}
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kw = {} if base is None else {k: getattr(base, k) for k in fields}
    for k, v in values.items():
        if k not in fields:
            raise ConfigError(f"{where}: unknown key {k!r}; allowed: {', '.join(fields)}")
        tp = hints.get(k, Any)
        sub = _optional_dataclass(tp)
        current = kw.get(k) if base is not None else _default_of(fields[k])
        if dataclasses.is_dataclass(current) and not isinstance(current, type):
            sub = type(current)
        if isinstance(v, Mapping) and sub is not None:
            default = current if dataclasses.is_dataclass(current) else None
            v = from_table(sub, v, f"{where}.{k}", default)
        else:
            if isinstance(v, list):
                v = tuple(v)
            if sub is None:
                check_type(v, tp, f"{where}.{k}")
        kw[k] = v
    try:
        return cls(**kw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None
