"""What a training or evaluation stage returns: where its outputs are and its headline metrics."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TrainingResult:
    output_dir: Path
    model_dir: Path
    metrics_path: Path
    metrics: dict
    history: list[dict]

    def artifacts(self) -> dict[str, str]:
        return {"model": str(self.model_dir), "metrics": str(self.metrics_path)}


@dataclass(frozen=True)
class EvaluationResult:
    output_dir: Path
    metrics_path: Path
    metrics: dict

    def artifacts(self) -> dict[str, str]:
        return {"metrics": str(self.metrics_path), "plots": str(self.output_dir / "plots")}
