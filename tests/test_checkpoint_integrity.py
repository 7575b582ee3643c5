"""Checkpoints hold no pickles and are verified before anything is read from them: RNG states and trainer state
are plain JSON, engine states load with the weights-only unpickler, a damaged newest checkpoint is reported in one
line and the run resumes from the one before, and a Ctrl-C in PPO checkpoints the last completed iteration.

Two PPO runs and a resume are shared by the module (``runs``); the damage tests resume copies of the interrupted
run's two checkpoints into one prepared run (``resumer``), which takes a second each."""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rlhf_core import checkpoint, distributed
from rlhf_core.config import load_config
from rlhf_core.errors import RLHFError
from rlhf_core.io import file_sha256
from rlhf_core.pipeline import run_stage
from tests.conftest import PicklePayload, tiny_overrides


def _overrides(stack, prepared_root: Path, ppo_dir: Path, *extra) -> list[str]:
    out, _ = stack
    paths = [f"paths.sft={out / 'sft'}", f"paths.rm={out / 'rm'}", f"paths.ppo={ppo_dir}"]
    short = "data.max_response_tokens=16"  # what is checkpointed and resumed, not how long the answers are
    return [*tiny_overrides(prepared_root), short, *paths, *extra]  # 4 iterations, checkpoint every 2


def _config(stack, prepared_root: Path, ppo_dir: Path, *extra):
    return load_config(None, _overrides(stack, prepared_root, ppo_dir, *extra))


@pytest.fixture(scope="module")
def runs(trained_tiny_rm, prepared_tiny, tmp_path_factory):
    """A straight run; a run interrupted inside iteration 4 (its checkpoints, step 2 and the interrupt's step 3,
    kept in ``pristine``); and its rerun, which resumes."""
    from rlhf_core.trainers.ppo import iteration

    root = tmp_path_factory.mktemp("integrity")
    straight = run_stage("ppo", _config(trained_tiny_rm, prepared_tiny[0], root / "straight"))
    config = _config(trained_tiny_rm, prepared_tiny[0], root / "interrupted")
    tracked = {"enabled": True, "uri": f"sqlite:///{root / 'mlflow.db'}"}  # outside the resume fingerprint
    config = config.model_copy(update={"tracking": config.tracking.model_copy(update=tracked)})
    real_score, calls = iteration.score, []

    def score_then_interrupt(*args, **kwargs):  # iteration 4 has sampled (drawn from the RNGs) when it stops
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_score(*args, **kwargs)

    said = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(said):
        patch.setattr(iteration, "score", score_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            run_stage("ppo", config)
    pristine = root / "pristine"
    shutil.copytree(root / "interrupted" / "checkpoints", pristine)
    heard = io.StringIO()
    with contextlib.redirect_stdout(heard):
        resumed = run_stage("ppo", config)
    overrides = _overrides(trained_tiny_rm, prepared_tiny[0], root / "interrupted")[:-1]  # all but paths.ppo
    return SimpleNamespace(root=root, config=config, overrides=overrides, straight=straight, resumed=resumed,
                           pristine=pristine, interrupt_said=said.getvalue(), resume_said=heard.getvalue())  # fmt: skip


@pytest.fixture(scope="module")
def resumer(runs):
    """A prepared PPO run of the interrupted run's configuration, to resume damaged copies of its checkpoints."""
    from rlhf_core.trainers.ppo.iteration import start_run
    from rlhf_core.trainers.ppo.stage import _resume_fingerprint

    run = start_run(runs.config, distributed.setup(runs.config.distributed), runs.root / "unused")
    return SimpleNamespace(run=run, fingerprint=_resume_fingerprint(runs.config))


def _resume(resumer, root: Path, run=None):
    from rlhf_core.trainers.ppo.stage import _resume

    return _resume(run or resumer.run, root, resumer.fingerprint)


def _copy(runs, tmp_path) -> Path:
    root = tmp_path / "checkpoints"
    shutil.copytree(runs.pristine, root)
    return root


def _rehash(step_dir: Path, name: str) -> None:
    """Bring the manifest in line with a changed file, as whoever plants a file can."""
    manifest = json.loads((step_dir / "manifest.json").read_text())
    file = step_dir / name
    manifest["files"][name] = {"size": file.stat().st_size, "sha256": file_sha256(file)}
    (step_dir / "manifest.json").write_text(json.dumps(manifest))


def _falls_back(resumer, root: Path, capsys, *expected: str) -> str:
    """Resuming ``root`` (damaged step 3) goes on from step 2, says why in one line, and deletes nothing."""
    start, history, _, path = _resume(resumer, root)
    assert (start, len(history), path) == (2, 2, root / "step-000002")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ppo: not resuming")]
    assert len(lines) == 1 and str(root / "step-000003") in lines[0], lines
    for text in expected:
        assert text in lines[0], lines[0]
    assert (root / "step-000003").is_dir(), "a damaged checkpoint is reported, not deleted"
    return lines[0]


# ------------------------------------------------------------------------------------------- plain data
def test_rng_state_round_trips_as_plain_data():
    random.gauss(0, 1), np.random.standard_normal()  # cached Gaussians are part of the state
    state = json.loads(json.dumps(checkpoint.rng_state()))
    before = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.standard_normal(),
              torch.rand(3).tolist())  # fmt: skip
    checkpoint.set_rng_state(state)
    after = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.standard_normal(),
             torch.rand(3).tolist())  # fmt: skip
    assert after == before


