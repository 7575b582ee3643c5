"""The stages in pipeline order, the scaffold every stage runs in, and the pipeline loop.

:func:`run_stage` is what every adapter calls (the CLI and so DVC, the Prefect tasks, the tests, the benchmarks),
so a stage behaves the same whichever starts it. Around the stage's own work it:

1. finishes or discards any interrupted commit in the stage's directory and those it reads (``commit.recover``);
2. with ``skip_unchanged``, returns the previous run's artifacts when its ``stage.json`` fingerprint matches and
   every recorded output still has the recorded content (SHA-256), without running;
3. opens the stage's MLflow run (nested under the pipeline's) and hands the work a fresh staging directory;
4. writes ``config.yaml`` and the metrics file beside the work's outputs, logs them to MLflow, and commits all of
   it as one unit with ``stage.json`` (``commit.commit``): a stage killed at any moment leaves its previous
   complete outputs or its new complete outputs, never a mix.

The fingerprint covers what the outputs are a function of, as the stage's declaration (``rlhf_core.stages``) gives
it and its ``dvc.yaml`` entry repeats: its params, the project code it runs, its output directory and the
fingerprints of the stages it reads. Changing any of them reruns the stage and, through its new fingerprint,
everything after it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rlhf_core import commit, distributed, preflight
from rlhf_core.config import Config, flatten, save_config
from rlhf_core.errors import ConfigError
from rlhf_core.io import atomic_write_json, read_json
from rlhf_core.stages import STAGES, code_digest, output_dir
from rlhf_core.tracking import Logger, pipeline_run, pipeline_run_name, record_skipped_stage, stage_run


@dataclass(frozen=True)
class StageOutcome:
    """What running (or skipping) a stage gives its caller."""

    artifacts: dict[str, str]  # name -> path; plus mlflow_run_id, and skipped: "unchanged" for a skipped stage
    metrics: dict = field(default_factory=dict)  # the headline numbers (the metrics file's content)
    history: list[dict] = field(default_factory=list)  # per-step metrics of a training stage run now


def run_stage(
    stage: str, config: Config, parent_run_id: str | None = None, skip_unchanged: bool = False
) -> StageOutcome:
    """Run one stage in the scaffold (see the module docstring), its MLflow run nested under ``parent_run_id``."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    declared = STAGES[stage]
    is_main = int(os.environ.get("RANK", "0")) == 0
    if not declared.distributed and not is_main:
        return StageOutcome({})  # evaluation and data preparation run once, on rank 0
    preflight.check_before_work(config, [stage])
    if declared.distributed:
        distributed.setup(config.distributed)  # joins torchrun's process group before any rank touches files
    if is_main:
        for name in (*declared.upstream, stage):
            commit.recover(Path(output_dir(config, name)))
    distributed.barrier()
    out = Path(output_dir(config, stage))
    fingerprint = stage_fingerprint(config, stage)
    if skip_unchanged:
        previous = unchanged_artifacts(config, stage, fingerprint)
        if previous is not None:
            metrics = _previous_metrics(config, stage)
            if is_main:
                record_skipped_stage(config, stage, parent_run_id, previous, metrics)
            return StageOutcome({**previous, "skipped": "unchanged"}, metrics)
    with stage_run(config, stage, is_main=is_main, parent_run_id=parent_run_id) as logger:
        staging = commit.start(out) if is_main else out / commit.STAGING
        distributed.barrier()
        started = time.time()
        try:
            with distributed.stage_autocast(config.distributed):
                result = declared.run(config, staging, logger)
        except BaseException:
            if is_main:
                commit.abandon(out)
            raise
        artifacts = {name: str(out / path) for name, path in result.artifacts.items()}
        if logger.run_id:
            artifacts["mlflow_run_id"] = logger.run_id
        metrics = dict(result.metrics)
        if is_main:
            if result.metrics_file:
                metrics[f"{stage.replace('-', '_')}/seconds"] = round(time.time() - started, 2)
            _write_and_log(config, staging, result, metrics, logger)
            manifest = {"stage": stage, "fingerprint": fingerprint, "artifacts": artifacts}
            commit.commit(out, {**manifest, "outputs": commit.digests(staging)})
        distributed.barrier()
    return StageOutcome(artifacts, metrics, result.history)


