"""The Prefect flow ``rlhf``: the pipeline stages in order, under one parent MLflow run.

Run it directly (``python -m flows.rlhf``), through ``rlhf run``, or serve it as the deployment ``full``
(``python -m flows.serve``; then ``prefect deployment run rlhf/full``).
"""

from __future__ import annotations

from prefect import flow

from rlhf_core.config import load_config
from rlhf_core.pipeline import log_stage_metrics
from rlhf_core.tracking import pipeline_run
from tasks.stages import STAGE_TASKS

FLOW_STAGES = tuple(STAGE_TASKS)


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
    selected = list(stages or FLOW_STAGES)
    unknown = [s for s in selected if s not in STAGE_TASKS]
    if unknown:
        raise ValueError(f"unknown stages {unknown}; the flow has {list(FLOW_STAGES)}")
    outputs: dict[str, dict[str, str]] = {}
    with pipeline_run(config, name="rlhf") as parent:
        for stage in FLOW_STAGES:
            if stage in selected:
                outputs[stage] = STAGE_TASKS[stage](config, parent.run_id, not force)
        log_stage_metrics(config, parent, selected)
    return outputs


if __name__ == "__main__":
    rlhf()
