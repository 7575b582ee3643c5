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


# Training curves are noisy batch by batch: the plots draw the raw values faintly and a trailing moving average over
# about this share of the run on top (at least one step), so the trend reads without hiding the noise.
SMOOTHING_SHARE = 0.05


def smoothed(values: list[float], share: float = SMOOTHING_SHARE) -> list[float]:
    """Trailing moving average over ``max(1, round(share * len(values)))`` points; NaNs (missing) are skipped, and
    a point with no finite value in its window stays NaN."""
    window = max(1, round(share * len(values)))
    out = []
    for i in range(len(values)):
        finite = [v for v in values[max(0, i - window + 1) : i + 1] if v == v]
        out.append(sum(finite) / len(finite) if finite else float("nan"))
    return out


def plot_smoothed(ax, steps: list, values: list[float], label: str, **style) -> None:
    """The raw curve faint, its moving average on top in the same colour."""
    (raw,) = ax.plot(steps, values, linewidth=0.6, alpha=0.3, **style)
    ax.plot(steps, smoothed(values), linewidth=1.5, color=raw.get_color(), label=f"{label} (smoothed)")


def write_curves(
    directory: str | Path,
    stage: str,
    train_rows: list[dict],
    val_rows: list[dict],
    panels: list[tuple[str, str | None, str]],
) -> Path:
    """``train.csv``, ``val.csv`` and ``<stage>_curves.png``: one panel per ``(train key, validation key or None,
    axis label)``, the training curve smoothed over the raw one and the validation points marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    write_table(directory / "train.csv", train_rows, [p[0] for p in panels])
    write_table(directory / "val.csv", val_rows, [p[1] for p in panels if p[1]])
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), dpi=100, squeeze=False)
    for ax, (train_key, val_key, ylabel) in zip(axes[0], panels, strict=True):
        plot_smoothed(ax, [r["step"] for r in train_rows], [r.get(train_key, float("nan")) for r in train_rows],
                      f"train {train_key.split('/')[-1]}")  # fmt: skip
        if val_key:
            ax.plot([r["step"] for r in val_rows], [r[val_key] for r in val_rows], "o--", color="black",
                    markersize=4, linewidth=0.8, label=f"validation {val_key.split('/')[-1]}")  # fmt: skip
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best", framealpha=0.8)
    fig.suptitle(f"{stage}: training (smoothed over the raw batches) and validation", fontsize=11)
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