def _write_and_log(config: Config, staging: Path, result, metrics: dict, logger: Logger) -> None:
    """What every stage adds to its own outputs: the resolved configuration and the metrics file, all logged."""
    save_config(config, staging / "config.yaml")
    logged = ["config.yaml", *result.logged]
    if result.metrics_file:
        atomic_write_json(staging / result.metrics_file, metrics)
        logged.insert(0, result.metrics_file)
    numbers = {k: v for k, v in flatten(metrics).items() if type(v) in (int, float)}
    logger.log_summary(numbers)
    for path in logged:
        logger.log_artifact(staging / path, path if (staging / path).is_dir() else None)


def _param_values(config: Config, keys: tuple[str, ...]) -> dict:
    tree = config.model_dump()
    values = {}
    for key in keys:
        node = tree
        for part in key.split("."):
            node = node[part]
        values[key] = node
    return values


def stage_fingerprint(config: Config, stage: str) -> str | None:
    """What the stage's outputs are a function of; None when an upstream stage has no stamp (never ran here)."""
    upstream = {}
    for name in STAGES[stage].upstream:
        stamp = commit.read_manifest(Path(output_dir(config, name)))
        if stamp is None:
            return None
        upstream[name] = stamp["fingerprint"]
    if stage == "ppo":  # the ensemble's other reward models are inputs too: a retrained member reruns PPO
        for directory in config.ppo.reward_ensemble:
            stamp = commit.read_manifest(Path(directory))
            if stamp is None:
                return None
            upstream[f"reward_ensemble:{directory}"] = stamp["fingerprint"]
    payload = {
        "stage": stage,
        "params": _param_values(config, STAGES[stage].all_params),
        "output": output_dir(config, stage),
        "code": code_digest(stage),
        "upstream": upstream,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def unchanged_artifacts(config: Config, stage: str, fingerprint: str | None) -> dict[str, str] | None:
    """The recorded artifacts when the stage already ran with ``fingerprint`` (``stage_fingerprint``) and every
    output it recorded is on disk with the recorded content."""
    out = Path(output_dir(config, stage))
    stamp = commit.read_manifest(out)
    if stamp is None or fingerprint is None or stamp.get("fingerprint") != fingerprint:
        return None
    if not commit.unchanged(out, stamp):
        return None
    return stamp.get("artifacts", {})


def _previous_metrics(config: Config, stage: str) -> dict:
    path = Path(output_dir(config, stage)) / "metrics.json"
    return read_json(path) if path.is_file() else {}


# ---------------------------------------------------------------------------------------------- the pipeline
StageRunner = Callable[[str, Config, str | None, bool], dict[str, str]]


def run_stage_artifacts(stage: str, config: Config, parent_run_id: str | None, skip_unchanged: bool) -> dict:
    return run_stage(stage, config, parent_run_id, skip_unchanged).artifacts


def select_stages(stages: list[str] | None) -> list[str]:
    """``stages`` (default: all) checked against the pipeline's, in pipeline order."""
    selected = list(stages or STAGES)
    unknown = [s for s in selected if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stages {unknown}; the pipeline's stages are {', '.join(STAGES)}")
    return [s for s in STAGES if s in selected]


def run_pipeline(
    config: Config, stages: list[str] | None = None, force: bool = False, runner: StageRunner = run_stage_artifacts
) -> dict[str, dict[str, str]]:
    """Run ``stages`` in order under one parent MLflow run, skipping unchanged ones unless ``force``; ``runner``
    runs one stage (the Prefect flow passes its tasks). Returns each stage's artifacts."""
    outputs: dict[str, dict[str, str]] = {}
    selected = select_stages(stages)
    preflight.check_before_work(config, selected)
    with pipeline_run(config, name=pipeline_run_name(config)) as parent:
        for stage in selected:
            outputs[stage] = runner(stage, config, parent.run_id, not force)
        log_stage_metrics(config, parent, selected)
    return outputs


def log_stage_metrics(config: Config, logger, stages) -> None:
    """Copy the numeric metrics of each stage's ``metrics.json`` (run now or skipped as unchanged) onto the
    pipeline's parent run, so two pipeline runs (say ``ppo_max`` and ``vanilla``) compare on one row in the
    MLflow UI."""
    for stage in stages:
        path = Path(output_dir(config, stage)) / "metrics.json"
        if STAGES[stage].metrics_file != "metrics.json" or not path.is_file():
            continue  # prepare's stats.json is nested counts, logged by its own run
        metrics = read_json(path)
        logger.log_metrics({k: float(v) for k, v in metrics.items() if type(v) in (int, float)})
