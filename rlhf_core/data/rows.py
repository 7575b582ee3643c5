"""Row shapes, validation and reading with ``file:line`` (or ``file row N``) errors.

Three row kinds flow through the pipeline, each kept in one form in the prepared splits:

- ``sft``: ``{prompt, response}`` (a demonstration)
- ``rm``: ``{prompt, chosen, rejected}`` (a preference pair; chosen and rejected must differ)
- ``prompt``: ``{prompt}`` (PPO and evaluation prompts)

A prompt is text or a list of ``{role, content}`` messages; a response is text (``data.conversations``). Files may
hold the shapes TRL, OpenRLHF and verl use, with their columns named in ``data.columns``:

- sft: ``{prompt, response}``, ``{prompt, completion}`` or ``{messages}`` ending with the assistant's answer;
- rm: ``{prompt, chosen, rejected}`` (explicit prompt), or ``{chosen, rejected}`` with the prompt inside both
  (implicit prompt: two conversations, or two HH-RLHF transcripts, that differ only in the last answer);
- prompt: ``{prompt}``, or ``{messages}`` ending with a user turn.

Extra keys (``category`` and the like) are kept. A malformed row either stops the stage with
``file:line: what is wrong`` or, with ``data.on_bad_rows: skip``, is dropped and counted in ``stats.json``.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from rlhf_core.config import DataColumns, DataConfig
from rlhf_core.data.conversations import (
    as_prompt,
    check_messages,
    is_conversation,
    prompt_of,
    response_of,
    split_conversation,
    split_implicit_pair,
)
from rlhf_core.data.files import iter_records
from rlhf_core.data.transcripts import history_messages, split_transcript
from rlhf_core.errors import BadRow, DataError

__all__ = ["BadRow", "BadRowLog", "load_split", "prompt_key", "read_rows", "validate_row"]

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
# The column names of the prepared splits (and the defaults of data.columns).
PREPARED_COLUMNS = DataColumns()
# Characters no prompt or answer contains on purpose (NUL, the C0 and C1 controls, DEL), but a damaged export
# does; tab, newline and carriage return are text.
_CONTROL_CHARACTER = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_JSON_TYPES = {type(None): "null", bool: "boolean", int: "number", float: "number", dict: "object", list: "list"}


@dataclass
class BadRowLog:
    """Applies ``data.on_bad_rows``: raise at the first bad row, or count and keep going (per reason and file)."""

    mode: str
    counts: Counter = field(default_factory=Counter)
    by_file: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    examples: list[str] = field(default_factory=list)
    rows_read: Counter = field(default_factory=Counter)  # per file: every row, good or bad

    def reader(self, path) -> tuple:
        """``(report, count)`` for reading ``path``: ``report`` files a row error under it, ``count()`` is how
        many rows the file held once it is read (call ``count(n)`` with the records it yielded)."""
        file, errors = str(path), [0]

        def report(where: str, reason: str) -> None:
            errors[0] += 1
            self.report(where, reason, file=file)

        def count(records: int) -> None:
            self.rows_read[file] += records + errors[0]

        return report, count

    def report(self, where: str, reason: str, file: str | None = None) -> None:
        if self.mode == "error":
            raise DataError(f"{where}: {reason} (fix the row, or set data.on_bad_rows=skip to drop such rows)")
        kind = reason.split(":")[0]
        self.counts[kind] += 1
        self.by_file[file or _file_of(where)][kind] += 1
        if len(self.examples) < 20:
            self.examples.append(f"{where}: {reason}")

    def as_stats(self) -> dict:
        return {
            "total": sum(self.counts.values()),
            "by_reason": dict(self.counts),
            "by_file": {name: dict(counts) for name, counts in self.by_file.items()},
            "examples": self.examples,
        }


def _file_of(where: str) -> str:
    """The file part of ``file:line`` or ``file row N``."""
    if " row " in where:
        return where.rsplit(" row ", 1)[0]
    head, _, tail = where.rpartition(":")
    return head if tail.isdigit() else where


def prompt_key(prompt) -> str:
    """A prompt as one string, to group rows by prompt and keep splits disjoint (messages as canonical JSON)."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False, sort_keys=True)


