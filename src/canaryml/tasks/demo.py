"""`canaryml demo`: the whole pipeline end to end on embedded defaults (`make demo`).

simulate a training corpus and a separate evaluation corpus → ingest both → train an LSTM
scorer with Isolation Forest (registered `@challenger`) → replay the evaluation corpus against
the Argo-threshold and Kayenta baselines → promote `@challenger` to `@champion` if the gates
pass → run the live controller (ServeLoop + Controller.step, the code `canaryml serve` runs) on
two simulated live canaries, one that goes bad and one that stays healthy, with a dry-run
actuator → print a summary and where to look.

Every stage calls the same task code as its own command, with the overrides shown in the log,
so `canaryml <stage> …` reproduces any step.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
from omegaconf import DictConfig, OmegaConf

from canaryml.errors import PromotionGateError

log = logging.getLogger(__name__)


def _stage(name: str, overrides: list[str], timings: dict[str, float]) -> None:
    import importlib

    from canaryml.cli import compose

    print(f"\n=== {name}: canaryml {name} {' '.join(overrides)}", flush=True)
    t0 = time.perf_counter()
    task = importlib.import_module(f"canaryml.tasks.{name}")
    task.run(compose(name, overrides))
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """The live loop logs one line per decision; the demo prints only changes of action."""
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
    for lg, _ in saved:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


def _live(cfg: DictConfig, out: Path) -> list[dict[str, Any]]:
    """Stream simulated live canaries through the serve loop (ServeLoop → Controller.step,
    durable decision log, dry-run actuator) with the @champion scorer."""
    from canaryml import tracking
    from canaryml.catalog import Catalog
    from canaryml.control.policies import ScorerPolicy
    from canaryml.control.policy import PolicyConfig, RollbackPolicy
    from canaryml.data.dataset import DeploymentArrays
    from canaryml.replay.sim import ReplaySource
    from canaryml.serving.actuators import DryRunActuator
    from canaryml.serving.decision_log import DecisionLog
    from canaryml.serving.loop import ServeLoop
    from canaryml.simulate import SimParams, simulate_deployment

    live = cfg.demo.live
    tracking.configure(cfg.mlflow.tracking_uri)
    uri = f"models:/{cfg.mlflow.registered_model}@champion"
    scorer = tracking.load_scorer(uri)
    mv = tracking.get_alias_version(str(cfg.mlflow.registered_model), "champion")
    version = f"{cfg.mlflow.registered_model}/{mv.version}" if mv else uri
    pcfg = PolicyConfig.from_mapping(cast(dict, OmegaConf.to_container(cfg.policy, resolve=True)))
    params = SimParams.from_mapping(cast(dict, OmegaConf.to_container(cfg.simulate, resolve=True)))
    catalog = Catalog.from_mapping(cast(dict, OmegaConf.to_container(cfg.metrics, resolve=True)))
    results = []
    for family in (str(live.faulty_family), str(live.healthy_family)):
        dep_id = f"live-{family}"
        sim = simulate_deployment(family, seed=int(live.seed), params=params, catalog=catalog,
                                  deployment_id=dep_id)
        arrays = DeploymentArrays(dep_id, sim.timestamps_s, sim.canary.astype(np.float32),
                                  sim.baseline.astype(np.float32), sim.metrics)
        # a live source: at time t it returns only samples up to t, exactly like Prometheus
        source = ReplaySource({dep_id: arrays})
        actuator = DryRunActuator()
        log_path = out / "live" / f"{dep_id}.sqlite"
        log_path.unlink(missing_ok=True)
        start, end = float(sim.timestamps_s[0]), float(sim.timestamps_s[-1])
        clock = {"now": start}
        with DecisionLog(log_path) as dlog:
            loop = ServeLoop(ScorerPolicy("champion", scorer, RollbackPolicy(pcfg), version),
                             source, actuator, dlog,
                             model_version=functools.partial(str, version),
                             clock=functools.partial(clock.__getitem__, "now"))
            final = None  # the first shrink/rollback (what evaluation counts), or promote
            last_action = None
            while clock["now"] <= end and not loop.controller.is_final(dep_id):
                with _quiet("canaryml.decision", "canaryml.serving.actuators"):
                    (entry,) = loop.tick([dep_id])
                d = entry.decision
                if d.action != last_action:  # the decision log has every tick; print changes
                    print(f"  {dep_id} t+{(clock['now'] - start) / 60:5.1f} min: {d.action} "
                          f"score={_fmt(d.score, '.3f')} ({d.reason})")
                    last_action = d.action
                if final is None and d.action in ("shrink", "rollback", "promote"):
                    final = (d, clock["now"])
                clock["now"] += pcfg.monitoring_interval_s
        decision, at = final if final else (None, None)
        impact = sim.impact_at_s
        row: dict[str, Any] = {
            "deployment": dep_id, "family": family, "label": sim.label,
            "action": decision.action.value if decision else "none",
            "decided_after_min": None if at is None else round((at - start) / 60, 1),
            "fault_onset_after_min": None if sim.fault_onset_s is None
            else round((sim.fault_onset_s - start) / 60, 1),
            "impact_after_min": None if impact is None else round((impact - start) / 60, 1),
            "lead_time_min": None if (impact is None or at is None or decision is None
                                      or decision.action == "promote")
            else round((impact - at) / 60, 1),
            "score": None if decision is None or decision.score is None
            else round(decision.score, 3),
            "reason": decision.reason if decision else "",
            "actuator_calls": [f"{a.action}@step{a.step}" for a in actuator.history
                               if a.action != "continue"],
            "decision_log": str(log_path),
        }
        results.append(row)
    return results


def _fmt(v: Any, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def run(cfg: DictConfig) -> int:
    d = cfg.demo
    out = Path(str(d.out)).resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    common = [f"seed={int(cfg.seed)}"]
    raw, ds = out / "raw" / "train", out / "dataset" / "train"
    raw_eval, ds_eval = out / "raw" / "eval", out / "dataset" / "eval"
    replay_out = out / "replay"
    stages: list[tuple[str, list[str]]] = [
        ("simulate", [f"out={raw}", f"n={int(d.n_train)}", *common]),
        ("simulate", [f"out={raw_eval}", f"n={int(d.n_eval)}", f"seed={int(cfg.seed) + 1}"]),
        ("ingest", ["source=bundle", f"input={raw}", f"out={ds}"]),
        ("ingest", ["source=bundle", f"input={raw_eval}", f"out={ds_eval}"]),
        ("train", [f"dataset={ds}", *common, *list(d.train_overrides)]),
        # thresholds and judge settings are chosen on the training corpus, never on the
        # evaluation corpus (DESIGN §7)
        ("replay", ["model=models:/canary-scorer@challenger", f"dataset={ds_eval}",
                    f"replay.calibration.dataset={ds}", f"out={replay_out}",
                    *list(d.replay_overrides)]),
    ]
    for name, overrides in stages:
        _stage(name, overrides, timings)
    promoted = True
    try:
        _stage("promote", [f"dataset={ds_eval}"], timings)
    except PromotionGateError as exc:
        promoted = False
        print(f"promotion refused, the previous champion stays: {exc}")
    t0 = time.perf_counter()
    print("\n=== live: the controller on two simulated live canaries (dry-run actuator)")
    live: list[dict[str, Any]] | None = None
    try:
        live = _live(cfg, out)
    except Exception as exc:  # a demo with no champion at all still prints its summary
        if promoted:
            raise
        print(f"live stage skipped: no champion to load ({exc})")
    timings["live"] = time.perf_counter() - t0
    total = time.perf_counter() - t_all
    summary = json.loads((replay_out / "summary.json").read_text())
    _print_summary(summary, live, replay_out, total, timings, cfg)
    (out / "demo_summary.json").write_text(json.dumps(
        {"replay": {k: {m: v.get(m) for m in ("detection_rate", "false_rollback_rate",
                                              "caught_before_impact", "lead_time_s_p50")}
                    for k, v in summary["policies"].items()},
         "live": live, "timings_s": timings, "total_s": total}, indent=2, default=str))
    return 0


def _print_summary(summary: dict[str, Any], live: list[dict[str, Any]] | None, replay_out: Path,
                   total: float, timings: dict[str, float], cfg: DictConfig) -> None:
    from canaryml.tracking import tracking_uri

    p: Callable[[str], None] = print
    ds = summary["dataset"]
    p(f"\n=== summary: replay of {ds['deployments']} held-out deployments {ds['labels']}, every "
      "policy at the settings chosen on the training corpus (95 % bootstrap intervals)")
    p(f"{'policy':>16} {'detection':>17} {'false_rollbacks':>17} {'caught_before_impact':>20} "
      f"{'lead_p50_min':>12}")

    def ci(m: dict[str, Any], key: str) -> str:
        lo_hi = (m.get("ci95") or {}).get(key)
        rng = "" if not lo_hi else f" [{lo_hi[0]:.2f},{lo_hi[1]:.2f}]"
        return _fmt(m.get(key)) + rng

    for name, m in summary["policies"].items():
        lead = m.get("lead_time_s_p50")
        p(f"{name:>16} {ci(m, 'detection_rate'):>17} {ci(m, 'false_rollback_rate'):>17} "
          f"{ci(m, 'caught_before_impact'):>20} "
          f"{_fmt(None if lead is None else lead / 60, '.1f'):>12}")
    for row in live or []:
        p(f"live {row['family']:<14} ({row['label']}): {row['action']} after "
          f"{_fmt(row['decided_after_min'], '.1f')} min; fault onset "
          f"{_fmt(row['fault_onset_after_min'], '.1f')} min, SLO breach "
          f"{_fmt(row['impact_after_min'], '.1f')} min, lead time "
          f"{_fmt(row['lead_time_min'], '.1f')} min")
    uri = tracking_uri(cfg.mlflow.tracking_uri)
    p(f"\nreport: {replay_out / 'report.html'}")
    p(f"mlflow: mlflow ui --backend-store-uri {uri}")
    p("took " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) + f"; total {total:.0f}s")
