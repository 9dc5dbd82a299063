"""`canaryml ingest source=nab`: NAB CSV + label windows → canonical dataset."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from canaryml.cli import compose
from canaryml.data.dataset import CanonicalDataset
from canaryml.errors import DataContractError
from canaryml.ingest import nab
from canaryml.tasks import ingest as ingest_task
from tests.conftest import PUBLIC_DATA


def fake_nab(root: Path) -> Path:
    cat = root / "data" / "realTest"
    cat.mkdir(parents=True)
    ts = pd.date_range("2014-02-14 14:30:00", periods=40, freq="5min")
    values = np.arange(40, dtype=float)
    a = pd.DataFrame({"timestamp": ts.strftime("%Y-%m-%d %H:%M:%S"), "value": values})
    # file b repeats two timestamps (like ec2_disk_write_bytes_1ef3de) and is unsorted
    b = pd.concat([a.iloc[:20], a.iloc[[10, 11]].assign(value=[-1.0, -2.0]), a.iloc[20:]])
    a.to_csv(cat / "a_series.csv", index=False)
    b.iloc[::-1].to_csv(cat / "b_series.csv", index=False)
    (root / "labels").mkdir()
    windows = {"realTest/a_series.csv": [["2014-02-14 16:00:00.000000",
                                          "2014-02-14 16:20:00.000000"]],
               "realTest/b_series.csv": []}
    (root / "labels" / "combined_windows.json").write_text(json.dumps(windows))
    return root


def test_nab_round_trip(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = fake_nab(tmp_path / "nab")
    out = tmp_path / "out"
    caplog.set_level(logging.INFO)
    cfg = compose("ingest", ["source=nab", f"input={src}", f"out={out}"])
    assert ingest_task.run(cfg) == 0
    ds = CanonicalDataset(out)
    assert ds.step_s == nab.STEP_S == 300 and ds.metrics == ["value"]
    deps = ds.deployments.set_index("deployment_id")
    assert list(deps.index) == ["realTest/a_series.train", "realTest/a_series.test",
                                "realTest/b_series.train", "realTest/b_series.test"]
    assert list(deps["split"]) == ["train", "test", "train", "test"]
    assert list(deps["label"]) == ["unknown", "faulty", "unknown", "healthy"]
    train, test = ds.arrays("realTest/a_series.train"), ds.arrays("realTest/a_series.test")
    assert len(train.timestamps_s) == 6  # floor(0.15 * 40)
    assert len(test.timestamps_s) == 34
    np.testing.assert_array_equal(test.canary[:, 0], np.arange(6, 40, dtype=np.float32))
    # window 16:00..16:20 inclusive = rows 18..22 of the file = test rows 12..16
    assert list(np.flatnonzero(test.anomaly)) == [12, 13, 14, 15, 16]
    assert ds.manifest["counts"]["duplicates_dropped"] == 2
    assert ds.manifest["counts"]["unsorted_rows"] > 0
    assert "dropped 2 duplicate sample(s)" in caplog.text
    b_test = ds.arrays("realTest/b_series.test")
    # of a repeated timestamp the row written last in the file wins; b is written reversed,
    # so the original values (10, 11) come after the repeats (-1, -2)
    assert b_test.canary[10 - 6, 0] == 10.0 and b_test.canary[11 - 6, 0] == 11.0
    assert ds.manifest["counts"]["gaps"] == 0


def test_nab_errors(tmp_path: Path) -> None:
    src = fake_nab(tmp_path / "nab")
    with pytest.raises(DataContractError, match=r"no category \['realNope'\]"):
        nab.read(src, categories=["realNope"])
    (src / "data" / "realTest" / "a_series.csv").write_text("timestamp,value\n2014-02-14 14:30:00,"
                                                            "abc\n")
    with pytest.raises(DataContractError, match=r"a_series.csv: cannot be read as NAB CSV"):
        nab.read(src)
    with pytest.raises(DataContractError, match="not a NAB folder"):
        nab.read(tmp_path)


@pytest.mark.skipif(not (PUBLIC_DATA / "nab" / "labels" / "combined_windows.json").is_file(),
                    reason="shared NAB data not present")
def test_nab_public_artificial() -> None:
    ing = nab.read(PUBLIC_DATA / "nab", categories=["artificialWithAnomaly"])
    deps = ing.bundle.deployments
    assert len(deps) == 12 and set(deps["split"]) == {"train", "test"}
    labels = ing.point_labels
    assert labels is not None
    per_file = labels.groupby(labels["deployment_id"].str.rsplit(".", n=1).str[0]).size()
    assert (per_file == 403).all() and len(per_file) == 6  # README: 403 rows inside windows
    assert ing.bundle.samples.num_rows == 6 * 4032
