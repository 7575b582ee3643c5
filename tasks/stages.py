"""One Prefect task per stage. Each returns its artifact paths and skips itself when its params, code and
upstream stages are unchanged since its last successful run (``rlhf_core.pipeline``).

Retries only where one is safe and cheap: every stage writes its outputs to a temporary path and renames, so a
failed attempt leaves nothing half-written. ``prepare``, ``rm-eval`` and ``eval`` are deterministic and short;
``ppo`` resumes from its newest checkpoint (``ppo.checkpoint.resume: auto``), so a retry continues rather than restarts.
``sft`` and ``rm`` keep no mid-run state, so a retry would silently redo the whole training: they fail at once.
A configuration or data error (``RLHFError``) is never retried: it would fail the same way again."""

from __future__ import annotations

from prefect import task

from rlhf_core.config import Config
from rlhf_core.errors import RLHFError
from rlhf_core.pipeline import run_stage_artifacts

RETRY_DELAY_SECONDS = 5


def transient_failure(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry anything but the project's own configuration and data errors."""
    return not isinstance(state.data, RLHFError)


def _retried(name: str):
    return task(name=name, retries=1, retry_delay_seconds=RETRY_DELAY_SECONDS, retry_condition_fn=transient_failure)


@_retried("prepare")
def prepare_task(config: Config, parent_run_id: str | None = None, skip_unchanged: bool = True) -> dict[str, str]:
    return run_stage_artifacts("prepare", config, parent_run_id, skip_unchanged)


@task(name="sft", retries=0)
def sft_task(config: Config, parent_run_id: str | None = None, skip_unchanged: bool = True) -> dict[str, str]:
    return run_stage_artifacts("sft", config, parent_run_id, skip_unchanged)


@task(name="rm", retries=0)
def rm_task(config: Config, parent_run_id: str | None = None, skip_unchanged: bool = True) -> dict[str, str]:
    return run_stage_artifacts("rm", config, parent_run_id, skip_unchanged)


@_retried("rm-eval")
def rm_eval_task(config: Config, parent_run_id: str | None = None, skip_unchanged: bool = True) -> dict[str, str]:
    return run_stage_artifacts("rm-eval", config, parent_run_id, skip_unchanged)


@_retried("ppo")
def ppo_task(config: Config, parent_run_id: str | None = None, skip_unchanged: bool = True) -> dict[str, str]:
    return run_stage_artifacts("ppo", config, parent_run_id, skip_unchanged)


@_retried("eval")
def eval_task(config: Config, parent_run_id: str | None = None, skip_unchanged: bool = True) -> dict[str, str]:
    return run_stage_artifacts("eval", config, parent_run_id, skip_unchanged)


STAGE_TASKS = {
    "prepare": prepare_task,
    "sft": sft_task,
    "rm": rm_task,
    "rm-eval": rm_eval_task,
    "ppo": ppo_task,
    "eval": eval_task,
}
