"""Experiment tracking: the logger protocol trainers receive, its MLflow and null implementations, and the
run lifecycle (one parent run per pipeline run, one nested run per stage).

Trainers never open runs themselves: the CLI, the Prefect tasks and the tests open them here and inject a
logger. Ranks other than 0 get a :class:`NullLogger`. We talk to MLflow through ``MlflowClient`` with explicit
run ids rather than the global "active run", so concurrent Prefect tasks cannot log into each other's runs.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from rlhf_core.config import Config, config_to_dict, flatten
from rlhf_core.errors import ConfigError

PARENT_RUN_ENV = "RLHF_MLFLOW_PARENT_RUN_ID"
# Which view MLflow 3's UI opens an experiment in. Earlier MLflow 3 UIs read the experiment's tag
# "mlflow.experimentKind" (useNavigateToExperimentPageTab -> getExperimentKindFromTags): we set it, so those open on
# the runs. The UI of MLflow 3.17 ignores the tag (workflow-based navigation is always on): `useExperimentKind`
# (ExperimentKindUtils.ts) takes the kind from the browser's workflow type (WorkflowTypeContext.tsx: the URL's
# `workflowType` parameter, else localStorage "mlflow.workflowType_v1", else "genai"), so a fresh browser lands on
# the GenAI overview of traces. There only a URL carrying `workflowType=machine_learning` opens on the runs:
# `experiment_ui_url` builds it for the CLI to print.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
CLASSIC_ML_EXPERIMENT = {EXPERIMENT_KIND_TAG: "custom_model_development"}
ML_WORKFLOW_QUERY = "workflowType=machine_learning"
# Where `mlflow ui` (the command the CLI prints for a local store) serves the UI.
LOCAL_UI = "http://127.0.0.1:5000"
# What `dvc exp run` puts in each stage command's environment (dvc/env.py): the experiment's name and baseline.
DVC_EXP_NAME_ENV, DVC_EXP_BASELINE_ENV = "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"
# Run tags copied onto every model version the PPO stage registers, so versions filter by preset and data.
MODEL_VERSION_TAGS = ("preset", "seed", "data.seed", "data_version", "git_commit")
# MLflow rejects the whole batch when one metric or param name has another character (on Windows ":" too).
_NOT_IN_MLFLOW_NAMES = re.compile(r"[^/\w.\- ]")
MLFLOW_MAX_KEY_LENGTH = 250


def mlflow_key(name: str) -> str:
    """``name`` as MLflow accepts it: letters, digits, ``_ - . / space``, no empty, ``.`` or ``..`` path parts.
    Our own keys already are; names built from the user's data (a split or category name) may not be."""
    clean = _NOT_IN_MLFLOW_NAMES.sub("_", str(name))
    parts = [p if p not in (".", "..") else "_" for p in clean.split("/") if p]
    return "/".join(parts)[:MLFLOW_MAX_KEY_LENGTH] or "_"


class Logger(Protocol):
    run_id: str | None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_summary(self, metrics: dict[str, float]) -> None: ...
    def log_params(self, params: dict) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def register_model(self, path: str | Path, name: str) -> str | None: ...


class NullLogger:
    """Logs nothing (tracking disabled, or a rank other than 0)."""

    run_id = None

    def log_metrics(self, metrics, step=None):
        pass

    def log_summary(self, metrics):
        pass

    def log_params(self, params):
        pass

    def log_artifact(self, path, artifact_path=None):
        pass

    def set_tags(self, tags):
        pass

    def register_model(self, path, name):
        return None


