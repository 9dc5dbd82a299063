"""Datasets on object storage: a local S3-compatible server (moto's server mode, started by the
test on 127.0.0.1) holds a canonical dataset; the dataset loader and `canaryml replay` read it
through pyarrow's S3 filesystem and get exactly what they get from the local copy."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.services

BUCKET = "canaryml-data"


@pytest.fixture()
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A moto S3 server on a free loopback port; the AWS environment points at it. Yields the
    endpoint URL."""
    server_mod = pytest.importorskip("moto.server")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        assert host == "127.0.0.1"
        endpoint = f"http://{host}:{port}"
        for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
                           "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true"
                           }.items():
            monkeypatch.setenv(key, value)
        yield endpoint
    finally:
        server.stop()


def _upload(local: Path, endpoint: str, prefix: str) -> str:
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1",
                           endpoint_override=endpoint, allow_bucket_creation=True)
    fs.create_dir(BUCKET)
    pafs.copy_files(str(local), f"{BUCKET}/{prefix}", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)
    return f"s3://{BUCKET}/{prefix}"


def test_dataset_loader_reads_from_s3(tmp_path: Path, s3: str) -> None:
    from canaryml.data.dataset import CanonicalDataset
    from canaryml.errors import DataContractError
    from canaryml.models.synthetic import make_corpus

    local = CanonicalDataset(make_corpus(tmp_path / "ds", n=6, steps=100, seed=3))
    uri = _upload(Path(local.path), s3, "corpora/ds")
    remote = CanonicalDataset(uri)
    assert remote.path == uri and not remote.location.is_local
    assert remote.manifest == local.manifest
    pd.testing.assert_frame_equal(remote.deployments, local.deployments)
    for dep in local.deployments["deployment_id"].astype(str):
        a, b = local.arrays(dep), remote.arrays(dep)
        np.testing.assert_array_equal(a.timestamps_s, b.timestamps_s)
        np.testing.assert_array_equal(a.canary, b.canary)
        np.testing.assert_array_equal(a.baseline, b.baseline)
    # the endpoint may also be given in the URI instead of the environment
    assert CanonicalDataset(f"{uri}?endpoint_override={s3}").content_hash == local.content_hash
    with pytest.raises(DataContractError, match="not a canonical dataset"):
        CanonicalDataset(f"s3://{BUCKET}/corpora/nothing-here")
    with pytest.raises(DataContractError, match="no telemetry for deployment 'ghost'"):
        remote.telemetry("ghost")


def test_replay_reads_dataset_from_s3(tmp_path: Path, s3: str, mlflow_uri: str) -> None:
    from canaryml.cli import compose
    from canaryml.models.synthetic import make_corpus
    from canaryml.tasks import replay as task

    local = make_corpus(tmp_path / "ds", n=8, steps=120, seed=2)
    uri = _upload(local, s3, "ds")
    args = ["model=standin", "replay.policies=[scorer,argo,kayenta]",
            "replay.report.enabled=false", "replay.mlflow=false",
            "policy.rollback_threshold=0.4"]
    summaries, decisions = [], []
    for name, dataset in (("local", str(local)), ("s3", uri)):
        out = tmp_path / f"out-{name}"
        assert task.run(compose("replay", [f"dataset={dataset}", f"out={out}", *args])) == 0
        summary = json.loads((out / "summary.json").read_text())
        summaries.append(summary)
        decisions.append(pd.read_parquet(out / "decisions.parquet"))
    pd.testing.assert_frame_equal(decisions[0], decisions[1])
    assert len(decisions[1]) == 8 * 3
    for name in ("scorer", "argo", "kayenta"):
        assert summaries[0]["policies"][name]["detection_rate"] == \
            summaries[1]["policies"][name]["detection_rate"]
