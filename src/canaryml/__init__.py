"""canaryml: adaptive deployment canaries with predictive rollback.

The Python API (canaryml.api) — the workbench commands as functions, keyword arguments being
config overrides:

    from canaryml import simulate, ingest, train, replay, load_scorer, config
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from canaryml.api import config, load_scorer, train

__all__ = ["config", "ingest", "load_scorer", "replay", "simulate", "train"]

_API = {"config", "load_scorer", "train"}  # simulate, ingest, replay: callable subpackages


def __getattr__(name: str) -> Any:
    """Lazy: `import canaryml` stays light (the CLI imports it for every command)."""
    if name in _API:
        from canaryml import api

        return getattr(api, name)
    raise AttributeError(f"module 'canaryml' has no attribute {name!r}")
