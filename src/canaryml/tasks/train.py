"""`canaryml train dataset=DIR forecaster=lstm|transformer detector=iforest|ocsvm trainer.…=…`

Trains a CanaryScorer, logs the run to MLflow (config, dataset hash, git commit, stage/name
metrics, loss curves live during the fit through Lightning's MLFlowLogger), logs the scorer
as a pyfunc, registers a `canary-scorer` version and points `@challenger` at it.

Continuous learning (the periodic retrain job, see serving/k8s/cronjob-retrain.yaml):
`canaryml train trainer.init_from=models:/canary-scorer@champion dataset=DIR
trainer.since=2026-01-01T00:00:00Z` fine-tunes the champion on recent telemetry
(`init_from=` and `since=` at top level work too).

`scorer_out=DIR` also saves the trained CanaryScorer bundle to DIR (atomically), with the
lineage of the run in its `scorer.json` info (`train_run_id`, `registered_model`,
`registered_version`, `dataset_hash`, `git_commit`), so a pipeline tool (dvc.yaml) can track it
as an output and `canaryml replay model=DIR` / `canaryml register scorer=DIR` can use it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from canaryml.data.dataset import CanonicalDataset
from canaryml.errors import ConfigError, DataContractError
from canaryml.paths import repo_root

log = logging.getLogger(__name__)


def _dataset(path_value: str) -> CanonicalDataset:
    if "://" in str(path_value):  # object storage (s3://bucket/prefix): read as is
        return CanonicalDataset(str(path_value))
    path = Path(path_value)
    if not path.is_absolute() and not path.exists():
        path = repo_root() / path
    if not (path / "manifest.json").is_file():
        raise DataContractError(
            f"dataset {path_value!r} ({path}) is not a canonical dataset (no manifest.json). "
            "Create one first: `canaryml simulate out=data/raw/simulated` then "
            "`canaryml ingest source=bundle input=data/raw/simulated out=data/processed/simulated`"
        )
    return CanonicalDataset(path)


def _loss_figure(history: list[dict[str, float]]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    for key in ("train/loss", "val/loss"):
        pts = [(h["epoch"], h[key]) for h in history if key in h]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("pinball loss")
    ax.legend()
    fig.tight_layout()
    return fig


def _save_scorer(scorer: Any, out: Path, *, run_id: str, version: Any,
                 registered_model: str) -> Path:
    """Save the scorer bundle to `out` (atomic: a failed save leaves the old one in place),
    recording where it came from so a copy outside MLflow still links back to its run."""
    from canaryml import tracking

    out = out.expanduser()
    if not out.is_absolute():
        out = Path.cwd() / out
    if out.exists() and not out.is_dir():
        raise ConfigError(f"scorer_out={str(out)!r} is a file; give a directory path "
                          "(it is replaced as a whole by the new scorer bundle)")
    lineage = {"train_run_id": run_id, "registered_model": registered_model,
               "registered_version": str(version.version),
               "dataset_hash": scorer.info.get("dataset_hash"),
               "git_commit": tracking.git_commit()}
    before = dict(scorer.info)
    scorer.info.update(lineage)
    try:
        path = Path(scorer.save(out))
    finally:
        scorer.info = before
    log.info("saved scorer bundle to %s (run %s, %s v%s)", path, run_id, registered_model,
             version.version)
    return path


def _operating_point(cfg: DictConfig, dataset: CanonicalDataset, result: Any
                     ) -> dict[str, Any] | None:
    """The model's threshold and hysteresis for `trainer.operating_point_frr`, chosen on the
    validation deployments (never trained on) with replay's own calibration code."""
    import mlflow

    from canaryml.control.policy import PolicyConfig
    from canaryml.replay.protocol import choose_operating_point

    pcfg = PolicyConfig.from_mapping(cast(dict, OmegaConf.to_container(cfg.policy, resolve=True)))
    target = float(cfg.trainer.get("operating_point_frr", 0.01))
    confidence = cfg.trainer.get("operating_point_confidence")
    if confidence is not None and not 0.0 < float(confidence) < 1.0:
        raise ConfigError(f"trainer.operating_point_confidence={confidence} must be in (0, 1) "
                          "or null")
    op = choose_operating_point(result.scorer, dataset, result.split["val"], pcfg, target,
                                confidence=None if confidence is None else float(confidence))
    if op is not None:
        p = op.get("predict_probability")
        log.info("operating point: threshold %.4f, %d breach(es) in a row, predictive rule %s, "
                 "for FRR <= %g on %d validation deployments", op["rollback_threshold"],
                 op["consecutive_breaches"], "off" if p is None else f"p > {p:.3f}", target,
                 op["deployments"])
        mlflow.log_metrics({"operating_point/rollback_threshold": op["rollback_threshold"],
                            "operating_point/consecutive_breaches": op["consecutive_breaches"]}
                           | ({} if p is None else {"operating_point/predict_probability": p}))
    return op


