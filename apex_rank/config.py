"""Frozen-dataclass configs, loaded from TOML or dicts with unknown keys rejected.

Every config object in apex-rank is a ``@dataclass(frozen=True)``; nested configs are
dataclass-typed fields. :func:`from_dict` builds one from a mapping and fails with a
:class:`~apex_rank.errors.ConfigError` that names the dotted key at fault, so a typo in a TOML
file never passes silently.

Example
-------
>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class Cfg:
...     k: int = 10
>>> from_dict(Cfg, {"k": 20})
Cfg(k=20)
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from apex_rank.errors import ConfigError

T = TypeVar("T")


def _check_value(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a table, found {type(value).__name__}")
        return from_dict(tp, value, _prefix=key + ".")
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key {key!r}: value {value!r} does not match {tp}")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"config key {key!r}: {value!r} is not one of {list(allowed)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r}: expected a list, found {type(value).__name__}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = [_check_value(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r}: expected a number, found {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r}: expected an integer, found {value!r}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ConfigError(f"config key {key!r}: expected {tp.__name__}, found {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any], *, _prefix: str = "") -> T:
    """Build the frozen dataclass ``cls`` from ``data``; unknown or mistyped keys raise."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(_prefix + u for u in unknown)} for "
            f"{cls.__name__}; valid keys: {', '.join(_prefix + f for f in fields)}"
        )
    kwargs = {name: _check_value(value, hints[name], _prefix + name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"invalid {cls.__name__} config: {err}") from err


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-dict (JSON/TOML friendly) form of a config dataclass; tuples become lists."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    result: dict[str, Any] = conv(cfg)
    return result


def load_config(path: str | Path, cls: type[T], *, section: str | None = None) -> T:
    """Read a TOML file (optionally one ``[section]`` of it) into ``cls``."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {p} is not valid TOML: {err}") from err
    if section is not None:
        data = data.get(section, {})
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p}: [{section}] must be a table")
    try:
        return from_dict(cls, data)
    except ConfigError as err:
        raise ConfigError(f"{p}: {err}") from err
