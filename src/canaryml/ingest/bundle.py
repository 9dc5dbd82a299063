"""`source=bundle`: a telemetry bundle folder (CSV or Parquet, DESIGN §2.1)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from canaryml.data.contract import Bundle, read_bundle
from canaryml.ingest import Ingested

log = logging.getLogger(__name__)

_MAX_SERIES_FOR_STEP = 64
_CHUNK = 1 << 20


def infer_step_s(bundle: Bundle) -> int:
    """The bundle's native step: the median positive spacing of timestamps within a series.

    Looks at up to 64 series (deployment × group × metric), which is enough for scraped data
    and costs one pass over the codes. Falls back to 60 s when no series has two samples.
    """
    codes = bundle.codes
    if codes is None or len(codes.timestamp_us) < 2:
        return 60
    n_met = max(1, len(codes.metrics))
    n_rows = len(codes.timestamp_us)

    def series_of(lo: int, hi: int) -> np.ndarray:
        series = codes.deployment[lo:hi].astype(np.int64)
        series *= 2
        series += codes.group[lo:hi]
        series *= n_met
        series += codes.metric[lo:hi]
        return series

    # the lowest 64 series ids present: a counting pass and a lookup (in chunks of rows, so
    # no full-size temporaries), not a sort of every row
    present = np.zeros(0, dtype=bool)
    for lo in range(0, n_rows, _CHUNK):
        seen = np.bincount(series_of(lo, lo + _CHUNK)) > 0
        if len(seen) > len(present):
            seen[:len(present)] |= present
            present = seen
        else:
            present[:len(seen)] |= seen
    chosen = np.flatnonzero(present)[:_MAX_SERIES_FOR_STEP]
    lookup = np.zeros(len(present), dtype=bool)
    lookup[chosen] = True
    picked_s, picked_t = [], []
    for lo in range(0, n_rows, _CHUNK):
        series = series_of(lo, lo + _CHUNK)
        mask = lookup[series]
        if codes.keep is not None:
            mask &= codes.keep[lo:lo + _CHUNK]
        picked_s.append(series[mask])
        picked_t.append(codes.timestamp_us[lo:lo + _CHUNK][mask])
    sub_s, sub_t = np.concatenate(picked_s), np.concatenate(picked_t)
    order = np.lexsort((sub_t, sub_s))
    sub_s, sub_t = sub_s[order], sub_t[order]
    diffs = np.diff(sub_t)[(np.diff(sub_s) == 0)]
    diffs = diffs[diffs > 0]
    if not len(diffs):
        return 60
    return max(1, round(float(np.median(diffs)) / 1e6))


def read(input_dir: str | Path) -> Ingested:
    """Read and validate a bundle folder; the native step is inferred from the samples."""
    bundle = read_bundle(input_dir)
    step = infer_step_s(bundle)
    log.info("bundle %s: %d deployments, %d samples, native step %ds", input_dir,
             len(bundle.deployments), bundle.num_samples, step)
    return Ingested(bundle=bundle, source="bundle", native_step_s=step)
