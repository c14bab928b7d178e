"""``key=value`` overrides from the command line (``--set``), parsed one way for configs and protocol options."""

from __future__ import annotations

import re
from typing import Any

import yaml

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_INTEGER = re.compile(r"^[+-]?\d+$")


def _coerce(value: Any) -> Any:
    """YAML 1.1 leaves '1e-3' a string; make numeric-looking strings numbers, recursively."""
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        return int(value) if _INTEGER.match(value.strip()) else float(value)
    if isinstance(value, list):
        return [_coerce(v) for v in value]
    if isinstance(value, dict):
        return {k: _coerce(v) for k, v in value.items()}
    return value


def parse_value(raw: str) -> Any:
    """A value as YAML (numbers, booleans, lists, null); text that is not YAML stays text."""
    try:
        return _coerce(yaml.safe_load(raw))
    except yaml.YAMLError:
        return raw


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"a.b.c=value"`` -> (``["a", "b", "c"]``, parsed value); ValueError naming the item otherwise."""
    key, sep, raw = item.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not sep or not parts:
        raise ValueError(f"--set {item!r} must look like key=value")
    return parts, parse_value(raw)


def parse_options(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["key=value", ...]`` -> a flat dict (dotted keys kept whole)."""
    options: dict[str, Any] = {}
    for item in items:
        parts, value = parse_override(item)
        options[".".join(parts)] = value
    return options


def apply_overrides(data: dict[str, Any], items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` items to a nested mapping in place (sections created as needed); returns it."""
    for item in items:
        parts, value = parse_override(item)
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"--set {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return data
