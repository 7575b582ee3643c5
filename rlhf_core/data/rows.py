"""Row schemas, validation and JSONL reading with ``file:line`` errors.

Three row kinds flow through the pipeline:

- ``sft``: ``{prompt, response}`` (a demonstration)
- ``rm``: ``{prompt, chosen, rejected}`` (a preference pair; chosen and rejected must differ)
- ``prompt``: ``{prompt}`` (PPO and evaluation prompts)

Extra keys (``category`` and the like) are kept. A malformed row either stops the stage with
``file:line: what is wrong`` or, with ``data.on_bad_rows: skip``, is dropped and counted in ``stats.json``.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rlhf_core.config import DataConfig
from rlhf_core.errors import DataError

ROW_FIELDS = {
    "sft": ("prompt", "response"),
    "rm": ("prompt", "chosen", "rejected"),
    "prompt": ("prompt",),
}
SPLIT_KINDS = {
    "sft_train": "sft",
    "sft_val": "sft",
    "rm_train": "rm",
    "rm_test": "rm",
    "ppo": "prompt",
    "eval": "prompt",
}
RESPONSE_FIELDS = ("response", "chosen", "rejected")


class BadRow(ValueError):
    """One row is malformed; the message says what is wrong (the caller adds file:line)."""


@dataclass
class BadRowLog:
    """Applies ``data.on_bad_rows``: raise at the first bad row, or count and keep going."""

    mode: str
    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def report(self, where: str, reason: str) -> None:
        if self.mode == "error":
            raise DataError(f"{where}: {reason} (fix the row, or set data.on_bad_rows=skip to drop such rows)")
        self.counts[reason.split(":")[0]] += 1
        if len(self.examples) < 20:
            self.examples.append(f"{where}: {reason}")

    def as_stats(self) -> dict:
        return {"total": sum(self.counts.values()), "by_reason": dict(self.counts), "examples": self.examples}


def validate_row(obj, kind: str, cfg: DataConfig) -> dict:
    """Return the row if it is well formed for ``kind``; raise :class:`BadRow` saying what is wrong."""
    if not isinstance(obj, dict):
        raise BadRow(f"expected a JSON object, got {type(obj).__name__}")
    for name in ROW_FIELDS[kind]:
        if name not in obj:
            raise BadRow(f"missing field '{name}' (a {kind} row needs {', '.join(ROW_FIELDS[kind])})")
        value = obj[name]
        if not isinstance(value, str):
            raise BadRow(f"field '{name}' must be a string, got {type(value).__name__}")
        if not value.strip():
            raise BadRow(f"empty field '{name}'")
        limit = cfg.max_prompt_chars if name == "prompt" else cfg.max_response_chars
        if len(value) > limit:
            limit_key = "max_prompt_chars" if name == "prompt" else "max_response_chars"
            raise BadRow(f"over-long field '{name}': {len(value)} characters > data.{limit_key}={limit}")
    if kind == "rm" and obj["chosen"].strip() == obj["rejected"].strip():
        raise BadRow("identical chosen and rejected responses")
    return obj


def open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")


def iter_json_lines(path: str | Path, bad: BadRowLog) -> Iterator[tuple[int, object]]:
    """Yield ``(line_number, parsed_object)`` for every non-blank line; bad JSON goes to ``bad``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        with open_text(path) as handle:
            for lineno, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as exc:
                    bad.report(f"{path}:{lineno}", f"bad JSON: {exc.msg} at column {exc.colno}")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from None


def read_rows(path: str | Path, kind: str, cfg: DataConfig, bad: BadRowLog) -> list[dict]:
    """Read and validate a JSONL(.gz) file of ``kind`` rows; each row remembers its ``file:line``."""
    rows = []
    for lineno, obj in iter_json_lines(path, bad):
        try:
            row = validate_row(obj, kind, cfg)
        except BadRow as exc:
            bad.report(f"{path}:{lineno}", str(exc))
            continue
        rows.append({**row, "_src": f"{path}:{lineno}"})
    return rows


def load_split(data_dir: str | Path, split: str, cfg: DataConfig) -> list[dict]:
    """Read one prepared split (``<data>/splits/<split>.jsonl``); malformed rows always stop the stage."""
    path = Path(data_dir) / "splits" / f"{split}.jsonl"
    if not path.is_file():
        raise DataError(f"split file not found: {path} (run `rlhf prepare` first)")
    rows = read_rows(path, SPLIT_KINDS[split], cfg, BadRowLog("error"))
    if not rows:
        raise DataError(f"{path}: the split '{split}' is empty")
    return rows
