"""Config machinery: dict/YAML <-> frozen dataclasses, ``key=value`` overrides, hashing.

Type annotations are resolved with ``typing.get_type_hints`` in the module that defines each
config class, so every module of this package imports the classes its annotations name.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the dotted path."""


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Converts a YAML/JSON value to the annotated type ``tp`` (recursively)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{path}: {value!r} matches none of {tp}: {'; '.join(errors)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ConfigError(f"{path}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args or [Any] * len(value))))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{path}: expected a number, got {value!r}") from None
        if not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls, d: dict, path: str = ""):
    """Builds dataclass ``cls`` from a nested dict; unknown keys are an error naming the path."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in d if k not in names]
    if unknown:
        k = unknown[0]
        near = difflib.get_close_matches(k, names, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else f"; known keys: {sorted(names)}"
        raise ConfigError(f"{_join(path, k)}: unknown key for {cls.__name__}{hint}")
    kwargs = {k: _coerce(v, hints[k], _join(path, k)) for k, v in d.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path or cls.__name__}: {e}") from e


def to_dict(cfg) -> dict:
    """Nested plain dict (tuples become lists) suitable for YAML/JSON."""
    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v
    return conv(cfg)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def apply_overrides(cfg, overrides: list[str] | tuple[str, ...]):
    """Applies ``a.b.c=value`` overrides (values parsed as YAML) to a frozen config."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        cfg = _replace_path(cfg, key.strip().split("."), value, key.strip())
    return cfg


def _replace_path(cfg, keys: list[str], value, full: str):
    if not dataclasses.is_dataclass(cfg):
        raise ConfigError(f"override {full}: {keys[0]!r} is below a non-config value")
    names = {f.name for f in dataclasses.fields(cfg)}
    k = keys[0]
    if k not in names:
        near = difflib.get_close_matches(k, names, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"override {full}: unknown key {k!r} in {type(cfg).__name__}{hint}")
    tp = _hints(type(cfg))[k]
    if len(keys) == 1:
        new = _coerce(value, tp, full)
    else:
        new = _replace_path(getattr(cfg, k), keys[1:], value, full)
    try:
        return dataclasses.replace(cfg, **{k: new})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"override {full}: {e}") from e


def load_config(path: str | Path, cls, overrides=()):
    """Reads a YAML file into ``cls`` and applies overrides; errors name the file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    try:
        cfg = from_dict(cls, raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e
    return apply_overrides(cfg, list(overrides))


def save_config(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_hash(cfg) -> str:
    """A stable short hash of a config (for caches keyed by configuration)."""
    blob = json.dumps(to_dict(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def apply_updates(cfg, updates: dict):
    """Applies ``{"a.b.c": value}`` (already-parsed values) to a frozen config."""
    for key, value in updates.items():
        cfg = _replace_path(cfg, key.strip().split("."), value, key.strip())
    return cfg


__all__ = [
    "ConfigError", "from_dict", "to_dict", "apply_overrides", "load_config", "save_config",
    "config_hash", "apply_updates",
]
