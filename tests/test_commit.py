"""A stage's outputs are committed as one unit: a process killed at any moment leaves the previous complete outputs
or the new complete outputs (after ``commit.recover``), never a mix, and the skip check verifies content."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_core import commit
from rlhf_core.config import load_config
from rlhf_core.pipeline import STAGES, run_stage
from rlhf_core.stages import STAGE_LIST, output_dir
from tests.conftest import REPO, tiny_overrides


class Killed(BaseException):
    """Stands for SIGKILL in process: nothing after the raise runs (the commit has no clean-up handlers)."""


OLD = {"model/weights.bin": "old weights", "model/config.json": "old", "metrics.json": "old", "plots/a.csv": "o",
       "old_only.txt": "only in the old outputs"}  # fmt: skip
NEW = {"model/weights.bin": "new weights", "model/tokenizer.json": "new", "metrics.json": "new", "plots/a.csv": "n",
       "config.yaml": "only in the new outputs"}  # fmt: skip


def _stage(out: Path, files: dict[str, str]) -> Path:
    staging = commit.start(out)
    for name, text in files.items():
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        (staging / name).write_text(text)
    return staging


def _commit(out: Path, files: dict[str, str], tag: str) -> None:
    staging = _stage(out, files)
    commit.commit(out, {"tag": tag, "outputs": commit.digests(staging)})


def _files(out: Path) -> dict[str, str]:
    return {
        p.relative_to(out).as_posix(): p.read_text()
        for p in out.rglob("*")
        if p.is_file() and p.name != commit.MANIFEST and "checkpoints" not in p.parts
    }


def _moves_in_a_commit(tmp_path: Path) -> int:
    out = tmp_path / "count"
    _commit(out, OLD, "old")
    calls = []
    real = commit._rename
    commit._rename = lambda a, b: (calls.append(a), real(a, b))
    try:
        _commit(out, NEW, "new")
    finally:
        commit._rename = real
    return len(calls)


def test_a_commit_killed_at_any_move_recovers_to_complete_outputs(tmp_path, monkeypatch):
    moves = _moves_in_a_commit(tmp_path)
    assert moves == 8  # model aside + in, metrics, plots aside + in, config.yaml, old_only aside, the manifest
    real = commit._rename
    for kill_at in range(-1, moves):  # -1: killed while working, before the commit was decided
        out = tmp_path / f"kill{kill_at}"
        _commit(out, OLD, "old")
        (out / "checkpoints").mkdir()
        (out / "checkpoints" / "step-1").write_text("work in progress, not an output")
        calls = []

        def rename(a, b, calls=calls, kill_at=kill_at):
            if len(calls) == kill_at:
                raise Killed
            calls.append(a)
            real(a, b)

        monkeypatch.setattr(commit, "_rename", rename)
        staging = _stage(out, NEW)
        if kill_at >= 0:
            with pytest.raises(Killed):
                commit.commit(out, {"tag": "new", "outputs": commit.digests(staging)})
        monkeypatch.setattr(commit, "_rename", real)
        commit.recover(out)
        manifest = commit.read_manifest(out)
        expected = NEW if kill_at >= 0 else OLD  # once the manifest is staged, the new outputs win
        assert manifest["tag"] == ("new" if kill_at >= 0 else "old"), kill_at
        assert _files(out) == expected, kill_at
        assert commit.unchanged(out, manifest), kill_at
        assert (out / "checkpoints" / "step-1").is_file(), "recovery leaves what is not an output alone"
        assert not (out / commit.STAGING).exists() and not (out / commit.TRASH).exists()


def test_unchanged_checks_content_not_only_existence(tmp_path):
    out = tmp_path / "out"
    _commit(out, NEW, "new")
    manifest = commit.read_manifest(out)
    assert commit.unchanged(out, manifest)
    (out / "model" / "weights.bin").write_text("new weightz")  # same size, other content
    assert not commit.unchanged(out, manifest)
    (out / "model" / "weights.bin").write_text("new weights")
    (out / "model" / "extra.bin").write_text("a file the commit did not write")
    assert not commit.unchanged(out, manifest)
    assert not commit.unchanged(out, {"outputs": {}}) and not commit.unchanged(out, {})  # a stamp without hashes


def test_a_failing_stage_leaves_its_previous_outputs(tmp_path):
    out = tmp_path / "out"
    _commit(out, OLD, "old")
    _stage(out, NEW)
    commit.abandon(out)
    assert _files(out) == OLD and commit.read_manifest(out)["tag"] == "old"
    fresh = tmp_path / "fresh"
    commit.start(fresh)
    commit.abandon(fresh)
    assert not fresh.exists(), "a stage that failed on its first run leaves nothing behind"


# ------------------------------------------------------------------------------------ real stages, real SIGKILL
KILLER = """
import importlib, json, os, signal, sys, traceback
from rlhf_core import commit
from rlhf_core.config import load_config
from rlhf_core.pipeline import run_stage

