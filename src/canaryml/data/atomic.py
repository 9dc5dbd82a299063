"""Atomic outputs that never delete what a command did not write.

A command writes only into a folder that is new (absent or empty) or that holds the command's
own *marker* — the file it always writes last, e.g. ingest's `manifest.json`, replay's
`summary.json`, a scorer's `scorer.json`. Anything else is refused with an `OutputDirError`
that names the folder, says why and says what to do; nothing is written or deleted. Outputs
may never overlap the command's inputs (the same folder, one inside the other).

Two ways to write, both via a temporary sibling folder so a failure leaves nothing half-written:

* `atomic_dir(out, marker=..., owns=..., inputs=...)` — the output *is* the folder (a canonical
  dataset, a bundle, a scorer): the block builds a complete new folder that replaces `out` as a
  whole (rename), so files of an older output that the new one lacks disappear.
* `atomic_outputs(out, marker=..., owns=..., inputs=...)` — the command owns *some files* in a
  folder shared with others (replay next to a hand-written README.md and plots): the block
  writes its files into a temporary folder; on success each file it wrote is moved into place
  (replacing the file of the same name, each move atomic, the marker last). Files it did not
  write are left alone.

`check_output_dir` applies the same rules without writing (to fail before hours of work).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from canaryml.errors import ConfigError

Owns = Callable[[Path], bool]  # given the output folder: does it hold this command's output?
PathLike = str | Path


class OutputDirError(ConfigError):
    """An output folder the command must not write into (foreign files, or it overlaps an
    input). The message names the folder, the reason and the fix."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _usual_mode(path: Path, directory: bool) -> None:
    """mkdtemp/mkstemp create 0700/0600; give outputs the mode a plain mkdir/open would."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


# ---- markers -------------------------------------------------------------------------------
def json_marker(name: str, *keys: str) -> Owns:
    """`owns` check: `out/name` is a JSON object holding every one of `keys` (a manifest of this
    command's kind, not just any file of that name)."""

    def owns(out: Path) -> bool:
        try:
            data = json.loads((out / name).read_text())
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and all(k in data for k in keys)

    return owns


def holds_only(*names: str, required: Iterable[str] = ()) -> Owns:
    """`owns` check for outputs without a manifest (a telemetry bundle): the folder holds
    nothing but files named in `names`, and at least one of `required` when given."""
    allowed, need = set(names), set(required)

    def owns(out: Path) -> bool:
        present = {p.name for p in out.iterdir()}
        return present <= allowed and (not need or bool(present & need))

    return owns


# ---- checks --------------------------------------------------------------------------------
def _abs(path: PathLike) -> Path:
    return Path(os.path.abspath(Path(path).expanduser())).resolve()


def _overlap(out: Path, inp: Path) -> str | None:
    if out == inp:
        return "it is the input folder"
    if inp in out.parents:
        return "it is inside the input folder"
    if out in inp.parents:
        return "the input folder is inside it"
    return None


def _listing(out: Path, limit: int = 5) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir())
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_output_dir(out: PathLike, *, marker: str | None = None, owns: Owns | None = None,
                     inputs: Iterable[PathLike | None] = (), what: str = "out",
                     kind: str = "output") -> Path:
    """The absolute output folder, or `OutputDirError` when the command must not write there.

    Allowed: `out` is absent, an empty folder, or a folder holding this command's output — its
    `marker` file exists and `owns(out)` (when given) agrees; with no `marker`, `owns(out)`
    alone decides; with neither, only a new or empty folder is allowed. Never allowed: `out` is
    a file, or `out` and an input are the same folder or one contains the other.
    `what` is how the user named the folder (e.g. `out`, `scorer_out`), `kind` what is written.
    """
    path = _abs(out)
    for given in inputs:
        if given is None or str(given) == "":
            continue
        inp = _abs(given)
        why = _overlap(path, inp)
        if why is not None:
            raise OutputDirError(
                f"{what}={path} overlaps the input {inp}: {why}, so writing the {kind} there "
                "would replace or mix with the input data. Give an output folder outside the "
                f"input (e.g. a sibling such as {inp.parent / (inp.name + '-out')}).")
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"{what}={path} is a file, not a folder; give a folder path for "
                             f"the {kind} (it is created when absent).")
    if not path.is_dir() or not any(path.iterdir()):
        return path
    if marker is not None:
        ok = (path / marker).is_file() and (owns is None or owns(path))
        mine = f"a {marker} written by this command"
    else:
        ok = owns is not None and owns(path)
        mine = f"only the files of a {kind}"
    if not ok:
        raise OutputDirError(
            f"{what}={path} already holds files ({_listing(path)}) and not {mine}, so it is "
            f"not a {kind} this command wrote; writing there could delete or overwrite them. "
            f"Give a new or empty folder for {what}=, or move those files away first.")
    return path


