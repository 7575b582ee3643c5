"""What happens around a run rather than inside it: the network a single process exposes, the MLflow record of a
run that was stopped or killed, and Ctrl-C / SIGTERM on the real command line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, tiny_overrides

LOOPBACK = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1 and ::1 as /proc/net/tcp{,6} write them


def _listening_addresses(pid: int) -> set[str]:
    """Local addresses (hex ip:port, as /proc/net/tcp{,6} list them) on which process ``pid`` listens."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.add(fields[1])
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")
def test_a_single_deepspeed_process_listens_on_no_outside_interface(monkeypatch):
    """torch's TCP rendezvous store listens on every interface, unauthenticated; one process needs none."""
    from rlhf_core import distributed
    from rlhf_core.config import DistributedConfig

    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    before = _listening_addresses(os.getpid())
    distributed.setup(DistributedConfig(engine="deepspeed"))
    try:
        import torch

        assert torch.distributed.is_initialized() and torch.distributed.get_world_size() == 1
        opened = _listening_addresses(os.getpid()) - before
        assert all(address.split(":")[0] in LOOPBACK for address in opened), opened
        assert "MASTER_ADDR" not in os.environ
    finally:
        distributed.shutdown()


def _runs(db: Path) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("rlhf-ppo-max")
    return client.search_runs([experiment.experiment_id]) if experiment else []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_a_stop_signal_ends_sft_with_one_line_and_a_killed_mlflow_run(prepared_tiny, tmp_path, sig):
    """Ctrl-C, or SIGTERM from a scheduler, in the middle of training: one line, exit 128 + signal, nothing written
    into the stage's directory, and the MLflow run ends KILLED instead of staying RUNNING."""
    root, _ = prepared_tiny
    params = tmp_path / "params.yaml"
    params.write_text("{}\n")
    overrides = [*tiny_overrides(root), f"paths.sft={tmp_path / 'sft'}", "tracking.enabled=true",
                 f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "sft.max_steps=100000"]  # fmt: skip
    cmd = [sys.executable, "-m", "rlhf_core.cli", "sft", "--params", str(params)]
    cmd += [a for o in overrides for a in ("--set", o)]
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, env={**os.environ, "COLUMNS": "200"}
        )
        deadline = time.time() + 120
        while "it/s" not in log.read_text() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)  # training has started: its progress bar shows a rate
        proc.send_signal(sig)
        code = proc.wait(timeout=60)
    err = log.read_text()
    assert code == 128 + sig.value, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    assert f"stopped ({sig.name}): rlhf sft was interrupted" in err
    assert not (tmp_path / "sft").exists()  # no previous outputs, and nothing half-written left behind
    (run,) = [r for r in _runs(tmp_path / "mlflow.db") if r.data.tags.get("stage") == "sft"]
    assert run.info.status == "KILLED"


def test_a_run_left_running_by_a_dead_process_is_marked_killed_by_the_next(tiny_config, tmp_path):
    """SIGKILL leaves no chance to end a run: the next run started on this host ends it."""
    from rlhf_core import tracking

    config = tiny_config.model_copy(update={"tracking": tiny_config.tracking.model_copy(update={"enabled": True})})
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that no longer exists
    with tracking.stage_run(config, "sft") as first:
        first.client.set_tag(first.run_id, tracking.PID_TAG, str(gone.pid))
        alive = first.run_id
        with tracking.stage_run(config, "rm") as second:  # this process's own running runs are left alone
            pass
    assert {r.info.run_id: r.info.status for r in _runs(tmp_path / "mlflow.db")}[alive] == "FINISHED"

    client, experiment_id = tracking._client(config)
    orphan = client.create_run(experiment_id, tags={tracking.HOST_TAG: __import__("socket").gethostname(),
                                                    tracking.PID_TAG: str(gone.pid)})  # fmt: skip
    with tracking.stage_run(config, "sft"):
        pass
    statuses = {r.info.run_id: r.info.status for r in _runs(tmp_path / "mlflow.db")}
    assert statuses[orphan.info.run_id] == "KILLED" and statuses[second.run_id] == "FINISHED"


def test_prepare_logs_prompt_overlap_between_user_files_to_mlflow(tmp_path, monkeypatch):
    """Overlapping prompts across the user's SFT, RM and PPO files are reported under MLflow-valid names (the
    split pair used to be joined with '&', which MLflow refuses, so `rlhf prepare` crashed after all its work)."""
    import json

    from rlhf_core.config import load_config
    from rlhf_core.pipeline import run_stage

    monkeypatch.chdir(tmp_path)
    rows = {
        "sft": [{"prompt": f"Q{i}?", "response": f"A{i}."} for i in range(40)],
        "rm": [{"prompt": f"Q{i}?", "chosen": "Yes.", "rejected": "No."} for i in range(40)],
        "ppo": [{"prompt": f"Q{i}?"} for i in range(40)],
    }
    for name, items in rows.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    files = ["data.source=jsonl", "data.sft_file=sft.jsonl", "data.rm_file=rm.jsonl", "data.ppo_file=ppo.jsonl"]
    config = load_config(None, [*tiny_overrides(tmp_path, tracking=True), *files, "data.on_bad_rows=skip"])
    run_stage("prepare", config)
    (run,) = _runs(tmp_path / "mlflow.db")
    assert run.info.status == "FINISHED"
    overlap = {k: v for k, v in run.data.metrics.items() if k.startswith("data/cross_split_prompt_overlap")}
    assert overlap and "data/cross_split_prompt_overlap.sft_train-rm_train" in overlap


def test_mlflow_key_keeps_valid_names_and_repairs_the_rest():
    from mlflow.utils.validation import _validate_metric_name

    from rlhf_core.tracking import mlflow_key

    assert mlflow_key("eval/gold/win_rate") == "eval/gold/win_rate"
    assert mlflow_key("ppo.resolved.kl coef-1") == "ppo.resolved.kl coef-1"
    for raw in ("a&b", "x:y", "../up", "a//b", "/lead", "ü?*", "", "k" * 400):
        _validate_metric_name(mlflow_key(raw))
