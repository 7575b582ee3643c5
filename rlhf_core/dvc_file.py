"""``dvc.yaml``, generated from the stage declarations (``rlhf_core.stages``): ``rlhf dvc-yaml --write`` writes it,
``rlhf dvc-yaml --check`` (and a test) fails when the file in the project differs. Users still get a plain
``dvc.yaml`` for ``dvc repro`` and ``dvc exp run``; nobody edits it by hand.

Each stage's entry: ``rlhf <stage>`` as the command; as deps the earlier stages' outputs it reads and exactly the
project files whose hash its fingerprint takes (so ``dvc repro`` and ``rlhf run`` agree about what changed); its
params; its outputs, metrics file and plots under the default ``paths``.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from rlhf_core.config import Config
from rlhf_core.io import atomic_write_text
from rlhf_core.stages import PROJECT, STAGES, Stage, code_files, input_path

HEADER = """\
# Generated from rlhf_core/stages.py by `rlhf dvc-yaml --write`; edit the declarations there, not this file.
# `dvc repro` rebuilds what changed; run it with the project's venv active (or `make repro`).
"""


def _entry(path: str, cached: bool, options: dict | None = None) -> str | dict:
    settings = {**({} if cached else {"cache": False}), **(options or {})}
    return {path: settings} if settings else path


def stage_entry(stage: Stage, config: Config) -> dict:
    root = stage.output_dir(config)
    outs = [_entry(f"{root}/{o.path}", o.cached) for o in stage.outputs if o.plot is None]
    outs.append(_entry(f"{root}/config.yaml", cached=False))
    entry = {
        "cmd": f"rlhf {stage.name}",
        "deps": [str(input_path(config, item)) for item in stage.inputs] + code_files(stage.name),
        "params": list(stage.all_params),
        "outs": outs,
        "metrics": [_entry(f"{root}/{stage.metrics_file}", cached=False)],
    }
    plots = [_entry(f"{root}/{o.path}", o.cached, o.plot) for o in stage.outputs if o.plot is not None]
    if plots:
        entry["plots"] = plots
    return entry


def render(config: Config | None = None) -> str:
    """The text of ``dvc.yaml`` for ``config``'s paths (default: the defaults, which is what the project keeps)."""
    config = config or Config()
    document = {"stages": {stage.name: stage_entry(stage, config) for stage in STAGES.values()}}
    plots = [
        {plot.name: {"title": plot.title, "x": plot.x, "y": {f"{stage.output_dir(config)}/{plot.file}": list(plot.y)}}}
        for stage in STAGES.values()
        for plot in stage.plots
    ]
    if plots:
        document["plots"] = plots
    return HEADER + yaml.safe_dump(document, sort_keys=False, width=120)


def differs(path: Path = PROJECT / "dvc.yaml") -> str | None:
    """None when ``path`` is what :func:`render` gives; otherwise a line saying how to fix it."""
    if path.is_file() and path.read_text() == render():
        return None
    state = "is missing" if not path.is_file() else "differs from the stage declarations (rlhf_core/stages.py)"
    return f"{path} {state}; run `rlhf dvc-yaml --write` and commit the result"


def write(path: Path = PROJECT / "dvc.yaml") -> None:
    atomic_write_text(path, render())
