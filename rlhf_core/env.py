"""Environment defaults for offline, project-local runs (set before prefect/mlflow are imported)."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.3",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "DVC_NO_ANALYTICS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # per-file "Loading weights" bars; set 0 to see them for big models
}


def apply_defaults(project_dir: str | Path = ".") -> None:
    """Keep Prefect's state inside the project and switch telemetry off; explicit settings win."""
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PREFECT_HOME", str(Path(project_dir).resolve() / ".prefect"))
