"""`canaryml <command> [hydra overrides]`: one entry point, each command a Hydra-composed task.

Every task lives in `canaryml.tasks.<command>` and exposes `run(cfg: DictConfig) -> int`.
Tasks that accept `-m` sweeps (tune) also expose `run_multirun(overrides) -> int`.
A task with `ACCEPTS_OVERRIDES = True` (tune) is called as `run(cfg, overrides)` so it can
re-compose the user's overrides with its own (one config per trial).
A task may expose `translate_args(args) -> list[str]` to map CLI spellings (`--to-version N`)
to Hydra overrides before composition.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Sequence

from canaryml.errors import CanarymlError, ConfigError

COMMANDS = {
    "simulate": "write a simulated telemetry bundle (out=DIR n=200 seed=0)",
    "ingest": "bundle|smd|nab|prometheus → canonical Parquet dataset (input=DIR out=DIR)",
    "train": "train a forecaster + residual detector scorer, log to MLflow (dataset=DIR)",
    "tune": "Optuna study over Hydra configs (dataset=DIR n_trials=20)",
    "replay": "replay past deployments through the controller (model=… dataset=DIR out=DIR)",
    "register": "register a scorer directory or run in the MLflow registry",
    "promote": "move alias champion to the challenger when the replay gates pass",
    "serve": "run the live controller",
    "demo": "the whole pipeline end to end on embedded defaults",
    "bench": "benchmarks → experiments/benchmarks/*.json",
}

USAGE = "usage: canaryml <command> [key=value ...]\n\ncommands:\n" + "\n".join(
    f"  {name:<9} {text}" for name, text in COMMANDS.items()
) + "\n\nOverrides are Hydra syntax (conf/ holds the defaults), e.g. `canaryml train forecaster=transformer`."


def setup_logging() -> None:
    level = os.environ.get("CANARYML_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("alembic", "mlflow.store", "urllib3", "kafka", "matplotlib", "numexpr"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def compose(command: str, overrides: Sequence[str] = ()):  # -> DictConfig
    """Compose `conf/config.yaml` with `overrides` for `command` (also used by tests)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from canaryml.paths import conf_dir

    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3",
                                   job_name=f"canaryml_{command}"):
            return hydra_compose("config", overrides=[*overrides, f"command={command}"])
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(
            f"bad configuration override for `canaryml {command}`: {exc}\n"
            f"Overrides are key=value (group=option for config groups); see conf/config.yaml."
        ) from exc


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if args else 2
    command, overrides = args[0], args[1:]
    if command not in COMMANDS:
        print(f"canaryml: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    setup_logging()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        task = importlib.import_module(f"canaryml.tasks.{command}")
        if hasattr(task, "translate_args"):  # CLI spellings such as `promote --to-version N`
            overrides = list(task.translate_args(overrides))
        multirun = [o for o in overrides if o in ("-m", "--multirun")]
        if multirun:
            if not hasattr(task, "run_multirun"):
                raise ConfigError(f"`canaryml {command}` does not take -m; only `tune` sweeps")
            return int(task.run_multirun([o for o in overrides if o not in multirun]))
        cfg = compose(command, overrides)
        if getattr(task, "ACCEPTS_OVERRIDES", False):  # tune re-composes them per trial
            return int(task.run(cfg, list(overrides)) or 0)
        return int(task.run(cfg) or 0)
    except CanarymlError as exc:
        print(f"canaryml {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"canaryml {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