def _type_name(value) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _shape_row(obj, kind: str, columns: DataColumns) -> dict:
    """Any accepted shape of ``kind`` -> ``{prompt, ..., extra keys}`` in the kept form."""
    if not isinstance(obj, dict):
        raise BadRow(f"expected a JSON object, got {_type_name(obj)}")
    names = _present_columns(obj, kind, columns)
    if kind == "prompt":
        row = {"prompt": _text_or_messages(obj[names["prompt"]], names["prompt"], prompt_of)}
    elif kind == "sft" and "prompt" in names:
        row = {
            "prompt": _text_or_messages(obj[names["prompt"]], names["prompt"], prompt_of),
            "response": _text_or_messages(obj[names["response"]], names["response"], response_of),
        }
    elif kind == "sft":
        prompt, response = split_conversation(obj[names["messages"]], names["messages"])
        row = {"prompt": prompt, "response": response}
    elif "prompt" in names:
        row = {
            "prompt": _text_or_messages(obj[names["prompt"]], names["prompt"], prompt_of),
            "chosen": _text_or_messages(obj[names["chosen"]], names["chosen"], response_of),
            "rejected": _text_or_messages(obj[names["rejected"]], names["rejected"], response_of),
        }
    else:
        pair = _split_implicit(obj[names["chosen"]], obj[names["rejected"]], (names["chosen"], names["rejected"]))
        row = dict(zip(("prompt", "chosen", "rejected"), pair, strict=True))
    used = set(names.values()) | set(row)
    return row | {k: v for k, v in obj.items() if k not in used and not k.startswith("_")}


def _present_columns(obj: dict, kind: str, columns: DataColumns) -> dict[str, str]:
    """Which of the row's columns hold what (``{"prompt": "question", ...}``); a missing one is a BadRow."""
    response = [columns.response] if columns.response else ["response", "completion"]
    found = {}
    if columns.prompt in obj:
        found["prompt"] = columns.prompt
    if kind == "prompt":
        if "prompt" not in found and columns.messages in obj:
            found["prompt"] = columns.messages
        if "prompt" not in found:
            raise BadRow(f"missing field '{columns.prompt}' (a prompt row needs {columns.prompt}, or "
                         f"{columns.messages} ending with a user turn)")  # fmt: skip
        return found
    if kind == "sft":
        have = [name for name in response if name in obj]
        if "prompt" in found and have:
            return {**found, "response": have[0]}
        if "prompt" not in found and columns.messages in obj:
            return {"messages": columns.messages}
        missing = " or ".join(f"'{name}'" for name in response) if "prompt" in found else f"'{columns.prompt}'"
        raise BadRow(f"missing field {missing} (an sft row needs {columns.prompt} and {' or '.join(response)}, "
                     f"or {columns.messages})")  # fmt: skip
    for name in (columns.chosen, columns.rejected):
        if name not in obj:
            raise BadRow(f"missing field '{name}' (an rm row needs {columns.chosen} and {columns.rejected}, "
                         f"with {columns.prompt} or the prompt inside both)")  # fmt: skip
    return {**found, "chosen": columns.chosen, "rejected": columns.rejected}


def _text_or_messages(value, name: str, convert):
    if isinstance(value, str) or is_conversation(value):
        return convert(value, name)
    if isinstance(value, list):
        check_messages(value, name)  # names the bad message
    raise BadRow(f"field '{name}' must be text or a list of {{role, content}} messages, got {_type_name(value)}")