class MLflowLogger:
    def __init__(self, client, run_id: str):
        self.client = client
        self.run_id = run_id
        self.curves: set[str] = set()  # keys logged with a step: their history is a curve

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        if step is not None:
            self.curves.update(metrics)
        now = int(time.time() * 1000)
        batch = [
            Metric(mlflow_key(key), float(value), now, step or 0)
            for key, value in metrics.items()
            if value is not None and math.isfinite(float(value))
        ]
        for start in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[start : start + 1000])

    def log_summary(self, metrics: dict[str, float]) -> None:
        """A stage's final numbers, except those already logged as a curve (a summary value would add a point at
        step 0 to it)."""
        self.log_metrics({k: v for k, v in metrics.items() if k not in self.curves})

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(mlflow_key(key), str(value)[:6000]) for key, value in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.is_file():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, mlflow_key(key), str(value)[:5000])

    def register_model(self, path: str | Path, name: str) -> str | None:
        """Log the model directory as this run's ``model`` artifact and register it as a new version of ``name``
        in the MLflow model registry; returns the version."""
        from mlflow.exceptions import MlflowException

        self.client.log_artifacts(self.run_id, str(path), "model")
        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
                raise
        source = f"{self.client.get_run(self.run_id).info.artifact_uri}/model"
        version = self.client.create_model_version(name, source=source, run_id=self.run_id)
        self.client.set_model_version_tag(name, version.version, "kind", "hf_causal_lm_directory")
        run_tags = self.client.get_run(self.run_id).data.tags
        for key in MODEL_VERSION_TAGS:
            if key in run_tags:
                self.client.set_model_version_tag(name, version.version, key, run_tags[key])
        return version.version


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@contextlib.contextmanager
def stop_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block ends, then deliver them. An interrupt inside an MLflow call would
    leave SQLite's write lock held by the abandoned transaction: ending the run as KILLED then fails ("database
    is locked", after a long wait and a traceback) and the run stays RUNNING."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if pending:
            signal.raise_signal(pending[0])  # now, to the handler the block borrowed it from


class _StopSafeClient:
    """An ``MlflowClient`` whose every call runs under :func:`stop_deferred`."""

    def __init__(self, client):
        self._client = client

    def __getattr__(self, name):
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute

        def call(*args, **kwargs):
            with stop_deferred():
                return attribute(*args, **kwargs)

        return call


# Tracking URI schemes accepted without asking MLflow (which means importing it: seconds, before any work).
_PLAIN_SCHEMES = {"", "file", "sqlite", "http", "https", "databricks"}
_UNITY_CATALOG = {"databricks-uc", "uc"}  # model registries only: MLflow keeps no runs there
_ACCEPTED_URIS = "a local path or file:///PATH, sqlite:///FILE.db, http(s)://HOST:PORT (an MLflow server), databricks"


def check_tracking_uri(uri: str) -> None:
    """Raise a ConfigError naming ``tracking.uri`` unless MLflow has a tracking store for the URI's scheme.
    MLflow's own error is a traceback from the first MLflow call (``UnsupportedModelRegistryStoreURIException``),
    naming no key. Schemes other than the plain ones (database URLs, plugins) are asked of MLflow's registries."""
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    scheme = uri if uri in _UNITY_CATALOG | {"databricks"} else parts.scheme.lower()  # as MLflow reads them,
    if len(scheme) == 1:  # and a Windows drive letter as a local path
        scheme = ""
    if scheme in ("http", "https") and not parts.hostname:
        raise ConfigError(f"tracking.uri={uri!r} names no host; write {scheme}://HOST:PORT of an MLflow server")
    if scheme in _PLAIN_SCHEMES or (scheme not in _UNITY_CATALOG and _mlflow_has_store_for(uri)):
        return
    from mlflow.store.db.db_types import DATABASE_ENGINES

    databases = ", ".join(f"{engine}://..." for engine in DATABASE_ENGINES if engine != "sqlite")
    raise ConfigError(
        f"tracking.uri={uri!r}: MLflow has no tracking store for the scheme {scheme!r}; use {_ACCEPTED_URIS}, "
        f"or a database URL ({databases})"
    )


