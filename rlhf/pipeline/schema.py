"""Build typed config dataclasses from YAML mappings, with errors that name the file and the key.

Written by hand because the pipeline needs three things at once that no small library gives:
unknown keys refused with their dotted path, string overrides (`sft.learning_rate=1e-4`) coerced
to the field's type, and nested dataclasses with a string shorthand (`dataset: path.jsonl`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union

import yaml

from rlhf.errors import ConfigError


def build(cls: type, data: Any, *, where: str, path: str = "") -> Any:
    """Make an instance of dataclass `cls` from `data`; `where` names the source for errors."""
    shorthand = getattr(cls, "SHORTHAND", None)
    if shorthand and isinstance(data, str):
        data = {shorthand: data}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: '{path or 'top level'}' must be a mapping of keys to values, "
                          f"got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        known = ", ".join(sorted(fields))
        raise ConfigError(f"{where}: unknown key '{_join(path, str(unknown[0]))}' (known keys here: {known})")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, where=where, path=_join(path, name))
    missing = [n for n, f in fields.items() if n not in kwargs and _required(f)]
    if missing:
        raise ConfigError(f"{where}: missing required key '{_join(path, missing[0])}'")
    instance = cls(**kwargs)
    check = getattr(instance, "validate", None)
    if check is not None:
        check(where=where, path=path)
    return instance


def _required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _coerce(hint: Any, value: Any, *, where: str, path: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(option, value, where=where, path=path)
            except ConfigError as err:
                errors.append(err)
        raise errors[-1]
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: '{path}' must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin is list:
        if isinstance(value, str):  # `key=a,b` on the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: '{path}' must be a list, got {value!r}")
        return [_coerce(args[0], v, where=where, path=f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{path}' must be a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where=where, path=path)
    if hint is Any:
        return value
    return _scalar(hint, value, where=where, path=path)


def _scalar(hint: type, value: Any, *, where: str, path: str) -> Any:
    expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[hint]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{where}: '{path}' must be {expected}; got {value!r}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`sft.learning_rate=1e-4` -> (['sft', 'learning_rate'], '1e-4' parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' must look like key=value, e.g. sft.learning_rate=1e-4")
    parts = key.strip().split(".")
    if any(not p for p in parts):
        raise ConfigError(f"override '{text}': empty key part in '{key}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_override(data: dict, parts: list[str], value: Any) -> None:
    """Set `data[parts[0]][parts[1]]... = value`, making mappings on the way."""
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if isinstance(child, str):  # a shorthand (dataset: path) being refined (dataset.split=test)
            child = {"path": child}
        if not isinstance(child, dict):
            child = {}
        node[part] = child
        node = child
    node[parts[-1]] = value


def as_plain(instance: Any) -> Any:
    """A dataclass as JSON-able data (for hashing, the registry and logs)."""
    return dataclasses.asdict(instance) if dataclasses.is_dataclass(instance) else instance
