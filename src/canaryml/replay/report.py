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
              "lead_time_s_p10", "lead_time_s_p50", "lead_time_s_p90", "time_to_detect_s_p50")


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(sweeps: Mapping[str, pd.DataFrame], points: Mapping[str, Mapping[str, Any]],
                path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, sw in sweeps.items():
        s = sw.sort_values("false_rollback_rate")
        ax.step(s["false_rollback_rate"], s["caught_before_impact"], where="post", label=name)
        p = points.get(name)
        if p and p.get("false_rollback_rate") is not None:
            ax.plot(p["false_rollback_rate"], p["caught_before_impact"], "o",
                    color=ax.lines[-1].get_color(), ms=6, mec="k")
    for x in (0.01, 0.05):
        ax.axvline(x, ls=":", color="grey", lw=0.8)
    ax.set_xlabel("false rollback rate (healthy canaries and pre-onset rollbacks)")
    ax.set_ylabel("faulty canaries caught before impact")
    ax.set_xlim(-0.01, 1.0)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    ax.set_title("oracle: threshold sweep on the evaluation corpora\n"
                 "dots: each policy at its training-chosen settings", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_timeline(arrays: DeploymentArrays, deployment: Mapping[str, Any],
                  scores: Mapping[str, tuple[np.ndarray, np.ndarray]],
                  decisions: Mapping[str, float], threshold: float, top_metrics: list[str],
                  path: Path) -> Path:
    """One incident: top metrics (canary vs baseline), then each policy's score with its
    rollback moment; the fault onset and the impact moment as vertical lines."""
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
        at = decisions.get(name)
        if at is not None and np.isfinite(at):
            for a in axes:
                a.axvline((at - t0) / 60.0, color=line.get_color(), lw=1, ls="--")
    ax.axhline(threshold, color="k", lw=0.8, ls=":", label="threshold")
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
                 "dashed = first rollback per policy", fontsize=9)
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
               path: Path) -> Path:
    pol = summary["policies"]
    head = "".join(f"<th>{c}</th>" for c in (
        "policy", "settings", *TABLE_COLS, "oracle@FRR≤1%: caught", "oracle@FRR≤5%: caught"))
    rows = []
    for name, m in pol.items():
        ops = m.get("oracle_operating_points", {})
        settings = html.escape(", ".join(f"{k}={v}" for k, v in (m.get("settings") or {}).items()
                                         if k not in ("groups", "critical", "data_required")))
        cells = [html.escape(name), f"<small>{settings}</small>", *(_ci(m, c) for c in TABLE_COLS),
                 _fmt((ops.get("frr<=0.01") or {}).get("caught_before_impact")),
                 _fmt((ops.get("frr<=0.05") or {}).get("caught_before_impact"))]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    ds = summary.get("dataset", {})
    proto = summary.get("protocol", {})
    chosen = proto.get("settings_chosen_on")
    how = (f"Settings chosen on the calibration corpus <code>{html.escape(str(chosen['path']))}"
           f"</code> at a false-rollback target of {chosen['target_frr']:g}" if chosen else
           "Settings as configured (no calibration corpus given)")
    body = f"""<!doctype html><html><head><meta charset="utf-8"><title>canaryml replay</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:right}}img{{max-width:100%}}</style>
</head><body><h1>canaryml replay</h1>
<p>evaluation {html.escape(str(ds.get('path')))} ({ds.get('deployments')} deployments,
labels {html.escape(str(ds.get('labels')))}), model <code>{html.escape(str(summary.get('model')))}</code>.
{how}; each evaluation corpus replayed once with its labels hidden. "Rolled back" = first shrink
or rollback; a rollback before the fault began is a false rollback. Lead time = impact −
decision (positive = before users were hurt). Brackets: {html.escape(str(proto.get('intervals')))}.
Replay speed {_fmt(summary.get('replay', {}).get('speed_x_realtime'))}× real time.</p>
<h2>Per policy at its chosen settings</h2><table><tr>{head}</tr>{''.join(rows)}</table>
<p>Oracle columns: best threshold of the sweep on the evaluation corpora themselves, an upper
bound no deployed policy can reach.</p>
<h2>Detection vs false rollback</h2>{_img(curve_png)}
<h2>Incidents</h2>{''.join(_img(p) for p in timeline_pngs) or '<p>none</p>'}
</body></html>"""
    atomic_write_text(path, body)
    return path