def _mlflow_has_store_for(uri: str) -> bool:
    """Whether both MLflow's tracking store and its model registry (the client opens both) accept ``uri``."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.exceptions import MlflowException
    from mlflow.tracking._model_registry.utils import _get_store_registry
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    try:
        for registry in (_tracking_store_registry, _get_store_registry()):
            registry.get_store_builder(uri)  # the builder only: nothing is created or connected to
    except MlflowException:
        return False
    return True


def _client(config: Config):
    check_tracking_uri(config.tracking.uri)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient

    client = _StopSafeClient(MlflowClient(tracking_uri=config.tracking.uri))
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    if experiment is None:
        experiment_id = client.create_experiment(config.tracking.experiment, tags=CLASSIC_ML_EXPERIMENT)
    else:
        experiment_id = experiment.experiment_id
        if EXPERIMENT_KIND_TAG not in experiment.tags:  # an experiment made elsewhere keeps its owner's choice
            client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, CLASSIC_ML_EXPERIMENT[EXPERIMENT_KIND_TAG])
    return client, experiment_id


def experiment_ui_url(config: Config, experiment_id: str | None = None) -> str | None:
    """The runs list of the experiment in the MLflow UI, as a browser that never opened the UI shows it (see
    ``ML_WORKFLOW_QUERY``): on the tracking server for an http(s) URI, else on ``mlflow ui``'s default address.
    ``experiment_id`` defaults to the configured experiment's. None when tracking is off, for Databricks (its own
    UI), or while the store or the experiment does not exist yet (nothing is created to find out)."""
    from urllib.parse import urlsplit

    uri = config.tracking.uri
    if not config.tracking.enabled or uri.lower().startswith(("databricks", "uc:")):
        return None
    if experiment_id is None:
        experiment_id = _existing_experiment_id(config)
        if experiment_id is None:
            return None
    base = uri.rstrip("/") if urlsplit(uri).scheme.lower() in ("http", "https") else LOCAL_UI
    return f"{base}/#/experiments/{experiment_id}/runs?{ML_WORKFLOW_QUERY}"


def _existing_experiment_id(config: Config) -> str | None:
    from urllib.parse import urlsplit

    uri = config.tracking.uri
    check_tracking_uri(uri)
    parts = urlsplit(uri)
    if uri.startswith("sqlite:///"):
        local = Path(uri.removeprefix("sqlite:///"))
    elif parts.scheme.lower() == "file":
        local = Path(parts.path)
    elif len(parts.scheme) <= 1:  # a plain path (or a Windows drive)
        local = Path(uri)
    else:
        local = None
    if local is not None and not local.exists():
        return None  # opening the store would create it
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient

    experiment = MlflowClient(tracking_uri=uri).get_experiment_by_name(config.tracking.experiment)
    return experiment.experiment_id if experiment is not None else None


def data_version(config: Config) -> str:
    """A short hash naming the data: the data settings plus, for file sources, the files' contents. The simulated
    domain is a pure function of its settings (and the code, which the git_commit tag names)."""
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps(config.data.model_dump(), sort_keys=True).encode())
    for path in (config.data.path, config.data.sft_file, config.data.rm_file, config.data.ppo_file):
        if path and Path(path).is_file():
            digest.update(hashlib.sha256(Path(path).read_bytes()).digest())
    return digest.hexdigest()[:12]


def _base_tags(config: Config) -> dict[str, str]:
    return {
        "git_commit": git_commit(),
        "data.source": config.data.source,
        "data.seed": str(config.data.seed),
        "data_version": data_version(config),
        "preset": config.ppo.preset,
        "seed": str(config.ppo.seed),
        "distributed.engine": config.distributed.engine,
    }


# Which process owns a run: a run left RUNNING by a process that no longer exists was killed (SIGKILL, power).
HOST_TAG, PID_TAG = "rlhf.host", "rlhf.pid"


@contextlib.contextmanager
def _run(config: Config, name: str, tags: dict[str, str]) -> Iterator[MLflowLogger]:
    client, experiment_id = _client(config)
    end_runs_of_dead_processes(client, experiment_id)
    owner = {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}
    run = client.create_run(experiment_id, run_name=name, tags={**_base_tags(config), **owner, **tags})
    logger = MLflowLogger(client, run.info.run_id)
    try:
        yield logger
    except BaseException as exc:
        # Ctrl-C and SIGTERM (a KeyboardInterrupt, see cli.install_stop_handlers) are a stop, not a failure.
        client.set_terminated(run.info.run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    client.set_terminated(run.info.run_id, "FINISHED")


def end_runs_of_dead_processes(client, experiment_id: str) -> list[str]:
    """Mark KILLED the runs still RUNNING whose process (on this host) is gone; returns their ids. A process
    killed with SIGKILL cannot end its own run, so the next run started here does it."""
    host = socket.gethostname().replace("'", "")
    try:
        running = client.search_runs(
            [experiment_id], filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'"
        )
    except Exception:  # noqa: BLE001 - housekeeping must never stop a run
        return []
    ended = []
    for run in running:
        pid = run.data.tags.get(PID_TAG, "")
        if pid.isdigit() and not _process_exists(int(pid)):
            client.set_tag(run.info.run_id, "rlhf.ended_by", "its process was gone; marked by a later run")
            client.set_terminated(run.info.run_id, "KILLED")
            ended.append(run.info.run_id)
    return ended


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


@contextlib.contextmanager
def pipeline_run(config: Config, name: str = "pipeline") -> Iterator[Logger]:
    """The parent run of one pipeline run; stage runs opened inside nest under it."""
    if not config.tracking.enabled:
        yield NullLogger()
        return
    with _run(config, name, {"kind": "pipeline"}) as logger:
        logger.log_params(flatten(config_to_dict(config)))
        previous = os.environ.get(PARENT_RUN_ENV)
        os.environ[PARENT_RUN_ENV] = logger.run_id
        try:
            yield logger
        finally:
            if previous is None:
                os.environ.pop(PARENT_RUN_ENV, None)
            else:
                os.environ[PARENT_RUN_ENV] = previous


def pipeline_run_name(config: Config) -> str:
    """What a pipeline's parent run is called in the MLflow UI: the preset and the seeds, not one name for all."""
    return f"{config.ppo.preset} seed {config.ppo.seed} (data seed {config.data.seed})"


