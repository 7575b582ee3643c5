"""Checks of the file system a stage is about to write, run before it reads, trains or deletes anything.

What depends on where the run starts and on the disk is checked here, not in the configuration's schema: the
output directories (``paths.*``, relative to the working directory) stay inside the project unless absolute, and
no two stages share or nest theirs; each directory is a directory, it and everything in it can be written (a
read-only ``outputs/ppo`` would otherwise lose its checkpoints to a fresh run and then fail), and it holds nothing
the stage did not write (``paths.ppo`` pointed at a folder of the user's would have its ``model/`` replaced). A hub
model name that could be neither loaded from the cache nor downloaded is reported here too.
"""

from __future__ import annotations

import os
from pathlib import Path

from rlhf_core import commit
from rlhf_core.errors import ConfigError
from rlhf_core.stages import STAGES

# What any stage's directory may hold besides the stage's own entries (its declaration's): the scaffold's files
# and DVC's .gitignore.
COMMON_ENTRIES = {"config.yaml", "metrics.json", "plots", commit.MANIFEST, commit.STAGING, commit.TRASH, ".gitignore"}


def check_stage_output(out: Path, stage: str, entries: set[str], where: str) -> None:
    """One ConfigError line, before any work, when ``stage`` could not safely write its output directory ``out``
    (``where``: the config field and value that name it), where it may leave ``entries`` (its declaration's)."""
    _check_creatable(out, where, directory=True)
    if not out.exists():
        return
    _check_writable_tree(out, where)
    _check_only_stage_files(out, stage, entries, where)


def check_before_work(config, stages: list[str]) -> None:
    """What the disk must allow for ``stages`` to run, checked before any stage reads, trains or deletes. Cheap on
    purpose (nothing here imports torch), so a mistake in the paths is reported in a blink."""
    check_output_paths(config)
    check_tracking_store(config)
    for stage in stages:
        declared, out = STAGES[stage], STAGES[stage].output_dir(config)
        check_stage_output(Path(out), stage, declared.entries, f"paths.{declared.path_key}={out}")
    check_model_source(config, stages)


def check_model_source(config, stages: list[str]) -> None:
    """A hub name in ``model.name_or_path``, for stages that load it, is in the Hugging Face cache or the hub can
    be reached (one short request); otherwise one line at once, not a minute of the hub client's retries."""
    name = config.model.name_or_path
    reads = lambda params: any(p in ("model", "model.name_or_path") for p in params)  # noqa: E731
    if name and any(reads(STAGES[stage].params) for stage in stages):
        from rlhf_core.models.store import check_hub_model

        check_hub_model(name, config.model.store)


def check_output_paths(config) -> None:
    """Every ``paths.*`` names a directory a stage may replace: inside the project when relative, not the project,
    home or root directory, and apart from every other stage's (neither the same nor nested)."""
    project = Path.cwd().resolve()
    values = config.paths.model_dump()
    resolved = {}
    for name, value in values.items():
        problem = _output_path_problem(value, project)
        if problem:
            raise ConfigError(f"paths.{name}={value!r} {problem}")
        resolved[name] = (project / value).resolve()
    names = list(resolved)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if resolved[a] == resolved[b] or resolved[a] in resolved[b].parents or resolved[b] in resolved[a].parents:
                raise ConfigError(
                    f"paths.{a}={values[a]!r} and paths.{b}={values[b]!r} overlap: one stage would overwrite or "
                    "delete the other's outputs; give each stage its own directory"
                )


def _output_path_problem(value: str, project: Path) -> str | None:
    """Why ``value`` cannot be a stage's output directory, or None."""
    if "\0" in value or any(ord(ch) < 32 for ch in value):
        return "contains a control character"
    if value.startswith("~"):
        return "starts with '~', which no stage expands; write the full path"
    path = Path(value)
    target = (project / path).resolve()
    if target == project or target in project.parents:
        return "is the project directory or one of its parents: a stage replaces its directory's contents"
    if target == Path.home().resolve() or target == Path(target.anchor):
        return "is the home or root directory"
    if not path.is_absolute() and project not in target.parents:
        return "leaves the project directory; use an absolute path to write outside it on purpose"
    return None


def check_tracking_store(config) -> None:
    """The local SQLite file an ``sqlite:///`` tracking URI names must be creatable (MLflow's own error for a path
    under a file is a traceback)."""
    uri = config.tracking.uri
    if config.tracking.enabled:
        from rlhf_core.tracking import check_tracking_uri

        check_tracking_uri(uri)
    if not config.tracking.enabled or not uri.startswith("sqlite:///"):
        return
    database = Path(uri.removeprefix("sqlite:///"))
    if database.is_dir():
        raise ConfigError(f"tracking.uri={uri}: {database} is a directory; name a .db file")
    _check_creatable(database, f"tracking.uri={uri}", directory=False)


def _check_creatable(path: Path, where: str, directory: bool) -> None:
    """``path`` can be created or written: no file in its way above it (nor at it, for a ``directory``), and the
    nearest existing folder writable."""
    if directory and path.exists() and not path.is_dir():
        raise ConfigError(f"{where}: {path} is a file, not a directory; choose a directory")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{where}: {parent} is a file, so nothing can be created under it")
            if not path.exists() and not os.access(parent, os.W_OK | os.X_OK):
                raise ConfigError(f"{where}: cannot create it, {parent} is not writable")
            return


def _check_writable_tree(out: Path, where: str) -> None:
    """Every folder under ``out`` writable: committing renames entries and clears old ones in any of them."""
    for folder, subfolders, _ in os.walk(out):
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(
                f"{where}: {folder} is not writable; nothing was changed. Make it writable (chmod -R u+w {out}) "
                "or choose another directory"
            )
        subfolders[:] = [s for s in subfolders if not os.path.islink(os.path.join(folder, s))]


def _our_temporary(name: str) -> bool:
    """A leftover of our own atomic writes (``.name.xxxx.tmp`` / ``.old``), cleared by the next commit."""
    return name.startswith(".") and name.endswith((".tmp", ".old"))


def _check_only_stage_files(out: Path, stage: str, entries: set[str], where: str) -> None:
    """``out`` holds this stage's outputs (or nothing): never another stage's or a folder of the user's."""
    manifest = commit.read_manifest(out)
    if manifest is not None and manifest.get("stage") not in (stage, None):
        raise ConfigError(f"{where}: {out} holds the outputs of the {manifest['stage']} stage; give each stage its own")
    recorded = set((manifest or {}).get("outputs") or {})
    allowed = entries | COMMON_ENTRIES | recorded
    foreign = sorted(p.name for p in out.iterdir() if p.name not in allowed and not _our_temporary(p.name))
    if foreign:
        shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
        raise ConfigError(
            f"{where}: {out} holds files the {stage} stage did not write ({shown}); the stage replaces what is "
            "in its directory, so choose an empty or new one"
        )