def test_trainer_state_survives_json_with_non_finite_numbers_and_refuses_objects():
    state = {"loss": float("nan"), "up": math.inf, "down": -math.inf, "x": 0.1 + 0.2, "n": np.int64(3),
             "f": np.float32(0.5), "t": torch.tensor(2.5), "pair": (1, 2)}  # fmt: skip
    back = json.loads(json.dumps(checkpoint.to_plain(state)))
    assert math.isnan(back["loss"]) and back["up"] == math.inf and back["down"] == -math.inf
    assert back["x"] == 0.1 + 0.2 and back["n"] == 3 and back["f"] == 0.5 and back["t"] == 2.5
    assert back["pair"] == [1, 2]
    with pytest.raises(TypeError, match=r"state\['history'\]\[0\]\['w'\]: Tensor is not plain data"):
        checkpoint.to_plain({"history": [{"w": torch.ones(2)}]})
    with pytest.raises(TypeError, match="keys must be strings"):
        checkpoint.to_plain({1: 2})


class _FileEngine:
    def save_state(self, directory: Path) -> None:
        (directory / "engine.pt").write_bytes(b"weights")


def test_an_interrupted_save_leaves_no_checkpoint_and_the_next_save_cleans_up(tmp_path, monkeypatch):
    """Interrupted before its manifest is written (a second Ctrl-C while saving), a save leaves only its temporary
    folder, which nothing lists and the next save removes."""
    ctx = distributed.DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), engine="torch")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "atomic_write_json", interrupted)
        with pytest.raises(KeyboardInterrupt):
            checkpoint.save_checkpoint(tmp_path, 1, {"policy": _FileEngine()}, {"step": 1}, ctx, "fp")
    assert [p.name for p in tmp_path.iterdir()] == [".step-000001.tmp"]
    assert checkpoint.list_checkpoints(tmp_path) == [] and checkpoint.candidates(tmp_path, "fp") == []
    saved = checkpoint.save_checkpoint(tmp_path, 1, {"policy": _FileEngine()}, {"step": 1}, ctx, "fp")
    assert [p.name for p in tmp_path.iterdir()] == ["step-000001"]
    assert checkpoint.verify(saved, ctx) is None
    assert sorted(json.loads((saved / "manifest.json").read_text())["files"]) == [
        "policy/engine.pt",
        "trainer-rank0.json",
    ]


# ------------------------------------------------------------------------------------------- Ctrl-C
def test_interrupted_ppo_checkpoints_its_last_iteration_and_resumes_to_the_same_end(runs):
    step3 = runs.root / "interrupted" / "checkpoints" / "step-000003"
    expected = f"ppo: interrupted at iteration 3; checkpoint {step3}; rerun the same command to resume"
    assert expected in runs.interrupt_said.splitlines()
    assert f"ppo: resumed from {step3} (step 3)" in runs.resume_said
    saved = runs.pristine / "step-000003"
    assert json.loads((saved / "manifest.json").read_text())["step"] == 3
    assert json.loads((saved / "trainer-rank0.json").read_text())["step"] == 3
    assert not list(saved.glob("*.pt")) and not (saved / "fingerprint.txt").exists()

    def untimed(history):
        return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in history]

    assert untimed(runs.resumed.history) == untimed(runs.straight.history)
    weights = "model/model.safetensors"
    assert (runs.root / "interrupted" / weights).read_bytes() == (runs.root / "straight" / weights).read_bytes()
    straight, resumed = dict(runs.straight.metrics), dict(runs.resumed.metrics)
    straight.pop("ppo/seconds"), resumed.pop("ppo/seconds")
    assert resumed == straight