@contextlib.contextmanager
def stage_run(config: Config, stage: str, is_main: bool = True, parent_run_id: str | None = None):
    """A run for one stage, nested under ``parent_run_id`` (default: the pipeline run of this process, or under
    ``dvc exp run`` the experiment's parent run)."""
    if not config.tracking.enabled or not is_main:
        yield NullLogger()
        return
    parent = parent_run_id or os.environ.get(PARENT_RUN_ENV)
    dvc_parent = None if parent else dvc_experiment_parent(config)
    tags = {"kind": "stage", "stage": stage}
    if parent or dvc_parent:
        tags["mlflow.parentRunId"] = parent or dvc_parent
    with _run(config, stage, tags) as logger:
        logger.log_params(flatten(config_to_dict(config)))
        yield logger
    if dvc_parent:  # the experiment's stages compare on one row, as a pipeline run's do
        _copy_final_metrics(logger.client, logger.run_id, dvc_parent)


def record_skipped_stage(config: Config, stage: str, parent_run_id: str | None, previous: dict, metrics: dict):
    """A stage skipped as unchanged still appears under the new pipeline run: a short nested run with its numbers,
    tagged ``rlhf.skipped`` and linked to the run that produced the outputs (``rlhf.reused_run_id``)."""
    parent = parent_run_id or os.environ.get(PARENT_RUN_ENV)
    if not config.tracking.enabled or not parent:
        return
    tags = {"kind": "stage", "stage": stage, "mlflow.parentRunId": parent, "rlhf.skipped": "unchanged"}
    if previous.get("mlflow_run_id"):
        tags["rlhf.reused_run_id"] = previous["mlflow_run_id"]
    with _run(config, f"{stage} (skipped: unchanged)", tags) as logger:
        logger.log_summary({k: v for k, v in flatten(metrics).items() if type(v) in (int, float)})


def dvc_experiment_parent(config: Config) -> str | None:
    """Under ``dvc exp run``, the id of the experiment's parent run (found by its ``dvc.exp_name`` tag, created by
    the experiment's first stage); None outside an experiment. The parent has no process of its own: it is made
    FINISHED at once and its stages nest under it."""
    name = os.environ.get(DVC_EXP_NAME_ENV)
    if not name:
        return None
    client, experiment_id = _client(config)
    quoted = name.replace("'", "")
    found = client.search_runs([experiment_id], filter_string=f"tags.`dvc.exp_name` = '{quoted}' and tags.kind = "
                               "'pipeline'", max_results=1, order_by=["attributes.start_time DESC"])  # fmt: skip
    if found:
        return found[0].info.run_id
    tags = {**_base_tags(config), "kind": "pipeline", "dvc.exp_name": name,
            "dvc.baseline_rev": os.environ.get(DVC_EXP_BASELINE_ENV, "")}  # fmt: skip
    run = client.create_run(experiment_id, run_name=f"dvc exp {name}: {pipeline_run_name(config)}", tags=tags)
    MLflowLogger(client, run.info.run_id).log_params(flatten(config_to_dict(config)))
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def _copy_final_metrics(client, source_run_id: str, target_run_id: str) -> None:
    metrics = client.get_run(source_run_id).data.metrics
    MLflowLogger(client, target_run_id).log_metrics(metrics)