def run_until_killed(stage, kill_at, overrides):
    if kill_at == "rm-best-checkpoint":  # inside the work: right after the first best model is written
        import rlhf_core.trainers.rm as rm
        real_save = rm.save_reward_model
        def save(*args, **kwargs):
            real_save(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
        rm.save_reward_model = save
    else:  # during the commit: right after its n-th move
        real_rename, calls = commit._rename, []
        def rename(source, target):
            real_rename(source, target)
            calls.append(source)
            if len(calls) == int(kill_at):
                os.kill(os.getpid(), signal.SIGKILL)
        commit._rename = rename
    run_stage(stage, load_config(None, overrides))

# Each kill runs in a fork of this process: a process of its own that SIGKILL ends for real, which finds the
# modules named on the command line imported already instead of spending a fresh interpreter's seconds on them.
for module in sys.argv[1:]:
    importlib.import_module(module)
for line in sys.stdin:  # one kill a line, [stage, kill_at, overrides, log file]; answers with its exit code
    stage, kill_at, overrides, log = json.loads(line)
    pid = os.fork()
    if pid == 0:
        out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(out, 1), os.dup2(out, 2)
        signal.alarm(300)  # a stage that hangs ends by SIGALRM, not killed where the test wants it
        try:
            run_until_killed(stage, kill_at, overrides)
        except BaseException:
            traceback.print_exc()
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(3)  # the stage ran to its end: not killed
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


# What the stages import as they run (the trainers lazily, transformers' save reaches DeepSpeed): the killer of
# several stages imports them once, beside the test's own stage runs.
WARM = (*(stage.module for stage in STAGE_LIST), "deepspeed", "mlflow", "matplotlib.pyplot", "peft")


class Killer:
    """A process that imports ``warm`` once (``KILLER``), then runs each kill in a fork of itself."""

    def __init__(self, logs: Path, warm: tuple[str, ...] = ()):
        logs.mkdir(exist_ok=True)
        self.logs, self.log = logs, logs / "killer.log"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True}
        with self.log.open("w") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", KILLER, *warm], cwd=REPO, env=env, stderr=log, **pipes)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.stdin.close()
        self.proc.stdout.close()
        self.proc.wait(timeout=60)

    def kill(self, stage: str, kill_at: str, overrides: list[str]) -> None:
        log = self.logs / f"{stage}-{kill_at}.log"
        self.proc.stdin.write(json.dumps([stage, kill_at, overrides, str(log)]) + "\n")
        self.proc.stdin.flush()
        code = self.proc.stdout.readline()
        assert code, f"the killer stopped: {self.log.read_text()[-2000:]}"
        assert int(code) == -9, f"{stage} was not killed at {kill_at}: {log.read_text()[-2000:]}"


# stage -> an override of one of its own params: the killed run differs from the committed one.
CHANGED = {
    "eval": "eval.seed=8",
    "ppo": "ppo.seed=43",
    "rm-eval": "rm_eval.calibration_bins=5",
    "rm": "rm.seed=43",
    "sft": "sft.seed=43",
    "prepare": "data.sim.annotator_temperature=2.5",
}
KILL_AFTER_MOVES = 3  # mid-commit: the first entries are in place, the rest and the manifest are not


def _consistent(config, stage: str) -> dict:
    out = Path(output_dir(config, stage))
    manifest = commit.read_manifest(out)
    assert manifest is not None and commit.unchanged(out, manifest), f"{stage}: outputs do not match stage.json"
    return manifest


@pytest.mark.slow
def test_every_stage_killed_mid_commit_then_run_again_keeps_or_rebuilds_never_mixes(tmp_path):
    """Each stage, committed once, is run again with one of its params changed and SIGKILLed after its third move
    into place. The next run finishes that commit and finds the new outputs complete: it skips the stage as
    unchanged. The issue's case: `rlhf sft --set sft.seed=43` killed after its model was moved in; a run with the
    old seed must then rebuild SFT, not skip it with the seed-43 model under the old record."""
    base = [*tiny_overrides(tmp_path), "ppo.steps=2"]
    config = load_config(None, base)
    with Killer(tmp_path / "kills", warm=WARM) as killer:  # importing while the first runs go on
        for stage in STAGES:
            run_stage(stage, config, skip_unchanged=True)
        first = {stage: _consistent(config, stage)["fingerprint"] for stage in STAGES}
        for stage, change in CHANGED.items():  # downstream first: an upstream commit changes their inputs
            changed = load_config(None, [*base, change])
            killer.kill(stage, str(KILL_AFTER_MOVES), [*base, change])
            outcome = run_stage(stage, changed, skip_unchanged=True)
            assert outcome.artifacts.get("skipped") == "unchanged", stage
            assert _consistent(changed, stage)["fingerprint"] != first[stage], stage
            if stage == "sft":
                reseeded = run_stage("sft", config, skip_unchanged=True)
                assert "skipped" not in reseeded.artifacts, "the seed-43 model must not pass for the seed-42 one"
                assert _consistent(config, "sft")["fingerprint"] == first["sft"]


@pytest.mark.slow
def test_rm_killed_while_training_leaves_the_previous_reward_model(trained_tiny_rm, prepared_tiny, tmp_path):
    """The best checkpoint is written while training; killed right after it, the stage's previous reward model
    (with its reward_stats.json) is what the next run finds, and it retrains rather than skipping."""
    out, _ = trained_tiny_rm
    overrides = [*tiny_overrides(prepared_tiny[0]), f"paths.sft={out / 'sft'}", f"paths.rm={tmp_path / 'rm'}"]
    config = load_config(None, overrides)
    run_stage("rm", config)
    before = _consistent(config, "rm")
    stats = (tmp_path / "rm" / "model" / "reward_stats.json").read_text()
    with Killer(tmp_path / "kills") as killer:
        killer.kill("rm", "rm-best-checkpoint", [*overrides, "rm.seed=43"])
    assert (tmp_path / "rm" / commit.STAGING / "model").is_dir(), "killed with a half-trained model staged"
    commit.recover(tmp_path / "rm")
    assert _consistent(config, "rm") == before
    assert (tmp_path / "rm" / "model" / "reward_stats.json").read_text() == stats
    assert (
        "skipped" not in run_stage("rm", load_config(None, [*overrides, "rm.seed=43"]), skip_unchanged=True).artifacts
    )
