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


def test_ingest_writes_dataset_to_s3_manifest_last(tmp_path: Path, s3: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow.fs as pafs

    from canaryml.bench.ingest import generate_bundle
    from canaryml.catalog import Catalog
    from canaryml.data import storage
    from canaryml.data.atomic import OutputDirError
    from canaryml.data.contract import read_bundle
    from canaryml.data.dataset import CanonicalDataset, write_canonical
    from canaryml.errors import DataContractError

    bundle_dir = tmp_path / "bundle"
    generate_bundle(bundle_dir, 20_000, seed=1)
    fs = pafs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1",
                           endpoint_override=s3, allow_bucket_creation=True)
    fs.create_dir(BUCKET)

    def ingest(out: str | Path) -> dict:
        return write_canonical(read_bundle(bundle_dir), out, step_s=15,
                               catalog=Catalog.default(), source="bundle")

    local = ingest(tmp_path / "local")
    uri = f"s3://{BUCKET}/processed/ds"
    remote = ingest(uri)
    assert remote["content_hash"] == local["content_hash"]
    ds = CanonicalDataset(uri)
    assert ds.content_hash == local["content_hash"]
    first = str(ds.deployments["deployment_id"].iloc[0])
    np.testing.assert_array_equal(ds.arrays(first).canary,
                                  CanonicalDataset(tmp_path / "local").arrays(first).canary)

    # the command line: `canaryml ingest … out=s3://…`
    from canaryml.cli import compose
    from canaryml.tasks import ingest as ingest_task

    cli_uri = f"s3://{BUCKET}/processed/cli"
    assert ingest_task.run(compose("ingest", ["source=bundle", f"input={bundle_dir}",
                                              f"out={cli_uri}", "ingest.step_s=15"])) == 0
    assert CanonicalDataset(cli_uri).content_hash == local["content_hash"]

    # an upload that fails half-way leaves no manifest: never read as a dataset
    calls = {"n": 0}
    real_upload = storage._upload

    def flaky(src: Path, loc: storage.Location, rel: str) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("connection reset (test)")
        real_upload(src, loc, rel)

    monkeypatch.setattr(storage, "_upload", flaky)
    with pytest.raises(DataContractError, match=r"no manifest\.json was written"):
        ingest(uri)
    with pytest.raises(DataContractError, match="not a canonical dataset"):
        CanonicalDataset(uri)
    monkeypatch.setattr(storage, "_upload", real_upload)
    assert ingest(uri)["content_hash"] == local["content_hash"]  # the rerun replaces it
    assert CanonicalDataset(uri).content_hash == local["content_hash"]

    # a prefix holding someone else's objects is refused, and nothing there changes
    with fs.open_output_stream(f"{BUCKET}/reports/notes.txt") as fh:
        fh.write(b"keep me")
    with pytest.raises(OutputDirError, match="already holds objects"):
        ingest(f"s3://{BUCKET}/reports")
    assert storage.list_files(storage.locate(f"s3://{BUCKET}/reports")) == ["notes.txt"]
