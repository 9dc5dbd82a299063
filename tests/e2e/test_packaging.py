"""The wheel works outside the checkout: build it, install it into a fresh venv whose only other
packages are the project's already-installed dependencies (no download, source tree not
importable), and run simulate → ingest → train → replay from an empty folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
NOISE = ("CloudPickle", "litlogger", "overflow encountered", "Downloading artifacts",
         "LeafSpec")


def _copy_sources(dst: Path) -> Path:
    """What a build reads (pyproject, README, src/ with its conf symlink, conf/), so building
    writes nothing (build/, egg-info) into the checkout others work in."""
    dst.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dst / name)
    shutil.copytree(REPO / "conf", dst / "conf")
    shutil.copytree(REPO / "src", dst / "src", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return dst


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = _copy_sources(tmp / "src")
    dist = tmp / "dist"
    # --no-build-isolation: the venv's setuptools builds it (nothing downloaded)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(dist), str(src)],
                   check=True, timeout=300, capture_output=True)
    (whl,) = dist.glob("canaryml-*.whl")
    return whl


def test_wheel_ships_the_configuration(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    conf = {p.relative_to(REPO / "conf").as_posix() for p in (REPO / "conf").rglob("*.yaml")}
    assert {f"canaryml/conf/{c}" for c in conf} <= names
    assert "canaryml/cli.py" in names and not any(n.startswith("conf/") for n in names)
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(meta).decode()
    assert "Requires-Dist: torch<3,>=2.13" in text
    for extra in ("eval", "serve", "dev"):
        assert f"Provides-Extra: {extra}" in text


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed; the dependencies come from this test's own
    site-packages through a .pth line (a plain path: the .pth files there, such as the editable
    install's path to src/, are not processed)."""
    root = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True,
                   timeout=120)
    py = root / "bin" / "python"
    # installed before the dependencies are visible, so pip sees no canaryml anywhere
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True, timeout=300,
                   capture_output=True)
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    deps = sysconfig.get_paths()["purelib"]
    (Path(site) / "_canaryml_test_deps.pth").write_text(deps + "\n")
    return root


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "CANARYML_CONF", "CANARYML_HOME", "MLFLOW_TRACKING_URI",
                        "VIRTUAL_ENV")}
    env.pop("PYTHONWARNINGS", None)  # what a user sees, warnings included
    return env | {"HOME": str(home), "MLFLOW_DISABLE_TELEMETRY": "true"}


def test_installed_wheel_runs_the_workbench_from_an_empty_folder(venv: Path,
                                                                  tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    env = _env(tmp_path)
    bin_ = venv / "bin"

    def run(*args: str, timeout: float = 240) -> str:
        proc = subprocess.run([str(bin_ / "canaryml"), *args], cwd=work, env=env, text=True,
                              capture_output=True, timeout=timeout, check=False)
        assert proc.returncode == 0, f"canaryml {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
        assert "Traceback" not in proc.stderr, proc.stderr
        for noise in NOISE:  # issue 15: no warnings a user can do nothing about
            assert noise not in proc.stderr, f"canaryml {args[0]}: {noise!r} in\n{proc.stderr}"
        return proc.stdout

    where = subprocess.run(
        [str(bin_ / "python"), "-c", "import canaryml, canaryml.paths as p; "
         "print(canaryml.__file__); print(p.conf_dir()); print(p.checkout_root())"],
        cwd=work, env=env, text=True, capture_output=True, check=True).stdout.split("\n")
    assert where[0].startswith(str(venv)) and not where[0].startswith(str(REPO))
    assert where[1].startswith(str(venv)) and where[2] == "None"

    assert run("--version").strip() == "canaryml 0.1.0"
    assert "forecaster  lstm* | transformer" in run("train", "--help")
    run("simulate", "out=raw", "n=6", "seed=3")
    run("ingest", "source=bundle", "input=raw", "out=ds")
    run("train", "dataset=ds", "scorer_out=model", "trainer.max_epochs=1",
        "trainer.progress_bar=false", "trainer.num_threads=1", "forecaster.hidden=8",
        "forecaster.lookback=16", "trainer.stride=4")
    run("replay", "model=model", "dataset=ds", "out=rep", "replay.report.enabled=false",
        "replay.mlflow=false", "replay.policies=[scorer,argo]")
    assert (work / "raw" / "deployments.parquet").is_file()
    assert (work / "ds" / "manifest.json").is_file()
    assert (work / "model" / "scorer.json").is_file()
    assert (work / "rep" / "summary.json").is_file()
    assert (work / "mlflow.db").is_file()  # the default store is in the working directory
