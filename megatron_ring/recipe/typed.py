"""Plain dicts -> typed dataclasses, with every error naming the key path and where it was set.

The schema is the dataclasses themselves (Megatron's way: configs are dataclasses); this module
only walks their type hints, so a new field needs no second declaration anywhere. A dataclass
may name keys that moved elsewhere in a class attribute `MOVED` ({old key: new key path}): a
recipe still using one is told where it went.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing


_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class RecipeError(ValueError):
    """A recipe that cannot run: the message names the file and the key path."""


class FieldError(ValueError):
    """A schema dataclass's own check (__post_init__) that failed on some of its keys (paths
    relative to it): the error is blamed on what set each key (a file, the command line, or the
    default), not on the file that happened to open the section."""

    def __init__(self, message: str, *keys: str):
        super().__init__(message)
        self.keys = keys


def _where(path: str, origin: dict[str, str]) -> str:
    """The file (or 'command line') that set this key or its nearest parent."""
    key = path
    while key:
        if key in origin:
            return origin[key]
        key = key.rpartition(".")[0]
    return origin.get("", "recipe")


def _fail(path: str, origin: dict, message: str):
    raise RecipeError(f"{_where(path, origin)}: {path}: {message}")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def convert(tp, value, path: str, origin: dict):
    """Check and convert one value against a type hint."""
    origin_tp = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin_tp in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return convert(inner[0], value, path, origin)
    if origin_tp is typing.Literal:
        if value not in args:
            _fail(path, origin, f"must be one of {list(args)}, got {value!r}")
        return value
    if origin_tp is list:
        if not isinstance(value, list):
            _fail(path, origin, f"expected a list, got {type(value).__name__} {value!r}")
        return [convert(args[0], v, f"{path}[{i}]", origin) for i, v in enumerate(value)]
    if origin_tp is dict:
        if not isinstance(value, dict):
            _fail(path, origin, f"expected a mapping, got {type(value).__name__}")
        return {str(k): convert(args[1], v, f"{path}.{k}", origin) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path, origin)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _FLOAT.match(value.strip()):
        return float(value)  # YAML 1.1 reads 3e-4 (no dot) as a string
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        _fail(path, origin, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def build(cls, data, path: str, origin: dict):
    """A dataclass from a mapping: unknown keys and wrong types are errors, missing keys take
    the field's default (a field without one is required)."""
    if not isinstance(data, dict):
        _fail(path or "(top)", origin, f"expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    moved = getattr(cls, "MOVED", {})  # old key -> its key path now, for recipes written before
    for key in data:
        if key in moved:
            _fail(_join(path, key), origin, f"unknown key: it moved to {moved[key]}")
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields) + list(moved), n=1)
            hint = (f"; known keys: {sorted(fields)}" if not close else
                    f" (did you mean {close[0]!r}?)" if close[0] in fields else
                    f" (did you mean {close[0]!r}? it moved to {moved[close[0]]})")
            _fail(_join(path, key), origin, f"unknown key{hint}")
    kwargs = {}
    for name, field in fields.items():
        sub = _join(path, name)
        if name in data:
            kwargs[name] = convert(hints[name], data[name], sub, origin)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            _fail(sub, origin, "required key is missing")
    try:
        obj = cls(**kwargs)
    except FieldError as e:
        raise RecipeError(f"{_blame(path, e.keys, data, origin)}: {e}") from None
    except (ValueError, TypeError) as e:  # a check that names no key: blamed on the section
        _fail(path or "(top)", origin, str(e))
    return obj


def _blame(path: str, keys, data: dict, origin: dict) -> str:
    """'SOURCE: key, key; SOURCE: key' for the keys of one check, grouped by what set them."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        value, found = data, True
        for part in key.split("."):
            found = isinstance(value, dict) and part in value
            if not found:
                break
            value = value[part]
        full = _join(path, key)
        groups.setdefault(_where(full, origin) if found else "default", []).append(full)
    return "; ".join(f"{where}: {', '.join(ks)}" for where, ks in groups.items())


def _join(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)
