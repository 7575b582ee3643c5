"""A stage's outputs committed as one unit, and content hashes to check them against later.

A stage writes everything into ``<out>/.staging/``. Committing writes the manifest ``.staging/stage.json`` (the
decision: from here on the new outputs win), then moves each entry into ``<out>/`` (an old directory goes to
``<out>/.trash/`` first, since a directory cannot be renamed over another), moves away the entries of the old
manifest that the new one lacks, and finally replaces ``<out>/stage.json``. Whatever is in ``<out>/`` besides the
manifest's entries (PPO's ``checkpoints/``) is left alone.

A process killed at any moment leaves one of three states, and :func:`recover`, which every stage runs before it
reads or writes a stage directory, turns each into complete outputs:

- a ``.staging/`` without manifest (killed while working): discarded; the previous outputs stay, complete;
- a ``.staging/`` with manifest (killed while moving): the move is finished; the new outputs are complete;
- a leftover ``.trash/``: deleted.

``stage.json`` records a SHA-256 of every committed entry, so a skip-if-unchanged check can verify what is on
disk (a model restored by ``dvc checkout``, a file edited by hand) rather than trust that it exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from rlhf_core.io import atomic_write_json, file_sha256

STAGING = ".staging"
TRASH = ".trash"
MANIFEST = "stage.json"


def start(out: Path) -> Path:
    """Finish or discard an interrupted commit in ``out``, then return a fresh, empty staging directory."""
    recover(out)
    staging = Path(out) / STAGING
    staging.mkdir(parents=True)
    return staging


def commit(out: Path, manifest: dict) -> None:
    """Make the staging directory's entries ``out``'s outputs; ``manifest`` (with ``outputs``: entry -> digest, see
    :func:`digests`) becomes ``out/stage.json``."""
    atomic_write_json(Path(out) / STAGING / MANIFEST, manifest)
    _roll_forward(Path(out))


def abandon(out: Path) -> None:
    """Drop the staging directory of a stage that failed (an exception, not a kill), and ``out`` itself when that
    leaves it empty: the previous outputs stay as they were."""
    out = Path(out)
    shutil.rmtree(out / STAGING, ignore_errors=True)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def recover(out: Path) -> None:
    """Bring ``out`` back to complete outputs after a process died in it (see the module docstring)."""
    out = Path(out)
    staging = out / STAGING
    if (staging / MANIFEST).is_file():
        _roll_forward(out)
    elif staging.exists():
        shutil.rmtree(staging)
    shutil.rmtree(out / TRASH, ignore_errors=True)


def read_manifest(out: Path) -> dict | None:
    """``out/stage.json``, or None when there is none (or it is unreadable)."""
    try:
        return json.loads((Path(out) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def digests(directory: Path) -> dict[str, str]:
    """SHA-256 of every entry of ``directory`` but the manifest: a file's content, or for a directory, the names and
    contents of all its files."""
    return {p.name: digest(p) for p in sorted(Path(directory).iterdir()) if p.name != MANIFEST}


def digest(path: Path) -> str:
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    total = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        total.update(f"{file.relative_to(path).as_posix()}\0{digest(file)}\n".encode())
    return total.hexdigest()


def unchanged(out: Path, manifest: dict) -> bool:
    """True when every entry ``manifest`` records is in ``out`` with the recorded content."""
    recorded = manifest.get("outputs")
    if not isinstance(recorded, dict) or not recorded:
        return False  # a stamp of an older release, which recorded no content
    return all((Path(out) / name).exists() and digest(Path(out) / name) == value for name, value in recorded.items())


def _roll_forward(out: Path) -> None:
    """Move the manifested staging entries into ``out`` (idempotent: an entry already moved is not there any more)."""
    staging, trash = out / STAGING, out / TRASH
    new = json.loads((staging / MANIFEST).read_text())["outputs"]
    old = (read_manifest(out) or {}).get("outputs", {})
    for name in new:
        if (staging / name).exists():
            _replace(staging / name, out / name, trash)
    for name in old:
        if name not in new and (out / name).exists():
            _move_aside(out / name, trash)
    _rename(staging / MANIFEST, out / MANIFEST)  # the commit is complete
    shutil.rmtree(staging)
    shutil.rmtree(trash, ignore_errors=True)


def _replace(source: Path, target: Path, trash: Path) -> None:
    if target.exists() and (target.is_dir() or source.is_dir()):
        _move_aside(target, trash)
    _rename(source, target)  # a file over a file is replaced in one step


def _move_aside(path: Path, trash: Path) -> None:
    trash.mkdir(exist_ok=True)
    if (trash / path.name).exists():
        shutil.rmtree(trash / path.name) if (trash / path.name).is_dir() else (trash / path.name).unlink()
    _rename(path, trash / path.name)


def _rename(source: Path, target: Path) -> None:
    """Every move of a commit goes through here (the commit tests stop a process at each of them)."""
    os.replace(source, target)
