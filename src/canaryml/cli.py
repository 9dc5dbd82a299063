"""`canaryml <command> [hydra overrides]`: one entry point, each command a Hydra-composed task.

Every task lives in `canaryml.tasks.<command>` and exposes `run(cfg: DictConfig) -> int`.
Tasks that accept `-m` sweeps (tune) also expose `run_multirun(overrides) -> int`.
A task with `ACCEPTS_OVERRIDES = True` (tune) is called as `run(cfg, overrides)` so it can
re-compose the user's overrides with its own (one config per trial).
A task may expose `translate_args(args) -> list[str]` to map CLI spellings (`--to-version N`)
to Hydra overrides before composition.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import sys
import textwrap
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from canaryml.errors import CanarymlError, ConfigError

if TYPE_CHECKING:
    from omegaconf import DictConfig


@dataclass(frozen=True)
class Command:
    summary: str  # one line for `canaryml --help`
    purpose: str  # the paragraph of `canaryml <command> --help`
    keys: tuple[str, ...] = ()  # top-level keys of conf/config.yaml the command reads
    groups: tuple[str, ...] = ()  # config groups it reads, printed in full by --help
    also: tuple[str, ...] = ()  # groups it reads too, listed only (long, or shared)


COMMANDS: dict[str, Command] = {
    "simulate": Command(
        "write a simulated telemetry bundle (out=DIR n=200 seed=0)",
        "Write a simulated telemetry bundle (deployments + samples tables, DESIGN §2.1): baseline "
        "and canary groups, fault families on faulty canaries, healthy variants that must not be "
        "rolled back.",
        ("out", "n", "seed"), ("simulate",), ("metrics",)),
    "ingest": Command(
        "bundle|smd|nab|nezha|prometheus → canonical Parquet dataset (input=DIR out=DIR)",
        "Validate telemetry from a source (bundle, smd, nab, nezha, prometheus) and write the "
        "canonical Parquet dataset with its manifest and content hash (DESIGN §2.3). Nothing is "
        "written when the input breaks the data contract.",
        ("source", "input", "out"), ("ingest",), ("metrics",)),
    "train": Command(
        "train a forecaster + residual detector scorer, log to MLflow (dataset=DIR)",
        "Train a forecaster (LSTM or Transformer) and a residual detector (Isolation Forest or "
        "One-Class SVM) into a calibrated CanaryScorer on a canonical dataset, log the run to "
        "MLflow and register the scorer as @challenger (scorer_out=DIR also saves it there).",
        ("dataset", "scorer_out", "seed", "mlflow"),
        ("forecaster", "detector", "scorer", "trainer")),
    "tune": Command(
        "Optuna study over Hydra configs (dataset=DIR n_trials=20)",
        "Run an Optuna study over the Hydra configuration (search space in conf/tune/): each "
        "trial trains a scorer and replays it; the best trial is logged to MLflow.",
        ("dataset", "n_trials", "study", "storage", "seed", "mlflow"), ("tune",),
        ("forecaster", "detector", "scorer", "trainer", "policy", "replay")),
    "replay": Command(
        "replay past deployments through the controller (model=… dataset=DIR out=DIR)",
        "Replay the deployments of a canonical dataset through Controller.step on a simulated "
        "clock for the scorer and the baseline judges; write decisions.parquet, summary.json "
        "and a report to out=DIR and log the metrics to MLflow.",
        ("model", "dataset", "out", "seed", "mlflow"), ("replay", "policy")),
    "register": Command(
        "register a scorer directory or run in the MLflow registry",
        "Register a saved CanaryScorer directory (`canaryml register scorer=DIR [alias=…]`) as a "
        "new version of the registered model and point the alias at it.",
        ("scorer_dir", "mlflow"), ("registry",)),
    "promote": Command(
        "move alias champion to the challenger when the replay gates pass",
        "Replay @challenger (and @champion) on the evaluation dataset and move @champion to the "
        "challenger only when the gates pass; `--to-version N` moves @champion back to version "
        "N. The evaluation dataset must not be the challenger's training data.",
        ("dataset", "to_version", "mlflow"), ("registry", "policy"), ("replay",)),
    "serve": Command(
        "run the live controller",
        "Run the live controller: read telemetry (Prometheus or Kafka), score each canary with "
        "the @champion scorer, decide and act (Kubernetes, Argo Rollouts, Flagger, Swarm or dry "
        "run); /metrics, /healthz and the verdict endpoints over HTTP.",
        ("mlflow",), ("serve", "policy"), ("metrics",)),
    "forward": Command(
        "forward app + infra telemetry Prometheus → Kafka for `serve` (kafka source)",
        "Pull the catalog's app and infra metrics of each deployment's canary and baseline "
        "groups from Prometheus (the serve source's queries and selectors) and produce them to "
        "the Kafka topic `canaryml serve serve.source.kind=kafka` consumes, keyed by deployment, "
        "with batching, retries (missed steps re-sent) and its own /metrics.",
        (), ("forward",), ("metrics", "serve")),
    "demo": Command(
        "the whole pipeline end to end on embedded defaults",
        "The whole pipeline end to end: simulate, ingest, train, replay, promote, a live loop "
        "and a summary table.",
        ("seed", "mlflow"), ("demo",), ("simulate", "policy")),
    "bench": Command(
        "benchmarks → experiments/benchmarks/*.json",
        "Benchmarks (ingest throughput, scorer latency, replay speed, controller latency) "
        "written to experiments/benchmarks/*.json.",
        (), ("bench",)),
}

OPTIONS_HELP = """options:
  -h, --help           this help: purpose, config groups and keys with their defaults
  --cfg job            print the composed configuration and exit (`-p GROUP` for one group,
                       `--resolve` to resolve interpolations)
  --version            print canaryml's version
  --completion bash    print a bash completion script (`eval "$(canaryml --completion bash)"`):
                       commands, options, config keys and group options"""

USAGE = ("usage: canaryml <command> [key=value ...] [--help | --cfg job]\n"
         "       canaryml --version | --completion bash\n\ncommands:\n"
         + "\n".join(f"  {name:<9} {c.summary}" for name, c in COMMANDS.items())
         + "\n\nOverrides are Hydra syntax (conf/ holds the defaults), e.g. "
           "`canaryml train forecaster=transformer`.\n"
           "`canaryml <command> --help` shows a command's settings and their defaults.")


def version() -> str:
    from importlib import metadata

    from canaryml import __version__

    try:
        return metadata.version("canaryml")
    except metadata.PackageNotFoundError:  # imported from a source tree that is not installed
        return __version__


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
    quiet_third_party()


def quiet_third_party() -> None:
    """Drop third-party noise printed on every run (the CLI and the Python API alike); leaves
    the root logger alone."""
    # Lightning advertises its cloud logger on every Trainer; only that line is dropped
    rank_zero = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if not any(isinstance(f, _DropLitLoggerTip) for f in rank_zero.filters):
        rank_zero.addFilter(_DropLitLoggerTip())
    # Lightning's own use of a deprecated torch pytree API, printed on every fit; not ours to fix
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            module=r"pytorch_lightning\.")
    # MLflow's own use of deprecated SQLAlchemy and pandas APIs, printed by every store open
    # and model log; not ours to fix either
    warnings.filterwarnings("ignore", message=r"The ``noload`` loader strategy is deprecated",
                            module=r"mlflow\.")
    warnings.filterwarnings("ignore", message=r"Operation with range is deprecated",
                            module=r"mlflow\.")
    # a progress bar per artifact download (log_model validates by downloading) is noise in logs
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


class _DropLitLoggerTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not (msg.startswith("💡 Tip:") and "litlogger" in msg)


def _searchpath_overrides(overrides: Sequence[str], extra: Sequence[Path]) -> list[str]:
    """`overrides` with one `hydra.searchpath=[…]`: the user's entries first, then `extra`."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    user: list[str] = []
    rest: list[str] = []
    for o in overrides:
        if o.lstrip("+~").startswith("hydra.searchpath="):
            value = OverridesParser.create().parse_override(o).value()
            user += [str(v) for v in (value if isinstance(value, list) else [value])]
        else:
            rest.append(o)
    paths = [*user, *(f"file://{p}" for p in extra if p.is_dir())]
    if not paths:
        return rest
    return [*rest, "hydra.searchpath=[" + ",".join(paths) + "]"]


