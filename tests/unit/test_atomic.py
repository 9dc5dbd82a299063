"""Outputs never delete what a command did not write (issue 16 #2): `ingest out=` an unrelated
folder, the input bundle or its parent is refused; replay-style `atomic_outputs` replaces only
its own files beside a hand-written README."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from canaryml.cli import compose, main
from canaryml.data.atomic import (
    OutputDirError,
    atomic_dir,
    atomic_outputs,
    atomic_write_json,
    check_output_dir,
    json_marker,
)
from canaryml.data.contract import write_bundle
from canaryml.tasks import ingest as ingest_task
from tests.unit.test_contract import tiny_bundle


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    deps, samples = tiny_bundle()
    return write_bundle(deps, samples, tmp_path / "raw" / "bundle")


def _ingest(bundle: Path, out: Path) -> int:
    return ingest_task.run(compose("ingest", ["source=bundle", f"input={bundle}", f"out={out}"]))


def test_ingest_refuses_an_unrelated_folder_and_keeps_its_files(tmp_path: Path,
                                                                bundle: Path) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("two years of work")
    with pytest.raises(OutputDirError) as exc:
        _ingest(bundle, notes)
    msg = str(exc.value)
    assert f"out={notes}" in msg and "thesis.tex" in msg  # names the folder and what is there
    assert "not a canonical dataset this command wrote" in msg  # why
    assert "Give a new or empty folder" in msg  # the fix
    assert (notes / "thesis.tex").read_text() == "two years of work"
    assert sorted(p.name for p in notes.iterdir()) == ["thesis.tex"]  # no temp left behind
    # a manifest.json of another kind is not ingest's marker either
    (notes / "manifest.json").write_text('{"name": "my web app"}')
    with pytest.raises(OutputDirError):
        _ingest(bundle, notes)
    assert (notes / "thesis.tex").is_file()


@pytest.mark.parametrize("where", ["input", "parent", "inside"])
def test_ingest_output_may_not_overlap_the_input(tmp_path: Path, bundle: Path,
                                                 where: str) -> None:
    out = {"input": bundle, "parent": bundle.parent, "inside": bundle / "processed"}[where]
    before = _tree(tmp_path / "raw")
    with pytest.raises(OutputDirError, match=r"overlaps the input .*bundle.*Give an output folder "
                                             "outside the input"):
        _ingest(bundle, out)
    assert _tree(tmp_path / "raw") == before  # the raw data is untouched


def test_cli_prints_the_refusal_and_exits_2(tmp_path: Path, bundle: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ingest", "source=bundle", f"input={bundle}", f"out={bundle.parent}"]) == 2
    err = capsys.readouterr().err
    assert "canaryml ingest: error:" in err and "overlaps the input" in err
    assert (bundle / "deployments.parquet").is_file()


def test_ingest_replaces_its_own_previous_dataset(tmp_path: Path, bundle: Path) -> None:
    out = tmp_path / "processed" / "sim"
    out.mkdir(parents=True)  # an empty folder is fine
    assert _ingest(bundle, out) == 0
    first = json.loads((out / "manifest.json").read_text())
    (out / "stale.parquet").write_bytes(b"old")  # part of the previous output: replaced as a whole
    assert _ingest(bundle, out) == 0
    assert json.loads((out / "manifest.json").read_text())["content_hash"] == first["content_hash"]
    assert not (out / "stale.parquet").exists()


def test_write_bundle_refuses_a_folder_with_other_files(tmp_path: Path, bundle: Path) -> None:
    deps, samples = tiny_bundle()
    write_bundle(deps, samples, bundle, fmt="csv")  # rewriting its own bundle is fine
    assert sorted(p.name for p in bundle.iterdir()) == ["deployments.csv", "samples.csv"]
    (bundle / "README.md").write_text("where this data came from")
    with pytest.raises(OutputDirError, match=r"README\.md"):
        write_bundle(deps, samples, bundle)
    assert (bundle / "README.md").is_file() and (bundle / "samples.csv").is_file()


def test_atomic_dir_rechecks_before_the_swap(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with (pytest.raises(OutputDirError, match="intruder"),
          atomic_dir(out, marker="summary.json") as tmp):
        (tmp / "summary.json").write_text("{}")
        out.mkdir()
        (out / "intruder.txt").write_text("appeared meanwhile")
    assert _tree(out) == {"intruder.txt": b"appeared meanwhile"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # temp folder removed


def _replay_like(out: Path, plots: list[str], summary: dict[str, object], **kw: object) -> None:
    with atomic_outputs(out, marker="summary.json", owns=json_marker("summary.json", "policies"),
                        **kw) as tmp:  # type: ignore[arg-type]
        (tmp / "decisions.parquet").write_bytes(json.dumps(summary).encode())
        for name in plots:
            (tmp / "plots").mkdir(exist_ok=True)
            (tmp / "plots" / name).write_bytes(name.encode())
        atomic_write_json(tmp / "summary.json", summary)


def test_atomic_outputs_replaces_its_files_beside_a_readme(tmp_path: Path) -> None:
    out = tmp_path / "experiments" / "replay" / "simulated"
    _replay_like(out, ["incident_a.png", "incident_b.png"], {"policies": 1})
    (out / "README.md").write_text("hand-written analysis")
    (out / "plots" / "hand_made.svg").write_text("<svg/>")
    _replay_like(out, ["incident_a.png", "incident_c.png"], {"policies": 2},
                 replaces=["plots/incident_*.png"])
    assert _tree(out) == {
        "README.md": b"hand-written analysis",
        "decisions.parquet": b'{"policies": 2}',
        "plots/hand_made.svg": b"<svg/>",  # a sub-folder is merged, not replaced
        "plots/incident_a.png": b"incident_a.png",
        "plots/incident_c.png": b"incident_c.png",  # incident_b: stale, matched `replaces`
        "summary.json": b'{\n  "policies": 2\n}\n',
    }
    assert sorted(p.name for p in out.parent.iterdir()) == ["simulated"]  # no temp left


def test_atomic_outputs_changes_nothing_on_failure_or_in_a_foreign_folder(
        tmp_path: Path) -> None:
    out = tmp_path / "replay"
    _replay_like(out, ["x.png"], {"policies": 1})
    (out / "README.md").write_text("notes")
    before = _tree(out)
    with (pytest.raises(RuntimeError, match="boom"),
          atomic_outputs(out, marker="summary.json") as tmp):
        (tmp / "decisions.parquet").write_bytes(b"new")
        atomic_write_json(tmp / "summary.json", {"policies": 3})
        raise RuntimeError("boom")
    assert _tree(out) == before
    (out / "decisions.parquet").unlink()
    (out / "decisions.parquet").mkdir()  # a folder where an output file goes: refused up front
    with pytest.raises(OutputDirError, match=r"decisions\.parquet is in the way"):
        _replay_like(out, [], {"policies": 4})
    assert json.loads((out / "summary.json").read_text()) == {"policies": 1}

    foreign = tmp_path / "docs"
    foreign.mkdir()
    (foreign / "README.md").write_text("no summary.json here")
    with pytest.raises(OutputDirError, match=r"not a summary.json written by this command"):
        _replay_like(foreign, [], {"policies": 1})
    assert _tree(foreign) == {"README.md": b"no summary.json here"}


def test_check_output_dir_without_a_marker_allows_only_new_or_empty(tmp_path: Path) -> None:
    assert check_output_dir(tmp_path / "new") == tmp_path / "new"
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputDirError, match="is a file"):
        check_output_dir(tmp_path / "f")
    with pytest.raises(OutputDirError, match="already holds files"):
        check_output_dir(tmp_path)
    with pytest.raises(OutputDirError, match="the input folder is inside it"):
        check_output_dir(tmp_path, inputs=[tmp_path / "a" / "b"])


def test_scratch_left_by_a_killed_run_is_removed_by_the_next_one(tmp_path: Path) -> None:
    import subprocess
    import sys

    from canaryml.data.atomic import atomic_dir

    out = tmp_path / "out"
    # a process that created its scratch folder and was SIGKILLed before cleaning up
    code = ("import os, signal, sys; from pathlib import Path; "
            "from canaryml.data.atomic import atomic_dir\n"
            f"with atomic_dir(Path({str(out)!r})) as tmp:\n"
            "    (tmp / 'half').write_text('x'); os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code], check=False)
    assert proc.returncode == -9
    left = list(tmp_path.glob(".out.tmp-*"))
    assert len(left) == 1 and not out.exists()
    unrelated = tmp_path / ".out.tmp-notes"  # not of the pattern: never touched
    unrelated.mkdir()
    with atomic_dir(out) as tmp:
        (tmp / "done").write_text("ok")
    assert (out / "done").read_text() == "ok"
    assert not left[0].exists() and unrelated.is_dir()
    assert [p.name for p in tmp_path.glob(".out.tmp-*")] == [".out.tmp-notes"]