def summary_metrics(result: Any) -> dict[str, float]:
    """The fit's one-off metrics (`val/best_loss`, `test/roc_auc`, `train/fit_s`, …): the
    per-epoch curves are not repeated, the live logger has them at their steps."""
    curves = {k for h in result.history for k in h}
    return {k: float(v) for k, v in result.metrics.items() if k not in curves}


def process_rank() -> int:
    """Global rank of this process in a multi-device (DDP) fit: Lightning starts ranks ≥ 1 as
    copies of this command with `LOCAL_RANK`/`NODE_RANK` set; torchrun and SLURM set `RANK`."""
    import os

    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    local = os.environ.get("LOCAL_RANK", "")
    node = os.environ.get("NODE_RANK", "")
    return (int(node) if node.isdigit() else 0) * 1000 + (int(local) if local.isdigit() else 0)


def run(cfg: DictConfig) -> int:
    import mlflow

    from canaryml import tracking
    from canaryml.models.train import spec_from_mapping, train_scorer

    def as_dict(node: Any) -> dict[str, Any]:
        return cast(dict[str, Any], OmegaConf.to_container(node, resolve=True))

    init_from = cfg.get("init_from") or cfg.trainer.get("init_from")
    since = cfg.get("since") or cfg.trainer.get("since")
    if since is not None and not init_from:
        log.warning("since=%s without init_from: training from scratch on recent data only", since)
    spec = spec_from_mapping(as_dict(cfg.forecaster), as_dict(cfg.detector), as_dict(cfg.scorer),
                             as_dict(cfg.trainer), seed=int(cfg.seed),
                             since=None if since is None else str(since))
    dataset = _dataset(str(cfg.dataset))
    tracking.configure(cfg.mlflow.tracking_uri)
    champion = None
    if init_from:
        if not str(init_from).startswith(("models:/", "runs:/")) and not Path(str(init_from)).is_dir():
            raise ConfigError(f"init_from={init_from!r}: use models:/canary-scorer@champion, "
                              "runs:/<id>/scorer or a scorer directory")
        champion = tracking.load_scorer(str(init_from))
    if process_rank() != 0:
        # a DDP worker (trainer.devices > 1): it takes part in the fit, and only rank 0 logs the
        # run, registers the version and saves scorer_out — one run and one version per command
        log.info("rank %d: training only; rank 0 logs and registers", process_rank())
        train_scorer(dataset, spec, init_from=champion)
        return 0
    full_cfg = as_dict(cfg)
    with tracking.start_run(full_cfg, experiment=str(cfg.mlflow.experiment),
                            run_name=f"train-{spec.network.kind}-{spec.detector.kind}",
                            dataset_hash=dataset.content_hash,
                            tags={"command": "train", "init_from": str(init_from or "")}) as run:
        # the loss curves reach the run live, epoch by epoch, through Lightning's MLFlowLogger
        result = train_scorer(dataset, spec, init_from=champion,
                              logger=tracking.lightning_logger())
        result.scorer.operating_point = _operating_point(cfg, dataset, result)
        mlflow.log_metrics(summary_metrics(result))
        if result.history:
            import matplotlib.pyplot as plt

            fig = _loss_figure(result.history)
            mlflow.log_figure(fig, "plots/loss_curves.png")
            plt.close(fig)
        mlflow.log_dict({k: list(v) for k, v in result.split.items()}, "split.json")
        version = tracking.log_scorer(result.scorer, str(cfg.mlflow.registered_model),
                                      alias="challenger")
        scorer_out = cfg.get("scorer_out")
        if scorer_out not in (None, ""):
            saved = _save_scorer(result.scorer, Path(str(scorer_out)), run_id=run.info.run_id,
                                 version=version, registered_model=str(cfg.mlflow.registered_model))
            mlflow.set_tag("scorer_out", str(saved))
    auc = result.metrics.get("test/roc_auc")
    print(f"trained {spec.network.kind}+{spec.detector.kind}: run {run.info.run_id}, "
          f"{cfg.mlflow.registered_model} v{version.version} @challenger, "
          f"val/best_loss={result.metrics.get('val/best_loss', float('nan')):.4f}, "
          f"test/roc_auc={'n/a' if auc is None else f'{auc:.3f}'}, "
          f"{result.metrics['train/sec_per_epoch']:.2f}s/epoch"
          + (f", scorer saved to {cfg.scorer_out}" if cfg.get("scorer_out") else ""))
    return 0
