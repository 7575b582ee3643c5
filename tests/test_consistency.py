"""The stage declarations are consistent, and dvc.yaml, the Prefect flow, the CLI and the configured paths follow
them (dvc.yaml is generated from them: tests/test_stage_reads.py checks it is up to date)."""

from __future__ import annotations

from pathlib import Path

import yaml

from flows.rlhf import FLOW_STAGES
from rlhf_core.config import Config, PathsConfig
from rlhf_core.stages import STAGES, output_dir
from tests.conftest import REPO

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _paths(entries) -> list[str]:
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]


def test_same_stages_in_the_same_order_everywhere():
    assert list(DVC) == list(STAGES) == list(FLOW_STAGES)


def test_dvc_commands_call_the_cli_stage():
    from typer.main import get_command

    from rlhf_core.cli import app

    commands = get_command(app).commands
    for stage, spec in DVC.items():
        assert spec["cmd"] == f"rlhf {stage}"
        assert stage in commands, f"`rlhf {stage}` is not a command"


def test_dvc_outputs_live_under_the_configured_stage_directory():
    config = Config()
    for stage, spec in DVC.items():
        root = Path(output_dir(config, stage))
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
        earlier_outputs += _paths(spec.get("outs")) + _paths(spec.get("metrics"))  # DVC keeps metrics files apart


def test_dvc_params_name_real_config_fields():
    tree = Config().model_dump()
    for stage, spec in DVC.items():
        for key in spec.get("params", []):
            node = tree
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"{stage}: params key {key} is not in the config"
                node = node[part]
        assert "tracking" not in spec.get("params", []), "tracking does not change outputs"


def test_each_stage_has_its_own_paths_field():
    assert sorted(stage.path_key for stage in STAGES.values()) == sorted(PathsConfig.model_fields)


def test_a_stage_reads_only_what_earlier_stages_declare_they_write():
    order = list(STAGES)
    for name, stage in STAGES.items():
        assert all(order.index(u) < order.index(name) for u in stage.upstream), name
        for item in stage.inputs:
            source, path = item.split("/", 1)
            written = [o.path for o in STAGES[source].outputs] + [STAGES[source].metrics_file]
            assert any(path == w or path.startswith(w + "/") for w in written), f"{name} reads {item}, never written"


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
                      and "trainers" not in p.parts
                      and p.name not in ("pipeline.py", "cli.py", "stages.py", "dvc_file.py")]  # fmt: skip
    for path in (REPO / "rlhf_core").rglob("*.py"):
        imported = _project_imports(path)
        where = path.relative_to(REPO)
        assert not {m for m in imported if m.split(".")[0] in ("flows", "tasks")}, f"{where} imports flows/tasks"
        if path in below_trainers:
            up = {m for m in imported if m.startswith(("rlhf_core.trainers", "rlhf_core.pipeline", "rlhf_core.cli"))}
            assert not up, f"{where} imports {up}, a layer above it"
        if "data" in path.relative_to(REPO / "rlhf_core").parts[:1]:
            assert not {m for m in imported if m.startswith("rlhf_core.models")}, f"{where} imports models/"


def test_engines_keep_the_engine_contract_and_trainers_never_test_an_engine_type():
    """What differs between engines is an attribute of the engine (``distributed.Engine``), not a type test."""
    import ast
    import inspect

    from rlhf_core import distributed

    wanted = {n for n, _ in inspect.getmembers(distributed.Engine) if not n.startswith("_")}
    wanted |= set(distributed.Engine.__annotations__)
    for engine in (distributed.TorchEngine, distributed.DeepSpeedEngine):
        have = {n for n, _ in inspect.getmembers(engine)} | set(inspect.signature(engine.__init__).parameters)
        have |= {n for n in wanted if f"self.{n} =" in inspect.getsource(engine)}
        assert wanted <= have, (engine.__name__, wanted - have)
    assert distributed.TorchEngine.drops_non_finite_updates and not distributed.DeepSpeedEngine.drops_non_finite_updates
    for path in (REPO / "rlhf_core" / "trainers").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance":
                assert "Engine" not in ast.unparse(node.args[1]), f"{path.relative_to(REPO)}: {ast.unparse(node)}"
