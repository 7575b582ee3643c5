"""The ``rlhf`` command: the stage subcommands of ``rlhf_core.cli`` plus ``rlhf run``, the whole pipeline. The
console script is this module's ``main`` (``rlhf_core.cli.main``, run once this module has added ``run``).

``rlhf run`` sits here, above the flow, because it can start the Prefect flow; with ``--no-prefect`` it runs the
same pipeline loop (``rlhf_core.pipeline.run_pipeline``) without Prefect.
"""

from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path
from typing import Annotated

import typer

from rlhf_core.cli import (
    ParamsOpt,
    SetOpt,
    app,
    console,
    fail,
    install_stop_handlers,
    load,
    main,
    print_summary,
    report_stop,
    stopped,
)
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
    install_stop_handlers()
    started = time.time()
    config = None
    try:
        config = load(params, set_)
        from rlhf_core.pipeline import STAGES, run_pipeline, select_stages
        from rlhf_core.preflight import check_before_work

        selected = select_stages([s.strip() for s in stages.split(",")] if stages else None)
        check_before_work(config, selected)
        if prefect:
            from flows.prefect_server import temporary_server
            from flows.rlhf import rlhf as rlhf_flow

            _keep_user_errors_off_the_console()
            with temporary_server():
                outputs = rlhf_flow(params_file=str(params), overrides=list(set_ or []), stages=selected, force=force)
        else:
            outputs = run_pipeline(config, selected, force)
    except RLHFError as exc:
        fail(exc)
        return
    except BaseException as exc:
        if not stopped(exc) or config is None:
            raise
        report_stop(
            "rlhf run was interrupted", "stages that finished keep their outputs, the interrupted one its previous ones"
        )
        return
    print_summary(config, outputs, time.time() - started, prefect)
    if not set_ and len(selected) == len(STAGES):
        record_in_dvc(params)


@app.command()
def plots(
    revisions: Annotated[
        list[str] | None,
        typer.Argument(help="Revisions or experiments to overlay (dvc plots diff); none: the workspace."),
    ] = None,
    out: Annotated[Path, typer.Option(help="The HTML page to write.")] = Path("dvc_plots/offline.html"),
) -> None:
    """The plots of dvc.yaml as one HTML page that needs no network (`dvc plots show` loads vega from a CDN)."""
    from flows.plots import write_plots_page

    try:
        written, count = write_plots_page(revisions or [], out)
    except RLHFError as exc:
        fail(exc)
        return
    typer.echo(f"{count} plots in {written} (self-contained: no scripts, nothing loaded from the network)")


def record_in_dvc(params: Path) -> None:
    """After a whole pipeline run from ``params.yaml`` without overrides (what ``dvc.yaml`` describes), record its
    outputs in ``dvc.lock`` (``dvc commit -f``), so ``make repro`` finds every stage up to date instead of running
    all six again: the two front doors agree. Anywhere else (no DVC project, another params file) it does nothing;
    a DVC that fails prints one line and the run stays a success."""
    if params.resolve() != Path("params.yaml").resolve() or not Path("dvc.yaml").is_file() or not Path(".dvc").is_dir():
        return
    from flows.plots import dvc_executable

    dvc = dvc_executable()
    try:
        done = subprocess.run([dvc, "commit", "--force", "--quiet"], capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.SubprocessError) as exc:
        console.print(f"dvc.lock not updated ({exc}); `dvc commit -f` records these outputs", highlight=False)
        return
    if done.returncode:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["?"]
        console.print(f"dvc.lock not updated ({last[0]}); `dvc commit -f` records these outputs", highlight=False)
    else:
        typer.echo("dvc.lock records these outputs: `make repro` and `dvc status` find every stage up to date")


def _user_error_names() -> tuple[str, ...]:
    names, todo = [], [RLHFError]
    while todo:
        cls = todo.pop()
        names.append(cls.__name__)
        todo += cls.__subclasses__()
    return tuple(names)


class _NoUserErrorReports(logging.Filter):
    """Prefect logs a failed task and flow with the exception's traceback (twice: task, then flow) and then their
    final states. For a mistake of the user's (an RLHFError) the one line ``rlhf run`` prints is the whole story:
    keep these records off the console. They still reach the Prefect API, so the UI shows why the run failed."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("prefect"):
            return True
        if record.exc_info and isinstance(record.exc_info[1], RLHFError):
            return False
        return not any(f"{name}:" in record.getMessage() or f"{name}(" in record.getMessage()
                       for name in _user_error_names())  # fmt: skip


def _keep_user_errors_off_the_console() -> None:
    from prefect.logging.configuration import setup_logging
    from prefect.logging.handlers import PrefectConsoleHandler

    setup_logging()  # idempotent; makes sure the console handler exists before we filter it
    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not any(
            isinstance(f, _NoUserErrorReports) for f in handler.filters
        ):
            handler.addFilter(_NoUserErrorReports())


if __name__ == "__main__":
    main()
