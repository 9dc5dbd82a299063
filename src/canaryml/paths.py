"""Where the project's configuration and default stores live."""

from __future__ import annotations

import os
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[2]


def repo_root() -> Path:
    return Path(os.environ.get("CANARYML_HOME", _REPO_ROOT))


def conf_dir() -> Path:
    """`conf/` of the checkout (editable install) or `$CANARYML_CONF`."""
    env = os.environ.get("CANARYML_CONF")
    return Path(env) if env else repo_root() / "conf"


def default_tracking_uri() -> str:
    """MLflow tracking URI: `$MLFLOW_TRACKING_URI`, else a SQLite file in the project."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{repo_root() / 'mlflow.db'}"
