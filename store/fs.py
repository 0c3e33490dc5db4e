"""Filesystem helpers: every store path goes through fsspec, so a store can live on a local disk,
in object storage (s3://, gs://) or in memory:// (tests) with the same code."""

from __future__ import annotations

import hashlib
import os
import posixpath
from typing import Any

import fsspec
from fsspec import AbstractFileSystem

from store.errors import StoreError

_CHUNK = 8 << 20


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


def write_bytes(fs: AbstractFileSystem, path: str, data: bytes, *, exclusive: bool = False) -> None:
    """Write a whole file. On a local disk the data is fsynced, so that a commit record written
    after it never points at data a power cut could still lose; `exclusive` fails if it exists."""
    if is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
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
    fs.pipe_file(path, data)


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
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
