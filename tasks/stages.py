"""One Prefect task per stage. Each returns its artifact paths and skips itself when its params, code and
upstream stages are unchanged since its last successful run (``rlhf_core.pipeline``). Retries stay off: a
training stage is not idempotent mid-way (PPO resumes from its own checkpoints instead)."""

from __future__ import annotations

from prefect import task

from rlhf_core.config import Config
from rlhf_core.pipeline import run_stage


@task(name="prepare", retries=0)
def prepare_task(config: Config, parent_run_id: str | None = None, skip_unchanged: bool = True) -> dict[str, str]:
    return run_stage("prepare", config, parent_run_id, skip_unchanged)


@task(name="sft", retries=0)
def sft_task(config: Config, parent_run_id: str | None = None, skip_unchanged: bool = True) -> dict[str, str]:
    return run_stage("sft", config, parent_run_id, skip_unchanged)


@task(name="rm", retries=0)
def rm_task(config: Config, parent_run_id: str | None = None, skip_unchanged: bool = True) -> dict[str, str]:
    return run_stage("rm", config, parent_run_id, skip_unchanged)


@task(name="rm-eval", retries=0)
def rm_eval_task(config: Config, parent_run_id: str | None = None, skip_unchanged: bool = True) -> dict[str, str]:
    return run_stage("rm-eval", config, parent_run_id, skip_unchanged)


@task(name="ppo", retries=0)
def ppo_task(config: Config, parent_run_id: str | None = None, skip_unchanged: bool = True) -> dict[str, str]:
    return run_stage("ppo", config, parent_run_id, skip_unchanged)


@task(name="eval", retries=0)
def eval_task(config: Config, parent_run_id: str | None = None, skip_unchanged: bool = True) -> dict[str, str]:
    return run_stage("eval", config, parent_run_id, skip_unchanged)


STAGE_TASKS = {
    "prepare": prepare_task,
    "sft": sft_task,
    "rm": rm_task,
    "rm-eval": rm_eval_task,
    "ppo": ppo_task,
    "eval": eval_task,
}
