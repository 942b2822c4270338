"""Config machinery: dict/YAML <-> frozen dataclasses, ``key=value`` overrides, hashing.

Type annotations are resolved with ``typing.get_type_hints`` in the module that defines each
config class, so every module of this package imports the classes its annotations name.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Optional

import yaml


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that reads numbers as YAML 1.2 and JSON do: ``1e-3`` and ``-.5e-4`` are
    floats (PyYAML follows YAML 1.1, where a float needs a digit before the dot and a signed
    exponent, so these were strings, and inside a free-form mapping such as
    ``objective.options`` nothing converts them), ``010`` is ten (YAML 1.1: octal 8) and ``1:30``
    a string (YAML 1.1: the base-60 integer 90)."""


class _Dumper(yaml.SafeDumper):
    """``yaml.SafeDumper`` that quotes strings ``_Loader`` would read as floats (``"1e3"``), so
    that a saved config loads back with the same values."""


_FLOAT_E = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$")
for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_E, list("-+.0123456789"))
del _cls


def _construct_int(loader, node):
    """A plain scalar YAML 1.1 resolves as an integer, read as YAML 1.2 reads it: decimal digits
    in base 10 (``010`` is 10), ``0x`` / ``0b`` prefixed; base-60 (``1:30``) stays a
    string. ``_`` separators are allowed (``10_000``)."""
    text = loader.construct_scalar(node)
    if ":" in text:
        return text
    v = text.replace("_", "")
    sign = -1 if v.startswith("-") else 1
    v = v.lstrip("+-")
    base = {"0x": 16, "0b": 2}.get(v[:2].lower(), 10)
    return sign * int(v[2:] if base != 10 else v, base)


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def load_yaml(text: str):
    """YAML text -> Python values (safe loader; ``1e-3`` is a float)."""
    return yaml.load(text, Loader=_Loader)


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


def check_local_path(field: str, value: Optional[str]) -> None:
    """Runs, checkpoints, logs and local models go through the local filesystem (pathlib): a URI
    such as ``gs://bucket/run`` would silently become a local folder named ``gs:``."""
    if value is not None and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", str(value)):
        raise ConfigError(f"{field}: {value!r} is a remote URI; runs and checkpoints are written through "
                          "the local filesystem: mount the bucket (e.g. gcsfuse, or a shared NFS path) and "
                          "give the mount path")


def from_dict(cls, d: dict, path: str = ""):
    """Builds dataclass ``cls`` from a nested dict; unknown keys are an error naming the path."""
    if not isinstance(d, dict):
        raise ConfigError(f"{path + ': ' if path else ''}expected a mapping of {cls.__name__} fields, got {d!r}")
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
    """Applies ``a.b.c=value`` overrides (values parsed as YAML) to a frozen config.

    All overrides are applied before the config is validated, so coupled fields can change
    together in any order (``model.decoder.num_heads=4 model.decoder.num_kv_heads=4``).
    A mapping given to a sub-config (``train.optim={lr: 0.001, warmup_steps: 10}``) merges into
    it field by field, as the dotted keys would; see ``apply_updates``. They apply in the order
    given, so a key given again wins over what came before it."""
    return apply_updates(cfg, *({key: value} for key, value in _parse_items(overrides)))


def _parse_items(overrides: list[str] | tuple[str, ...]) -> list[tuple[str, Any]]:
    """``["a.b=1", "c=[x, y]"]`` -> ``[("a.b", 1), ("c", ["x", "y"])]`` (values parsed as YAML)."""
    items = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        try:
            value = load_yaml(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key.strip()}: invalid YAML value {raw!r} (quote the value, e.g. "
                              f"{key.strip()}='\"...\"', for a literal string): {e}") from None
        items.append((key.strip(), value))
    return items


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict:
    """``["a.b=1", "c=[x, y]"]`` -> ``{"a.b": 1, "c": ["x", "y"]}`` (values parsed as YAML).

    A key given twice keeps its last value, at its last position (so that it applies after the
    keys given before it, ``train.optim={lr: 0.2} train.optim.lr=0.3`` setting 0.3)."""
    updates = {}
    for key, value in _parse_items(overrides):
        updates.pop(key, None)
        updates[key] = value
    return updates