def test_an_interrupt_inside_an_update_writes_no_checkpoint(runs, trained_tiny_rm, prepared_tiny, tmp_path, capsys):
    """Once an iteration's update has stepped an engine, its weights belong to no iteration: the interrupt names
    the last checkpoint instead of writing one."""
    from rlhf_core.trainers.ppo import iteration

    real_update, calls = iteration.update, []

    def update_then_interrupt(*args, **kwargs):
        calls.append(1)
        result = real_update(*args, **kwargs)
        if len(calls) == 4:  # iteration 3 is complete, not checkpointed (every 2), and 4 has stepped
            raise KeyboardInterrupt
        return result

    config = _config(trained_tiny_rm, prepared_tiny[0], tmp_path / "ppo")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(iteration, "update", update_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            run_stage("ppo", config)
    root = tmp_path / "ppo" / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["step-000002"]
    said = (f"ppo: interrupted inside the update of iteration 4, which no checkpoint can hold; checkpoint "
            f"{root / 'step-000002'} (iteration 2); rerun the same command to resume")  # fmt: skip
    assert said in capsys.readouterr().err


@pytest.mark.slow
def test_sigterm_through_the_cli_stops_with_a_checkpoint_and_the_rerun_resumes(runs, tmp_path):
    """The real chain: `rlhf ppo` gets SIGTERM once its first checkpoint exists, says where it stopped, exits 143,
    and the same command again resumes and ends with the straight run's weights."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from tests.conftest import REPO

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({}))
    ppo = runs.config.paths.ppo.replace("interrupted", "sigterm")
    overrides = [*runs.overrides, f"paths.ppo={ppo}"]
    command = [sys.executable, "-m", "rlhf_core.cli", "ppo", "--params", str(params)]
    command += [arg for override in overrides for arg in ("--set", override)]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = Path(ppo) / "checkpoints" / "step-000002"
    deadline = time.time() + 240
    while not first.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert first.is_dir(), "the run never wrote its first checkpoint"
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err and "ppo: interrupted" in err and "stopped (SIGTERM)" in err, err[-3000:]
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "ppo: resumed from" in again.stdout + again.stderr
    weights = "model/model.safetensors"
    assert (Path(ppo) / weights).read_bytes() == (runs.root / "straight" / weights).read_bytes()


# ------------------------------------------------------------------------------------------- damage
def test_truncated_newest_engine_state_resumes_from_the_one_before(runs, resumer, tmp_path, capsys):
    root = _copy(runs, tmp_path)
    engine = root / "step-000003" / "policy" / "engine.pt"
    engine.write_bytes(engine.read_bytes()[:1000])
    _falls_back(resumer, root, capsys, "policy/engine.pt is 1000 bytes", "truncated")


def test_empty_trainer_state_resumes_from_the_one_before(runs, resumer, tmp_path, capsys):
    root = _copy(runs, tmp_path)
    (root / "step-000003" / "trainer-rank0.json").write_bytes(b"")
    _falls_back(resumer, root, capsys, "trainer-rank0.json is 0 bytes")


def test_missing_policy_folder_resumes_from_the_one_before(runs, resumer, tmp_path, capsys):
    root = _copy(runs, tmp_path)
    shutil.rmtree(root / "step-000003" / "policy")
    _falls_back(resumer, root, capsys, "missing file policy/engine.pt")


def test_planted_pickles_do_not_run(runs, resumer, tmp_path, capsys):
    """A payload in engine.pt, even with the manifest rewritten to match, is refused by the weights-only
    unpickler; a pickled trainer-rank0.pt next to the JSON is an unexpected file and is never opened."""
    live = tmp_path / "live.pt"
    torch.save({"module": PicklePayload(tmp_path / "live")}, live)
    torch.load(live, weights_only=False)
    assert (tmp_path / "live").exists(), "the payload is live: an unsafe load runs it"

    root = _copy(runs, tmp_path)
    marker = tmp_path / "ran"
    torch.save({"module": PicklePayload(marker)}, root / "step-000003" / "policy" / "engine.pt")
    _rehash(root / "step-000003", "policy/engine.pt")
    _falls_back(resumer, root, capsys, "policy: refused by the weights-only unpickler", "GLOBAL exec")
    assert not marker.exists()

    root = _copy(runs, tmp_path / "second")
    torch.save({"step": 3, "rng": PicklePayload(marker)}, root / "step-000003" / "trainer-rank0.pt")
    _falls_back(resumer, root, capsys, "unexpected file trainer-rank0.pt")
    assert not marker.exists()


def test_another_models_weights_resume_from_the_one_before(runs, resumer, tmp_path, capsys):
    from rlhf_core.models.causal_lm import build_tiny_llama

    root = _copy(runs, tmp_path)
    engine = root / "step-000003" / "policy" / "engine.pt"
    state = torch.load(engine, weights_only=True)
    other = build_tiny_llama(runs.config.model.model_copy(update={"hidden_size": 48}), resumer.run.tokenizer)
    state["module"] = other.state_dict()
    torch.save(state, engine)
    _rehash(root / "step-000003", "policy/engine.pt")
    line = _falls_back(resumer, root, capsys, "policy: weights of another model", ", 48) there, (")
    assert "\n" not in line and len(line) < 400
    kept = torch.load(root / "step-000002" / "policy" / "engine.pt", weights_only=True)["module"]
    loaded = resumer.run.models.policy.module.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in kept.items()), "the fallback restored step 2's weights"


def test_no_intact_checkpoint_is_an_error_naming_resume_never(runs, resumer, tmp_path):
    root = _copy(runs, tmp_path)
    (root / "step-000003" / "trainer-rank0.json").write_text("{not json")
    (root / "step-000002" / "manifest.json").write_text("{")
    with pytest.raises(RLHFError, match=rf"none of the 2 checkpoint\(s\) in {root}.*resume=never") as failure:
        _resume(resumer, root)
    assert "\n" not in str(failure.value)
    assert sorted(p.name for p in root.iterdir()) == ["step-000002", "step-000003"], "nothing deleted"


def test_older_format_checkpoints_are_not_resumed_nor_unpickled(runs, resumer, tmp_path):
    root = tmp_path / "checkpoints"
    old = root / "step-000002"
    shutil.copytree(runs.pristine / "step-000002" / "policy", old / "policy")
    marker = tmp_path / "ran"
    torch.save({"step": 2, "rng": PicklePayload(marker)}, old / "trainer-rank0.pt")
    (old / "fingerprint.txt").write_text(resumer.fingerprint)
    with pytest.raises(RLHFError, match="older checkpoint format.*resume=never"):
        _resume(resumer, root)
    assert not marker.exists() and old.is_dir()


def test_resume_never_deletes_them_and_starts_afresh(runs, resumer, trained_tiny_rm, prepared_tiny, tmp_path):
    root = _copy(runs, tmp_path)
    never = _config(trained_tiny_rm, prepared_tiny[0], runs.root / "interrupted", "ppo.checkpoint.resume=never")
    assert _resume(resumer, root, run=replace(resumer.run, config=never)) == (0, [], [], None)
    assert not root.exists()


def test_auto_moves_another_configurations_checkpoints_aside_naming_what_changed(
    runs, resumer, trained_tiny_rm, prepared_tiny, tmp_path, capsys
):
    """`resume: auto` after one value changed keeps the previous run's checkpoints: moved aside (one rename each)
    in one line naming the key, old -> new; a run of that configuration brings them back and resumes; one set
    stays aside, so a third configuration replaces the set kept before."""
    from rlhf_core.trainers.ppo.stage import _resume, _resume_config, _resume_fingerprint

    root = _copy(runs, tmp_path)
    said = lambda: [line for line in capsys.readouterr().err.splitlines() if line.startswith("ppo: ")]  # noqa: E731

    def run_of(*extra):
        config = _config(trained_tiny_rm, prepared_tiny[0], runs.root / "interrupted", *extra)
        return replace(resumer.run, config=config), _resume_fingerprint(config)

    changed, fingerprint = run_of("ppo.policy_optim.lr=5e-05")
    assert _resume(changed, root, fingerprint) == (0, [], [], None)
    aside = root / f"{checkpoint.ASIDE}{resumer.fingerprint}"
    [line] = said()
    for text in (f"the checkpoints in {root} (up to step 3) are of another configuration",
                 "(ppo.policy_optim.lr: 0.0001 -> 5e-05)", f"moved them to {aside}, the one set kept aside",
                 "a run of that configuration resumes them", "this run starts afresh"):  # fmt: skip
        assert text in line, line
    assert sorted(p.name for p in root.iterdir()) == [aside.name]
    for step in ("step-000002", "step-000003"):
        for file in (runs.pristine / step).rglob("*"):
            moved = aside / step / file.relative_to(runs.pristine / step)
            assert file.is_dir() or moved.read_bytes() == file.read_bytes(), moved

    # The changed run checkpointed step 2 (made here from the original's files, with its own manifest).
    shutil.copytree(runs.pristine / "step-000002", root / "step-000002")
    manifest = json.loads((root / "step-000002" / "manifest.json").read_text())
    manifest.update(fingerprint=fingerprint, config=_resume_config(changed.config))
    (root / "step-000002" / "manifest.json").write_text(json.dumps(manifest))
    start, history, _, path = _resume(resumer.run, root, resumer.fingerprint)  # the original configuration again
    assert (start, len(history), path) == (3, 3, root / "step-000003")
    moved, back = said()[:2]
    assert "(ppo.policy_optim.lr: 5e-05 -> 0.0001)" in moved and "starts afresh" not in moved
    assert back == f"ppo: this configuration's checkpoints, set aside by a run of another one, are back from {aside}"
    assert sorted(p.name for p in root.iterdir()) == [f"{checkpoint.ASIDE}{fingerprint}", "step-000002", "step-000003"]

    third, _ = run_of("ppo.kl_coef=0.3", "ppo.seed=5")
    assert _resume(third, root, _resume_fingerprint(third.config)) == (0, [], [], None)
    [line] = said()
    assert "(ppo.kl_coef: null -> 0.3; ppo.seed: 42 -> 5)" in line, line
    assert f"replacing {checkpoint.ASIDE}{fingerprint}" in line, line
    assert sorted(p.name for p in root.iterdir()) == [aside.name], "one set kept aside"


# ------------------------------------------------------------------------------------------- DeepSpeed
def test_deepspeed_state_is_checked_by_the_weights_only_unpickler_first(tmp_path):
    """DeepSpeed unpickles its files fully; load_state refuses a file the weights-only unpickler (allowing the
    three DeepSpeed classes its files hold) does not accept, before DeepSpeed reads it."""
    config = load_config(None, ["distributed.engine=deepspeed", "distributed.zero_stage=2"])
    ctx = distributed.setup(config.distributed)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
        engine = distributed.make_engine(model, config.ppo.policy_optim, 10, ctx, config.distributed, 2, 1)
        loss = engine.engine(torch.randn(2, 4)).sum()
        engine.backward(loss)
        engine.step()
        engine.save_state(tmp_path)
        engine.load_state(tmp_path)  # an intact DeepSpeed checkpoint passes the check
        optim = next((tmp_path / "engine").glob("*optim_states.pt"))
        marker = tmp_path / "ran"
        torch.save({"optimizer_state_dict": PicklePayload(marker)}, optim)
        with pytest.raises(ValueError, match=rf"(?s){optim.name}: .*Unsupported global: GLOBAL exec"):
            engine.load_state(tmp_path)
        assert not marker.exists()
    finally:
        distributed.shutdown()


def test_the_resumed_run_continues_the_interrupted_runs_mlflow_record(runs):
    """The interrupted run ends KILLED; the resumed run links it and holds the whole curve, from iteration 1."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=runs.config.tracking.uri)
    experiment = client.get_experiment_by_name(runs.config.tracking.experiment)
    ppo_runs = sorted(client.search_runs([experiment.experiment_id]), key=lambda r: r.info.start_time)
    killed, resumed = ppo_runs
    assert killed.info.status == "KILLED" and resumed.info.status == "FINISHED"
    tags = resumed.data.tags
    assert tags["resumed_from_run"] == killed.info.run_id and tags["resumed_from_step"] == "3"
    assert tags["resumed_from_checkpoint"].endswith("step-000003")
    curve = client.get_metric_history(resumed.info.run_id, "objective/kl")
    assert [m.step for m in curve] == [1, 2, 3, 4]
    before = {m.step: m.value for m in client.get_metric_history(killed.info.run_id, "objective/kl")}
    assert before and all(before[m.step] == m.value for m in curve if m.step in before)
