"""docs/reference/configuration.md, generated from the configuration schema: every key with its default and its
description, as ``rlhf config --markdown`` prints them. ``python -m rlhf_core.reference`` (``make generated``)
writes it; a test fails when the page differs."""

from __future__ import annotations

from pathlib import Path

from rlhf_core.config import Config, describe_config
from rlhf_core.io import atomic_write_text

PAGE = Path(__file__).resolve().parents[1] / "docs" / "reference" / "configuration.md"
HEADER = """\
# Configuration reference

Every key of `params.yaml` (and of `--set group.key=value`) with its default and what it does, generated from the
schema (`rlhf_core/config/schema.py`) by `make generated` (the same table as `rlhf config --markdown`); a test
fails when this page differs, and another when `params.yaml` does not hold exactly these defaults. A
`ppo.tricks.*` switch left `null` shows the value the default preset resolves it to.

"""


def config_markdown(rows: list[tuple[str, str, str]]) -> str:
    """``rlhf config``'s rows as one markdown table per top-level group."""
    out, group = [], None
    for key, value, description in rows:
        if key.split(".")[0] != group:
            group = key.split(".")[0]
            out += ["", f"## `{group}`", "", "| key | default | what it does |", "| --- | --- | --- |"]
        cell, text = value.replace("|", "\\|"), description.replace("|", "\\|")
        out.append(f"| `{key}` | `{cell}` | {text} |")
    return "\n".join(out).lstrip("\n") + "\n"


def render() -> str:
    return HEADER + config_markdown(describe_config(Config()))


def write(path: Path = PAGE) -> None:
    atomic_write_text(path, render())


if __name__ == "__main__":
    write()
