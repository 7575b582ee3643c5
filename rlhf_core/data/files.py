"""Reading data files as users keep them: JSON lines (plain or gzipped), a JSON array, parquet, and directories
written by ``datasets.Dataset.save_to_disk``.

:func:`iter_records` yields ``(where, record)`` pairs; ``where`` is what an error names: ``file:line`` for JSON
lines (the line an editor shows) and ``file row N`` for a JSON array, parquet and saved datasets (the index that
``dataset[N]`` or pandas' ``iloc`` takes, from 0). The format comes from the name (``data.file_format: auto``) or
is set for a name that does not tell it.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

from rlhf_core.errors import DataError

FORMATS = ("jsonl", "json", "parquet", "hf_dataset")
_SUFFIXES = {".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".json.gz": "json", ".json": "json", ".parquet": "parquet"}
_BLANK = object()


def detect_format(path: Path, file_format: str) -> str:
    """The file's format: ``file_format`` unless it is ``auto``, else from the name (a directory is a saved
    Hugging Face dataset)."""
    if file_format != "auto":
        return file_format
    if path.is_dir():
        return "hf_dataset"
    name = path.name.lower()
    for suffix, found in _SUFFIXES.items():
        if name.endswith(suffix):
            return found
    raise DataError(
        f"{path}: cannot tell the format from the name (known: .jsonl, .jsonl.gz, .json, .json.gz, .parquet, or a "
        "directory written by datasets' save_to_disk); rename the file or set data.file_format to one of "
        f"{', '.join(FORMATS)}"
    )


def iter_records(path: str | Path, file_format: str, report, empty_ok: bool = False) -> Iterator[tuple[str, object]]:
    """Yield ``(where, record)`` for every row of the file; a line that is not UTF-8 or not JSON goes to
    ``report(where, reason)`` (so ``data.on_bad_rows=skip`` can drop it); a file that cannot be read at all, or
    holds no rows (unless ``empty_ok``), is one :class:`DataError` naming it."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    readers = {"jsonl": _json_lines, "json": _json_document, "parquet": _parquet, "hf_dataset": _saved_dataset}
    found = detect_format(path, file_format)
    if path.is_dir() != (found == "hf_dataset"):
        what = "a directory" if path.is_dir() else "a file"
        raise DataError(f"{path} is {what}, not {'a saved dataset' if found == 'hf_dataset' else found}; "
                        "check data.file_format")  # fmt: skip
    if path.is_file() and path.stat().st_size == 0 and not empty_ok:
        raise DataError(f"{path} is empty (0 bytes); point the setting at the file that holds the rows")
    seen = 0

    def counted_report(where: str, reason: str) -> None:
        nonlocal seen
        seen += 1
        report(where, reason)

    for item in readers[found](path, counted_report):
        seen += 1
        yield item
    if seen == 0 and not empty_ok:
        raise DataError(f"{path} holds no rows; point the setting at the file that holds the rows")


def _json_lines(path: Path, report) -> Iterator[tuple[str, object]]:
    lineno = 0
    try:
        with gzip.open(path, "rb") if path.name.lower().endswith(".gz") else path.open("rb") as handle:
            for lineno, raw in enumerate(handle, start=1):
                parsed = _parse_line(raw, lineno == 1, f"{path}:{lineno}", report)
                if parsed is not _BLANK:
                    yield f"{path}:{lineno}", parsed
    except (OSError, EOFError, zlib.error) as exc:
        # gzip: a truncated file raises EOFError, a corrupt one BadGzipFile (an OSError) or zlib.error.
        raise DataError(
            f"{path}: cannot read past line {lineno}: {exc}. The file is truncated or damaged; copy or "
            "download it again"
        ) from None


def _parse_line(raw: bytes, first: bool, where: str, report):
    """One line's JSON value, or ``_BLANK`` for a blank line and after reporting a bad one."""
    try:
        line = raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as exc:
        report(where, f"not UTF-8: byte 0x{raw[exc.start]:02x} at column {exc.start + 1}")
        return _BLANK
    if not line.strip():
        return _BLANK
    try:
        return json.loads(line.rstrip("\r\n"))
    except json.JSONDecodeError as exc:
        report(where, f"bad JSON: {exc.msg} at column {exc.colno}")
        return _BLANK


def _json_document(path: Path, report) -> Iterator[tuple[str, object]]:
    """A ``.json`` file: one JSON array of rows, or JSON lines under a .json name (as ``datasets`` accepts)."""
    try:
        with gzip.open(path, "rb") if path.name.lower().endswith(".gz") else path.open("rb") as handle:
            raw = handle.read()
        text = raw.decode("utf-8-sig")
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read it: {exc}. The file is truncated or damaged") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8: byte 0x{raw[exc.start]:02x} at byte {exc.start}") from None
    if not text.lstrip().startswith("["):
        yield from _json_lines(path, report)
        return
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: bad JSON: {exc.msg} at column {exc.colno} (the file is one JSON "
                        "array, so no row of it can be read)") from None  # fmt: skip
    for index, record in enumerate(document):
        yield f"{path} row {index}", record


def _parquet(path: Path, report) -> Iterator[tuple[str, object]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
        batches = table.iter_batches()
        index = 0
        for batch in batches:
            for record in batch.to_pylist():
                yield f"{path} row {index}", record
                index += 1
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: cannot read it as parquet: {exc}. Is it a parquet file? Copy it again if "
                        "it is damaged") from None  # fmt: skip


def _saved_dataset(path: Path, report) -> Iterator[tuple[str, object]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise DataError(f"{path}: not a directory written by datasets' save_to_disk ({exc})") from None
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        if len(names) != 1:
            raise DataError(f"{path} holds the splits {', '.join(names)}: point the setting at one of them, e.g. "
                            f"{path / names[0]}")  # fmt: skip
        path, loaded = path / names[0], loaded[names[0]]
    for index, record in enumerate(loaded):
        yield f"{path} row {index}", record
