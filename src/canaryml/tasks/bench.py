"""`canaryml bench`: run the benchmark suites; each writes experiments/benchmarks/<suite>.json."""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path
from typing import cast

from omegaconf import DictConfig, OmegaConf

from canaryml.errors import ConfigError
from canaryml.paths import repo_root

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> int:
    out_dir = Path(cfg.bench.out_dir)
    if not out_dir.is_absolute():
        out_dir = repo_root() / out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    for suite in cfg.bench.suites:
        try:
            module = importlib.import_module(f"canaryml.bench.{suite}")
        except ModuleNotFoundError as exc:
            raise ConfigError(f"unknown benchmark suite {suite!r} in bench.suites") from exc
        kwargs = cast(dict, OmegaConf.to_container(cfg.bench.get(suite) or {}, resolve=True))
        log.info("bench %s …", suite)
        result = module.run(out_dir, **kwargs)
        print(f"== {suite} → {out_dir / (suite + '.json')}")
        print(json.dumps(result.get("summary", result), indent=2, default=str))
    return 0
