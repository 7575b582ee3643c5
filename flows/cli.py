"""The ``rlhf`` command: the stage subcommands of ``rlhf_core.cli`` plus ``rlhf run``, the whole pipeline. The
console script is this module's ``main`` (``rlhf_core.cli.main``, run once this module has added ``run``).

``rlhf run`` sits here, above the flow, because it can start the Prefect flow; with ``--no-prefect`` it runs the
same pipeline loop (``rlhf_core.pipeline.run_pipeline``) without Prefect.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from rlhf_core.cli import ParamsOpt, SetOpt, app, fail, load, main, print_summary
from rlhf_core.env import apply_defaults
from rlhf_core.errors import RLHFError


@app.command()
def run(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    stages: Annotated[str | None, typer.Option(help="Comma-separated subset, e.g. prepare,sft.")] = None,
    prefect: Annotated[bool, typer.Option(help="Orchestrate with the Prefect flow 'rlhf'.")] = True,
    force: Annotated[bool, typer.Option(help="Rerun stages whose inputs and params are unchanged.")] = False,
) -> None:
    """Run the whole pipeline (the Prefect flow 'rlhf' by default) and print a summary."""
    apply_defaults()
    started = time.time()
    try:
        config = load(params, set_)
        from rlhf_core.pipeline import run_pipeline, select_stages

        selected = select_stages([s.strip() for s in stages.split(",")] if stages else None)
        if prefect:
            from flows.rlhf import rlhf as rlhf_flow

            outputs = rlhf_flow(params_file=str(params), overrides=list(set_ or []), stages=selected, force=force)
        else:
            outputs = run_pipeline(config, selected, force)
    except RLHFError as exc:
        fail(exc)
        return
    print_summary(config, outputs, time.time() - started, prefect)


if __name__ == "__main__":
    main()
