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
