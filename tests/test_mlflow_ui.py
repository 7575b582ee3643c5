"""The MLflow UI opens the project's experiment on its runs list, not on MLflow 3's GenAI overview of traces.

MLflow 3.17's UI picks an experiment's landing page from the browser's workflow type (the URL's ``workflowType``,
else what the browser stored, else "genai"), not from the experiment's ``mlflow.experimentKind`` tag, which earlier
MLflow 3 UIs read. So the project sets the tag (for those) and hands out a URL that carries the workflow type
(``experiment_ui_url``); the browser test opens that URL in a fresh headless Chromium.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from rlhf_core.config import load_config
from rlhf_core.tracking import (
    CLASSIC_ML_EXPERIMENT,
    EXPERIMENT_KIND_TAG,
    ML_WORKFLOW_QUERY,
    experiment_ui_url,
    pipeline_run,
    pipeline_run_name,
)

CHROMIUM = Path("/usr/bin/chromium")
# Debian's chromium, headless as root in a container, touching nothing outside its fresh profile.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]  # fmt: skip


OLDER_KIND = "genai_development"  # the kind someone chose for an experiment of theirs


@pytest.fixture(scope="module")
def tracked_store(tmp_path_factory) -> tuple[str, Path]:
    """A SQLite store as users have it after pipeline runs: the experiment made by an older release (no kind tag),
    reused by a run of the project's logger, and someone's experiment with a kind of their own: (uri, directory)."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow_ui")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    config = _tracking(uri)
    assert experiment_ui_url(config) is None and not (root / "mlflow.db").exists()  # nothing created to ask
    client = MlflowClient(tracking_uri=uri)
    client.create_experiment(config.tracking.experiment)  # as releases before the tag made it
    client.create_experiment("someone-elses", tags={EXPERIMENT_KIND_TAG: OLDER_KIND})
    with contextlib.chdir(root):  # the runs' artifacts go to ./mlruns
        for tracked in (config, _tracking(uri, "tracking.experiment=someone-elses")):
            with pipeline_run(tracked, pipeline_run_name(tracked)) as parent:
                parent.log_metrics({"objective/kl": 0.5}, step=1)
    return uri, root


def _tracking(uri: str, *overrides: str):
    return load_config(None, ["tracking.enabled=true", f"tracking.uri={uri}", *overrides])


def test_the_experiment_is_tagged_classic_ml_and_its_url_opens_the_runs(tracked_store):
    """What the fix stores and hands out, checked without a browser: the experiment kind tag (added to an experiment
    an older release made without it; one whose owner chose a kind keeps it), and the URL."""
    from mlflow import MlflowClient

    uri, _ = tracked_store
    client = MlflowClient(tracking_uri=uri)
    config = _tracking(uri)
    ours = client.get_experiment_by_name(config.tracking.experiment)
    assert ours.tags[EXPERIMENT_KIND_TAG] == CLASSIC_ML_EXPERIMENT[EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert len(client.search_runs([ours.experiment_id])) == 1
    assert client.get_experiment_by_name("someone-elses").tags[EXPERIMENT_KIND_TAG] == OLDER_KIND

    url = f"http://127.0.0.1:5000/#/experiments/{ours.experiment_id}/runs?workflowType=machine_learning"
    assert experiment_ui_url(config) == url  # on `mlflow ui --backend-store-uri ... --host 127.0.0.1`
    served = _tracking("http://mlflow.example.com:8080/")
    assert experiment_ui_url(served, "7") == f"http://mlflow.example.com:8080/#/experiments/7/runs?{ML_WORKFLOW_QUERY}"
    assert experiment_ui_url(load_config(None, ["tracking.enabled=false"])) is None
    assert experiment_ui_url(_tracking("databricks"), "7") is None  # Databricks has its own UI


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_up(url: str, server: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow server exited with status {server.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"mlflow server did not answer {url} within {seconds} s")


@pytest.mark.slow
def test_a_fresh_browser_opens_the_experiment_on_its_runs_list(tracked_store):
    """Serve the store with `mlflow server`, open the URL the project hands out in a fresh headless Chromium, and
    read the page: the pipeline run's name in the runs list, and no GenAI overview."""
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium): the experiment's tag is checked without it")
    uri, root = tracked_store
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1"]  # fmt: skip
    server = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_until_up(f"{base}/health", server, 60)
        config = _tracking(base)  # what a team with a tracking server configures
        url = experiment_ui_url(config)
        assert url is not None and url.startswith(f"{base}/#/experiments/") and url.endswith(ML_WORKFLOW_QUERY)
        browser = [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={root / 'profile'}", "--dump-dom",
                   "--window-size=1400,900", "--virtual-time-budget=15000", url]  # fmt: skip
        page = subprocess.run(browser, capture_output=True, text=True, timeout=90).stdout
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    assert pipeline_run_name(config) in page  # the runs list, with the pipeline's run
    assert ">Runs<" in page and ">Model training<" in page
    for genai in (">Overview<", ">Sessions<", ">Judges<"):  # the GenAI side navigation and its overview
        assert genai not in page
