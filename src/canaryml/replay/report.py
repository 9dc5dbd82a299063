"""HTML report with embedded PNGs: detection-vs-false-rollback curves, a per-policy table and
incident timelines (canary vs baseline for the top contributing metrics, score, threshold,
rollback moment and impact moment)."""

from __future__ import annotations

import base64
import html
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from canaryml.data.atomic import atomic_write_text
from canaryml.data.dataset import DeploymentArrays

log = logging.getLogger(__name__)

TABLE_COLS = ("detection_rate", "false_rollback_rate", "caught_before_impact",
              "lead_time_s_p10", "lead_time_s_p50", "lead_time_s_p90", "lead_share_p50",
              "time_to_detect_s_p50")


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(sweeps: Mapping[str, pd.DataFrame], points: Mapping[str, Mapping[str, Any]],
                path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    drawn = 0
    for name, sw in sweeps.items():
        # a corpus without faulty (or without healthy) canaries has no such curve: say so
        s = sw[["false_rollback_rate", "caught_before_impact"]].apply(
            pd.to_numeric, errors="coerce").dropna().sort_values("false_rollback_rate")
        if s.empty:
            continue
        line, = ax.step(s["false_rollback_rate"], s["caught_before_impact"], where="post",
                        label=name)
        drawn += 1
        p = points.get(name)
        if p and p.get("false_rollback_rate") is not None and \
                p.get("caught_before_impact") is not None:
            ax.plot(p["false_rollback_rate"], p["caught_before_impact"], "o",
                    color=line.get_color(), ms=6, mec="k")
    if not drawn:
        ax.text(0.5, 0.5, "no curve: the evaluation corpora lack faulty or healthy canaries",
                ha="center", va="center", fontsize=9, transform=ax.transAxes)
    for x in (0.01, 0.05):
        ax.axvline(x, ls=":", color="grey", lw=0.8)
    ax.set_xlabel("false rollback rate (healthy canaries and pre-onset rollbacks)")
    ax.set_ylabel("faulty canaries caught before impact")
    ax.set_xlim(-0.01, 1.0)
    ax.set_ylim(0, 1.02)
    if drawn:
        ax.legend(fontsize=8)
    ax.set_title("oracle: threshold sweep on the evaluation corpora\n"
                 "dots: each policy at its training-chosen settings", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_reliability(points: Mapping[str, Mapping[str, Any]], path: Path) -> Path | None:
    """Reliability diagram of each scorer policy's breach predictor (`predictor_reliability` in
    summary.json): predicted probability vs observed frequency per bin, on the training split's
    held-back deployments (cross-fitted) and on the evaluation corpora. None: nothing to draw."""
    rel: dict[str, Any] = {}
    shared: dict[str, int] = {}
    for n, m in points.items():  # scorer variants of one model share its predictor: one curve
        r = m.get("predictor_reliability")
        if not r:
            continue
        same = next((k for k, v in rel.items() if v == r), None)
        if same is None:
            rel[n], shared[n] = r, 0
        else:
            shared[same] += 1
    if not rel:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=0.8)
    for name, r in rel.items():
        for part, style in (("training_held_back", "--"), ("evaluation", "-")):
            pts = r.get(part) or []
            if pts:
                more = f" (+{shared[name]} variants)" if shared[name] else ""
                ax.plot([p["predicted"] for p in pts], [p["observed"] for p in pts], style,
                        marker="o", ms=4, label=f"{name}{more}: {part.replace('_', ' ')}")
    horizon = next(iter(rel.values())).get("horizon_s")
    ax.set_xlabel(f"predicted P(SLO breach within {horizon:.0f} s)")
    ax.set_ylabel("observed frequency")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title("breach predictor reliability (one point per probability bin)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_timeline(arrays: DeploymentArrays, deployment: Mapping[str, Any],
                  scores: Mapping[str, tuple[np.ndarray, np.ndarray]],
                  decisions: Mapping[str, float], thresholds: Mapping[str, float],
                  top_metrics: list[str], path: Path) -> Path:
    """One incident: top metrics (canary vs baseline), then each policy's score (normalised to
    [0, 1]) with its own threshold on that scale (dotted) and its rollback moment; the fault
    onset and the impact moment as vertical lines."""
    plt = _plt()
    t0 = float(arrays.timestamps_s[0])
    tm = (arrays.timestamps_s - t0) / 60.0
    n = len(top_metrics) + 1
    fig, axes = plt.subplots(n, 1, figsize=(8, 1.8 * n), sharex=True)
    axes = np.atleast_1d(axes)
    for ax, m in zip(axes[:-1], top_metrics, strict=False):
        j = arrays.metrics.index(m)
        ax.plot(tm, arrays.canary[:, j], lw=1, label="canary", color="tab:red")
        if arrays.baseline is not None:
            ax.plot(tm, arrays.baseline[:, j], lw=1, label="baseline", color="tab:blue")
        ax.set_ylabel(m, fontsize=8)
    axes[0].legend(fontsize=7, loc="upper left")
    ax = axes[-1]
    for name, (t, s) in scores.items():
        line, = ax.plot((t - t0) / 60.0, s, lw=1, label=name)
        thr = thresholds.get(name)
        if thr is not None and thr <= 1.0:
            ax.axhline(thr, color=line.get_color(), lw=0.8, ls=":")
        at = decisions.get(name)
        if at is not None and np.isfinite(at):
            for a in axes:
                a.axvline((at - t0) / 60.0, color=line.get_color(), lw=1, ls="--")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("score", fontsize=8)
    ax.set_xlabel("minutes since deployment start")
    ax.legend(fontsize=7, loc="upper left", ncol=3)
    for key, color, text in (("fault_onset_s", "orange", "onset"), ("impact_at_s", "k", "impact")):
        v = deployment.get(key)
        if v is not None and np.isfinite(v):
            for a in axes:
                a.axvline((v - t0) / 60.0, color=color, lw=1.5)
            axes[0].text((v - t0) / 60.0, axes[0].get_ylim()[1], text, fontsize=7, va="top")
    fig.suptitle(f"{deployment['deployment_id']} ({deployment.get('fault_kind') or 'faulty'}); "
                 "dashed = first rollback, dotted = threshold, per policy", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.name)}" src="data:image/png;base64,{data}">'


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.0f}"
    return html.escape(str(v))


