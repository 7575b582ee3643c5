"""Atomic save and load of everything a run needs to resume: engine states (weights, optimizer, scheduler, via
``distributed``), and per-rank trainer state (RNG states, running moments, KL controller, data position, step,
history).

Layout: ``<root>/step-000010/{policy/, critic/, trainer-rank0.pt, ...}``. A checkpoint is written into
``.step-000010.tmp`` and renamed into place only when every rank has finished, so a run killed mid-save leaves
the previous checkpoint as the latest complete one.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from rlhf_core import distributed
from rlhf_core.errors import RLHFError

_STEP_DIR = re.compile(r"^step-(\d{6})$")


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    root: Path, step: int, engines: dict, trainer_state: dict, ctx, fingerprint: str, keep: int = 2
) -> Path:
    """Write ``engines`` ({name: engine}) and this rank's ``trainer_state`` for ``step``; keep the newest ``keep``.

    ``fingerprint`` identifies the configuration; :func:`list_checkpoints` only offers checkpoints whose
    fingerprint matches, so a run with changed params never resumes another run's state."""
    root = Path(root)
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp"
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    for name, engine in engines.items():
        (tmp / name).mkdir(exist_ok=True)
        engine.save_state(tmp / name)
    torch.save({**trainer_state, "rng": rng_state()}, tmp / f"trainer-rank{ctx.rank}.pt")
    if ctx.is_main:
        (tmp / "fingerprint.txt").write_text(fingerprint)
    distributed.barrier()
    if ctx.is_main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def list_checkpoints(root: Path, fingerprint: str | None = None) -> list[Path]:
    """Complete checkpoints under ``root`` (of the configuration ``fingerprint``, when given), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir()
        and _STEP_DIR.match(p.name)
        and (p / "trainer-rank0.pt").is_file()
        and (fingerprint is None or _read(p / "fingerprint.txt") == fingerprint)
    ]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def _read(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None


def config_fingerprint(config_dump: dict) -> str:
    """A stable hash of a configuration dump (what must match for a checkpoint to be resumed)."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(config_dump, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_checkpoint(path: Path, engines: dict, ctx) -> dict:
    """Restore ``engines`` and this rank's RNG states from ``path``; return its trainer state."""
    path = Path(path)
    state_file = path / f"trainer-rank{ctx.rank}.pt"
    if not state_file.is_file():
        raise RLHFError(f"{path}: no state for rank {ctx.rank}; resume with the world size it was saved with")
    for name, engine in engines.items():
        engine.load_state(path / name)
    state = torch.load(state_file, map_location="cpu", weights_only=False)
    set_rng_state(state.pop("rng"))
    return state
