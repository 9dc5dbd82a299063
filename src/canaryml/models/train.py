"""Library entry for training a CanaryScorer (typed arguments; `canaryml train` wraps it).

Deployments are split by deployment (or by time), never by rows:
  train → scaler + forecaster (healthy spans only: healthy deployments, pre-onset of faulty);
  val   → early stopping (healthy spans), then split in halves: detector fit / calibration;
  test  → held back: `test/roc_auc` (faulty post-onset ticks vs healthy deployments' ticks).
The breach predictor (predictive rollback) is fitted on the labelled train + test deployments;
the validation deployments choose the model's operating point (train task).
Without a baseline group in any deployment (SMD, NAB) the model is single-group
(`canaryml.models.scorer.SingleGroup`): per-series scalers and values detectors from the train +
validation deployments' healthy ticks, and the values detector's share chosen on anomalies
injected into the calibration deployments (`choose_values_weight`).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from canaryml.data.dataset import CanonicalDataset, DeploymentArrays
from canaryml.errors import DataContractError
from canaryml.models.detectors import DetectorSpec, PCADetector, ResidualDetector
from canaryml.models.forecaster import Forecaster, fit_forecaster
from canaryml.models.networks import NetworkSpec, build_network
from canaryml.models.predict import PredictorSpec, fit_on_dataset
from canaryml.models.scorer import (
    Calibration,
    CanaryScorer,
    ScorerWeights,
    SingleGroup,
    calibrate,
)
from canaryml.models.windows import (
    DeploymentInfo,
    Scaler,
    WindowDataset,
    deployment_infos,
    healthy_mask,
    healthy_segments,
    split_deployments,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainerSpec:
    max_epochs: int = 8
    batch_size: int = 256
    lr: float = 3e-3
    patience: int = 2
    stride: int = 2
    max_train_windows: int = 40000
    split: str = "deployment"
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    accelerator: str = "auto"
    devices: int = 1
    progress_bar: bool = True
    num_threads: int = 0
    # point-labelled benchmarks (SMD, NAB): their unlabelled `<id>.train` parts are the normal
    # reference, as in the published protocols; simulated and real canaries keep `unknown` out
    unknown_is_normal: bool = False
    # the breach predictor's horizon (predictive rollback, canaryml.models.predict); null/0 = none
    predict_horizon_s: float | None = 1200.0


@dataclass(frozen=True)
class TrainSpec:
    network: NetworkSpec = field(default_factory=NetworkSpec)
    detector: DetectorSpec = field(default_factory=DetectorSpec)
    weights: ScorerWeights = field(default_factory=ScorerWeights)
    trainer: TrainerSpec = field(default_factory=TrainerSpec)
    seed: int = 0
    since: str | None = None  # only deployments starting at/after this UTC time


@dataclass(frozen=True)
class TrainResult:
    scorer: CanaryScorer
    metrics: dict[str, float]
    history: list[dict[str, float]]
    split: dict[str, tuple[str, ...]]


def _select(infos: list[DeploymentInfo], since: str | None) -> list[DeploymentInfo]:
    if since is None:
        return infos
    try:
        t = pd.Timestamp(since)
    except ValueError as exc:
        raise DataContractError(f"since={since!r} is not a timestamp; use ISO-8601, e.g. "
                                "2026-01-01T00:00:00Z") from exc
    t = t.tz_localize("UTC") if t.tzinfo is None else t
    out = [i for i in infos if i.start_s >= t.timestamp()]
    if not out:
        raise DataContractError(f"no deployments start at/after since={since!r}; pick an earlier "
                                "time or ingest recent telemetry")
    return out


def _healthy_series(scaler: Scaler | None, arrays: Sequence[tuple[DeploymentArrays, DeploymentInfo]]
                    ) -> list[np.ndarray]:
    out = []
    for arr, info in arrays:
        for lo, hi in healthy_segments(arr, info):
            for g in (arr.canary, arr.baseline):
                if g is not None:
                    out.append(g[lo:hi] if scaler is None else scaler.transform(g[lo:hi]))
    return out


def tick_labels(arr: DeploymentArrays, info: DeploymentInfo) -> np.ndarray:
    """Per tick: 0 healthy, 1 faulty post-onset, -1 excluded (pre-onset of faulty, unknown)."""
    lab = np.full(len(arr.timestamps_s), -1, dtype=np.int8)
    if info.label == "healthy":
        lab[:] = 0
    elif info.label == "faulty" and info.fault_onset_s is not None:
        lab[arr.timestamps_s >= info.fault_onset_s] = 1
    return lab


def evaluate(scorer: CanaryScorer, items: Sequence[tuple[DeploymentArrays, DeploymentInfo]]
             ) -> dict[str, float]:
    """Tick-level ROC-AUC (faulty post-onset vs healthy deployments) and healthy score stats."""
    from sklearn.metrics import roc_auc_score

    scores, labels = [], []
    for arr, info in items:
        s = scorer.score_series(arr)
        lab = tick_labels(arr, info)
        ok = np.isfinite(s) & (lab >= 0)
        scores.append(s[ok])
        labels.append(lab[ok])
    s_all = np.concatenate(scores) if scores else np.zeros(0)
    l_all = np.concatenate(labels) if labels else np.zeros(0)
    out: dict[str, float] = {"n_ticks": float(len(s_all))}
    if len(np.unique(l_all)) == 2:
        out["roc_auc"] = float(roc_auc_score(l_all, s_all))
    if (l_all == 0).any():
        out["healthy_score_p95"] = float(np.quantile(s_all[l_all == 0], 0.95))
    if (l_all == 1).any():
        out["faulty_score_median"] = float(np.median(s_all[l_all == 1]))
    return out


def _fit_detector(spec: DetectorSpec, feats: np.ndarray, seed: int) -> ResidualDetector | None:
    return spec.build(seed).fit(feats) if feats.shape[1] else None


def train_scorer(dataset: CanonicalDataset, spec: TrainSpec, *, work_dir: Path | None = None,
                 init_from: CanaryScorer | None = None,
                 deployments: Sequence[str] | None = None,
                 callbacks: Sequence[Any] = (), logger: Any | None = None) -> TrainResult:
    """Train (or, with `init_from`, fine-tune) a CanaryScorer on `dataset`.

    `deployments` restricts training (train/val/test split included) to these deployment ids,
    e.g. to keep a tuning hold-out unseen; `callbacks` are extra Lightning callbacks for the
    forecaster fit (e.g. Optuna pruning on `val/loss`); `logger` is a Lightning logger that gets
    the `train/loss` / `val/loss` curves live during the fit (`tracking.lightning_logger()` for
    the active MLflow run; None = a CSV file in a temp dir, nothing tracked).

    `init_from` keeps the champion's network architecture, metrics and scaler and continues
    training its weights on the selected deployments (continuous learning); detectors and
    calibration are refitted on the new data.
    """
    tr = spec.trainer
    if tr.num_threads:
        torch.set_num_threads(tr.num_threads)
    infos = _select(deployment_infos(dataset), spec.since)
    if tr.unknown_is_normal:
        infos = [dataclasses.replace(i, label="healthy") if i.label == "unknown" else i
                 for i in infos]
    if deployments is not None:
        keep = set(deployments)
        unknown = keep - {i.deployment_id for i in infos}
        if unknown:
            raise DataContractError(f"{dataset.path}: unknown deployment id(s) "
                                    f"{sorted(unknown)[:5]}; pass ids from deployments.parquet")
        infos = [i for i in infos if i.deployment_id in keep]
    metrics = tuple(dataset.metrics)
    if init_from is not None and tuple(init_from.metrics) != metrics:
        raise DataContractError(
            f"{dataset.path}: metrics {list(metrics)} differ from the model's "
            f"{list(init_from.metrics)}; fine-tuning needs the same metrics — train from scratch"
        )
    if init_from is not None and init_from.step_s != dataset.step_s:
        raise DataContractError(f"{dataset.path}: step {dataset.step_s}s differs from the model's "
                                f"{init_from.step_s}s; re-ingest with step_s={init_from.step_s}")
    split = split_deployments(infos, tr.val_fraction, tr.test_fraction, spec.seed, tr.split)
    by_id = {i.deployment_id: i for i in infos}

    def load(ids: Sequence[str]) -> list[tuple[DeploymentArrays, DeploymentInfo]]:
        return [(dataset.arrays(d), by_id[d]) for d in ids]

    train_items, val_items, test_items = load(split.train), load(split.val), load(split.test)
    if not train_items or not val_items:
        raise DataContractError(
            f"{dataset.path}: {len(infos)} deployment(s) are too few to split into train/val "
            f"(val_fraction={tr.val_fraction}); add deployments or lower trainer.val_fraction"
        )
    net_spec = init_from.spec if init_from is not None else NetworkSpec(
        **{**spec.network.__dict__, "n_metrics": len(metrics)})
    raw_train = _healthy_series(None, train_items)
    if not raw_train:
        raise DataContractError(f"{dataset.path}: no healthy telemetry in the training split; "
                                "train needs healthy deployments or pre-onset spans")
    scaler = init_from.scaler if init_from is not None else Scaler.fit(raw_train)
    gap_scale = init_from.gap_scale if init_from is not None else _gap_scale(scaler, train_items)
    w = net_spec.lookback + net_spec.horizon
    # single-group mode: no deployment has a baseline group (SMD, NAB, …)
    single: SingleGroup | None = None
    if all(a.baseline is None for a, _ in (*train_items, *val_items, *test_items)):
        single = (init_from.single if init_from is not None and init_from.single is not None
                  else _fit_single_group(dataset, scaler, [*train_items, *val_items], spec))
    if single is None:
        train_series = _healthy_series(scaler, train_items)
        val_series = _healthy_series(scaler, val_items)
    else:
        train_series = _single_series(single, train_items)
        val_series = _single_series(single, val_items)
    train_ds = WindowDataset(train_series, net_spec.lookback,
                             net_spec.horizon, tr.stride, tr.max_train_windows, spec.seed,
                             min_history=net_spec.min_history)
    val_ds = WindowDataset(val_series, net_spec.lookback, net_spec.horizon,
                           max(tr.stride, 2), tr.max_train_windows // 4, spec.seed)
    if len(train_ds) == 0:
        raise DataContractError(
            f"{dataset.path}: no healthy span is ≥ {w} steps (lookback {net_spec.lookback} + "
            f"horizon {net_spec.horizon}); lower forecaster.lookback or use longer deployments"
        )
    log.info("training %s forecaster on %d windows (val %d), %d metrics", net_spec.kind,
             len(train_ds), len(val_ds), len(metrics))
    torch.manual_seed(spec.seed)  # weight init: same seed → same network (determinism test)
    net = build_network(net_spec)
    if init_from is not None:
        net.load_state_dict(init_from.network.state_dict())
    module = Forecaster(net, net_spec.quantiles, lr=tr.lr)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="canaryml-train-") as tmp:
        module, history, sec_per_epoch = fit_forecaster(
            module, train_ds, val_ds, max_epochs=tr.max_epochs, batch_size=tr.batch_size,
            patience=tr.patience, work_dir=Path(work_dir or tmp), accelerator=tr.accelerator,
            devices=tr.devices, progress_bar=tr.progress_bar, seed=spec.seed,
            callbacks=list(callbacks), logger=logger)
    fit_s = time.perf_counter() - t0

    # detectors + calibration on healthy ticks of the validation deployments (never train)
    catalog = dataset.catalog.with_metrics(metrics) if init_from is None else init_from.catalog
    dummy = Calibration(np.ones((2, 4)), np.ones(2), np.zeros(2), np.ones(2))
    pre = CanaryScorer(spec=net_spec, network=module.net, scaler=scaler, metrics=metrics,
                       catalog=catalog,
                       detectors={"app": None, "infra": None}, calibration=dummy,
                       weights=spec.weights, step_s=dataset.step_s, gap_scale=gap_scale,
                       single_group=single)
    fit_items, cal_items = _detector_calibration_split(val_items, train_items)
    fit_comps = _healthy_components(pre, fit_items)
    detectors: dict[str, ResidualDetector | None] = {}
    for kind, mask in (("app", pre._is_app), ("infra", ~pre._is_app)):
        feats = np.concatenate([fit_comps["e_d"][:, mask], fit_comps["e_drift"][:, mask]], 1)
        detectors[kind] = _fit_detector(spec.detector, feats, spec.seed) if mask.any() else None
    pre = CanaryScorer(spec=net_spec, network=module.net, scaler=scaler, metrics=metrics,
                       catalog=catalog, detectors=detectors, calibration=dummy,
                       weights=spec.weights, step_s=dataset.step_s, gap_scale=gap_scale,
                       single_group=single)
    cal = calibrate(_healthy_components(pre, cal_items), detectors)
    weights = spec.weights
    info: dict[str, Any] = {"dataset_hash": dataset.content_hash, "trained_at": time.time(),
                            "init_from": init_from.info.get("model_uri") if init_from else None}
    if single is not None:
        info["single_group"] = {"series": len(single.keys),
                                "series_normalisation": weights.series_normalisation,
                                "values_detector": weights.values_detector}
        if cal.values is None or weights.values_detector is None:
            weights = dataclasses.replace(weights, values_weight=0.0)
        elif weights.values_weight is None:
            pre = CanaryScorer(spec=net_spec, network=module.net, scaler=scaler, metrics=metrics,
                               catalog=catalog, detectors=detectors, calibration=cal,
                               weights=dataclasses.replace(weights, values_weight=0.0),
                               step_s=dataset.step_s, gap_scale=gap_scale, single_group=single)
            chosen, table = choose_values_weight(pre, cal_items, spec.seed)
            weights = dataclasses.replace(weights, values_weight=chosen)
            info["single_group"]["values_weight_injected_ap"] = table
        info["single_group"]["values_weight"] = weights.values_weight
    scorer = CanaryScorer(spec=net_spec, network=module.net, scaler=scaler, metrics=metrics,
                          catalog=catalog,
                          detectors=detectors, calibration=cal, weights=weights,
                          step_s=dataset.step_s, gap_scale=gap_scale, info=info,
                          single_group=single)
    metrics_out: dict[str, float] = {"train/fit_s": fit_s, "train/sec_per_epoch": sec_per_epoch,
                                     "train/epochs": float(len(history)),
                                     "train/windows": float(len(train_ds))}
    if history:
        last = history[-1]
        metrics_out |= {k: v for k, v in last.items() if k != "epoch"}
        metrics_out["val/best_loss"] = min(h.get("val/loss", np.inf) for h in history)
    if tr.predict_horizon_s:  # train + test splits (validation chooses its probability)
        t0 = time.perf_counter()
        scorer.predictor = fit_on_dataset(
            dataset, [*split.train, *split.test], scorer.metrics, catalog,
            PredictorSpec(horizon_s=float(tr.predict_horizon_s)), min_steps=scorer.min_steps,
            seed=spec.seed)
        metrics_out["train/predictor_fit_s"] = time.perf_counter() - t0
        if scorer.predictor is not None:
            metrics_out["predictor/brier_out_of_fold"] = scorer.predictor.info["brier_out_of_fold"]
    for stage, items in (("test", test_items),):
        if items:
            metrics_out |= {f"{stage}/{k}": v for k, v in evaluate(scorer, items).items()}
    return TrainResult(scorer, metrics_out, history,
                       {"train": split.train, "val": split.val, "test": split.test})


def _gap_scale(scaler: Scaler, items: Sequence[tuple[DeploymentArrays, DeploymentInfo]]
               ) -> np.ndarray:
    """Robust per-metric spread of the scaled canary−baseline gap on healthy training ticks."""
    gaps = []
    for arr, info in items:
        if arr.baseline is None:
            continue
        m = healthy_mask(arr.timestamps_s, info.label, info.fault_onset_s)
        gaps.append(scaler.transform(arr.canary[m]) - scaler.transform(arr.baseline[m]))
    n_metrics = len(scaler.center)
    if not gaps:
        return np.ones(n_metrics, np.float32)
    g = np.concatenate(gaps)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        q25, q75 = np.nanpercentile(g, [25, 75], axis=0)
    s = (q75 - q25) / 1.349
    return np.where(np.isfinite(s) & (s > 0.05), s, 0.05).astype(np.float32)


def _detector_calibration_split(val_items: Sequence[tuple[DeploymentArrays, DeploymentInfo]],
                                train_items: Sequence[tuple[DeploymentArrays, DeploymentInfo]]
                                ) -> tuple[list[tuple[DeploymentArrays, DeploymentInfo]],
                                           list[tuple[DeploymentArrays, DeploymentInfo]]]:
    """Validation deployments with healthy ticks, alternately to the detector fit and to the
    calibration (so both halves get healthy deployments and faulty ones' pre-onset spans alike;
    a fault present from the first sample has no healthy tick and is left out). With one such
    deployment both use it; with none, the training deployments stand in (warned)."""
    def normal(items: Sequence[tuple[DeploymentArrays, DeploymentInfo]]
               ) -> list[tuple[DeploymentArrays, DeploymentInfo]]:
        return [(a, i) for a, i in items
                if healthy_mask(a.timestamps_s, i.label, i.fault_onset_s).any()]

    usable = normal(val_items)
    if not usable:
        log.warning("no validation deployment has healthy ticks; the detectors and the "
                    "calibration use the training deployments (optimistic: give more healthy "
                    "deployments or a larger trainer.val_fraction)")
        usable = normal(train_items)
    if len(usable) == 1:
        log.warning("one validation deployment with healthy ticks: the detectors and the "
                    "calibration share it (give more healthy deployments for a reliable threshold)")
        return usable, usable
    return usable[0::2], usable[1::2]


def _healthy_components(scorer: CanaryScorer, items: Sequence[tuple[DeploymentArrays, DeploymentInfo]]
                        ) -> dict[str, np.ndarray]:
    """Raw components of every valid window that ends on a healthy tick (partial windows at a
    deployment's start included when the forecaster has a `min_history`)."""
    parts: dict[str, list[np.ndarray]] = {}
    for group, (arr, info) in enumerate(items):
        can, base, first = scorer.padded(arr.canary, arr.baseline)
        if first is None:
            continue
        w = scorer.lookback
        mask = healthy_mask(arr.timestamps_s, info.label, info.fault_onset_s)[first:]
        if not mask.any():
            continue
        vc = np.lib.stride_tricks.sliding_window_view(can, w, axis=0).transpose(0, 2, 1)[mask]
        vb = (None if base is None else
              np.lib.stride_tricks.sliding_window_view(base, w, axis=0).transpose(0, 2, 1)[mask])
        rows = (None if vb is not None or scorer.single is None else
                np.full(len(vc), scorer.single.index(arr.deployment_id)))
        comps = scorer._components(np.ascontiguousarray(vc),
                                   None if vb is None else np.ascontiguousarray(vb), rows)
        keep = ~comps["invalid"]
        comps["group"] = np.full(len(keep), group)
        for k in ("fe_app", "fe_infra", "det_app", "det_infra", "e_d", "e_drift", "invalid",
                  "group", "values"):
            if k in comps:
                parts.setdefault(k, []).append(comps[k][keep])
    if not parts:
        raise DataContractError("no healthy windows in the calibration split; need healthy "
                                "deployments longer than lookback + horizon")
    return {k: np.concatenate(v) for k, v in parts.items()}


def _service_of(dataset: CanonicalDataset) -> dict[str, str]:
    deps = dataset.deployments
    ids = deps["deployment_id"].astype(str)
    if "service" not in deps.columns:
        return dict(zip(ids, ids, strict=True))
    svc = deps["service"].astype(str).where(deps["service"].notna(), ids)
    return dict(zip(ids, svc, strict=True))


def _single_series(single: SingleGroup, items: Sequence[tuple[DeploymentArrays, DeploymentInfo]]
                   ) -> list[np.ndarray]:
    """Healthy spans of single-group deployments, each scaled by its own series' state."""
    out = []
    for arr, info in items:
        row = np.array([single.index(arr.deployment_id)])
        for lo, hi in healthy_segments(arr, info):
            out.append(single.transform(arr.canary[None, lo:hi], row)[0])
    return out


def _fit_single_group(dataset: CanonicalDataset, pooled: Scaler,
                      items: Sequence[tuple[DeploymentArrays, DeploymentInfo]], spec: TrainSpec
                      ) -> SingleGroup:
    """Per-series state from the healthy ticks of the train + validation deployments (never the
    held-back test split): a robust scaler per series (`series_normalisation`; else the pooled
    one for all) and a PCA detector per series on the scaled current values, plus a pooled
    fallback row for series not seen here."""
    w = spec.weights
    service = _service_of(dataset)
    blocks: dict[str, list[np.ndarray]] = {}
    for arr, info in items:
        for lo, hi in healthy_segments(arr, info):
            blocks.setdefault(service.get(arr.deployment_id, arr.deployment_id), []).append(
                arr.canary[lo:hi])
    keys = sorted(blocks) if w.series_normalisation else []
    fitted = [_series_scaler(blocks[k], pooled) for k in keys]
    center = np.stack([*(c for c, _ in fitted), pooled.center])
    scale = np.stack([*(s for _, s in fitted), pooled.scale])
    aliases = {d: s for d, s in service.items() if s in set(keys)}
    values: list[PCADetector | None] = [None] * (len(keys) + 1)
    if w.values_detector is not None:
        single = SingleGroup(keys, center, scale, values, aliases)
        rng = np.random.default_rng(spec.seed)

        def scaled(k: str, row: int) -> np.ndarray:
            z = np.concatenate([single.transform(b[None], np.array([row]), clip=False)[0]
                                for b in blocks[k]])
            return np.where(np.isfinite(z), z, 0.0)

        pooled_rows = []
        for row, k in enumerate(keys):  # one detector per series on its own scaled values
            z = scaled(k, row)
            values[row] = _fit_values(z, w, spec.seed)
            pooled_rows.append(z[rng.choice(len(z), min(len(z), 20000 // len(keys)),
                                            replace=False)])
        if not keys:  # no per-series scaling: every series in the pooled scaler's units
            pooled_rows = [scaled(k, 0) for k in blocks]
        values[-1] = _fit_values(np.concatenate(pooled_rows), w, spec.seed)
    return SingleGroup(keys, center, scale, values, aliases)


def _fit_values(z: np.ndarray, w: ScorerWeights, seed: int) -> PCADetector | None:
    if len(z) < 10:
        return None
    return PCADetector(variance=w.values_variance, max_fit_rows=100_000, random_state=seed).fit(z)


def _series_scaler(blocks: Sequence[np.ndarray], pooled: Scaler) -> tuple[np.ndarray, np.ndarray]:
    """Robust center/scale of one series: median and IQR/1.349, at least a quarter of its
    standard deviation (a metric that is flat but for spikes has IQR 0); only for a metric
    constant in this series' training data a tenth of the pooled scale (any change then reads as
    ~10 σ, not ∞). Nothing else of the other series enters: a series' scale is its own."""
    import warnings

    x = np.concatenate([np.asarray(b, np.float64) for b in blocks])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        center = np.nanmedian(x, axis=0)
        q25, q75 = np.nanpercentile(x, [25, 75], axis=0)
        std = np.nanstd(x, axis=0)
    scale = np.fmax((q75 - q25) / 1.349, 0.25 * std)
    constant = ~np.isfinite(scale) | (scale <= 1e-9 * np.maximum(np.abs(np.nan_to_num(center)), 1.0))
    scale = np.where(constant, np.maximum(0.1 * pooled.scale.astype(np.float64), 1e-6), scale)
    center = np.where(np.isfinite(center), center, pooled.center)
    return center.astype(np.float32), scale.astype(np.float32)


def _inject(arr: DeploymentArrays, scale: np.ndarray, rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray]:
    """A copy of a healthy series with synthetic anomalous segments (10 % of its ticks) and their
    labels: a level shift of 3–8 series σ on a random subset of metrics, or those metrics'
    values replaced by the same metrics at another time (marginals kept, the correlation with
    the other metrics broken). Only to weigh the single-group components at training."""
    x = arr.canary.copy()
    t, m = x.shape
    lab = np.zeros(t, bool)
    target = int(0.1 * t)
    while lab.sum() < target:
        n = int(rng.integers(3, 60))
        a = int(rng.integers(0, max(t - n, 1)))
        cols = rng.choice(m, int(rng.integers(1, max(1, m // 3) + 1)), replace=False)
        if rng.random() < 0.5:
            sign = rng.choice([-1.0, 1.0], len(cols))
            x[a:a + n, cols] += sign * rng.uniform(3, 8, len(cols)) * scale[cols]
        else:
            b = int(rng.integers(0, max(t - n, 1)))
            x[a:a + n, cols] = arr.canary[b:b + n, cols]
        lab[a:a + n] = True
    return x, lab


def choose_values_weight(scorer: CanaryScorer,
                         items: Sequence[tuple[DeploymentArrays, DeploymentInfo]], seed: int,
                         grid: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0)
                         ) -> tuple[float, dict[str, float]]:
    """The single-group share of the values detector: the grid value with the best mean average
    precision on anomalies injected (`_inject`) into the healthy calibration deployments — no
    evaluation labels are read. Ties go to the smaller share."""
    from sklearn.metrics import average_precision_score

    assert scorer.single is not None
    rng = np.random.default_rng(seed + 7)
    ap: dict[float, list[float]] = {g: [] for g in grid}
    for arr, info in items:
        mask = healthy_mask(arr.timestamps_s, info.label, info.fault_onset_s)
        if mask.sum() < 4 * scorer.lookback:
            continue
        healthy = dataclasses.replace(arr, canary=arr.canary[mask], baseline=None,
                                      timestamps_s=arr.timestamps_s[mask], anomaly=None)
        row = scorer.single.index(arr.deployment_id)
        x, lab = _inject(healthy, scorer.single.scale[row], rng)
        series = dataclasses.replace(healthy, canary=x)
        for g in grid:
            s = scorer.with_values_weight(g).score_series(series)
            ok = np.isfinite(s)
            if lab[ok].any() and not lab[ok].all():
                ap[g].append(float(average_precision_score(lab[ok], s[ok])))
    table = {str(g): float(np.mean(v)) if v else float("nan") for g, v in ap.items()}
    scored = [(float(np.mean(v)), -g, g) for g, v in ap.items() if v]
    if not scored:
        log.warning("no calibration series long enough to weigh the values detector; using 0.5")
        return 0.5, table
    best = max(scored)[2]
    log.info("single-group values_weight %.2f (injected-anomaly AP by weight: %s)", best, table)
    return float(best), table


def spec_from_mapping(forecaster: dict[str, Any], detector: dict[str, Any], scorer: dict[str, Any],
                      trainer: dict[str, Any], seed: int = 0, since: str | None = None) -> TrainSpec:
    """TrainSpec from plain config mappings (the task layer converts DictConfig to dicts)."""
    from canaryml.errors import ConfigError

    f = dict(forecaster)
    f["quantiles"] = tuple(float(q) for q in f.get("quantiles", (0.1, 0.5, 0.9)))
    d = dict(detector)
    kind = d.pop("kind", "iforest")
    # read by the train task, not by the fit: init_from/since pick data, operating_point_frr
    # the fitted threshold's false-rollback target
    t = {k: v for k, v in trainer.items()
         if k not in ("init_from", "since", "operating_point_frr", "operating_point_confidence")}
    try:
        return TrainSpec(network=NetworkSpec(**f), detector=DetectorSpec(kind, tuple(sorted(d.items()))),
                         weights=ScorerWeights(**scorer), trainer=TrainerSpec(**t), seed=seed,
                         since=since)
    except TypeError as exc:
        raise ConfigError(f"unknown key in forecaster/detector/scorer/trainer config: {exc}") from exc
