"""Every file in every config group composes; the model groups also build their objects."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest
from omegaconf import OmegaConf

from canaryml.cli import compose
from canaryml.errors import ConfigError
from canaryml.models.detectors import IsolationForestDetector, OneClassSVMDetector, PCADetector
from canaryml.models.networks import build_network
from canaryml.models.train import spec_from_mapping
from canaryml.paths import conf_dir

GROUPS = sorted(p.name for p in conf_dir().iterdir() if p.is_dir() and any(p.glob("*.yaml")))
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((conf_dir() / g).glob("*.yaml"))]


def _d(node: Any) -> dict[str, Any]:
    return cast(dict[str, Any], OmegaConf.to_container(node, resolve=True))


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_config_file_composes(group: str, option: str) -> None:
    cfg = compose("train", [f"{group}={option}"])
    assert cfg[group] is not None, f"conf/{group}/{option}.yaml is empty"
    OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("forecaster", sorted(f.stem for f in (conf_dir() / "forecaster").glob("*.yaml")))
@pytest.mark.parametrize("detector", sorted(f.stem for f in (conf_dir() / "detector").glob("*.yaml")))
def test_model_groups_instantiate(forecaster: str, detector: str) -> None:
    cfg = compose("train", [f"forecaster={forecaster}", f"detector={detector}"])
    spec = spec_from_mapping(_d(cfg.forecaster), _d(cfg.detector), _d(cfg.scorer), _d(cfg.trainer),
                             seed=int(cfg.seed))
    net = build_network(spec.network)
    assert sum(p.numel() for p in net.parameters()) > 0
    det = spec.detector.build()
    assert isinstance(det, {"iforest": IsolationForestDetector, "ocsvm": OneClassSVMDetector,
                            "pca": PCADetector}[detector])


def test_unknown_keys_in_model_groups_are_config_errors(tmp_path: Path) -> None:
    cfg = compose("train")
    bad = _d(cfg.forecaster) | {"hiden": 3}
    with pytest.raises(ConfigError, match="unknown key"):
        spec_from_mapping(bad, _d(cfg.detector), _d(cfg.scorer), _d(cfg.trainer))
    with pytest.raises(ConfigError, match="forecast_weight"):
        spec_from_mapping(_d(cfg.forecaster), _d(cfg.detector), _d(cfg.scorer) | {"forecast_weight": 2},
                          _d(cfg.trainer))
