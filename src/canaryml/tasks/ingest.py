"""`canaryml ingest source=bundle|smd|nab|prometheus|nezha input=DIR out=DIR` → canonical dataset."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from canaryml.catalog import Catalog
from canaryml.data.atomic import check_output_dir
from canaryml.data.dataset import MANIFEST, OWNS_DATASET
from canaryml.data.storage import is_uri
from canaryml.errors import ConfigError, config_int
from canaryml.ingest import SOURCES, Ingested, write_ingested
from canaryml.paths import repo_root

log = logging.getLogger(__name__)


def _resolve(path: str | None) -> Path | None:
    if path in (None, ""):
        return None
    p = Path(str(path)).expanduser()
    return p if p.is_absolute() else Path.cwd() / p


def read_source(source: str, input_dir: Path | None, icfg: dict[str, Any]) -> Ingested:
    """Run the reader for `source` with the `ingest` config section as plain values."""
    if source == "bundle":
        from canaryml.ingest import bundle

        if input_dir is None:
            raise ConfigError("source=bundle needs input=DIR (a telemetry bundle folder)")
        return bundle.read(input_dir)
    if source == "smd":
        from canaryml.ingest import smd

        return smd.read(input_dir, machines=icfg.get("machines"))
    if source == "nab":
        from canaryml.ingest import nab

        ncfg = icfg.get("nab") or {}
        return nab.read(input_dir, categories=icfg.get("categories"),
                        probation=float(ncfg.get("probation", nab.PROBATION)))
    if source == "prometheus":
        from canaryml.ingest import prometheus

        pcfg = icfg.get("prometheus") or {}
        dfile = _resolve(pcfg.get("deployments_file"))
        return prometheus.read(
            str(pcfg.get("url", "http://127.0.0.1:9090")), pcfg.get("queries") or {},
            pcfg.get("selectors") or {}, step_s=int(pcfg.get("step_s", 15)),
            deployments=pcfg.get("deployments") or None, deployments_file=dfile,
            timeout_s=float(pcfg.get("timeout_s", 10.0)), retries=int(pcfg.get("retries", 3)),
            baseline=str(pcfg.get("baseline", "selector")),
            history_offset_s=float(pcfg.get("history_offset_s", 3600)))
    if source == "nezha":
        from canaryml.ingest import nezha

        return nezha.read(input_dir, icfg.get("nezha") or {})
    raise ConfigError(f"source={source!r} is not one of {', '.join(SOURCES)}")


def run(cfg: DictConfig) -> int:
    source = str(cfg.source)
    icfg = cast(dict[str, Any], OmegaConf.to_container(cfg.ingest, resolve=True))
    input_dir = _resolve(cfg.input)
    out = str(cfg.out) if is_uri(str(cfg.out or "")) else _resolve(cfg.out)  # s3://… as is
    if out is None:  # data/processed/<input folder name>; smd/nab defaults and prometheus
        name = input_dir.name if input_dir is not None and source != "prometheus" else source
        if source == "nezha" and name != "nezha":  # a day folder: nezha-2022-08-22
            name = f"nezha-{name}"
        out = repo_root() / "data" / "processed" / name
    # before reading: never replace the input or a folder that is not a canonical dataset
    check_output_dir(out, marker=MANIFEST, owns=OWNS_DATASET, inputs=[input_dir],
                     kind="canonical dataset")
    ingested = read_source(source, input_dir, icfg)
    catalog = Catalog.from_mapping(cast(dict[str, Any], OmegaConf.to_container(cfg.metrics)),
                                   source="conf/metrics")
    step = icfg.get("step_s")
    manifest = write_ingested(ingested, out, catalog=catalog,
                              step_s=None if step is None else config_int(step, "ingest.step_s", low=1),
                              name=icfg.get("name"))
    c = manifest["counts"]
    print(f"ingest {source}: {c['deployments']} deployments, {c['rows']} rows × "
          f"{len(manifest['metrics'])} metrics at {manifest['step_s']}s, {c['gaps']} gaps, "
          f"{c['duplicates_dropped']} duplicates dropped, {c['unsorted_rows']} unsorted rows "
          f"fixed; hash {manifest['content_hash'][:12]} → {out}")
    return 0
