"""Atomic, verified, pickle-free save and load of everything a run needs to resume: engine states (weights,
optimizer, scheduler, via ``distributed``) and per-rank trainer state (RNG states, running moments, KL controller,
monitors, step, history).

Layout: ``<root>/step-000010/{policy/, critic/, trainer-rank0.json, ..., manifest.json}``.

- A checkpoint is written into ``.step-000010.tmp`` and renamed into place only when every rank has finished, so
  a run killed (or interrupted twice) mid-save leaves the previous checkpoint as the latest complete one.
- ``manifest.json`` is written last, by rank 0: the step, the configuration's fingerprint and the configuration
  itself, the number of processes, and every file's size and SHA-256. Only directories with a manifest are
  offered, and nothing is read from one before every file matches it: a truncated, missing, changed or extra file
  is reported in one line.
- Nothing is unpickled: the trainer state is JSON (RNG states as lists of ints and base64), the plain-torch
  engines' ``engine.pt`` is read with ``torch.load(weights_only=True)``, and DeepSpeed's files are checked by the
  same weights-only unpickler before DeepSpeed reads them (``distributed.DeepSpeedEngine.load_state``). The
  manifest guards against damage, not against someone who can write the directory (they can rewrite it too);
  refusing to run pickled code is what guards against that.
- Checkpoints of another configuration are moved aside (``previous-<fingerprint>/``, one such set kept, see
  :func:`set_aside_others`) rather than deleted: a run with one value changed does not take the previous run's.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from rlhf_core import distributed
from rlhf_core.errors import RLHFError
from rlhf_core.io import atomic_write_json, atomic_write_text, file_sha256

MANIFEST = "manifest.json"
ASIDE = "previous-"  # + the fingerprint: the one set of another configuration's checkpoints kept
FORMAT = 2  # 1: pickled trainer-rank*.pt and fingerprint.txt, no manifest
_STEP_DIR = re.compile(r"^step-(\d{6})$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class CheckpointError(RLHFError):
    """A checkpoint that cannot be resumed; the message names it and what is wrong, in one line."""


# ------------------------------------------------------------------------------------------- RNG states
def rng_state() -> dict:
    """Every RNG the run draws from, as plain data (JSON without pickles)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {
            "name": name,
            "keys": keys.tolist(),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": _bytes_text(torch.get_rng_state()),
        "cuda": [_bytes_text(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned (after a JSON round trip)."""
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    keys = np.array(npy["keys"], dtype=np.uint32)
    np.random.set_state((npy["name"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(_text_bytes(state["torch"]))
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_text_bytes(s) for s in state["cuda"]])


def _bytes_text(tensor: torch.Tensor) -> str:
    # torch keeps its generator state as a uint8 tensor; base64 keeps it a short JSON string.
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode("ascii")


def _text_bytes(text: str) -> torch.Tensor:
    return torch.tensor(list(base64.b64decode(text, validate=True)), dtype=torch.uint8)


# ------------------------------------------------------------------------------------------- plain data
def to_plain(value, where: str = "state"):
    """``value`` as JSON data: numpy and 0-d torch numbers become Python ones, tuples become lists. Anything
    else is a bug in what the trainer checkpoints, named by its place (``where``). NaN and +-inf stay floats:
    Python's json writes them as NaN/Infinity and reads them back, so a non-finite metric survives a resume."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):  # numpy's float64 is a float subclass: store the plain float
        return float(value)
    if isinstance(value, (np.generic, torch.Tensor)) and np.ndim(value) == 0:
        return to_plain(value.item(), where)
    if isinstance(value, (list, tuple)):
        return [to_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"{where}: keys must be strings to survive JSON, got {sorted(map(repr, value))[:3]}")
        return {k: to_plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    raise TypeError(f"{where}: {type(value).__name__} is not plain data (numbers, strings, lists, dicts)")


# ------------------------------------------------------------------------------------------- saving
def save_checkpoint(
    root: Path,
    step: int,
    engines: dict,
    trainer_state: dict,
    ctx,
    fingerprint: str,
    keep: int = 2,
    config: dict | None = None,
) -> Path:
    """Write ``engines`` ({name: engine}) and this rank's ``trainer_state`` for ``step``; keep the newest ``keep``.

    ``trainer_state`` is plain data; its ``rng`` (from :func:`rng_state`) is taken now unless it has one.
    ``fingerprint`` identifies the configuration; only a run of the same configuration resumes the checkpoint.
    ``config`` (JSON data: what the fingerprint hashes) goes into the manifest, so that a run of another
    configuration can say which settings differ. Every rank must call this."""
    root = Path(root)
    final, tmp = root / f"step-{step:06d}", root / f".step-{step:06d}.tmp"
    if ctx.is_main:
        for leftover in root.glob(".step-*"):  # the temporary folders of saves that were interrupted
            shutil.rmtree(leftover, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    for name, engine in engines.items():
        (tmp / name).mkdir(exist_ok=True)
        engine.save_state(tmp / name)
    state = to_plain({"rng": rng_state(), **trainer_state})
    atomic_write_text(tmp / f"trainer-rank{ctx.rank}.json", json.dumps(state))
    distributed.barrier()  # every rank's files are complete: now they can be listed and hashed
    _write_manifest(tmp, step, fingerprint, ctx, config)
    if ctx.is_main:
        _publish(tmp, final)
        # Prune only behind this step: a newer checkpoint here is a damaged one this run resumed past, reported
        # then and replaced when the run gets there; counting it could prune the intact checkpoint just written.
        behind = [p for p in list_checkpoints(root) if _step_of(p) <= step]
        for old in behind[:-keep]:
            _remove(old)
    distributed.barrier()
    return final


def _write_manifest(directory: Path, step: int, fingerprint: str, ctx, config: dict | None) -> None:
    """Hash every file of ``directory`` (the ranks share the work); rank 0 writes the manifest."""
    names = _files_in(directory)
    hashed = _sizes_and_hashes(directory, names, ctx)
    if ctx.is_main:
        files = {name: {"size": size, "sha256": sha} for name, (size, sha) in zip(names, hashed, strict=True)}
        manifest = {"format": FORMAT, "step": step, "fingerprint": fingerprint, "world_size": ctx.world_size,
                    "files": files, **({"config": config} if config is not None else {})}  # fmt: skip
        atomic_write_json(directory / MANIFEST, manifest)


def _publish(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``. A ``final`` already there (a damaged checkpoint of that step being replaced)
    is moved aside first, so a reader never finds half of either."""
    if final.exists():
        aside = final.with_name(f".{final.name}.old")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _remove(path: Path) -> None:
    """Delete a checkpoint: hidden by one rename first, so an interrupted delete leaves no half checkpoint."""
    hidden = path.with_name(f".{path.name}.old")
    shutil.rmtree(hidden, ignore_errors=True)
    os.replace(path, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def _files_in(directory: Path) -> list[str]:
    """Every file under ``directory`` but the manifest, as sorted relative POSIX paths."""
    found = (p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
    return sorted(name for name in found if name != MANIFEST)


def _sizes_and_hashes(directory: Path, names: list[str], ctx) -> list[tuple[int, str]]:
    """(size, SHA-256) of each of ``names``; (-1, "") for a file that is gone or unreadable. Rank r hashes every
    world_size-th file and the ranks sum their rows (one collective), so a sharded checkpoint is hashed in
    parallel and every rank ends with every row. float64 holds sizes below 2**53 and digest bytes exactly."""
    rows = torch.zeros(len(names), 33, dtype=torch.float64)
    for i in range(ctx.rank, len(names), ctx.world_size):
        try:
            digest = bytes.fromhex(file_sha256(directory / names[i]))
            rows[i, 0] = (directory / names[i]).stat().st_size
            rows[i, 1:] = torch.tensor(list(digest), dtype=torch.float64)
        except OSError:  # no exception on one rank alone: the others are about to wait for its rows
            rows[i, 0] = -1
    rows = distributed.all_reduce_sum(rows.to(ctx.device)).cpu()
    return [(int(r[0]), bytes(int(b) for b in r[1:]).hex() if r[0] >= 0 else "") for r in rows]


# ------------------------------------------------------------------------------------------- finding
def list_checkpoints(root: Path, fingerprint: str | None = None) -> list[Path]:
    """Checkpoints under ``root`` that have a manifest (of the configuration ``fingerprint``, when given), oldest
    first. A listing, not a check: :func:`load_checkpoint` verifies the files."""
    found = []
    for path in _step_dirs(root):
        manifest = _manifest_or_none(path)
        if manifest is not None and (fingerprint is None or manifest.get("fingerprint") == fingerprint):
            found.append(path)
    return found


def _step_dirs(root: Path) -> list[Path]:
    """Every ``step-NNNNNN`` directory under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=_step_of)


def _step_of(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def read_manifest(path: Path) -> dict:
    """``path``'s manifest; ValueError when it is not a readable one (FileNotFoundError when there is none)."""
    manifest = json.loads((Path(path) / MANIFEST).read_text())
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(f, dict) for f in files.values()):
        raise ValueError(f"{MANIFEST} lists no files")
    return manifest


def _manifest_or_none(path: Path) -> dict | None:
    try:
        return read_manifest(path)
    except (OSError, ValueError):
        return None


def _owner(path: Path) -> str | None:
    """The fingerprint of the configuration that wrote ``path``: from its manifest, or from the older format's
    fingerprint.txt; None when neither can be read (a damaged checkpoint that may be this configuration's)."""
    manifest = _manifest_or_none(path)
    if manifest is not None:
        return manifest.get("fingerprint")
    legacy = path / "fingerprint.txt"
    if not (path / MANIFEST).exists() and legacy.is_file():
        return legacy.read_text()
    return None


def candidates(root: Path, fingerprint: str) -> list[Path]:
    """The checkpoints a run of ``fingerprint`` could resume, newest first: its own, and those whose origin cannot
    be read (so damage is reported rather than taken for another configuration's checkpoint)."""
    return [p for p in reversed(_step_dirs(root)) if _owner(p) in (fingerprint, None)]


# ------------------------------------------------------------------------------------------- verifying
def verify(path: Path, ctx) -> str | None:
    """None when every file of ``path`` is the one its manifest names (size and SHA-256), no file is missing or
    extra, and it was written for this step and this many processes; else what is wrong, in a few words.
    Every rank must call it (the ranks share the hashing) and every rank gets the same answer."""
    path = Path(path)
    if not (path / MANIFEST).exists():
        if (path / "trainer-rank0.pt").exists():
            return "older checkpoint format (pickled trainer state, no manifest.json): not resumed"
        return f"no {MANIFEST} (incomplete)"
    try:
        manifest = read_manifest(path)
    except (OSError, ValueError) as exc:
        return f"{MANIFEST} unreadable ({_one_line(exc)})"
    if manifest.get("format") != FORMAT:
        return f"checkpoint format {manifest.get('format')!r}; this code reads format {FORMAT}"
    if manifest.get("step") != _step_of(path):
        return f"{MANIFEST} is of step {manifest.get('step')}, not {_step_of(path)}"
    if manifest.get("world_size") != ctx.world_size:
        return (f"written by {manifest.get('world_size')} process(es), this run has {ctx.world_size}: resume with "
                "the number of processes it was saved with")  # fmt: skip
    listed, present = sorted(manifest["files"]), _files_in(path)
    missing, extra = sorted(set(listed) - set(present)), sorted(set(present) - set(listed))
    if missing or extra:
        return f"missing file {missing[0]}" if missing else f"unexpected file {extra[0]}"
    for name, (size, sha) in zip(listed, _sizes_and_hashes(path, listed, ctx), strict=True):
        expected = manifest["files"][name]
        if size < 0:
            return f"{name} is unreadable"
        if size != expected.get("size"):
            return f"{name} is {size} bytes, the manifest says {expected.get('size')} (truncated or replaced)"
        if sha != expected.get("sha256"):
            return f"{name} differs from the manifest (SHA-256)"
    return None


# ------------------------------------------------------------------------------------------- loading
def load_checkpoint(path: Path, engines: dict, ctx, restore: Callable[[dict], None] | None = None) -> dict:
    """Verify ``path``, restore ``engines`` ({name: engine}), call ``restore`` on this rank's trainer state (the
    caller's own objects: moments, monitors), restore the RNG states; return the trainer state.

    Anything that fails (a file that does not match the manifest, unreadable JSON, weights of another model, an
    object the weights-only unpickler refuses) raises :class:`CheckpointError` in one line, on every rank alike.
    What was restored before the failure is overwritten by the next checkpoint loaded."""
    path = Path(path)
    problem = verify(path, ctx)
    state = None
    if problem is None:
        state, problem = _attempt(lambda: _read_trainer_state(path, ctx.rank), ctx)
    if problem is None:
        _, problem = _attempt(lambda: _load_engines(path, engines), ctx)
    if problem is None and restore is not None:
        _, problem = _attempt(lambda: restore(state), ctx)
    if problem is None:
        _, problem = _attempt(lambda: set_rng_state(state["rng"]), ctx)
    if problem is not None:
        raise CheckpointError(f"{path}: {problem}")
    return state


def _attempt(action: Callable, ctx) -> tuple[object, str | None]:
    """(result, None), or (None, what went wrong in one line). Any exception counts: these are readers of files
    that may hold anything. The ranks then agree, so all of them go on to the same next step."""
    try:
        result, problem = action(), None
    except Exception as exc:  # noqa: BLE001 - reported in one line, the caller falls back or stops
        result, problem = None, _one_line(exc)
    failures = float(distributed.all_reduce_sum(torch.tensor([float(problem is not None)], device=ctx.device))[0])
    if problem is None and failures > 0:
        problem = "failed to load on another rank"
    return result, problem


def _read_trainer_state(path: Path, rank: int) -> dict:
    """This rank's trainer state: JSON, so reading it runs no code."""
    name = f"trainer-rank{rank}.json"
    state = json.loads((path / name).read_text())
    if not isinstance(state, dict) or state.get("step") != _step_of(path) or "rng" not in state:
        raise ValueError(f"{name} is not the trainer state of step {_step_of(path)}")
    return state


def _load_engines(path: Path, engines: dict) -> None:
    for name, engine in engines.items():
        try:
            engine.load_state(path / name)
        except Exception as exc:
            raise ValueError(f"{name}: {_one_line(exc)}") from exc  # which engine, then what


def _one_line(exc: BaseException) -> str:
    """An exception as one short line: torch's refusals and load_state_dict errors span paragraphs."""
    text = _ANSI.sub("", f"no entry {exc} in it" if isinstance(exc, KeyError) else str(exc))
    if "WeightsUnpickler error:" in text:
        # torch's refusal is a paragraph of advice; keep the place ("name: ") and what it refused to import.
        where = text.split("Weights only load failed")[0]
        what = text.split("WeightsUnpickler error:")[1].strip().splitlines()[0].split(" Please ")[0]
        text = f"{where}refused by the weights-only unpickler, nothing of it run: {what}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    text = " ".join(lines[:2]) if lines else type(exc).__name__
    return text if len(text) <= 240 else text[:237] + "..."


# ------------------------------------------------------------------------------------------- resuming
def resume_latest(
    root: Path, fingerprint: str, engines: dict, ctx, restore: Callable[[dict], None], report: Callable[[str], None]
) -> tuple[Path, dict] | None:
    """Load the newest checkpoint of the configuration ``fingerprint`` that is intact and fits (see
    :func:`load_checkpoint`); each newer one that is not is passed to ``report`` in one line and left in place.
    None when there is no checkpoint of this configuration; CheckpointError naming ``root`` when none of them
    can be resumed."""
    problems = []
    for path in candidates(root, fingerprint):
        try:
            return path, load_checkpoint(path, engines, ctx, restore)
        except CheckpointError as exc:
            report(str(exc))
            problems.append(str(exc))
    if not problems:
        return None
    raise CheckpointError(f"none of the {len(problems)} checkpoint(s) in {root} can be resumed (newest: {problems[0]})")


# ------------------------------------------------------------------------------------------- other configurations
def set_aside_others(root: Path, fingerprint: str, config: dict, report: Callable[[str], None]) -> None:
    """Move the checkpoints in ``root`` written by another configuration into ``root/previous-<its fingerprint>/``
    and say so through ``report``, in one line naming the settings that differ (``config`` is this run's); bring
    this configuration's set-aside checkpoints back when ``root`` holds none of its own. One set is kept aside: a
    new one replaces it, so disk use stays bounded. Every move is one rename, so a kill leaves each checkpoint
    whole, in one place or the other. Run it on the main process only."""
    root = Path(root)
    for leftover in root.glob(f".{ASIDE}*.old"):  # a deletion that was interrupted
        shutil.rmtree(leftover, ignore_errors=True)
    others = [p for p in _step_dirs(root) if _owner(p) not in (fingerprint, None)]
    mine, own = root / f"{ASIDE}{fingerprint}", candidates(root, fingerprint)
    comes_back = mine.is_dir() and not own
    kept, fresh = None, not comes_back and not own
    if others:
        newest = others[-1]
        kept = root / f"{ASIDE}{_owner(newest)}"
        earlier = [p for p in root.glob(f"{ASIDE}*") if p not in (kept, mine)]
        for path in earlier:  # first: killed after this, the next run moves the rest and no third set is left
            _remove(path)
        kept.mkdir(exist_ok=True)
        for path in others:
            if (kept / path.name).exists():
                _remove(kept / path.name)
            os.replace(path, kept / path.name)
        recorded = (_manifest_or_none(kept / newest.name) or {}).get("config")
        changes = config_changes(recorded, config) if isinstance(recorded, dict) else None
        replaced = f", replacing {', '.join(p.name for p in earlier)}" if earlier else ""
        report(
            f"ppo: the checkpoints in {root} (up to step {_step_of(newest)}) are of another configuration "
            f"({_changes_text(changes, kept.name.removeprefix(ASIDE), fingerprint)}); moved them to {kept}, the one "
            f"set kept aside{replaced}; a run of that configuration resumes them"
            + ("; this run starts afresh" if fresh else "")
        )
    if comes_back:
        for path in _step_dirs(mine):
            os.replace(path, root / path.name)
        _remove(mine)
        report(f"ppo: this configuration's checkpoints, set aside by a run of another one, are back from {mine}")
    elif mine.is_dir() and kept is not None:
        _remove(mine)  # this configuration resumes its own newer checkpoints: only the set just moved stays aside


def config_changes(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every setting that differs between two configuration dumps, dotted keys sorted."""
    before, after = _flatten(old), _flatten(new)
    absent = object()
    rows = []
    for key in sorted(before.keys() | after.keys()):
        a, b = before.get(key, absent), after.get(key, absent)
        if a != b:
            rows.append(f"{key}: {_shown(a, absent)} -> {_shown(b, absent)}")
    return rows


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _shown(value, absent) -> str:
    """A value as the params file and ``--set`` write it."""
    if value is absent:
        return "(not set)"
    return value if isinstance(value, str) else json.dumps(value)


def _changes_text(changes: list[str] | None, old: str | None, new: str, shown: int = 4) -> str:
    if changes is None:
        return f"written before checkpoints recorded their configuration; fingerprint {old}, this run's {new}"
    if not changes:
        return f"fingerprint {old}, this run's {new}"
    more = f" and {len(changes) - shown} more" if len(changes) > shown else ""
    return "; ".join(changes[:shown]) + more


def config_fingerprint(config_dump: dict) -> str:
    """A stable hash of a configuration dump (what must match for a checkpoint to be resumed)."""
    return hashlib.sha256(json.dumps(config_dump, sort_keys=True, default=str).encode()).hexdigest()[:16]