def _dataclass_in(tp):
    """The config class ``tp`` is, or is an optional of (None otherwise)."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        found = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        return found[0] if len(found) == 1 else None
    return None


def _set_path(cls, d: dict, keys: list[str], value, full: str) -> None:
    """Sets ``value`` at ``keys`` in ``d`` (``to_dict`` of a ``cls``), checking every key."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    k = keys[0]
    if k not in names:
        near = difflib.get_close_matches(k, names, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"override {full}: unknown key {k!r} in {cls.__name__}{hint}")
    sub_cls = _dataclass_in(_hints(cls)[k])
    if len(keys) == 1:
        if isinstance(value, dict) and sub_cls is not None and isinstance(d.get(k), dict):
            for sub_key, sub_value in value.items():         # a mapping merges into the sub-config
                _set_path(sub_cls, d[k], [str(sub_key)], sub_value, f"{full}.{sub_key}")
        else:
            d[k] = to_dict(value) if dataclasses.is_dataclass(value) else value   # later keys may go below
        return
    if sub_cls is not None and d.get(k) is None:     # an optional sub-config that is not set
        raise ConfigError(f"override {full}: {k} is not set (None), so it has no {keys[1]!r} to change; give "
                          f"{k} as a mapping (e.g. {k}='{{{keys[1]}: ...}}'; fields it leaves out take their "
                          f"defaults), then dotted keys below it")
    if sub_cls is None or not isinstance(d.get(k), dict):
        raise ConfigError(f"override {full}: {keys[1]!r} is below a non-config value")
    _set_path(sub_cls, d[k], keys[1:], value, full)


def load_config(path: str | Path, cls, overrides=()):
    """Reads a YAML file into ``cls`` and applies overrides; errors name the file."""
    path = Path(path)
    try:
        raw = load_yaml(path.read_text())
        raw = {} if raw is None else raw     # an empty file: the defaults (but not a file holding 0)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    try:
        cfg = from_dict(cls, raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e
    return apply_overrides(cfg, list(overrides))


def save_config(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False))


# ``dataclasses.field(metadata=HASH_OMIT_DEFAULT)``: a field added after configs were hashed, left
# out of ``config_hash`` while it holds its default, so that existing hashes do not change
HASH_OMIT_DEFAULT = {"hash_omit_default": True}


def _hash_dict(v):
    """``to_dict`` less the ``HASH_OMIT_DEFAULT`` fields that hold their default."""
    if dataclasses.is_dataclass(v):
        out = {}
        for f in dataclasses.fields(v):
            x = getattr(v, f.name)
            if f.metadata.get("hash_omit_default") and f.default is not dataclasses.MISSING and x == f.default:
                continue
            out[f.name] = _hash_dict(x)
        return out
    if isinstance(v, (list, tuple)):
        return [_hash_dict(x) for x in v]
    if isinstance(v, dict):
        return {k: _hash_dict(x) for k, x in v.items()}
    return v


def config_hash(cfg) -> str:
    """A stable short hash of a config (for caches keyed by configuration). Fields marked
    ``HASH_OMIT_DEFAULT`` count only when they differ from their default."""
    blob = json.dumps(_hash_dict(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def apply_updates(cfg, *updates: dict):
    """Applies ``{"a.b.c": value}`` dicts (already-parsed values) to a frozen config, one dict
    after the other and all of them before the result is validated (see ``apply_overrides``).

    A mapping value for a sub-config merges into it, recursively: ``{"train.optim": {"lr": 0.1}}``
    sets only ``lr`` and keeps the other fields, as ``{"train.optim.lr": 0.1}`` does. A config
    instance (``{"train.optim": OptimConfig(lr=0.1)}``) replaces the whole sub-config. Values of
    other fields, ``dict``-typed ones included, replace the old value."""
    items = [(k.strip(), v) for u in updates for k, v in u.items()]
    if not items:
        return cfg
    cls, d = type(cfg), to_dict(cfg)
    for key, value in items:
        _set_path(cls, d, key.split("."), value, key)
    try:
        return from_dict(cls, d)
    except ConfigError as e:
        raise ConfigError(f"override {', '.join(dict.fromkeys(k for k, _ in items))}: {e}") from e


__all__ = [
    "ConfigError", "from_dict", "to_dict", "apply_overrides", "load_config", "save_config",
    "config_hash", "apply_updates", "parse_overrides",
]
