"""Markdown tables for the experiment READMEs, straight from a replay's summary.json.

    .venv/bin/python experiments/replay/tables.py experiments/replay/simulated/summary.json
    .venv/bin/python experiments/replay/tables.py SUMMARY --by per_fault_kind
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _f(v: Any, digits: int = 2) -> str:
    if v is None:
        return "–"
    return f"{v:.{digits}f}" if abs(v) < 10 and digits else f"{v:.0f}"


def _ci(m: dict[str, Any], key: str, digits: int = 2) -> str:
    ci = (m.get("ci95") or {}).get(key)
    return _f(m.get(key), digits) + ("" if not ci else f" [{_f(ci[0], digits)}, {_f(ci[1], digits)}]")


def headline(summary: dict[str, Any]) -> str:
    rows = ["| policy | detection | false rollbacks | healthy rolled back | caught before impact "
            "| lead time p50 (s) | lead share p50 | onset → rollback p50 (s) "
            "| oracle: caught @FRR ≤ 1 % |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, m in summary["policies"].items():
        oracle = (m.get("oracle_operating_points", {}).get("frr<=0.01") or {})
        rows.append(f"| {name} | {_ci(m, 'detection_rate')} | {_ci(m, 'false_rollback_rate', 3)} "
                    f"| {_f(m.get('healthy_rolled_back_rate'), 3)} "
                    f"| {_ci(m, 'caught_before_impact')} | {_ci(m, 'lead_time_s_p50', 0)} "
                    f"| {_ci(m, 'lead_share_p50')} "
                    f"| {_ci(m, 'time_to_detect_s_p50', 0)} "
                    f"| {_f(oracle.get('caught_before_impact'))} |")
    return "\n".join(rows)


def settings(summary: dict[str, Any]) -> str:
    rows = ["| policy | settings chosen on the calibration corpus | calibration: caught / FRR |",
            "|---|---|---|"]
    skip = {"groups", "critical", "data_required", "confidence", "tolerance"}
    for name, m in summary["policies"].items():
        s = ", ".join(f"{k}={_f(v, 3) if isinstance(v, float) else v}"
                      for k, v in m.get("settings", {}).items() if k not in skip)
        c = m.get("calibration") or {}
        rows.append(f"| {name} | {s} | {_f(c.get('caught_before_impact'))} / "
                    f"{_f(c.get('false_rollback_rate'), 3)} |")
    return "\n".join(rows)


def by_group(summary: dict[str, Any], key: str) -> str:
    pols = list(summary["policies"])
    groups = sorted({g for m in summary["policies"].values() for g in m.get(key, {})})
    rows = ["| " + key.replace("per_", "") + " (n) | " + " | ".join(pols) + " |",
            "|---|" + "---|" * len(pols)]
    for g in groups:
        n = next(m[key][g]["n_faulty"] for m in summary["policies"].values() if g in m.get(key, {}))
        cells = []
        for p in pols:
            r = summary["policies"][p].get(key, {}).get(g) or {}
            cells.append(f"{_f(r.get('caught_before_impact'))} / {_f(r.get('detection_rate'))} / "
                         f"{_f(r.get('time_to_detect_s_p50'), 0)}")
        rows.append(f"| {g} ({n}) | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("summary", type=Path)
    ap.add_argument("--by", choices=["per_fault_kind", "per_onset_style"])
    ap.add_argument("--settings", action="store_true")
    args = ap.parse_args()
    s = json.loads(args.summary.read_text())
    print(by_group(s, args.by) if args.by else settings(s) if args.settings else headline(s))


if __name__ == "__main__":
    main()
