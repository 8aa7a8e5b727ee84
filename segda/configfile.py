"""The mechanics of typed configs, for any tree of dataclasses: read YAML safely, build the tree from a mapping,
apply `a.b=value` overrides, coerce each value to its field's type. `segda.config` holds the fields themselves.

A field's type decides how its value is read: bool, int, float (finite), str, list[T], dict, T | None, or a type
with a `parse(value, what)` classmethod (sizes). Every error names the file or flag and the key, and says what is
allowed. Hostile files cost bounded work: at most MAX_BYTES bytes, MAX_ALIASES YAML aliases, MAX_NODES values.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path

import yaml

from segda.log import SegdaError

MAX_BYTES = 1 << 20
"""A config or id map larger than this is refused unread (recipes are a few kilobytes)."""
MAX_ALIASES = 64
MAX_NODES = 100_000
"""YAML aliases and values per file: an alias bomb (a kilobyte that expands to billions of values) is refused."""


def read_yaml(path: str | Path, what: str = "config file"):
    """The YAML document at `path`: UTF-8, bounded in size, aliases and values; SegdaError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise SegdaError(f"{what} {path} does not exist")
    if path.stat().st_size > MAX_BYTES:
        raise SegdaError(f"{what} {path} is {path.stat().st_size:,} bytes, more than {MAX_BYTES:,}: is it the right "
                         "file?")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise SegdaError(f"{what} {path} is not UTF-8 text ({err.reason} at byte {err.start}): save it as UTF-8") \
            from None
    return parse_yaml(text, str(path))


def parse_yaml(text: str, source: str):
    try:
        nodes = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        raise SegdaError(f"{source} is not valid YAML: {err}") from err
    _check_size(nodes, source)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SegdaError(f"{source} is not valid YAML: {err}") from err


def _check_size(root, source: str) -> None:
    """Count the values the document expands to, following aliases (shared nodes) without expanding them."""
    if root is None:
        return
    aliases, seen, memo = 0, set(), {}

    def expanded(node) -> int:
        nonlocal aliases
        if id(node) in memo:
            aliases += 1
            if aliases > MAX_ALIASES:
                raise SegdaError(f"{source} uses more than {MAX_ALIASES} YAML aliases: write the values out")
            return memo[id(node)]
        if id(node) in seen:  # a node inside itself
            raise SegdaError(f"{source}: a YAML alias refers to itself")
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            count = 1 + sum(expanded(k) + expanded(v) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            count = 1 + sum(expanded(v) for v in node.value)
        else:
            count = 1
        memo[id(node)] = count
        if count > MAX_NODES:
            raise SegdaError(f"{source} expands to more than {MAX_NODES:,} values (YAML aliases?): refused")
        return count

    expanded(root)


def build(cls, raw: dict, prefix: str, source: str):
    """An instance of dataclass `cls` from the mapping `raw` (nested dataclasses from nested mappings)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise SegdaError(f"{source}: unknown config key {dotted!r}{suggest(key, names, prefix)}")
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, dict):
                raise SegdaError(f"{source}: {dotted!r} must be a mapping of its fields")
            kwargs[key] = build(hints[key], value, dotted + ".", source)
        else:
            kwargs[key] = coerce(value, hints[key], dotted, source)
    return cls(**kwargs)


def apply_override(root, item: str) -> None:
    """`dotted.key=value` onto the dataclass tree `root`; the value is read as YAML (strings stay strings)."""
    if "=" not in item:
        raise SegdaError(f"--set {item!r}: expected dotted.key=value, e.g. train.max_steps=1000")
    dotted, text = item.split("=", 1)
    parts = dotted.strip().split(".")
    target = root
    for depth, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(target)]
        prefix = ".".join(parts[:depth]) + ("." if depth else "")
        if part not in names:
            raise SegdaError(f"--set: unknown config key {dotted!r}{suggest(part, names, prefix)}")
        if depth == len(parts) - 1:
            hint = typing.get_type_hints(type(target))[part]
            if dataclasses.is_dataclass(hint):
                raise SegdaError(f"--set: {dotted!r} is a section; set one of its fields, e.g. {dotted}.<field>=...")
            setattr(target, part, coerce(_parse_value(text, hint, dotted), hint, dotted, "--set"))
        else:
            target = getattr(target, part)


def _parse_value(text: str, hint, dotted: str):
    if hint is str or hasattr(hint, "parse") and not text.strip().startswith("["):
        return text  # a path like 007 or true stays a string; YAML would read the size 0x10 as 16
    if len(text) > MAX_BYTES:
        raise SegdaError(f"--set {dotted}: a value of {len(text):,} characters is refused")
    return parse_yaml(text, f"--set {dotted}")


def coerce(value, hint, dotted: str, source: str):
    """`value` as a `hint`; SegdaError naming the key otherwise."""
    where = f"--set {dotted}" if source == "--set" else f"{source}: {dotted}"
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        if value is None or value == "":
            return None
        (hint,) = [a for a in args if a is not type(None)]
    if hasattr(hint, "parse"):
        return hint.parse(value, where)
    origin = typing.get_origin(hint) or hint
    if origin is str:
        if value is None:
            return ""
        _require(isinstance(value, str), where, hint, value)
        return value
    if origin is bool:
        _require(isinstance(value, bool), where, hint, value)
        return value
    if origin is int:
        _require(isinstance(value, int) and not isinstance(value, bool), where, hint, value)
        return value
    if origin is float:
        return _float(value, where, hint)
    if origin is list:
        _require(isinstance(value, list), where, hint, value)
        (item,) = typing.get_args(hint) or (object,)
        if item is float:
            return [_float(v, where, hint) for v in value]
        _require(item is object or all(isinstance(v, item) and not isinstance(v, bool) for v in value), where,
                 hint, value)
        return list(value)
    if origin is dict:
        _require(isinstance(value, dict), where, hint, value)
        return value
    return value


def _float(value, where: str, hint) -> float:
    if isinstance(value, str):  # YAML 1.1 reads 6e-5 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    _require(isinstance(value, (int, float)) and not isinstance(value, bool), where, hint, value)
    if not math.isfinite(value):
        raise SegdaError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def _require(ok: bool, where: str, hint, value) -> None:
    if not ok:
        raise SegdaError(f"{where} must be {type_name(hint)}, got {value!r}")


def type_name(hint) -> str:
    return getattr(hint, "__name__", None) if typing.get_origin(hint) is None else str(hint).replace("typing.", "")


def suggest(key: str, names: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"; did you mean {prefix + close[0]!r}?" if close else ""
    return f"{hint} (allowed: {', '.join(prefix + n for n in names)})"


def check(ok: bool, key: str, rule: str) -> None:
    """The one form of a validation error: the key, then what it must be."""
    if not ok:
        raise SegdaError(f"config key {key} {rule}")
