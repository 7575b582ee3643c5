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
import re
import zlib
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
# Characters no prompt or answer contains on purpose (NUL, the C0 and C1 controls, DEL), but a damaged export
# does; tab, newline and carriage return are text.
_CONTROL_CHARACTER = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


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
        control = _CONTROL_CHARACTER.search(value)
        if control:
            code, at = ord(control.group()), control.start() + 1
            raise BadRow(f"control character: U+{code:04X} in field '{name}' at character {at}")
        limit = cfg.max_prompt_chars if name == "prompt" else cfg.max_response_chars
        if len(value) > limit:
            limit_key = "max_prompt_chars" if name == "prompt" else "max_response_chars"
            raise BadRow(f"over-long field '{name}': {len(value)} characters > data.{limit_key}={limit}")
    if kind == "rm" and obj["chosen"].strip() == obj["rejected"].strip():
        raise BadRow("identical chosen and rejected responses")
    return obj


def iter_json_lines(path: str | Path, bad: BadRowLog) -> Iterator[tuple[int, object]]:
    """Yield ``(line_number, parsed_object)`` for every non-blank line; a line that is not UTF-8 or not JSON goes
    to ``bad`` (so ``on_bad_rows=skip`` can drop it); a damaged file is one DataError naming the last good line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    lineno = 0
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb") as handle:
            for lineno, raw in enumerate(handle, start=1):
                parsed = _parse_line(raw, lineno == 1, f"{path}:{lineno}", bad)
                if parsed is not _BLANK:
                    yield lineno, parsed
    except (OSError, EOFError, zlib.error) as exc:
        # gzip: a truncated file raises EOFError, a corrupt one BadGzipFile (an OSError) or zlib.error.
        raise DataError(
            f"{path}: cannot read past line {lineno}: {exc}. The file is truncated or damaged; copy or "
            "download it again"
        ) from None


_BLANK = object()


def _parse_line(raw: bytes, first: bool, where: str, bad: BadRowLog):
    """One line's JSON value, ``_BLANK`` for a blank line, or ``_BLANK`` after reporting a bad one."""
    try:
        line = raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as exc:
        bad.report(where, f"not UTF-8: byte 0x{raw[exc.start]:02x} at column {exc.start + 1}")
        return _BLANK
    if not line.strip():
        return _BLANK
    try:
        return json.loads(line.rstrip("\r\n"))
    except json.JSONDecodeError as exc:
        bad.report(where, f"bad JSON: {exc.msg} at column {exc.colno}")
        return _BLANK


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
