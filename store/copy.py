"""Copying a store between places (local disk, s3://, gs://, ...): `potstill store copy`.

A copy follows the same commit protocol as a writer (docs/store-format.md §3), so it is safe to
interrupt and to read while it runs: the tokenizer files, then the manifest, then per shard its data
files and, last, its commit record. Every byte is checked against the source's sha256 on the way, so
a copy never spreads a corrupted shard. Rerunning the same copy skips the shards already committed
at the destination, and copying into a store that other writers fill is fine too (shard names are
unique per writer). Leftovers of crashed writers at the source are never copied.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from store.errors import StoreError
from store.fs import is_local, join, listdir_names, read_bytes, resolve, write_bytes
from store.manifest import FileEntry
from store.reader import MANIFEST, Store

_BLOCK = 8 << 20
Progress = Callable[[str, int, int], None]  # (shard, shards done, shards in all)


@dataclass
class CopyReport:
    source: str
    destination: str
    shards_copied: list[str] = field(default_factory=list)
    shards_skipped: list[str] = field(default_factory=list)  # already committed at the destination
    records: int = 0
    bytes: int = 0


def copy_store(
    source: str,
    destination: str,
    *,
    source_options: dict[str, Any] | None = None,
    destination_options: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> CopyReport:
    """Copy every committed shard of `source` to `destination`, checking each file's sha256.

    The destination is created when missing. When it exists it must be a copy of the same store
    (the same manifest, byte for byte); anything else is refused before a byte is written.
    """
    src = Store(source, source_options)
    fs, root = resolve(destination, destination_options)
    manifest_bytes = read_bytes(src.fs, join(src.root, MANIFEST))
    report = CopyReport(source=source, destination=destination)

    manifest_path = join(root, MANIFEST)
    if fs.exists(manifest_path):
        if read_bytes(fs, manifest_path) != manifest_bytes:
            raise StoreError(f"{destination} is another store (its manifest differs from {source}'s); not copying into it")
    else:
        strays = [n for n in listdir_names(fs, root) if n != "tokenizer"]
        if strays:
            raise StoreError(f"{destination} exists and is not a potstill store (it holds {', '.join(strays[:3])}); "
                             "copy into a new or empty folder")
        for entry in src.manifest.tokenizer.files:
            _copy_file(src, entry, fs, root, f"{source}/{MANIFEST}")
        write_bytes(fs, manifest_path, manifest_bytes, exclusive=True)

    done = set(listdir_names(fs, join(root, "commits")))
    for i, commit in enumerate(src.commits):
        name = f"{commit.shard}.json"
        if name in done:
            report.shards_skipped.append(commit.shard)
        else:
            for entry in commit.files:
                _copy_file(src, entry, fs, root, f"{source}/commits/{name}")
            # the commit record goes last and as it was: a reader sees the whole shard or nothing
            write_bytes(fs, join(root, "commits", name), read_bytes(src.fs, join(src.root, "commits", name)))
            report.shards_copied.append(commit.shard)
            report.records += commit.records
            report.bytes += commit.bytes
        if progress is not None:
            progress(commit.shard, i + 1, len(src.commits))
    return report


def _copy_file(src: Store, entry: FileEntry, fs: Any, root: str, where: str) -> None:
    """Stream one file across, hashing on the way. A mismatch stops the copy before the shard's
    commit record is written, so what was written is a leftover no reader sees."""
    rel = entry.path  # already checked not to escape the store when the source was opened
    target = join(root, rel)
    digest, size = hashlib.sha256(), 0
    if is_local(fs):
        os.makedirs(os.path.dirname(target), exist_ok=True)
    else:
        fs.makedirs(posixpath.dirname(target), exist_ok=True)
    with src.fs.open(join(src.root, rel), "rb") as fin, fs.open(target, "wb") as fout:
        while block := fin.read(_BLOCK):
            digest.update(block)
            size += len(block)
            fout.write(block)
        if is_local(fs):
            fout.flush()
            os.fsync(fout.fileno())
    if size != entry.bytes or digest.hexdigest() != entry.sha256:
        raise StoreError(f"{src.url}/{rel}: does not match its checksum in {where}; "
                         f"run `potstill store verify {src.url}`; the copy stopped before this shard")
