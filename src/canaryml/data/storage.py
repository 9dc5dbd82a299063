"""Where datasets live: a local folder or object storage through pyarrow filesystems.

A dataset location is either a local path or a URI that `pyarrow.fs.FileSystem.from_uri`
understands: `s3://bucket/prefix` (credentials and region from the usual AWS environment
variables or files; an S3-compatible server such as MinIO via `AWS_ENDPOINT_URL` or the URI's
`?endpoint_override=http://host:port` query), `gs://…`, `hdfs://…`, `file:///…`.
`Location` carries the filesystem, the path inside it and the text the user gave (for
messages), so readers and writers never turn a URI into a `pathlib.Path` (which would fold
`s3://` into `s3:/`).
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from canaryml.errors import DataContractError

PathLike = str | Path


def is_uri(location: PathLike) -> bool:
    """True for `scheme://…` locations (object storage); False for plain local paths."""
    return isinstance(location, str) and "://" in location and not location.startswith("file:")


@dataclass(frozen=True)
class Location:
    """A folder on some filesystem: `fs` + `path` (no trailing slash), and `text` as given."""

    fs: pafs.FileSystem
    path: str
    text: str

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def join(self, *parts: str) -> str:
        return posixpath.join(self.path, *parts) if not self.is_local else os.path.join(
            self.path, *parts)

    def child(self, *parts: str) -> Location:
        sub = "/".join(parts)
        return Location(self.fs, self.join(*parts), self.text.rstrip("/") + "/" + sub)

    def info(self, *parts: str) -> pafs.FileInfo:
        return self.fs.get_file_info(self.join(*parts))

    def is_file(self, *parts: str) -> bool:
        return self.info(*parts).type == pafs.FileType.File

    def is_dir(self, *parts: str) -> bool:
        return self.info(*parts).type == pafs.FileType.Directory

    def read_bytes(self, *parts: str) -> bytes:
        with self.fs.open_input_stream(self.join(*parts)) as fh:
            return bytes(fh.read())

    def __str__(self) -> str:
        return self.text


def locate(location: PathLike) -> Location:
    """The filesystem and path of a local folder or an object-storage URI.

    Raises `DataContractError` naming the location when the URI's filesystem cannot be set up
    (unknown scheme, bad query, missing S3 support)."""
    if isinstance(location, Path) or not is_uri(location):
        text = str(location)
        local = Path(text[len("file://"):] if text.startswith("file://") else text)
        return Location(pafs.LocalFileSystem(), str(local.expanduser().absolute()), text)
    try:
        fs, path = pafs.FileSystem.from_uri(location)
    except (ValueError, OSError, ImportError) as exc:
        raise DataContractError(
            f"{location}: cannot open this location ({exc}); give a local folder or a URI such "
            "as s3://bucket/prefix (an S3-compatible server: set AWS_ENDPOINT_URL or add "
            "?endpoint_override=http://host:port)") from exc
    return Location(fs, path.rstrip("/"), location)


def list_files(loc: Location) -> list[str]:
    """Paths (relative to `loc`, `/`-separated) of every file under `loc`; [] when absent."""
    selector = pafs.FileSelector(loc.path, recursive=True, allow_not_found=True)
    prefix = loc.path.rstrip("/") + "/"
    return sorted(i.path[len(prefix):] for i in loc.fs.get_file_info(selector)
                  if i.type == pafs.FileType.File and i.path.startswith(prefix))


def publish(local: Path, loc: Location, *, marker: str, owns: Callable[[Location], bool],
            replaceable: Callable[[str], bool], kind: str, what: str = "out") -> None:
    """Copy the complete output folder `local` to object storage at `loc`, marker last.

    Object storage has no atomic folder rename, so the marker file is the commit point:
    readers require it (a canonical dataset without `manifest.json` is no dataset). An
    existing output is replaced in this order: its marker is deleted first (from then on no
    reader sees a dataset, never a mix of old and new files), the new files are uploaded, the
    old files the new output lacks are deleted, and the new marker is written last. A failure
    leaves no marker, so nothing half-written is ever read as a dataset; the next run may
    replace those files. `loc` must be empty, hold this command's output (`owns`) or only
    files `replaceable` says the command writes (an interrupted earlier upload): anything else
    is refused with `OutputDirError` before anything is written or deleted.
    """
    from canaryml.data.atomic import OutputDirError

    try:
        existing = list_files(loc)
        if existing and not (owns(loc) or all(replaceable(p) for p in existing)):
            shown = ", ".join(existing[:5]) + (f" and {len(existing) - 5} more"
                                               if len(existing) > 5 else "")
            raise OutputDirError(
                f"{what}={loc.text} already holds objects ({shown}) and not a {marker} written "
                f"by this command, so it is not a {kind} this command wrote; writing there "
                f"could delete or overwrite them. Give a new or empty prefix for {what}=.")
        new = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
        if marker not in new:
            raise OutputDirError(f"the {kind} for {what}={loc.text} wrote no {marker}; nothing "
                                 "was uploaded (a bug: the writer must write its marker)")
        if marker in existing:
            loc.fs.delete_file(loc.join(marker))
        for rel in new:
            if rel != marker:
                _upload(local / rel, loc, rel)
        for rel in sorted(set(existing) - set(new)):
            loc.fs.delete_file(loc.join(rel))
        _upload(local / marker, loc, marker)
    except OSError as exc:
        raise DataContractError(
            f"{what}={loc.text}: writing the {kind} failed ({exc}); no {marker} was written, "
            "so no reader takes it for a complete output. Check the bucket, the credentials "
            "and the endpoint, then run again") from exc


def _upload(src: Path, loc: Location, rel: str) -> None:
    with open(src, "rb") as fh, loc.fs.open_output_stream(loc.join(rel)) as out:
        while chunk := fh.read(8 << 20):
            out.write(chunk)
