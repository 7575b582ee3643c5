"""What a stage's work hands back to the stage scaffold (``rlhf_core.pipeline.run_stage``), which writes
``metrics.json`` and ``config.yaml`` beside the stage's own outputs, logs them to MLflow and commits them."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class StageResult:
    metrics: dict  # the headline numbers, logged to MLflow and written as `metrics_file` (empty on ranks but 0)
    artifacts: dict[str, str]  # name -> path inside the stage's directory, reported by `rlhf` and the Prefect task
    logged: tuple[str, ...] = ()  # paths inside the stage's directory to log as MLflow artifacts
    history: list[dict] = field(default_factory=list)  # one metrics record per training step, if the stage trains
    metrics_file: str | None = "metrics.json"  # None: the stage writes its own (prepare's stats.json)
