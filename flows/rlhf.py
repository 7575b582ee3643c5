"""The Prefect flow ``rlhf``: the pipeline loop of ``rlhf_core.pipeline`` with each stage a Prefect task.

Run it directly (``python -m flows.rlhf``), through ``rlhf run``, or serve it as the deployment ``full``
(``python -m flows.serve``; then ``prefect deployment run rlhf/full``).
"""

from __future__ import annotations

from prefect import flow
from prefect.states import State

from rlhf_core.config import load_config
from rlhf_core.pipeline import STAGES, run_pipeline
from tasks.stages import STAGE_TASKS

FLOW_STAGES = tuple(STAGES)


def _run_task(stage: str, config, parent_run_id: str | None, skip_unchanged: bool) -> dict[str, str]:
    returned = STAGE_TASKS[stage](config, parent_run_id, skip_unchanged)
    # A skipped stage's task returns its final state (named Skipped, the artifacts as its data).
    return returned.result() if isinstance(returned, State) else returned


@flow(name="rlhf", log_prints=True)
def rlhf(
    params_file: str = "params.yaml",
    overrides: list[str] | None = None,
    stages: list[str] | None = None,
    force: bool = False,
) -> dict[str, dict[str, str]]:
    """Run ``stages`` (default: all) with ``params_file`` plus ``group.key=value`` overrides; stages whose
    inputs and params are unchanged are skipped unless ``force``."""
    config = load_config(params_file, overrides or [])
    return run_pipeline(config, stages, force, runner=_run_task)


if __name__ == "__main__":
    rlhf()
