"""serving/k8s/replay-indexed-job.yaml: an Indexed Job whose pods each replay one shard, and a
merge Job; the canaryml arguments compose against the real config tree."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from canaryml.cli import compose
from canaryml.replay.runner import parse_shard

JOB = Path(__file__).resolve().parents[2] / "serving" / "k8s" / "replay-indexed-job.yaml"


def _docs() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in yaml.safe_load_all(JOB.read_text()) if d}


def _replay_args(container: dict[str, Any], index: int) -> list[str]:
    script = " ".join(container.get("args") or []).replace("${JOB_COMPLETION_INDEX}", str(index))
    words = shlex.split(script.split("exec ", 1)[1] if "exec " in script else script)
    return words[2:] if words[:2] == ["canaryml", "replay"] else words[1:]


def test_indexed_job_runs_one_shard_per_index_and_the_merge_reads_them_all() -> None:
    docs = _docs()
    job = docs["canaryml-replay-shards"]["spec"]
    assert job["completionMode"] == "Indexed" and job["parallelism"] == job["completions"]
    (pod,) = job["template"]["spec"]["containers"]
    outs = []
    for i in range(job["completions"]):
        args = _replay_args(pod, i)
        shard = next(a for a in args if a.startswith("shard="))
        assert parse_shard(shard.split("=", 1)[1]) == (i, job["completions"])
        cfg = compose("replay", args)  # every override exists in the config tree
        assert cfg.shard == f"{i}/{job['completions']}"
        outs.append(Path(str(cfg.out)))
    assert len(set(outs)) == len(outs) and len({o.parent for o in outs}) == 1
    merge = docs["canaryml-replay-merge"]["spec"]["template"]["spec"]["containers"][0]
    script = " ".join(merge["args"])
    assert re.search(rf"-ge {job['completions']}\b", script)  # waits for every shard
    cfg = compose("replay", _replay_args(merge, 0))
    assert Path(str(cfg.merge)) == outs[0].parent and Path(str(cfg.out)).parent == outs[0].parent
    claim = docs["canaryml-replay-results"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for name in ("canaryml-replay-shards", "canaryml-replay-merge"):
        vols = docs[name]["spec"]["template"]["spec"]["volumes"]
        assert vols[0]["persistentVolumeClaim"]["claimName"] == "canaryml-replay-results"
