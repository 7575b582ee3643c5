"""``params.yaml`` kept complete from the schema without losing what people wrote in it.

The file is written by hand: its order, blank lines and comments (which cite the paper and its released code) are
worth keeping, so it is not regenerated wholesale. What ``make generated`` (``python -m rlhf_core.params_file``)
does is add every schema key the file lacks, at the end of its group, with its default and its description as the
comment: a new field or a new stage's ``paths`` entry appears in the file by itself. Every existing line stays as it
is; a test fails when the file lacks a key (run ``make generated``), and another when a value differs from the
schema's default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel

from rlhf_core.config import Config
from rlhf_core.config.loading import _as_set_value
from rlhf_core.io import atomic_write_text

PATH = Path(__file__).resolve().parents[1] / "params.yaml"
INDENT = "  "
_KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][A-Za-z0-9_]*):")


@dataclass
class _Node:
    key: str
    lines: list[str]  # its own line and the comment or blank lines after it, up to the next key
    children: list[_Node] = field(default_factory=list)


def _parse(text: str) -> tuple[list[str], list[_Node]]:
    """The lines before the first key, and the keys as a tree in file order (nesting by indentation)."""
    head: list[str] = []
    roots: list[_Node] = []
    stack: list[tuple[int, _Node]] = []
    last: _Node | None = None
    for line in text.splitlines():
        match = _KEY_LINE.match(line)
        if match is None:
            (last.lines if last else head).append(line)
            continue
        depth = len(match["indent"]) // len(INDENT)
        node = _Node(match["key"], [line])
        while stack and stack[-1][0] >= depth:
            stack.pop()
        (stack[-1][1].children if stack else roots).append(node)
        stack.append((depth, node))
        last = node
    return head, roots


def _new_lines(name: str, value, description: str, depth: int) -> list[str]:
    """A key the file lacks: a group with all its fields, or one field with its default and description."""
    indent = INDENT * depth
    if isinstance(value, BaseModel):
        lines = [f"{indent}{name}:" + (f"  # {description}" if description else "")]
        for child, spec in type(value).model_fields.items():
            lines += _new_lines(child, getattr(value, child), spec.description or "", depth + 1)
        return lines
    return [f"{indent}{name}: {_as_set_value(value)}" + (f"  # {description}" if description else "")]


def _emit(nodes: list[_Node], model: BaseModel, depth: int) -> list[str]:
    out: list[str] = []
    present = {node.key for node in nodes}
    for node in nodes:
        value = getattr(model, node.key, None)
        # A group's own lines (its key, then any comment before its first field) come before its fields.
        out += node.lines
        if isinstance(value, BaseModel):
            out += _emit(node.children, value, depth + 1)
    missing = [name for name in type(model).model_fields if name not in present]
    if missing:
        trailing = []  # keep the blank lines that end the group after the added keys
        while out and not out[-1].strip():
            trailing.insert(0, out.pop())
        for name in missing:
            out += _new_lines(name, getattr(model, name), type(model).model_fields[name].description or "", depth)
        out += trailing
    return out


def render(text: str | None = None) -> str:
    """``params.yaml``'s text (default: the project's) with every schema key it lacks added to its group."""
    text = PATH.read_text() if text is None else text
    head, roots = _parse(text)
    return "\n".join([*head, *_emit(roots, Config(), 0)]) + "\n"


def write(path: Path = PATH) -> None:
    atomic_write_text(path, render(path.read_text()))


if __name__ == "__main__":
    write()
