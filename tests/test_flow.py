"""The Prefect flow runs its stages under one parent MLflow run with a nested run per stage."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import tiny_overrides


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.mark.slow
def test_flow_runs_all_stages_with_nested_mlflow_runs(prefect_harness, tmp_path):
    from mlflow import MlflowClient

    from flows.rlhf import FLOW_STAGES, rlhf

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"sft": {"num_sample_generations": 2}}))
    overrides = [*tiny_overrides(tmp_path, tracking=True), "sft.max_steps=4"]
    outputs = rlhf(params_file=str(params), overrides=overrides)

    assert list(outputs) == list(FLOW_STAGES) == ["prepare", "sft", "rm", "rm-eval", "ppo", "eval"]
    assert (tmp_path / "data" / "splits" / "sft_train.jsonl").is_file()
    assert outputs["sft"]["model"] == str(tmp_path / "sft" / "model")
    assert json.loads((tmp_path / "sft" / "metrics.json").read_text())["sft/steps"] == 4

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("rlhf-ppo-max")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("kind") == "pipeline"]
    assert len(parents) == 1
    tags = parents[0].data.tags
    assert tags["preset"] == "ppo_max" and tags["seed"] == "42" and len(tags["data_version"]) == 12
    assert tags["git_commit"]
    parent_metrics = parents[0].data.metrics  # every stage's headline metrics on the parent, for comparisons
    assert {"sft/ppl", "rm_eval/gold_accuracy", "ppo/objective_kl", "eval/win_rate"} <= set(parent_metrics)
    children = {
        r.data.tags["stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id
    }
    assert set(children) == set(FLOW_STAGES)
    assert all(run.info.status == "FINISHED" for run in children.values())
    sft_run = children["sft"]
    assert sft_run.info.status == "FINISHED"
    assert sft_run.data.params["sft.max_steps"] == "4"
    assert "sft/loss" in sft_run.data.metrics and "sft/ppl" in sft_run.data.metrics
    history = client.get_metric_history(sft_run.info.run_id, "sft/loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    artifacts = {a.path for a in client.list_artifacts(sft_run.info.run_id)}
    assert {"metrics.json", "samples.jsonl", "config.yaml", "plots"} <= artifacts
    assert outputs["sft"]["mlflow_run_id"] == sft_run.info.run_id
    assert "rm/accuracy" in children["rm"].data.metrics
    assert "rm_eval/gold_accuracy" in children["rm-eval"].data.metrics
    assert "plots" in {a.path for a in client.list_artifacts(children["rm-eval"].info.run_id)}
    ppo_run = children["ppo"]
    assert "objective/kl" in ppo_run.data.metrics and "rollout/response_length" in ppo_run.data.metrics
    assert ppo_run.data.params["ppo.resolved.reward_norm"] == "True"
    _every_output_is_known_and_every_key_is_valid_for_mlflow(tmp_path, client, runs)
    _prefect_shows_results_and_skips(rlhf, params, overrides)
    versions = client.search_model_versions("name='rlhf-ppo-max-policy'")
    assert [v.run_id for v in versions] == [ppo_run.info.run_id]  # the final policy is in the model registry
    assert "model/model.safetensors" in {a.path for a in client.list_artifacts(ppo_run.info.run_id, "model")}
    assert versions[0].tags["preset"] == "ppo_max" and versions[0].tags["data_version"] == tags["data_version"]
    assert parents[0].info.run_name == "ppo_max seed 42 (data seed 1234)"
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # opens as classic ML runs
    _skipped_stages_nest_under_the_new_parent(client, experiment.experiment_id, children)


def _skipped_stages_nest_under_the_new_parent(client, experiment_id: str, first_children: dict) -> None:
    """The rerun (every stage unchanged) has its own parent run with all six stages under it, each marked skipped
    and linked to the run that produced its outputs."""
    runs = client.search_runs([experiment_id])
    parents = sorted((r for r in runs if r.data.tags.get("kind") == "pipeline"), key=lambda r: r.info.start_time)
    assert len(parents) == 2
    second = {r.data.tags["stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[1].info.run_id}
    assert set(second) == set(first_children)
    for stage, run in second.items():
        assert run.data.tags["rlhf.skipped"] == "unchanged" and run.info.status == "FINISHED"
        assert run.data.tags["rlhf.reused_run_id"] == first_children[stage].info.run_id
    assert second["ppo"].data.metrics["ppo/objective_kl"] == first_children["ppo"].data.metrics["ppo/objective_kl"]


def test_retries_only_where_safe_and_never_for_config_or_data_errors():
    from prefect.states import Failed

    from rlhf_core.errors import ConfigError, DataError
    from tasks import stages

    retries = {t.name: t.retries for t in stages.STAGE_TASKS.values()}
    assert retries == {"prepare": 1, "sft": 0, "rm": 0, "rm-eval": 1, "ppo": 1, "eval": 1}
    condition = stages.STAGE_TASKS["ppo"].retry_condition_fn
    assert condition(None, None, Failed(data=OSError("disk hiccup")))
    assert not condition(None, None, Failed(data=ConfigError("ppo.steps: bad")))
    assert not condition(None, None, Failed(data=DataError("ppo.jsonl:3: empty prompt")))


def _every_output_is_known_and_every_key_is_valid_for_mlflow(root, client, runs) -> None:
    """What the stages wrote is what the output-directory preflight allows (else a rerun would call a stage's own
    files foreign), and every number of every stage's outputs logs to a real MLflow store under its flattened key."""
    from mlflow.utils.validation import _validate_metric_name, _validate_param_name

    from rlhf_core.config import flatten
    from rlhf_core.preflight import COMMON_ENTRIES
    from rlhf_core.stages import STAGES

    keys = set()
    for stage in STAGES.values():
        directory = stage.path_key
        entries = {p.name for p in (root / directory).iterdir()}
        assert entries <= stage.entries | COMMON_ENTRIES, (stage.name, entries - stage.entries)
        for name in ("metrics.json", "stats.json"):
            if (root / directory / name).is_file():
                keys |= set(flatten(json.loads((root / directory / name).read_text())))
    logged = {key for run in runs for key in [*run.data.metrics, *run.data.params]}
    assert len(keys) > 100 and logged
    for key in keys | logged:
        _validate_metric_name(key)
        _validate_param_name(key)


