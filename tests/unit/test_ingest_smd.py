"""`canaryml ingest source=smd`: SMD text files + point labels → canonical dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from canaryml.cli import compose
from canaryml.data.dataset import CanonicalDataset
from canaryml.errors import DataContractError
from canaryml.ingest import smd
from canaryml.tasks import ingest as ingest_task
from tests.conftest import PUBLIC_DATA


def fake_smd(root: Path, machines: dict[str, tuple[int, int, list[int]]]) -> Path:
    """machines: name -> (train rows, test rows, labelled test rows)."""
    rng = np.random.default_rng(0)
    for sub in ("train", "test", "test_label"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for name, (n_train, n_test, hits) in machines.items():
        for sub, n in (("train", n_train), ("test", n_test)):
            data = rng.random((n, 38))
            np.savetxt(root / sub / f"{name}.txt", data, fmt="%.6f", delimiter=",")
        label = np.zeros(n_test, dtype=int)
        label[hits] = 1
        np.savetxt(root / "test_label" / f"{name}.txt", label, fmt="%d")
    return root


def test_smd_round_trip(tmp_path: Path) -> None:
    src = fake_smd(tmp_path / "smd", {"machine-9-1": (30, 25, [3, 4, 20]),
                                      "machine-9-2": (12, 10, [])})
    out = tmp_path / "out"
    cfg = compose("ingest", ["source=smd", f"input={src}", f"out={out}"])
    assert ingest_task.run(cfg) == 0
    ds = CanonicalDataset(out)
    assert ds.step_s == smd.STEP_S == 60
    assert ds.metrics == list(smd.METRICS) and len(ds.metrics) == 38
    assert ds.catalog.get("smd_05").kind == "infra"
    deps = ds.deployments.set_index("deployment_id")
    assert list(deps.index) == ["machine-9-1.train", "machine-9-1.test", "machine-9-2.train",
                                "machine-9-2.test"]
    assert list(deps["split"]) == ["train", "test", "train", "test"]
    assert list(deps["label"]) == ["unknown", "faulty", "unknown", "healthy"]
    train, test = ds.arrays("machine-9-1.train"), ds.arrays("machine-9-1.test")
    assert train.canary.shape == (30, 38) and test.canary.shape == (25, 38)
    assert train.baseline is None  # SMD has one group
    assert test.timestamps_s[0] == train.timestamps_s[-1] + 60
    assert np.all(np.diff(test.timestamps_s) == 60)
    assert list(np.flatnonzero(test.anomaly)) == [3, 4, 20]
    assert train.anomaly.sum() == 0
    raw = np.loadtxt(src / "test" / "machine-9-1.txt", delimiter=",")
    np.testing.assert_allclose(test.canary, raw.astype(np.float32), rtol=1e-6)
    assert ds.manifest["counts"]["gaps"] == 0
    assert ds.manifest["counts"]["rows"] == 30 + 25 + 12 + 10


def test_smd_machines_filter_and_errors(tmp_path: Path) -> None:
    src = fake_smd(tmp_path / "smd", {"machine-9-1": (5, 5, [1]), "machine-9-2": (5, 5, [])})
    out = tmp_path / "out"
    cfg = compose("ingest", ["source=smd", f"input={src}", f"out={out}",
                             "ingest.machines=[machine-9-2]"])
    assert ingest_task.run(cfg) == 0
    assert list(CanonicalDataset(out).deployments["deployment_id"]) == ["machine-9-2.train",
                                                                        "machine-9-2.test"]
    # same input, same bytes: the content hash is reproducible
    first = CanonicalDataset(out).content_hash
    assert ingest_task.run(cfg) == 0
    assert CanonicalDataset(out).content_hash == first
    with pytest.raises(DataContractError, match=r"machine-7-7.*available: \['machine-9-1'"):
        smd.read(src, machines=["machine-7-7"])
    np.savetxt(src / "test_label" / "machine-9-1.txt", np.zeros(4), fmt="%d")
    with pytest.raises(DataContractError, match=r"machine-9-1.txt: 4 labels for 5 test rows"):
        smd.read(src, machines=["machine-9-1"])
    (src / "train" / "machine-9-2.txt").write_text("")
    with pytest.raises(DataContractError, match=r"machine-9-2.txt: the file is empty"):
        smd.read(src, machines=["machine-9-2"])
    with pytest.raises(DataContractError, match="not an SMD folder"):
        smd.read(tmp_path / "nowhere")


@pytest.mark.skipif(not (PUBLIC_DATA / "smd" / "test" / "machine-2-8.txt").is_file(),
                    reason="shared SMD data not present")
def test_smd_public_machine(tmp_path: Path) -> None:
    ing = smd.read(PUBLIC_DATA / "smd", machines=["machine-2-8"])
    labels = ing.point_labels
    assert labels is not None and len(labels) == 161  # README: 161 anomalous minutes
    deps = ing.bundle.deployments.set_index("deployment_id")
    assert deps.loc["machine-2-8.test", "label"] == "faulty"
    assert ing.bundle.samples.num_rows == (23_702 + 23_703) * 38
