"""The stages in pipeline order and how one runs inside its own (nested) MLflow run.

The CLI (what DVC calls), the Prefect tasks and the tests all go through :func:`run_stage`, so a stage behaves
the same whichever adapter starts it.

Skipping unchanged stages (``rlhf run`` and the Prefect flow; DVC has its own lock file): after a stage succeeds
it writes ``stage.json`` into its output directory with a fingerprint of what it depended on: its params
(``STAGE_PARAMS``, the same keys as its ``dvc.yaml`` entry), the project's code, its output directory and the
fingerprints of the stages it reads from. A later run whose fingerprint matches, and whose artifacts still
exist, is skipped. Changing a param, the code or an upstream stage reruns the stage and everything after it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

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


# The config keys each stage reads (its `dvc.yaml` params; a test keeps the two equal) and the stages it reads from.
STAGE_PARAMS = {
    "prepare": ["data", "model.vocab_size", "model.name_or_path"],
    "sft": ["model", "sft", "distributed", "data.source", "data.seed", "data.max_response_tokens"],
    "rm": [
        "rm", "distributed", "rm_eval.batch_size", "data.source", "data.seed", "data.max_response_tokens",
        "ppo.temperature", "ppo.top_p", "ppo.repetition_penalty",
    ],
    "rm-eval": ["rm_eval", "data.source", "data.seed", "data.sim"],
    "ppo": ["ppo", "distributed", "data.source", "data.seed", "data.sim", "data.max_response_tokens"],
    "eval": ["eval", "data.source", "data.seed", "data.sim", "data.max_response_tokens"],
}  # fmt: skip
UPSTREAM = {
    "prepare": [],
    "sft": ["prepare"],
    "rm": ["prepare", "sft"],
    "rm-eval": ["prepare", "rm"],
    "ppo": ["prepare", "sft", "rm"],
    "eval": ["prepare", "sft", "rm", "ppo"],
}
STAMP = "stage.json"


def _code_version() -> str:
    """Hash of the project's Python sources (what the stages run)."""
    digest = hashlib.sha256()
    root = Path(__file__).resolve().parent
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


def _param_values(config: Config, keys: list[str]) -> dict:
    tree = config.model_dump()
    values = {}
    for key in keys:
        node = tree
        for part in key.split("."):
            node = node[part]
        values[key] = node
    return values


def _read_stamp(config: Config, stage: str) -> dict | None:
    path = Path(stage_output_dir(config, stage)) / STAMP
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def stage_fingerprint(config: Config, stage: str) -> str | None:
    """What the stage's outputs are a function of; None when an upstream stage has no stamp (never ran here)."""
    upstream = {}
    for name in UPSTREAM[stage]:
        stamp = _read_stamp(config, name)
        if stamp is None:
            return None
        upstream[name] = stamp["fingerprint"]
    payload = {
        "stage": stage,
        "params": _param_values(config, STAGE_PARAMS[stage]),
        "output": stage_output_dir(config, stage),
        "code": _code_version(),
        "upstream": upstream,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def unchanged_artifacts(config: Config, stage: str) -> dict[str, str] | None:
    """The recorded artifacts when the stage already ran with the same fingerprint and they still exist."""
    stamp = _read_stamp(config, stage)
    fingerprint = stage_fingerprint(config, stage)
    if stamp is None or fingerprint is None or stamp.get("fingerprint") != fingerprint:
        return None
    artifacts = stamp.get("artifacts", {})
    if not all(Path(path).exists() for name, path in artifacts.items() if name != "mlflow_run_id"):
        return None
    return artifacts


def run_stage(
    stage: str, config: Config, parent_run_id: str | None = None, skip_unchanged: bool = False
) -> dict[str, str]:
    """Run one stage in an MLflow run nested under ``parent_run_id``; return its artifact paths.

    With ``skip_unchanged``, a stage whose fingerprint matches its last successful run returns that run's
    artifacts (plus ``skipped: "unchanged"``) without running.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    if skip_unchanged:
        previous = unchanged_artifacts(config, stage)
        if previous is not None:
            return {**previous, "skipped": "unchanged"}
    is_main = int(os.environ.get("RANK", "0")) == 0
    with stage_run(config, stage, is_main=is_main, parent_run_id=parent_run_id) as logger:
        result = STAGES[stage](config, logger)
        artifacts = result.artifacts()
        if logger.run_id:
            artifacts["mlflow_run_id"] = logger.run_id
    if is_main:
        from rlhf_core.io import atomic_write_json

        stamp = {"stage": stage, "fingerprint": stage_fingerprint(config, stage), "artifacts": artifacts}
        atomic_write_json(Path(stage_output_dir(config, stage)) / STAMP, stamp)
    return artifacts


def log_stage_metrics(config: Config, logger, stages) -> None:
    """Copy the numeric metrics of each stage's ``metrics.json`` (run now or skipped as unchanged) onto the
    pipeline's parent run, so two pipeline runs (say ``ppo_max`` and ``vanilla``) compare on one row in the
    MLflow UI."""
    from rlhf_core.io import read_json

    for stage in stages:
        path = Path(stage_output_dir(config, stage)) / "metrics.json"
        if stage == "prepare" or not path.is_file():
            continue  # prepare's stats.json is nested counts, logged by its own run
        metrics = read_json(path)
        logger.log_metrics({k: float(v) for k, v in metrics.items() if type(v) in (int, float)})
