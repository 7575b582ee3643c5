"""What each stage reads, measured: every stage runs on the tiny configuration while the test records which config
fields it reads and which project source files it executes. Both must be covered by what decides whether the
stage reruns: its declared params (its fingerprint and its dvc.yaml params) and its code files (its fingerprint's
code hash and its dvc.yaml deps). A stage that starts reading ``eval.seed`` without declaring it fails here."""

from __future__ import annotations

import hashlib
import sys
import threading
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from rlhf_core import commit, dvc_file, pipeline, stages
from rlhf_core import config as config_module
from rlhf_core.config import load_config
from tests.conftest import REPO, tiny_overrides

# Reads that cannot change a stage's outputs, or that its fingerprint covers another way: where runs are logged,
# and the output directories (its own is in the fingerprint, the ones it reads come with their stages' stamps).
EXEMPT_KEYS = ("tracking", "paths")


class ConfigReads:
    """Records the dotted keys of the config fields read through ``config`` and the groups inside it (leaf values,
    and whole groups dumped with ``model_dump``), including through copies made with ``model_copy``."""

    def __init__(self, config: BaseModel):
        self.keys: set[str] = set()
        self._paths: dict[int, str] = {}
        self._keep: list[BaseModel] = []  # keeps recorded objects alive, so their ids stay theirs
        self._register(config, "")

    def _register(self, group: BaseModel, path: str) -> None:
        self._paths[id(group)] = path
        self._keep.append(group)
        for name in type(group).model_fields:
            value = object.__getattribute__(group, name)
            if isinstance(value, BaseModel):
                self._register(value, f"{path}.{name}" if path else name)

    def __enter__(self):
        recorder, group_class = self, config_module._Group
        original_get, original_dump, original_copy = (
            group_class.__getattribute__, group_class.model_dump, group_class.model_copy
        )  # fmt: skip

        def getattribute(obj, name):
            value = original_get(obj, name)
            path = recorder._paths.get(id(obj))
            if path is not None and name in type(obj).model_fields and not isinstance(value, BaseModel):
                recorder.keys.add(f"{path}.{name}" if path else name)
            return value

        def model_dump(obj, *args, **kwargs):
            path = recorder._paths.get(id(obj))
            if path:
                recorder.keys.add(path)
            return original_dump(obj, *args, **kwargs)

        def model_copy(obj, *args, **kwargs):
            copied = original_copy(obj, *args, **kwargs)
            path = recorder._paths.get(id(obj))
            if path is not None:
                recorder._register(copied, path)
            return copied

        self._restore = (original_get, original_dump, original_copy)
        group_class.__getattribute__, group_class.model_dump, group_class.model_copy = (
            getattribute, model_dump, model_copy
        )  # fmt: skip
        return self

    def __exit__(self, *exc):
        group_class = config_module._Group
        group_class.__getattribute__, group_class.model_dump, group_class.model_copy = self._restore


class CodeRun:
    """Records the project source files (under rlhf_core/) whose functions run, in every thread."""

    def __init__(self):
        self.files: set[str] = set()
        self._root = str(REPO / "rlhf_core")

    def _trace(self, frame, event, arg):
        # Called once per new Python frame (not per line: returning None leaves the frame untraced).
        name = frame.f_code.co_filename
        if name.startswith(self._root):
            self.files.add(str(Path(name).relative_to(REPO)))

    def __enter__(self):
        sys.settrace(self._trace)
        threading.settrace(self._trace)
        return self

    def __exit__(self, *exc):
        sys.settrace(None)
        threading.settrace(None)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """Every stage run once on the tiny configuration: stage -> (config keys read, project files run)."""
    root = tmp_path_factory.mktemp("reads")
    config = load_config(None, [*tiny_overrides(root), "ppo.steps=2", "sft.max_steps=4", "rm.max_steps=3"])
    readings = {}
    for name in stages.STAGES:
        with ConfigReads(config) as reads, CodeRun() as code:
            outcome = pipeline.run_stage(name, config)  # the scaffold's reads count too: it runs the same way
        assert "skipped" not in outcome.artifacts, name
        readings[name] = (reads.keys, code.files)
    return readings


