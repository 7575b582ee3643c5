"""Run tags: the data version names the data settings and, for file sources, the files' contents; a tracking URI
MLflow has no store for is one configuration error naming the key."""

from __future__ import annotations

import pytest

from rlhf_core.config import load_config
from rlhf_core.errors import ConfigError
from rlhf_core.tracking import check_tracking_uri, data_version


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


@pytest.mark.parametrize(
    "uri",
    ["sqlite:///mlflow.db", "sqlite:////abs/mlflow.db", "mlruns", "/abs/mlruns", "file:///abs/mlruns", "C:\\mlruns",
     "http://127.0.0.1:5000", "https://mlflow.example.com/prefix", "databricks", "databricks://profile",
     "postgresql://user@host/db", "mysql+pymysql://user@host/db"],
)  # fmt: skip
def test_tracking_uris_mlflow_has_a_store_for_pass(uri):
    check_tracking_uri(uri)


@pytest.mark.parametrize(
    ("uri", "words"),
    [
        ("bogus://nowhere", ("scheme 'bogus'", "sqlite:///", "http(s)://", "databricks", "postgresql://")),
        ("postgresqlx://host/db", ("scheme 'postgresqlx'",)),
        ("databricks-uc", ("scheme 'databricks-uc'",)),  # a model registry, no runs
        ("uc:http://localhost:8080", ("scheme 'uc'",)),
        ("http://", ("names no host", "http://HOST:PORT")),
    ],
)
def test_a_tracking_uri_mlflow_cannot_open_is_one_config_error_naming_the_key(uri, words):
    with pytest.raises(ConfigError) as error:
        check_tracking_uri(uri)
    message = str(error.value)
    assert message.startswith(f"tracking.uri={uri!r}") and "\n" not in message
    for word in words:
        assert word in message


def test_a_stage_with_a_bogus_tracking_uri_stops_before_writing_anything(tmp_path, monkeypatch):
    """What `rlhf prepare --set tracking.enabled=true --set tracking.uri=bogus://nowhere` runs: a ConfigError (the
    CLI prints its line and exits 2) instead of MLflow's traceback, and no output, staging directory or store."""
    from rlhf_core.pipeline import run_stage
    from tests.conftest import tiny_overrides

    monkeypatch.chdir(tmp_path)
    config = load_config(None, [*tiny_overrides(tmp_path / "outputs", tracking=True), "tracking.uri=bogus://nowhere"])
    with pytest.raises(ConfigError, match=r"^tracking\.uri='bogus://nowhere'"):
        run_stage("prepare", config)
    assert list(tmp_path.iterdir()) == []
