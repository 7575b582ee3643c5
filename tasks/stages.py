"""One Prefect task per stage. Each returns its artifact paths and skips itself when its params, code and
upstream stages are unchanged since its last successful run (``rlhf_core.pipeline``).

Retries only where one is safe and cheap: every stage writes its outputs to a temporary path and renames, so a
failed attempt leaves nothing half-written. ``prepare``, ``rm-eval`` and ``eval`` are deterministic and short;
``ppo`` resumes from its newest checkpoint (``ppo.checkpoint.resume: auto``), so a retry continues rather than restarts.
``sft`` and ``rm`` keep no mid-run state, so a retry would silently redo the whole training: they fail at once.
A configuration or data error (``RLHFError``) is never retried: it would fail the same way again."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.states import Completed

from rlhf_core.config import Config, stage_output_dir
from rlhf_core.errors import RLHFError
from rlhf_core.pipeline import run_stage

RETRY_DELAY_SECONDS = 5


def _run_and_report(stage: str, config: Config, parent_run_id: str | None, skip_unchanged: bool):
    """Run ``stage`` and show its result in the Prefect UI: a markdown artifact with its headline numbers, and
    for a stage skipped as unchanged a log line and a final state named ``Skipped`` (not a plain Completed, which
    looks exactly like a run). Returns the artifacts, as the flow expects."""
    outcome = run_stage(stage, config, parent_run_id, skip_unchanged)
    logger = get_run_logger()
    where = stage_output_dir(config, stage)
    if outcome.artifacts.get("skipped"):
        logger.info(f"{stage}: skipped: unchanged since its last run (params, code and inputs); outputs in {where}")
        return Completed(name="Skipped", message="skipped: unchanged", data=outcome.artifacts)
    create_markdown_artifact(
        key=f"{stage.replace('_', '-')}-result",
        markdown=result_markdown(stage, config, where),
        description=f"rlhf {stage}: headline numbers",
    )
    return outcome.artifacts


def result_markdown(stage: str, config: Config, where: str) -> str:
    """The rows ``rlhf run`` prints for ``stage``, read from the file ``print_summary`` reads (``stats.json`` for
    prepare: its nested counts are not in the stage's flat metrics), as a markdown table."""
    from rlhf_core.cli import SUMMARY_ROWS

    file, rows = SUMMARY_ROWS[stage]
    lines = [f"### {stage} ({config.ppo.preset}, outputs in `{where}`)", "", "| what | value |", "| --- | --- |"]
    try:
        from rlhf_core.io import read_json

        table = rows(read_json(f"{where}/{file}"), config)
    except (RLHFError, KeyError):
        table = [("metrics", "(not readable)")]
    lines += [f"| {what} | {value} |" for what, value in table]
    return "\n".join(lines) + "\n"


def transient_failure(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry anything but the project's own configuration and data errors."""
    return not isinstance(state.data, RLHFError)


def _retried(name: str):
    return task(name=name, retries=1, retry_delay_seconds=RETRY_DELAY_SECONDS, retry_condition_fn=transient_failure)


@_retried("prepare")
def prepare_task(config: Config, parent_run_id: str | None = None, skip_unchanged: bool = True) -> dict[str, str]:
    return _run_and_report("prepare", config, parent_run_id, skip_unchanged)


@task(name="sft", retries=0)
def sft_task(config: Config, parent_run_id: str | None = None, skip_unchanged: bool = True) -> dict[str, str]:
    return _run_and_report("sft", config, parent_run_id, skip_unchanged)


@task(name="rm", retries=0)
def rm_task(config: Config, parent_run_id: str | None = None, skip_unchanged: bool = True) -> dict[str, str]:
    return _run_and_report("rm", config, parent_run_id, skip_unchanged)


@_retried("rm-eval")
def rm_eval_task(config: Config, parent_run_id: str | None = None, skip_unchanged: bool = True) -> dict[str, str]:
    return _run_and_report("rm-eval", config, parent_run_id, skip_unchanged)


@_retried("ppo")
def ppo_task(config: Config, parent_run_id: str | None = None, skip_unchanged: bool = True) -> dict[str, str]:
    return _run_and_report("ppo", config, parent_run_id, skip_unchanged)


@_retried("eval")
def eval_task(config: Config, parent_run_id: str | None = None, skip_unchanged: bool = True) -> dict[str, str]:
    return _run_and_report("eval", config, parent_run_id, skip_unchanged)


STAGE_TASKS = {
    "prepare": prepare_task,
    "sft": sft_task,
    "rm": rm_task,
    "rm-eval": rm_eval_task,
    "ppo": ppo_task,
    "eval": eval_task,
}