def _covered(key: str, declared: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in declared)


def _declared_with_upstream(stage: str) -> tuple[str, ...]:
    """Its params and those of every stage it reads, at any distance: a change to those reruns the upstream stage,
    and the new upstream fingerprint (or, for DVC, its new outputs) reruns this one."""
    params, todo = [], [stage]
    while todo:
        declared = stages.STAGES[todo.pop()]
        params += declared.all_params
        todo += declared.upstream
    return tuple(params)


@pytest.mark.parametrize("stage", list(stages.STAGES))
def test_every_config_field_a_stage_reads_is_declared(recorded, stage):
    keys, _ = recorded[stage]
    assert keys, f"{stage}: recorded no config reads; the recorder is broken"
    declared = _declared_with_upstream(stage)
    missing = sorted(k for k in keys if not _covered(k, declared) and not _covered(k, EXEMPT_KEYS))
    assert not missing, f"{stage} reads {missing} but its declaration (rlhf_core/stages.py) does not list them"


@pytest.mark.parametrize("stage", list(stages.STAGES))
def test_every_project_file_a_stage_runs_is_in_its_code_hash(recorded, stage):
    _, files = recorded[stage]
    own = str(Path(sys.modules[stages.STAGES[stage].run.__module__].__file__).relative_to(REPO))
    assert own in files, f"{stage}: its own module never ran; the recorder is broken"
    not_followed = {str(stages._module_file(m).relative_to(REPO)) for m in stages.NOT_FOLLOWED}
    missing = sorted(files - set(stages.code_files(stage)) - not_followed)
    assert not missing, f"{stage} runs {missing}, which neither its fingerprint nor dvc.yaml hashes"


def test_the_recorder_sees_ppo_read_the_eval_stages_sampling(recorded):
    """The case that went unnoticed: PPO's end-of-run comparison samples with eval.sampling and eval.seed."""
    keys, _ = recorded["ppo"]
    assert "eval.seed" in keys and any(k.startswith("eval.sampling") for k in keys), sorted(keys)


def test_dvc_yaml_is_generated_from_the_declarations():
    assert dvc_file.differs() is None, dvc_file.differs()


def test_fingerprint_and_dvc_yaml_hash_the_same_code():
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name in stages.STAGES:
        code = [d for d in spec[name]["deps"] if d.endswith(".py")]
        assert code == stages.code_files(name), name
        digest = hashlib.sha256()
        for path in code:
            digest.update(path.encode() + (REPO / path).read_bytes())
        assert digest.hexdigest() == stages.code_digest(name), name
        assert spec[name]["params"] == list(stages.STAGES[name].all_params), name


def test_a_docstring_in_the_logging_code_reruns_no_stage():
    """`rlhf run` used to hash every file in rlhf_core: an edit to tracking.py reran all six stages."""
    for name in stages.STAGES:
        files = stages.code_files(name)
        assert "rlhf_core/tracking.py" not in files and "rlhf_core/summary.py" not in files, name
    assert "rlhf_core/trainers/ppo/update.py" in stages.code_files("ppo")
    assert "rlhf_core/trainers/ppo/update.py" not in stages.code_files("rm")


def test_changing_the_eval_sampling_reruns_ppo_whose_end_of_run_comparison_uses_it(monkeypatch, tmp_path):
    """PPO's ppo/eval_* metrics sample with eval.sampling and eval.seed: a new eval.seed must rerun PPO, not leave
    its comparison from the old seed (it did, under both `rlhf run` and `dvc repro`)."""
    monkeypatch.setattr(commit, "read_manifest", lambda directory: {"fingerprint": "upstream"})
    base = tiny_overrides(tmp_path)

    def ppo_fingerprint(*overrides):
        return pipeline.stage_fingerprint(load_config(None, [*base, *overrides]), "ppo")

    before = ppo_fingerprint()
    assert ppo_fingerprint("eval.seed=8") != before
    assert ppo_fingerprint("eval.sampling.temperature=0.5") != before
    assert ppo_fingerprint("eval.bootstrap_samples=200") == before, "the eval stage's own statistics are not PPO's"
    assert ppo_fingerprint("tracking.experiment=other") == before
