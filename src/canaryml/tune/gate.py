"""When `canaryml tune` may register its best trial as `@challenger` (typed, pure logic).

A study's best trial is registered only when it is strictly better, on the study's objective,
than (1) the study's own untuned-default trial and (2) every model version behind `@challenger`
and `@champion` — a tie changes nothing and is not registered. The incumbents' numbers come from
the tags a tuned version carries (`tune.objective_key` equal to this study's: same objective,
false-rollback bound, dataset and hold-out) or, for any other version, from replaying it on this
study's hold-out (see `canaryml.tasks.tune`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# objective values equal within this are a tie (they are shares of canaries or losses)
TIE_TOL = 1e-9

KEY_TAG = "tune.objective_key"
VALUE_TAG = "tune.objective_value"
OBJECTIVE_TAG = "tune.objective"


def objective_key(objective: str, max_frr: float, dataset_hash: str, holdout: Sequence[str]
                  ) -> str:
    """What makes two objective values comparable: same objective and bound, same data and
    hold-out deployments."""
    raw = json.dumps([objective, float(max_frr), dataset_hash, sorted(holdout)])
    return hashlib.sha1(raw.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Contender:
    """A model (trial or registered version) and its objective value(s) on the hold-out."""

    name: str  # e.g. "the untuned default, trial 0", "@champion v3"
    values: tuple[float, ...]


def beats(candidate: Sequence[float], other: Sequence[float], directions: Sequence[str]) -> bool:
    """Strictly better: on one objective by more than TIE_TOL in its direction; on several, a
    Pareto domination (no worse on any, better on one)."""
    better = worse = False
    for c, o, d in zip(candidate, other, directions, strict=True):
        if not (math.isfinite(c) and math.isfinite(o)):
            if math.isfinite(c) and not math.isfinite(o):
                better = True
            elif not math.isfinite(c):
                worse = True
            continue
        delta = (c - o) if d == "maximize" else (o - c)
        if delta > TIE_TOL:
            better = True
        elif delta < -TIE_TOL:
            worse = True
    return better and not worse


@dataclass(frozen=True)
class Decision:
    register: bool
    reason: str


def decide(best: Contender, incumbents: Sequence[Contender], directions: Sequence[str]
           ) -> Decision:
    """Register `best` only if it strictly beats every incumbent (the untuned default trial and
    the current `@challenger` / `@champion`)."""
    for inc in incumbents:
        if not beats(best.values, inc.values, directions):
            verdict = ("only ties" if all(abs(a - b) <= TIE_TOL
                                          for a, b in zip(best.values, inc.values, strict=True))
                       else "does not beat")
            return Decision(False, f"{best.name} ({_fmt(best.values)}) {verdict} "
                                   f"{inc.name} ({_fmt(inc.values)})")
    names = ", ".join(f"{i.name} ({_fmt(i.values)})" for i in incumbents) or "no incumbent"
    return Decision(True, f"{best.name} ({_fmt(best.values)}) beats {names}")


def tagged_values(tags: Mapping[str, str], key: str) -> tuple[float, ...] | None:
    """The objective value(s) a registered version carries for objective key `key`, if any."""
    if tags.get(KEY_TAG) != key or VALUE_TAG not in tags:
        return None
    try:
        raw = json.loads(tags[VALUE_TAG])
    except ValueError:
        return None
    values = raw if isinstance(raw, list) else [raw]
    try:
        return tuple(float(v) for v in values)
    except (TypeError, ValueError):
        return None


def _fmt(values: Sequence[float]) -> str:
    return ", ".join(f"{v:.4g}" for v in values)