def _compose(command: str, overrides: Sequence[str], *, with_choices: bool = False
             ) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from canaryml.paths import conf_dir, conf_search_path

    primary = conf_dir()  # Hydra reads the primary config.yaml from its main directory only
    extra = [d for d in conf_search_path() if d != primary]
    try:
        all_overrides = _searchpath_overrides([*overrides, f"command={command}"], extra)
        with initialize_config_dir(config_dir=str(primary), version_base="1.3",
                                   job_name=f"canaryml_{command}"):
            return hydra_compose("config", overrides=all_overrides,
                                 return_hydra_config=with_choices)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(
            f"bad configuration override for `canaryml {command}`: {exc}\n"
            f"Overrides are key=value (group=option for config groups); "
            f"`canaryml {command} --help` lists the settings, conf/config.yaml the groups."
        ) from exc


def compose(command: str, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose `config.yaml` with `overrides` for `command` (also used by tests).

    Config search path (canaryml.paths): the first directory holding a `config.yaml` of
    `$CANARYML_CONF`, `$CANARYML_HOME/conf` and the packaged `conf/` is Hydra's main directory;
    the others follow in that order, after any `hydra.searchpath=[file:///DIR]` the user
    passes. A directory without `config.yaml` therefore adds options (`serve=prod`) and does
    not shadow the packaged files of the same name; a complete copy of `conf/` replaces them."""
    return _compose(command, overrides)


# ---- --help and --cfg ------------------------------------------------------------------------
_KEY_LINE = re.compile(r"^(?P<indent> *)'?(?P<key>[A-Za-z_][\w\-]*)'?:(?P<rest>.*)$")


def _key_paths(lines: Sequence[str]) -> list[tuple[str | None, str]]:
    """Each line with the dotted path of the mapping key it holds (None: no key, e.g. a list
    item or a comment), tracked by indentation."""
    stack: list[tuple[int, str]] = []
    out: list[tuple[str | None, str]] = []
    for line in lines:
        m = _KEY_LINE.match(line)
        if not m:
            out.append((None, line))
            continue
        indent = len(m["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, m["key"]))
        out.append((".".join(k for _, k in stack), m["rest"]))
    return out


def _comments(path: Path) -> dict[str, str]:
    """Trailing comments of a YAML file's keys, by dotted path (`gates.detection_rate_min`)."""
    out: dict[str, str] = {}
    if path.is_file():
        for key, rest in _key_paths(path.read_text().splitlines()):
            m = re.search(r"(?:^|\s)#\s?(.*)$", rest)
            if key and m and key not in out:
                out[key] = m[1].strip()
    return out


def _find_conf_file(rel: str) -> Path | None:
    from canaryml.paths import conf_search_path

    for d in conf_search_path():
        if (d / rel).is_file():
            return d / rel
    return None


def _options(group: str) -> list[str]:
    from canaryml.paths import conf_search_path

    names = {f.stem for d in conf_search_path() for f in (d / group).glob("*.yaml")}
    return sorted(names)


def _yaml_block(node: object, comments: dict[str, str], indent: str = "  ") -> str:
    """`node` as YAML, indented, each key with its comment from the source file."""
    from omegaconf import OmegaConf

    lines = OmegaConf.to_yaml(node, resolve=False).rstrip("\n").splitlines()
    out = []
    for line, (key, _) in zip(lines, _key_paths(lines), strict=True):
        if key in comments:
            line = f"{line:<40} # {comments[key]}" if len(line) < 40 else \
                f"{line}  # {comments[key]}"
        out.append(indent + line)
    return "\n".join(out)


def command_help(command: str, overrides: Sequence[str] = ()) -> str:
    """`canaryml <command> --help`: purpose, top-level keys and config groups with defaults."""
    from omegaconf import OmegaConf

    spec = COMMANDS[command]
    cfg = _compose(command, overrides, with_choices=True)
    choices = dict(cfg.hydra.runtime.choices)
    with _unlocked(cfg):
        del cfg["hydra"]
    out = [f"usage: canaryml {command} [key=value ...] [group=option ...] [--cfg job]", "",
           textwrap.fill(spec.purpose, width=100), ""]
    if spec.keys:
        top = _comments(_find_conf_file("config.yaml") or Path())
        out.append("top-level keys (defaults):")
        out.append(_yaml_block(OmegaConf.masked_copy(cfg, list(spec.keys)), top))
        out.append("")
    groups = [*spec.groups, *spec.also]
    if groups:
        out.append("config groups (pick an option with group=option, override a key with "
                   "group.key=value):")
        for g in groups:
            chosen = choices.get(g)
            opts = " | ".join(f"{o}*" if o == chosen else o for o in _options(g))
            out.append(f"  {g:<11} {opts}")
        out.append("  (* = selected)")
    for g in spec.groups:
        chosen = choices.get(g)
        src = _find_conf_file(f"{g}/{chosen}.yaml") if chosen else None
        out += ["", f"{g}: ({g}={chosen}, {src or 'conf/' + g})",
                _yaml_block(cfg[g], _comments(src or Path()), "  ")]
    if spec.also:
        names = ", ".join(spec.also)
        out += ["", f"also read: {names} — print with `canaryml {command} --cfg job -p GROUP`."]
    out += ["", OPTIONS_HELP]
    return "\n".join(out)


class _unlocked:
    """Context: struct mode off on a DictConfig (to drop the `hydra` node)."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg

    def __enter__(self) -> None:
        from omegaconf import OmegaConf

        OmegaConf.set_struct(self.cfg, False)

    def __exit__(self, *exc: object) -> None:
        from omegaconf import OmegaConf

        OmegaConf.set_struct(self.cfg, True)


def show_cfg(command: str, overrides: Sequence[str], package: str | None, resolve: bool) -> str:
    """`canaryml <command> --cfg job [-p PACKAGE] [--resolve]`: the composed config as YAML."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    cfg = compose(command, overrides)
    node: object = cfg
    if package:
        node = OmegaConf.select(cfg, package, default=None)
        if node is None:
            raise ConfigError(f"-p {package}: no such key in the composed config of "
                              f"`canaryml {command}`; top-level keys: {sorted(str(k) for k in cfg)}")
        if not OmegaConf.is_config(node):
            return f"{package}: {node}"
        if resolve:  # interpolations may point outside the package (forward → serve.*)
            try:
                node = OmegaConf.to_container(node, resolve=True)
            except OmegaConfBaseException as exc:
                raise ConfigError(f"cannot resolve the config of `canaryml {command}`: "
                                  f"{exc}") from exc
        node = OmegaConf.create({package: node})  # keep the group's name, like Hydra's -p
    try:
        return OmegaConf.to_yaml(node, resolve=resolve).rstrip("\n")
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot resolve the config of `canaryml {command}`: {exc}") from exc


_CFG_KINDS = ("job", "all")


def _parse_flags(command: str, args: Sequence[str]) -> tuple[list[str], dict[str, object]]:
    """Split CLI flags (--help, --cfg job, -p, --resolve) from Hydra overrides."""
    flags: dict[str, object] = {}
    rest: list[str] = []
    it = iter(args)
    for arg in it:
        if arg in ("-h", "--help"):
            flags["help"] = True
        elif arg in ("--cfg", "-c") or arg.startswith("--cfg="):
            kind = arg.split("=", 1)[1] if "=" in arg else next(it, None)
            if kind not in _CFG_KINDS:
                raise ConfigError(f"--cfg takes `job` (the composed configuration), got "
                                  f"{kind!r}: `canaryml {command} --cfg job`")
            flags["cfg"] = kind
        elif arg in ("-p", "--package") or arg.startswith("--package="):
            pkg = arg.split("=", 1)[1] if "=" in arg else next(it, None)
            if not pkg or pkg.startswith("-"):
                raise ConfigError(f"{arg} needs a config group or key, e.g. "
                                  f"`canaryml {command} --cfg job -p policy`")
            flags["package"] = pkg
        elif arg == "--resolve":
            flags["resolve"] = True
        elif arg == "--version":
            flags["version"] = True
        elif arg.startswith("-") and arg not in ("-m", "--multirun") and "=" not in arg:
            raise ConfigError(f"unknown option {arg!r} for `canaryml {command}`; settings are "
                              f"key=value overrides.\n{OPTIONS_HELP}")
        else:
            rest.append(arg)
    if "package" in flags and "cfg" not in flags:
        raise ConfigError(f"-p only goes with --cfg: `canaryml {command} --cfg job -p "
                          f"{flags['package']}`")
    return rest, flags


# ---- shell completion -------------------------------------------------------------------------
BASH_COMPLETION = """_canaryml() {
    local IFS=$'\\n'
    COMPREPLY=($(canaryml --complete "${COMP_WORDS[@]:1:COMP_CWORD}" 2>/dev/null))
    [[ ${#COMPREPLY[@]} -eq 1 && ${COMPREPLY[0]} == *= ]] && compopt -o nospace
}
complete -F _canaryml canaryml"""

_FLAGS = ("--help", "--cfg", "--resolve", "--version")


def _leaf_keys(node: object, prefix: str = "") -> list[str]:
    if isinstance(node, dict) and node:
        return [k for key, value in node.items()
                for k in _leaf_keys(value, f"{prefix}{key}.")]
    return [prefix[:-1]]


def complete(words: Sequence[str]) -> list[str]:
    """Completions for the last of `words` (the command line after `canaryml`): a command, an
    option, `group=option` or `key=` of the command's composed configuration."""
    cur = words[-1] if words else ""
    if len(words) <= 1:
        cands = [*COMMANDS, "--help", "--version", "--completion"]
        return sorted(c for c in cands if c.startswith(cur))
    command = words[0]
    if command not in COMMANDS:
        return []
    if cur.startswith("-"):
        return [f for f in _FLAGS if f.startswith(cur)]
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(_compose(command, []), resolve=False)
    cfg = {str(k): v for k, v in raw.items() if k not in ("hydra", "command")}  # type: ignore[union-attr]
    groups = [g for g in cfg if _options(g)]
    if "=" in cur:
        key, _, value = cur.partition("=")
        return [f"{key}={o}" for o in _options(key) if o.startswith(value)] if key in groups \
            else []
    keys = [f"{g}=" for g in groups] + [f"{k}=" for k in _leaf_keys(cfg)]
    return sorted({k for k in keys if k.startswith(cur)})


def _write(text: str, stream: TextIO | None = None) -> None:
    print(text, file=stream or sys.stdout)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:  # `canaryml --help | head`: the reader left; not an error of ours
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes at exit
        except (OSError, ValueError):
            pass
        return 141  # 128 + SIGPIPE, what a shell tool reports


def _main(args: list[str]) -> int:
    if not args:
        _write(USAGE, sys.stderr)
        return 2
    if args[0] in ("-h", "--help", "help"):
        if len(args) > 1 and args[0] == "help" and args[1] in COMMANDS:
            return _main([args[1], "--help"])
        _write(USAGE)
        return 0
    if args[0] in ("--version", "-V", "version"):
        _write(f"canaryml {version()}")
        return 0
    if args[0] == "--completion":
        if args[1:] != ["bash"]:
            _write("canaryml: --completion takes `bash`: eval \"$(canaryml --completion bash)\"",
                   sys.stderr)
            return 2
        _write(BASH_COMPLETION)
        return 0
    if args[0] == "--complete":  # what the completion script asks; never an error to the shell
        with contextlib.suppress(Exception):  # a broken config just completes nothing
            _write("\n".join(complete(args[1:])))
        return 0
    command, overrides = args[0], args[1:]
    if command not in COMMANDS:
        _write(f"canaryml: unknown command {command!r}\n\n{USAGE}", sys.stderr)
        return 2
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        task = importlib.import_module(f"canaryml.tasks.{command}")
        if hasattr(task, "translate_args"):  # CLI spellings such as `promote --to-version N`
            overrides = list(task.translate_args(overrides))
        overrides, flags = _parse_flags(command, overrides)
        if flags.get("version"):
            _write(f"canaryml {version()}")
            return 0
        if flags.get("help") or flags.get("cfg"):  # show the config a sweep starts from
            overrides = [o for o in overrides if o not in ("-m", "--multirun")]
        if flags.get("help"):
            _write(command_help(command, overrides))
            return 0
        if flags.get("cfg"):
            _write(show_cfg(command, overrides, flags.get("package"),  # type: ignore[arg-type]
                            bool(flags.get("resolve"))))
            return 0
        setup_logging()
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
        _write(f"canaryml {command}: error: {exc}", sys.stderr)
        return 2
    except BrokenPipeError:
        raise  # main() handles it
    except OSError as exc:  # a path that cannot be read or written, a port in use, …
        logging.getLogger(__name__).debug("canaryml %s failed", command, exc_info=True)
        where = f" ({exc.filename})" if exc.filename else ""
        _write(f"canaryml {command}: error: {exc.strerror or exc}{where}. Check the paths and "
               "permissions in the overrides (CANARYML_LOG_LEVEL=DEBUG shows the traceback).",
               sys.stderr)
        return 2
    except KeyboardInterrupt:
        _write(f"canaryml {command}: interrupted", sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