def _ci(m: Mapping[str, Any], key: str) -> str:
    v, ci = m.get(key), (m.get("ci95") or {}).get(key)
    if v is None:
        return "–"
    return _fmt(v) + ("" if not ci else f" <small>[{_fmt(ci[0])}, {_fmt(ci[1])}]</small>")


def write_html(summary: Mapping[str, Any], curve_png: Path, timeline_pngs: list[Path],
               path: Path, reliability_png: Path | None = None) -> Path:
    pol = summary["policies"]
    head = "".join(f"<th>{c}</th>" for c in (
        "policy", "threshold (its own terms)", "settings", *TABLE_COLS, "oracle@FRR≤1%: caught",
        "oracle@FRR≤5%: caught"))
    rows = []
    for name, m in pol.items():
        ops = m.get("oracle_operating_points", {})
        settings = html.escape(", ".join(f"{k}={v}" for k, v in (m.get("settings") or {}).items()
                                         if k not in ("groups", "critical", "data_required")))
        threshold = html.escape(str((m.get("threshold") or {}).get("text", "–")))
        cells = [html.escape(name), f"<small>{threshold}</small>", f"<small>{settings}</small>",
                 *(_ci(m, c) for c in TABLE_COLS),
                 _fmt((ops.get("frr<=0.01") or {}).get("caught_before_impact")),
                 _fmt((ops.get("frr<=0.05") or {}).get("caught_before_impact"))]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    ds = summary.get("dataset", {})
    proto = summary.get("protocol", {})
    chosen = proto.get("settings_chosen_on")
    how = (f"Settings chosen on the calibration corpus <code>{html.escape(str(chosen['path']))}"
           f"</code> at a false-rollback target of {chosen['target_frr']:g}" if chosen else
           "Settings as configured (no calibration corpus given)")
    mv = summary.get("model_version") or {}
    model = html.escape(str(summary.get("model")))
    if mv.get("version"):
        model += (f" = <b>{html.escape(str(mv['registered_model']))} version "
                  f"{html.escape(str(mv['version']))}</b> (MLflow run "
                  f"<code>{html.escape(str(mv.get('run_id')))}</code>)")
    note = proto.get("not_measured")
    body = f"""<!doctype html><html><head><meta charset="utf-8"><title>canaryml replay</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:right}}img{{max-width:100%}}</style>
</head><body><h1>canaryml replay</h1>
<p>evaluation {html.escape(str(ds.get('path')))} ({ds.get('deployments')} deployments,
labels {html.escape(str(ds.get('labels')))}), model <code>{model}</code>.
{how}; each evaluation corpus replayed once with its labels hidden. "Rolled back" = first shrink
or rollback; a rollback before the fault began is a false rollback. Lead time = impact −
decision (positive = before users were hurt). Brackets: {html.escape(str(proto.get('intervals')))}.
Replay speed {_fmt(summary.get('replay', {}).get('speed_x_realtime'))}× real time.</p>
{f"<p><b>Not measured:</b> {html.escape(note)}.</p>" if note else ""}
<h2>Per policy at its chosen settings</h2><table><tr>{head}</tr>{''.join(rows)}</table>
<p>Oracle columns: best threshold of the sweep on the evaluation corpora themselves, an upper
bound no deployed policy can reach.</p>
<h2>Detection vs false rollback</h2>{_img(curve_png)}
{"<h2>Predictive rule: breach predictor reliability</h2>" + _img(reliability_png)
 if reliability_png else ""}
<h2>Per fault family</h2>{_per_family(pol)}
<h2>False rollbacks</h2>{_false_rollbacks(pol)}
<h2>Incidents</h2>{''.join(_img(p) for p in timeline_pngs) or '<p>none</p>'}
</body></html>"""
    atomic_write_text(path, body)
    return path