def _split_implicit(chosen, rejected, names: tuple[str, str]) -> tuple[object, str, str]:
    """A pair with the prompt inside both sides: two conversations (common messages), or two HH-RLHF transcripts
    (the dialogue history before the final ``Assistant:`` turn)."""
    if is_conversation(chosen) and is_conversation(rejected):
        return split_implicit_pair(chosen, rejected, names)
    if isinstance(chosen, str) and isinstance(rejected, str):
        (history, first), (other, second) = split_transcript(chosen), split_transcript(rejected)
        if history != other:
            raise BadRow(f"prompts differ: '{names[0]}' and '{names[1]}' continue different dialogues (their "
                         "histories before the final answer differ; a preference pair needs one prompt)")  # fmt: skip
        # Kept as a conversation, like the same pair given as messages (a lone question: its text).
        return as_prompt(history_messages(history)), first, second
    raise BadRow(f"not a pair: '{names[0]}' and '{names[1]}' must both be text (HH-RLHF transcripts) or both be "
                 "message lists when the row has no prompt")  # fmt: skip


def _check_text(value: str, label: str) -> None:
    """``label``: how the error names the text (``field 'prompt'``, ``field 'prompt' message 2 (user)``)."""
    if not value.strip():
        raise BadRow(f"empty {label}")
    control = _CONTROL_CHARACTER.search(value)
    if control:
        code, at = ord(control.group()), control.start() + 1
        raise BadRow(f"control character: U+{code:04X} in {label} at character {at}")


def _check_length(chars: int, name: str, limit: int, limit_key: str) -> None:
    if chars > limit:
        raise BadRow(f"over-long field '{name}': {chars} characters > data.{limit_key}={limit}")


def validate_row(obj, kind: str, cfg: DataConfig, columns: DataColumns | None = None) -> dict:
    """The row of ``kind`` in its kept form if it is well formed; raise :class:`BadRow` saying what is wrong.

    ``columns``: the file's column names (``data.columns``); None for the prepared splits' own names.
    """
    row = _shape_row(obj, kind, columns or PREPARED_COLUMNS)
    prompt = row["prompt"]
    if isinstance(prompt, str):
        _check_text(prompt, "field 'prompt'")
    else:
        for i, message in enumerate(prompt):
            _check_text(message["content"], f"field 'prompt' message {i} ({message['role']})")
    chars = len(prompt) if isinstance(prompt, str) else sum(len(m["content"]) for m in prompt)
    _check_length(chars, "prompt", cfg.max_prompt_chars, "max_prompt_chars")
    for name in ROW_FIELDS[kind][1:]:
        _check_text(row[name], f"field '{name}'")
        _check_length(len(row[name]), name, cfg.max_response_chars, "max_response_chars")
    if kind == "rm" and row["chosen"].strip() == row["rejected"].strip():
        raise BadRow("identical chosen and rejected responses")
    return row


def read_rows(path: str | Path, kind: str, cfg: DataConfig, bad: BadRowLog, prepared: bool = False) -> list[dict]:
    """Read and validate a data file of ``kind`` rows; each row remembers where it came from (``_src``:
    ``file:line`` or ``file row N``; ``_file``). A user's file is read in ``data.file_format`` with
    ``data.columns``; a ``prepared`` split is JSON lines with the kept column names."""
    columns = None if prepared else cfg.columns
    report, count = bad.reader(path)
    rows, records = [], 0
    for where, obj in iter_records(path, "jsonl" if prepared else cfg.file_format, report, empty_ok=prepared):
        records += 1
        try:
            row = validate_row(obj, kind, cfg, columns)
        except BadRow as exc:
            bad.report(where, str(exc), file=str(path))
            continue
        rows.append({**row, "_src": where, "_file": str(path)})
    count(records)
    return rows


def load_split(data_dir: str | Path, split: str, cfg: DataConfig) -> list[dict]:
    """Read one prepared split (``<data>/splits/<split>.jsonl``); malformed rows always stop the stage."""
    path = Path(data_dir) / "splits" / f"{split}.jsonl"
    if not path.is_file():
        raise DataError(f"split file not found: {path} (run `rlhf prepare` first)")
    rows = read_rows(path, SPLIT_KINDS[split], cfg, BadRowLog("error"), prepared=True)
    if not rows:
        raise DataError(f"{path}: the split '{split}' is empty")
    return rows
