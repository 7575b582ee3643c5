"""The stages in pipeline order and how one runs inside its own (nested) MLflow run.

The CLI (what DVC calls), the Prefect tasks and the tests all go through :func:`run_stage`, so a stage behaves
the same whichever adapter starts it.
"""

from __future__ import annotations

import os

from rlhf_core.config import Config
from rlhf_core.data.prepare import prepare_data
from rlhf_core.tracking import stage_run
from rlhf_core.trainers.eval import evaluate_win_rate
from rlhf_core.trainers.ppo import train_ppo
from rlhf_core.trainers.rm import train_reward_model
from rlhf_core.trainers.rm_eval import evaluate_reward_model
from rlhf_core.trainers.sft import train_sft

# Pipeline order. Each stage function is (config, logger) -> result with .artifacts() -> {name: path}.
STAGES = {
    "prepare": prepare_data,
    "sft": train_sft,
    "rm": train_reward_model,
    "rm-eval": evaluate_reward_model,
    "ppo": train_ppo,
    "eval": evaluate_win_rate,
}


def stage_output_dir(config: Config, stage: str) -> str:
    return getattr(config.paths, {"prepare": "data"}.get(stage, stage.replace("-", "_")))


def run_stage(stage: str, config: Config, parent_run_id: str | None = None) -> dict[str, str]:
    """Run one stage in an MLflow run nested under ``parent_run_id``; return its artifact paths."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    is_main = int(os.environ.get("RANK", "0")) == 0
    with stage_run(config, stage, is_main=is_main, parent_run_id=parent_run_id) as logger:
        result = STAGES[stage](config, logger)
        artifacts = result.artifacts()
        if logger.run_id:
            artifacts["mlflow_run_id"] = logger.run_id
    return artifacts