def _prefect_shows_results_and_skips(rlhf, params, overrides) -> None:
    """Each stage leaves a markdown artifact of its headline numbers; a rerun's unchanged stages end in a state
    named Skipped (a plain Completed would look exactly like a run) and still hand the flow their artifacts."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts()}
    assert {"prepare-result", "sft-result", "rm-result", "rm-eval-result", "ppo-result", "eval-result"} <= keys
    again = rlhf(params_file=str(params), overrides=overrides)
    assert again["sft"]["skipped"] == "unchanged" and again["ppo"]["model"]
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs()
    newest = {}
    for run in sorted(runs, key=lambda r: r.start_time or r.expected_start_time):
        newest[run.name.rsplit("-", 1)[0]] = run
    assert {name: run.state.name for name, run in newest.items()} == dict.fromkeys(
        ("prepare", "sft", "rm", "rm-eval", "ppo", "eval"), "Skipped"
    )


@pytest.mark.slow
def test_one_ctrl_c_stops_rlhf_run_under_prefect_within_seconds(prepared_tiny, tmp_path):
    """Ctrl-C reaches the terminal's whole process group. Prefect's temporary server used to be in it: it died
    first, and the run printed about 200 KB of connection errors for over two minutes and left the flow run
    RUNNING. Now: exit 130 within seconds, one line, and the flow run ends CRASHED in Prefect's database."""
    import os
    import signal
    import sqlite3
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    root, _ = prepared_tiny
    (tmp_path / "params.yaml").write_text("{}\n")
    overrides = [*tiny_overrides(root), f"paths.sft={tmp_path / 'sft'}", "sft.max_steps=100000"]
    cmd = [sys.executable, "-m", "flows.cli", "run", "--stages", "prepare,sft", "--params", "params.yaml"]
    cmd += [a for o in overrides for a in ("--set", o)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / ".prefect"), "COLUMNS": "200"}
    env.pop("PREFECT_API_URL", None)
    log = tmp_path / "out.txt"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip  # its own process group, like a terminal's
        deadline = time.time() + 180
        while "it/s" not in log.read_text() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        sent = time.time()
        code = proc.wait(timeout=120)
    waited, text = time.time() - sent, log.read_text()
    assert code == 130, text[-3000:]
    assert waited < 30 and "Traceback" not in text and len(text) < 20_000, (waited, len(text), text[-2000:])
    assert "stopped (SIGINT): rlhf run was interrupted" in text
    with sqlite3.connect(tmp_path / ".prefect" / "prefect.db") as db:
        states = [row[0] for row in db.execute("select state_type from flow_run")]
    assert states == ["CRASHED"], states
    assert not _servers_started_in(tmp_path), "the temporary Prefect server outlived the run"


def _servers_started_in(directory) -> list[int]:
    """Pids of Prefect API servers (uvicorn running Prefect's app) whose working directory is ``directory``."""
    import os
    from pathlib import Path

    found = []
    for proc in Path("/proc").iterdir():
        try:
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
            if b"prefect.server.api.server:create_app" in command and os.readlink(proc / "cwd") == str(directory):
                found.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return found
