"""Run tags: the data version names the data settings and, for file sources, the files' contents."""

from __future__ import annotations

from rlhf_core.config import load_config
from rlhf_core.tracking import data_version


def test_data_version_follows_settings_and_file_contents(tmp_path):
    base = load_config(None, [])
    assert data_version(base) == data_version(load_config(None, ["ppo.seed=3"]))  # not a data setting
    assert data_version(base) != data_version(load_config(None, ["data.seed=5"]))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: hello", "rejected": "x"}\n')
    hh = load_config(None, ["data.source=hh_rlhf", f"data.path={pairs}"])
    before = data_version(hh)
    pairs.write_text(pairs.read_text() + pairs.read_text())
    assert data_version(hh) != before  # same path, new contents: a new data version


def test_stages_of_one_dvc_experiment_nest_under_one_parent_with_their_metrics(prepared_tiny, tmp_path, monkeypatch):
    """`dvc exp run` runs each stage as its own command with DVC_EXP_NAME set: the stages of one experiment share
    one parent run named after it (not loose top-level runs), and that parent carries their final numbers."""
    from mlflow import MlflowClient

    from rlhf_core.pipeline import run_stage
    from tests.conftest import tiny_overrides

    root = prepared_tiny[0]
    overrides = [*tiny_overrides(root, tracking=True), f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                 f"paths.sft={tmp_path / 'sft'}"]  # fmt: skip
    config = load_config(None, overrides)
    monkeypatch.setenv("DVC_EXP_NAME", "lucky-fern")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "abc123")
    run_stage("sft", config)
    run_stage("sft", load_config(None, [*overrides, "sft.max_steps=4"]))  # a second stage command of the experiment
    monkeypatch.delenv("DVC_EXP_NAME")
    run_stage("sft", load_config(None, [*overrides, "sft.max_steps=2"]))  # outside an experiment: top level

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("kind") == "pipeline"]
    assert parent.data.tags["dvc.exp_name"] == "lucky-fern" and parent.data.tags["dvc.baseline_rev"] == "abc123"
    assert parent.info.run_name.startswith("dvc exp lucky-fern: ppo_max seed 42")
    stages = [r for r in runs if r.data.tags.get("kind") == "stage"]
    nested = [r for r in stages if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(stages) == 3 and len(nested) == 2
    assert parent.data.metrics["sft/steps"] == 4  # the newest stage's numbers, on the experiment's row
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