# ---- writers -------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _begin(out: PathLike, checks: dict[str, Any]) -> tuple[Path, Path]:
    """The checked output folder and a new scratch folder beside it, named after this process;
    scratch folders of the same output left by a process that no longer runs (killed before it
    could clean up) are removed first. Only folders of exactly this pattern are touched: they
    are this command's own leftovers."""
    path = check_output_dir(out, **checks)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.tmp-"
    for stale in path.parent.glob(prefix + "*-*"):
        pid = stale.name[len(prefix):].split("-", 1)[0]
        if stale.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=path.parent))
    _usual_mode(tmp, directory=True)
    return path, tmp



@contextlib.contextmanager
def atomic_dir(out: PathLike, *, marker: str | None = None, owns: Owns | None = None,
               inputs: Iterable[PathLike | None] = (), what: str = "out",
               kind: str = "output") -> Iterator[Path]:
    """Yield a temporary folder that replaces `out` as a whole if the block succeeds.

    `out` must pass `check_output_dir` (same arguments) — checked before the block and again
    right before the swap. On any exception the temporary folder is removed and `out` is left
    as it was (absent or holding the previous complete output).
    """
    checks: dict[str, Any] = {"marker": marker, "owns": owns, "inputs": tuple(inputs),
                              "what": what, "kind": kind}
    path, tmp = _begin(out, checks)
    try:
        yield tmp
        check_output_dir(path, **checks)  # nothing foreign appeared while we worked
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_outputs(out: PathLike, *, marker: str, owns: Owns | None = None,
                   inputs: Iterable[PathLike | None] = (), replaces: Iterable[str] = (),
                   what: str = "out", kind: str = "output") -> Iterator[Path]:
    """Yield a temporary folder; on success move every file written there into `out`.

    For a command that owns only its own files in a shared folder (replay's outputs beside a
    README.md): files are moved one by one (sub-folders such as `plots/` are merged, not
    replaced), each replacing the file of the same name atomically, `marker` last — the block
    must write `marker`. Files in `out` the block did not write are never touched, except
    those matching a `replaces` glob (relative to `out`, e.g. `incident_*.png`: the command's
    own files whose set changes from run to run), which are removed after the move. `out` must
    pass `check_output_dir` (new, empty, or holding `marker`); a written file whose place in
    `out` is taken by a folder (or the reverse) is refused before anything moves. On any
    exception nothing in `out` changes.
    """
    checks: dict[str, Any] = {"marker": marker, "owns": owns, "inputs": tuple(inputs),
                              "what": what, "kind": kind}
    path, tmp = _begin(out, checks)
    try:
        yield tmp
        if not (tmp / marker).is_file():
            raise OutputDirError(f"the {kind} for {what}={path} wrote no {marker}; nothing was "
                                 "moved into place (a bug: the writer must write its marker)")
        check_output_dir(path, **checks)
        files = sorted((p.relative_to(tmp) for p in tmp.rglob("*") if not p.is_dir()),
                       key=lambda rel: (rel == Path(marker), str(rel)))
        for rel in files:
            dest = path / rel
            clash = next((q for q in [dest, *dest.parents] if q != path and path in q.parents
                          and q.exists() and (q.is_dir() if q == dest else not q.is_dir())), None)
            if clash is not None:
                raise OutputDirError(
                    f"{what}={path}: {clash.relative_to(path)} is in the way of the output file "
                    f"{rel} ({'a folder' if clash.is_dir() else 'a file'} of that name); move it "
                    "away and run again. Nothing was changed.")
        stale = {p for pattern in replaces for p in path.glob(pattern)
                 if p.is_file() and p.relative_to(path) not in set(files)}
        path.mkdir(exist_ok=True)
        for rel in files:
            (path / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / rel, path / rel)
        for p in stale:
            p.unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        _usual_mode(Path(tmp), directory=False)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
