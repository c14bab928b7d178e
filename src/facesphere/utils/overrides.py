"""``key=value`` overrides from the command line (``--set``), parsed one way for configs and protocol options.

Values are YAML (``load_yaml``) with numbers as people write them: PyYAML follows YAML 1.1, which reads
``1e-3`` (no dot) as text; here it is a float, as in YAML 1.2. Quoted text stays text (``name="2024"``).
``format_value`` writes a value so that ``parse_value`` reads it back unchanged.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import yaml


class _Loader(yaml.SafeLoader):
    """SafeLoader that also resolves plain ``1e3`` / ``1.5E-3`` / ``.5e1`` scalars as floats (YAML 1.2)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
                              list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with YAML 1.2 exponent floats (``1e-3`` is 0.001, not text); raises ``yaml.YAMLError``."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:  # deeply nested flow collections
        raise yaml.YAMLError("nested too deeply") from None


def parse_value(raw: str) -> Any:
    """A value as YAML (numbers, booleans, lists, null); text that is not YAML stays text."""
    try:
        return load_yaml(raw)
    except yaml.YAMLError:
        return raw


def format_value(value: Any) -> str:
    """``value`` (None, bool, int, float, str or a list of them) as ``--set`` text that ``parse_value`` reads back
    equal: plain where that is unambiguous, else quoted."""
    if isinstance(value, float):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf") if math.isinf(value) else repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(format_value(v) if not isinstance(v, str) else _quoted(v) for v in value) + "]"
    if isinstance(value, str):
        return value if value.strip() == value and _is_plain(value) else _quoted(value)
    return json.dumps(value)  # None, bool, int


def _quoted(text: str) -> str:
    """A YAML double-quoted scalar: characters YAML may not carry literally (controls, C1, U+FFFE/F) escaped as
    ``\\uXXXX``; others kept as they are (JSON's surrogate-pair escapes would not read back in YAML)."""
    out = []
    for char in text:
        code = ord(char)
        if char in '"\\':
            out.append("\\" + char)
        elif 0x20 <= code <= 0x7E or 0xA0 <= code <= 0xD7FF or 0xE000 <= code <= 0xFFFD or code >= 0x10000:
            out.append(char)
        else:
            out.append(f"\\u{code:04x}")
    return '"' + "".join(out) + '"'


def _is_plain(text: str) -> bool:
    try:
        return load_yaml(text) == text
    except yaml.YAMLError:
        return False


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
    """Apply ``a.b.c=value`` items to a nested mapping in place (sections created as needed); returns it.

    A part that is a number indexes an existing list (``objectives.0.args.teacher=models/y1``)."""
    for item in items:
        parts, value = parse_override(item)
        node: Any = data
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not (part.isdigit() and int(part) < len(node)):
                    raise ValueError(f"--set {item!r}: {'.'.join(parts[:depth]) or 'the top level'} is a list of "
                                     f"{len(node)}; {part!r} is not an index into it")
                part = int(part)
            elif not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: {parts[depth - 1]!r} is not a section")
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {}) if isinstance(node, dict) else node[part]
    return data
