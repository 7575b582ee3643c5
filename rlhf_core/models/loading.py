"""The one door through which a model or tokenizer directory is read: whatever is wrong with it (missing, a
truncated ``model.safetensors``, weights of another size, a damaged ``tokenizer.json``) becomes one
:class:`RLHFError` line naming the directory, what failed and what to do, never a traceback."""

from __future__ import annotations

from pathlib import Path

from rlhf_core.errors import RLHFError


def from_pretrained(auto_class, name_or_path: str | Path, what: str, role: str | None = None, **kwargs):
    """``auto_class.from_pretrained(name_or_path, **kwargs)``; ``what`` names the thing ("causal LM"), ``role`` the
    setting it came from ("model.name_or_path"), for the message."""
    name = str(name_or_path)
    label = f"{role}={name}" if role else name
    if _is_local_path(name) and not Path(name).expanduser().exists():
        hint = _written_by(Path(name)) or "; `rlhf models list` names the models `rlhf models pull` can fetch"
        raise RLHFError(f"{label}: no such directory{hint}")
    try:
        return auto_class.from_pretrained(name, **kwargs)
    except Exception as exc:  # noqa: BLE001 - a third-party loader: any failure here is about the files
        problem = " ".join(str(exc).split())[:300] or type(exc).__name__
        if "mismatched_sizes" in problem or "size mismatch" in problem:
            problem = "the weights' shapes do not match config.json"
        if not Path(name).expanduser().exists():
            raise RLHFError(
                f"{label}: neither a local directory nor a model the hub could provide ({problem})"
            ) from None
        raise RLHFError(
            f"{label}: cannot load it as a {what} ({type(exc).__name__}: {problem}). The files are damaged or "
            f"belong to another model{_written_by(Path(name)) or '; point to an intact directory'}"
        ) from None


def _is_local_path(name: str) -> bool:
    """A path rather than a hub name (``owner/name``, dots allowed: "Qwen/Qwen2.5-0.5B" is a hub name)."""
    from rlhf_core.models.store import is_hub_name

    return not is_hub_name(name)


def _written_by(path: Path) -> str:
    """'; the sft stage writes it (`rlhf sft`)' when ``path`` is a stage's model directory (its parent has that
    stage's manifest, or is named after it)."""
    import json

    try:
        stage = json.loads((path.parent / "stage.json").read_text())["stage"]
    except (OSError, ValueError, KeyError, TypeError):
        stage = path.parent.name if path.name == "model" and path.parent.name in ("sft", "rm", "ppo") else None
    return f"; the {stage} stage writes it (`rlhf {stage}`)" if stage else ""
