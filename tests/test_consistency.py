"""dvc.yaml, the Prefect flow, the stage list and the configured paths agree."""

from __future__ import annotations

from pathlib import Path

import yaml

from flows.rlhf import FLOW_STAGES
from rlhf_core.config import Config
from rlhf_core.pipeline import STAGES, stage_output_dir
from tests.conftest import REPO

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _paths(entries) -> list[str]:
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]


def test_same_stages_in_the_same_order_everywhere():
    assert list(DVC) == list(STAGES) == list(FLOW_STAGES)


def test_dvc_commands_call_the_cli_stage():
    for stage, spec in DVC.items():
        assert spec["cmd"] == f"rlhf {stage}"


def test_dvc_outputs_live_under_the_configured_stage_directory():
    config = Config()
    for stage, spec in DVC.items():
        root = Path(stage_output_dir(config, stage))
        produced = _paths(spec.get("outs")) + _paths(spec.get("metrics")) + _paths(spec.get("plots"))
        assert produced, stage
        for path in produced:
            assert Path(path).is_relative_to(root), f"{stage}: {path} is outside {root}"
        assert f"{root}/config.yaml" in produced, f"{stage} must keep its resolved config"


def test_dvc_dependencies_exist_or_come_from_an_earlier_stage():
    earlier_outputs: list[str] = []
    for stage, spec in DVC.items():
        for dep in spec.get("deps", []):
            from_stage = any(Path(dep).is_relative_to(out) for out in earlier_outputs)
            assert from_stage or (REPO / dep).exists(), f"{stage}: dependency {dep} is neither code nor an output"
        earlier_outputs += _paths(spec.get("outs"))


def test_dvc_params_name_real_config_fields():
    tree = Config().model_dump()
    for stage, spec in DVC.items():
        for key in spec.get("params", []):
            node = tree
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"{stage}: params key {key} is not in the config"
                node = node[part]
        assert "tracking" not in spec.get("params", []), "tracking does not change outputs"


def _declared(module_file: str, deps: list[str]) -> bool:
    return any(module_file == dep or Path(module_file).is_relative_to(dep) for dep in deps)


def test_every_stage_declares_the_project_code_it_imports():
    """A change to any project module a stage imports must make `dvc repro` rerun that stage."""
    import ast
    import inspect

    for stage, function in STAGES.items():
        source = Path(inspect.getsourcefile(function)).relative_to(REPO)
        deps = DVC[stage]["deps"]
        assert _declared(str(source), deps), f"{stage}: {source} missing from deps"
        for node in ast.walk(ast.parse((REPO / source).read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rlhf_core"):
                names = [node.module] if node.module != "rlhf_core" else [f"rlhf_core.{a.name}" for a in node.names]
                for name in names:
                    if name in ("rlhf_core.tracking", "rlhf_core.errors"):
                        continue  # where metrics are logged and how errors read do not change outputs
                    path = name.replace(".", "/")
                    module_file = f"{path}.py" if (REPO / f"{path}.py").exists() else path
                    assert _declared(module_file, deps), f"{stage}: imports {name} but dvc.yaml lacks it"


def test_stage_params_match_dvc_and_upstream_covers_every_stage():
    from rlhf_core.pipeline import STAGE_PARAMS, UPSTREAM

    assert {stage: spec.get("params", []) for stage, spec in DVC.items()} == STAGE_PARAMS
    assert list(UPSTREAM) == list(STAGES)
    for stage, upstream in UPSTREAM.items():
        assert all(list(STAGES).index(u) < list(STAGES).index(stage) for u in upstream)


def _project_imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth of the file (function-level imports included)."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_imports_run_down_the_layers():
    """DESIGN.md's direction: flows -> tasks -> rlhf_core (pipeline, cli) -> trainers -> models, data, ... -> algos.
    rlhf_core imports nothing of flows or tasks; nothing below the stages imports a stage; data stays below models."""
    below_trainers = [p for p in (REPO / "rlhf_core").rglob("*.py") if p.parent.name != "trainers"
                      and "trainers" not in p.parts and p.name not in ("pipeline.py", "cli.py")]  # fmt: skip
    for path in (REPO / "rlhf_core").rglob("*.py"):
        imported = _project_imports(path)
        where = path.relative_to(REPO)
        assert not {m for m in imported if m.split(".")[0] in ("flows", "tasks")}, f"{where} imports flows/tasks"
        if path in below_trainers:
            up = {m for m in imported if m.startswith(("rlhf_core.trainers", "rlhf_core.pipeline", "rlhf_core.cli"))}
            assert not up, f"{where} imports {up}, a layer above it"
        if "data" in path.relative_to(REPO / "rlhf_core").parts[:1]:
            assert not {m for m in imported if m.startswith("rlhf_core.models")}, f"{where} imports models/"
