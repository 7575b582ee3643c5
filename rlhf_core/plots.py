"""Curves as CSV (DVC plots) and PNG (MLflow and people), written atomically."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from rlhf_core.io import atomic_write_text


def _csv(rows: list[dict], keys: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["step", *keys], extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_curves(
    directory: str | Path,
    stage: str,
    train_rows: list[dict],
    val_rows: list[dict],
    train_keys: list[str],
    val_keys: list[str],
    ylabel: str = "loss (nats/token)",
) -> Path:
    """``train.csv``, ``val.csv`` and ``<stage>_curves.png`` (train and validation on one axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    write_table(directory / "train.csv", train_rows, train_keys)
    write_table(directory / "val.csv", val_rows, val_keys)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for key in train_keys:
        ax.plot([r["step"] for r in train_rows], [r[key] for r in train_rows], label=key, linewidth=1)
    for key in val_keys:
        ax.plot([r["step"] for r in val_rows], [r[key] for r in val_rows], "o-", label=key)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{stage}: training and validation")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, directory / f"{stage}_curves.png")


def write_table(path: str | Path, rows: list[dict], keys: list[str]) -> None:
    """``step`` and ``keys`` of every row as CSV (what ``dvc plots`` reads); a key a row lacks is left empty."""
    atomic_write_text(path, _csv(rows, keys))


def save_figure(fig, path: str | Path) -> Path:
    """Write a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".png.tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)
    return path
