"""Where the configuration and the default stores live, for a checkout and for an install.

* Configuration: the `conf/` tree shipped inside the package (`canaryml/conf`; in a checkout a
  symlink to the repository's top-level `conf/`), overlaid by the directories in
  `$CANARYML_CONF` (os.pathsep-separated; the first wins) and by `$CANARYML_HOME/conf` when it
  exists. An overlay may be a complete copy of `conf/` or only the files that differ or are new
  (`serve/prod.yaml`).
* Default stores and outputs (`mlflow.db`, `data/processed/<name>`, `experiments/…`): under
  `$CANARYML_HOME` when set; else the checkout when canaryml runs from one (editable install);
  else the current working directory (an installed wheel never writes into site-packages).
"""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent
_CHECKOUT = _PACKAGE_DIR.parents[1]  # <repo>/src/canaryml → <repo>


def checkout_root() -> Path | None:
    """The source checkout canaryml is imported from, or None for an installed package."""
    if (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "src" / "canaryml").is_dir():
        return _CHECKOUT
    return None


def repo_root() -> Path:
    """Project root for default stores and outputs: `$CANARYML_HOME`, else the checkout, else
    the current working directory."""
    env = os.environ.get("CANARYML_HOME")
    if env:
        return Path(env)
    return checkout_root() or Path.cwd()


def packaged_conf_dir() -> Path:
    """The configuration shipped with canaryml (package data `canaryml/conf`)."""
    return _PACKAGE_DIR / "conf"


def user_conf_dirs() -> list[Path]:
    """Directories named by `$CANARYML_CONF`, in precedence order."""
    env = os.environ.get("CANARYML_CONF", "")
    return [Path(p) for p in env.split(os.pathsep) if p.strip()]


def conf_search_path() -> list[Path]:
    """Every configuration directory, highest precedence first: `$CANARYML_CONF`, then
    `$CANARYML_HOME/conf` (when it exists), then the packaged `conf/`."""
    dirs = user_conf_dirs()
    home = os.environ.get("CANARYML_HOME")
    if home and (Path(home) / "conf").is_dir():
        dirs.append(Path(home) / "conf")
    dirs.append(packaged_conf_dir())
    return list(dict.fromkeys(d.resolve() for d in dirs))


def conf_dir() -> Path:
    """The configuration directory that holds `config.yaml` first in the search path (a complete
    `$CANARYML_CONF`, else the packaged `conf/`); file-level defaults are read from here."""
    for d in conf_search_path():
        if (d / "config.yaml").is_file():
            return d
    return packaged_conf_dir()


def default_tracking_uri() -> str:
    """MLflow tracking URI: `$MLFLOW_TRACKING_URI`, else `mlflow.db` under `repo_root()`."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{repo_root() / 'mlflow.db'}"
