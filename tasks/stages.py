"""One Prefect task per stage, made from its declaration (``rlhf_core.stages``). Each returns its artifact paths
and skips itself when its params, code and upstream stages are unchanged since its last successful run
(``rlhf_core.pipeline``).

Retries (the declaration's ``retries``) only where one is safe and cheap: every stage writes its outputs to a
temporary path and renames, so a failed attempt leaves nothing half-written. ``prepare``, ``rm-eval`` and ``eval``
are deterministic and short; ``ppo`` resumes from its newest checkpoint (``ppo.checkpoint.resume: auto``), so a
retry continues rather than restarts. ``sft`` and ``rm`` keep no mid-run state, so a retry would silently redo the
whole training: they fail at once. A configuration or data error (``RLHFError``) is never retried: it would fail
the same way again. Prefect's result cache is off: whether a stage may be skipped is the pipeline's skip rule,
which also checks the outputs on disk."""

from __future__ import annotations

from prefect import Task, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from rlhf_core.config import Config
from rlhf_core.errors import RLHFError
from rlhf_core.io import read_json
from rlhf_core.pipeline import run_stage
from rlhf_core.stages import STAGES, Stage

RETRY_DELAY_SECONDS = 5


def _run_and_report(stage: str, config: Config, parent_run_id: str | None, skip_unchanged: bool):
    """Run ``stage`` and show its result in the Prefect UI: a markdown artifact with its headline numbers, and
    for a stage skipped as unchanged a log line and a final state named ``Skipped`` (not a plain Completed, which
    looks exactly like a run). Returns the artifacts, as the flow expects."""
    outcome = run_stage(stage, config, parent_run_id, skip_unchanged)
    logger = get_run_logger()
    where = STAGES[stage].output_dir(config)
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
    """The rows ``rlhf run`` prints for ``stage`` (its declaration's summary, read from its metrics file), as a
    markdown table."""
    declared = STAGES[stage]
    lines = [f"### {stage} ({config.ppo.preset}, outputs in `{where}`)", "", "| what | value |", "| --- | --- |"]
    try:
        table = declared.summary(read_json(f"{where}/{declared.metrics_file}"), config)
    except (RLHFError, KeyError):
        table = [("metrics", "(not readable)")]
    lines += [f"| {what} | {value} |" for what, value in table]
    return "\n".join(lines) + "\n"


def transient_failure(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry anything but the project's own configuration and data errors."""
    return not isinstance(state.data, RLHFError)


def stage_task(stage: Stage) -> Task:
    """The Prefect task running ``stage`` (named after it, so the UI and the task keys tell stages apart)."""

    def run(config: Config, parent_run_id: str | None = None, skip_unchanged: bool = True) -> dict[str, str]:
        return _run_and_report(stage.name, config, parent_run_id, skip_unchanged)

    run.__name__ = run.__qualname__ = f"{stage.name.replace('-', '_')}_task"
    retry = {"retry_delay_seconds": RETRY_DELAY_SECONDS, "retry_condition_fn": transient_failure}
    return task(run, name=stage.name, retries=stage.retries, cache_policy=NO_CACHE, **(retry if stage.retries else {}))


STAGE_TASKS = {name: stage_task(stage) for name, stage in STAGES.items()}
