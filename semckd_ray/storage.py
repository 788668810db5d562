"""Files on the storage path, local or in object storage, through ``pyarrow.fs`` as Ray itself does.

A location is a local path, a ``file://`` URI, or an object-store URI such as ``s3://bucket/prefix``
(or ``gs://``); an S3-compatible server that is not AWS is named by the URI's query, which pyarrow
reads: ``s3://bucket/prefix?endpoint_override=http://host:9000``. ``join`` keeps that query, so
every location below a storage path reaches the same server.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from pathlib import Path


def is_uri(location: str) -> bool:
    return "://" in str(location) and not str(location).startswith("file://")


def _split(location: str) -> tuple[str, str]:
    """``(location without its query, "?query" or "")``."""
    location = str(location)
    if is_uri(location) and "?" in location:
        head, query = location.split("?", 1)
        return head, "?" + query
    return location, ""


def join(location: str, *parts: str) -> str:
    """``location/part/...``, below ``location`` always (a part's leading ``/`` does not start over)."""
    head, query = _split(location)
    parts = tuple(p.strip("/") for p in parts if p.strip("/"))
    if not is_uri(head):
        return str(Path(head.removeprefix("file://"), *parts))
    return posixpath.join(head.rstrip("/"), *parts) + query


def redact(text: str) -> str:
    """``text`` (a location, or a message naming one) without credentials: pyarrow takes an S3 URI's
    keys as its userinfo (``s3://KEY:SECRET@bucket/prefix``), which ``semckd_ray.tracking.redact``
    strips, as it replaces every secret of the environment."""
    from semckd_ray.tracking import redact as redact_tracking

    return redact_tracking(str(text))


def filesystem(location: str):
    """``(pyarrow filesystem, path inside it)`` for ``location``."""
    import pyarrow.fs as pafs

    location = str(location)
    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location.removeprefix("file://")).expanduser().resolve())
    return pafs.FileSystem.from_uri(location)


def exists(location: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(location: str) -> bytes | None:
    """The file's content, or ``None`` when there is no such file."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(location: str) -> str | None:
    data = read_bytes(location)
    return None if data is None else data.decode()


def write_bytes(location: str, data: bytes) -> None:
    """Write the whole file at once: a reader sees the old content or the new, never a part.

    An object store writes an object whole; a local or shared folder gets a temporary file that is
    then renamed over the old one.
    """
    fs, path = filesystem(location)
    if is_uri(str(location)):  # no folders to make: a key names the object
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(location: str, text: str) -> None:
    write_bytes(location, text.encode())


def upload(local_path: str | os.PathLike, location: str) -> None:
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    if not is_uri(str(location)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(str(Path(local_path).resolve()), path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)


def download(location: str, local_path: str | os.PathLike) -> None:
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    Path(local_path).parent.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(Path(local_path).resolve()), source_filesystem=fs,
                    destination_filesystem=pafs.LocalFileSystem())


def list_dir(location: str) -> list[str]:
    """The names directly inside the folder ``location`` (none if it does not exist)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    return sorted(posixpath.basename(info.path.rstrip("/"))
                  for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))


def delete(location: str) -> None:
    """Remove the file or folder ``location``; nothing happens when it is not there."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif kind == pafs.FileType.File:
        fs.delete_file(path)
