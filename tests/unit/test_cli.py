"""The CLI's own surface: --help per command, --cfg job, --version, piping, expected errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from canaryml import __version__
from canaryml.cli import COMMANDS, compose, main

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_help_shows_purpose_groups_and_defaults(
        command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    spec = COMMANDS[command]
    assert out.startswith(f"usage: canaryml {command}")
    assert spec.purpose.split()[0] in out
    for group in spec.groups:
        assert f"\n{group}: ({group}=" in out  # the composed group, printed with its defaults
    for key in spec.keys:
        assert f"\n  {key}:" in out or f"\n  '{key}':" in out
    assert "--cfg job" in out


def test_help_shows_defaults_comments_and_the_selected_option(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "-h"]) == 0
    out = capsys.readouterr().out
    assert "  forecaster  lstm* | transformer" in out
    assert "max_epochs: 8" in out and "# early stopping on val/loss" in out
    assert "dataset: data/processed/simulated" in out
    # overrides given with --help are applied to what it shows
    assert main(["train", "forecaster=transformer", "trainer.max_epochs=3", "--help"]) == 0
    out = capsys.readouterr().out
    assert "lstm | transformer*" in out and "max_epochs: 3" in out
    assert main(["help", "simulate"]) == 0
    assert "simulate: (simulate=default" in capsys.readouterr().out


def test_cfg_job_prints_the_composed_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "trainer.max_epochs=2", "--cfg", "job"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["max_epochs"] == 2 and printed["command"] == "train"
    assert printed == yaml.safe_load(
        __import__("omegaconf").OmegaConf.to_yaml(compose("train", ["trainer.max_epochs=2"])))
    assert main(["serve", "--cfg", "job", "-p", "policy"]) == 0
    assert set(yaml.safe_load(capsys.readouterr().out)) == {"policy"}
    assert main(["promote", "--to-version", "3", "--cfg=job", "-p", "to_version"]) == 0
    assert capsys.readouterr().out.strip() == "to_version: 3"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"canaryml {__version__}"


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "--bogus"], "unknown option '--bogus'"),
    (["train", "--cfg", "hydra"], "--cfg takes `job`"),
    (["train", "-p", "policy"], "-p only goes with --cfg"),
    (["train", "nope=1", "--cfg", "job"], "Could not override 'nope'"),
    (["serve", "serve=nothere", "--help"], "Could not find 'serve/nothere'"),
    (["simulate", "out=/proc/canaryml-cannot-write", "n=2"], "Check the paths"),
])
def test_expected_errors_exit_2_with_a_message(argv: list[str], message: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_no_arguments_and_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: canaryml" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_user_conf_dirs_add_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "serve").mkdir()
    (tmp_path / "serve" / "prod.yaml").write_text(
        "defaults:\n  - default\n  - _self_\ninterval_s: 99\n")
    with pytest.raises(Exception, match="serve/prod"):
        compose("serve", ["serve=prod"])
    assert compose("serve", ["serve=prod", f"hydra.searchpath=[file://{tmp_path}]"]
                   ).serve.interval_s == 99
    monkeypatch.setenv("CANARYML_CONF", str(tmp_path))
    assert compose("serve", ["serve=prod"]).serve.interval_s == 99
    assert compose("serve", []).serve.interval_s != 99


def test_help_piped_into_head_has_no_broken_pipe_traceback() -> None:
    # `| true` closes the pipe before canaryml writes (it starts in ~1 s): a sure EPIPE
    for args, reader in ((["--help"], "head -1"), (["--help"], "true"),
                         (["train", "--help"], "true"), (["serve", "--cfg", "job"], "true")):
        cmd = (f"{sys.executable} -c 'import sys; from canaryml.cli import main; "
               f"sys.exit(main())' {' '.join(args)} | {reader}")
        proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120,
                              check=False, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
        assert proc.returncode == 0
        if reader.startswith("head"):
            assert proc.stdout.startswith("usage: canaryml"), proc.stdout
        assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_python_dash_m_works_the_same() -> None:
    proc = subprocess.run([sys.executable, "-m", "canaryml", "--version"], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == f"canaryml {__version__}"