def _per_family(pol: Mapping[str, Mapping[str, Any]]) -> str:
    """Faulty canaries caught (and caught before impact) per fault family and policy."""
    kinds = sorted({k for m in pol.values() for k in (m.get("per_fault_kind") or {})})
    if not kinds:
        return "<p>no faulty deployment with a fault kind</p>"
    head = "<tr><th>fault family</th><th>faulty</th>" + "".join(
        f"<th>{html.escape(n)}: caught / before impact</th>" for n in pol) + "</tr>"
    rows = []
    for k in kinds:
        cells = [html.escape(k)]
        first = next(iter(pol.values())).get("per_fault_kind", {}).get(k, {})
        cells.append(_fmt(first.get("n_faulty")))
        for m in pol.values():
            g = (m.get("per_fault_kind") or {}).get(k, {})
            cells.append(f"{_fmt(g.get('detection_rate'))} / {_fmt(g.get('caught_before_impact'))}")
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _false_rollbacks(pol: Mapping[str, Mapping[str, Any]]) -> str:
    """Every false rollback: healthy canaries rolled back and faulty ones before their onset."""
    rows = []
    for name, m in pol.items():
        for r in m.get("false_rollbacks") or []:
            before = r.get("before_onset_s")
            what = "healthy" if r["label"] == "healthy" else (
                f"{r.get('fault_kind') or 'faulty'}, {before / 60:.1f} min before its onset"
                if before is not None else "faulty")
            cells = [html.escape(name), html.escape(str(r["deployment_id"])), html.escape(what),
                     f"{r['decided_after_s'] / 60:.1f} min", html.escape(str(r["action"])),
                     html.escape("; ".join(r.get("reasons") or []))]
            rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    if not rows:
        return "<p>none</p>"
    head = "".join(f"<th>{c}</th>" for c in ("policy", "deployment", "canary", "rolled back after",
                                             "action", "reasons"))
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"
