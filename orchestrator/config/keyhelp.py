"""`--help` text from the schema itself: every key, its default and the docstring written under it."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from typing import Any


def _attribute_docs(cls: type) -> dict[str, str]:
    """The string literal under each annotated attribute of a dataclass (its documentation)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return "???"


def key_lines(cls: type, prefix: str = "", width: int = 110) -> list[str]:
    """`key = default` and its meaning, one entry per leaf key (nested dataclasses as dotted keys)."""
    docs = _attribute_docs(cls)
    out: list[str] = []
    for f in dataclasses.fields(cls):
        value = _default(f)
        if dataclasses.is_dataclass(value):
            out += key_lines(type(value), f"{prefix}{f.name}.", width)
            continue
        out.append(f"  {prefix}{f.name} = {value!r}")
        if f.name in docs:
            out += textwrap.wrap(docs[f.name], width, initial_indent="      ", subsequent_indent="      ")
    return out
