"""Typed configuration for the command-line entry points.

Precedence: dataclass defaults < ``configs/*.yaml`` preset (its ``engine:`` section) < ``key=value``
on the command line. `describe` prints every field with its one-line docstring.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import logging
import textwrap
import types
import typing
from typing import Any, TypeVar

__all__ = ["parse_overrides", "build_config", "describe", "field_docs"]

T = TypeVar("T")

log = logging.getLogger("eet_pipe")


def parse_overrides(args: list[str]) -> dict[str, str]:
    """['a=1', 'b=x'] -> {'a': '1', 'b': 'x'}; anything without '=' is an error."""
    out = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise ValueError(f"argument {arg!r} is not key=value")
        out[key.strip().replace("-", "_")] = value
    return out


def field_docs(cls: type) -> dict[str, str]:
    """The one-line docstring under each dataclass field, read from the sources of the class and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        docs.update(_own_field_docs(klass))
    if dataclasses.is_dataclass(cls):  # fields declared elsewhere carry their docstring in metadata["doc"]
        docs.update({f.name: f.metadata["doc"] for f in dataclasses.fields(cls) if "doc" in f.metadata})
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            docs[node.target.id] = nxt.value.value.strip().splitlines()[0]
    return docs


def _convert(name: str, raw: Any, annotation: Any) -> Any:
    if not isinstance(raw, str):
        return raw
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin in (typing.Union, types.UnionType):
        if raw.lower() in ("none", "null", ""):
            return None
        return _convert(name, raw, args[0])
    if origin is list:
        return [] if raw == "" else [_convert(name, part, args[0] if args else str) for part in raw.split(",")]
    try:
        if annotation is bool:
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes", "on")
        if annotation in (int, float):
            return annotation(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a valid {annotation.__name__}") from None
    return raw


def build_config(cls: type[T], *layers: dict[str, Any]) -> T:
    """Instantiate dataclass `cls` from defaults overlaid by each dict in `layers` (later wins).

    A key of `cls.RENAMED` (old -> (new, warning)) is read as its new key, with the warning logged."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    renamed: dict[str, tuple[str, str]] = getattr(cls, "RENAMED", {})
    values: dict[str, Any] = {}
    for layer in layers:
        for key, raw in layer.items():
            if key in renamed and key not in fields:
                key, warning = renamed[key]
                log.warning(warning)
            if key not in fields:
                raise ValueError(f"unknown option {key!r}; allowed: {', '.join(sorted(fields))}")
            values[key] = _convert(key, raw, hints[key])
    return cls(**values)


def describe(cls: type) -> str:
    """Every field: name, type, default and docstring, one per line."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "")
        kind = getattr(hints[f.name], "__name__", str(hints[f.name]).replace("typing.", ""))
        lines.append(f"  {f.name}={default!s:<12} ({kind}) {docs.get(f.name, '')}")
    return "\n".join(lines)
