"""Filesystem helpers: every store path goes through fsspec, so a store can live on a local disk,
in object storage (s3://, gs://) or in memory:// (tests) with the same code."""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import secrets
import tempfile
from typing import Any, Protocol

import fsspec
from fsspec import AbstractFileSystem

from potstill.store.errors import StoreError

_CHUNK = 8 << 20


class StoreLocation(Protocol):
    """Where a store lives: its filesystem and root path. A `Store` is one; the modules the reader
    builds on (leases, writer) ask for no more than this, so they never import the reader."""

    fs: AbstractFileSystem
    root: str


def resolve(url: str, storage_options: dict[str, Any] | None = None) -> tuple[AbstractFileSystem, str]:
    """Return the filesystem and the root path (no trailing slash) of a store URL or local path."""
    if not url:
        raise StoreError("empty store path")
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    path = path.rstrip("/") or "/"
    return fs, path


def is_local(fs: AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def join(root: str, *parts: str) -> str:
    return posixpath.join(root, *parts)


def check_relative(path: str, prefix: str, where: str) -> str:
    """Reject a path from store metadata that could escape its folder.

    `prefix` is the folder (relative to the store root, ending in '/') the path must lie under;
    `where` names the file the path came from, for the error message.
    """
    if not isinstance(path, str) or not path:
        raise StoreError(f"{where}: empty or non-string path {path!r}")
    bad = (
        path.startswith(("/", "~"))
        or "\\" in path
        or "://" in path
        or ":" in path.split("/", 1)[0]
        or any(seg in ("", ".", "..") for seg in path.split("/"))
    )
    if bad or not path.startswith(prefix) or posixpath.normpath(path) != path:
        raise StoreError(f"{where}: path {path!r} escapes {prefix!r}; refusing to read it")
    return path


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(fs: AbstractFileSystem, path: str) -> tuple[str, int]:
    """sha256 hex digest and byte size of a file, streamed."""
    h = hashlib.sha256()
    size = 0
    with fs.open(path, "rb") as f:
        while True:
            block = f.read(_CHUNK)
            if not block:
                break
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def write_bytes(fs: AbstractFileSystem, path: str, data: bytes | memoryview, *, exclusive: bool = False,
                atomic: bool = False) -> None:
    """Write a whole file.

    On a local disk the data is fsynced, so that a commit record written after it never points at
    data a power cut could still lose. `exclusive` fails with FileExistsError if the file exists.
    `atomic`: readers see the old state or the whole file, never a part of it, even after a crash
    (local: a temporary file in the same folder, fsynced, then linked or renamed into place and the
    folder fsynced; object stores: one PUT, atomic by the store's own guarantee).
    """
    if is_local(fs):
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        if atomic:
            _write_atomic_local(path, data, exclusive)
            return
        with open(path, "xb" if exclusive else "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return
    if exclusive and fs.exists(path):
        raise FileExistsError(path)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    fs.pipe_file(path, bytes(data))


TEMP_SUFFIX = ".tmp"


def temp_name(path: str) -> str:
    """The temporary file an atomic write of `path` goes through: `.<name>.<pid>-<random>.tmp`
    beside it. The leading dot keeps it out of every listing readers use."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}")


def temp_target(name: str) -> str | None:
    """The file a temporary file of an atomic write was to become (`.X.json.<pid>-<hex>.tmp` -> X.json),
    or None when `name` is not such a file."""
    if not (name.startswith(".") and name.endswith(TEMP_SUFFIX)):
        return None
    target, _, _ = name[1 : -len(TEMP_SUFFIX)].rpartition(".")
    return target or None


def temp_pid(name: str) -> int | None:
    """The process that writes a temporary file (`.X.json.<pid>-<hex>.tmp` -> pid), or None."""
    if temp_target(name) is None:
        return None
    pid, _, _ = name[1 : -len(TEMP_SUFFIX)].rpartition(".")[2].partition("-")
    return int(pid) if pid.isdigit() else None


def pid_alive(pid: int) -> bool:
    """Whether a process of this host runs under `pid` (a reused pid reads as alive: the safe direction)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_atomic_local(path: str, data: bytes | memoryview, exclusive: bool) -> None:
    tmp = temp_name(path)
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            try:
                os.link(tmp, path)  # atomic, and fails if `path` exists: no commit is ever overwritten
            except FileExistsError:  # (an OSError too: must not reach the fallback below)
                raise
            except OSError:  # a file system without hard links: check, then rename (atomic, not exclusive)
                if os.path.exists(path):
                    raise FileExistsError(path) from None
                os.replace(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    fsync_dir(os.path.dirname(path))


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """Make a folder's entries (files created or renamed in it) durable; a no-op where folders
    cannot be opened for fsync."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_bytes(fs: AbstractFileSystem, path: str) -> bytes:
    return fs.cat_file(path)


def exists(fs: AbstractFileSystem, path: str) -> bool:
    return fs.exists(path)


def listdir_names(fs: AbstractFileSystem, path: str) -> list[str]:
    """Names (not paths) of the entries of a folder; empty when it does not exist."""
    try:
        fs.invalidate_cache(path)  # other writers add files: never trust a cached listing
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    names = []
    for entry in entries:
        name = posixpath.basename(entry.rstrip("/"))
        if name:
            names.append(name)
    return sorted(set(names))


def unstrip(fs: AbstractFileSystem, path: str) -> str:
    """A full URL for a path of `fs` (for libraries such as zarr that open by URL)."""
    return fs.unstrip_protocol(path)


def write_problem(folder: str) -> str | None:
    """Why nothing can be written in a local `folder` (or, when it does not exist yet, in the nearest
    folder above it that does, since a run creates it), or None; remote URLs are not probed. A real
    file is written and removed: permission bits say nothing to root or on a read-only mount."""
    if "://" in folder and not folder.startswith("file://"):
        return None
    probe = os.path.abspath(folder.removeprefix("file://"))
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f"{probe} is a file, not a folder"
    try:
        fd, path = tempfile.mkstemp(prefix=".potstill-write-check-", dir=probe)
        os.close(fd)
        os.remove(path)
    except OSError as e:
        return e.strerror or str(e)
    return None
