"""Copying a store between places (local disk, s3://, gs://, ...): `potstill store copy`.

A copy follows the same commit protocol as a writer (docs/reference/store-format.md §3), so it is safe to
interrupt and to read while it runs: the tokenizer files, then the manifest, then per shard its data
files and, last, its commit record (written atomically, so a killed copy never leaves half of one).
Every byte is checked against the source's sha256 on the way, so a copy never spreads a corrupted
shard. Rerunning the same copy first removes what an interrupted copy (or any dead writer) left at
the destination, exactly as `potstill store verify --clean` would, then skips the shards already
committed there (and copies again a shard whose commit record there differs from the source's).
Copying into a store that other writers fill is fine too (shard names are unique per writer, and
what live writers own is left alone). Leftovers of crashed writers at the source are never copied.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from potstill.store.errors import StoreError
from potstill.store.fs import is_local, join, listdir_names, read_bytes, resolve, write_bytes
from potstill.store.leases import WriterLease
from potstill.store.manifest import FileEntry
from potstill.store.provenance import RUN_NAME_RE, RUNS
from potstill.store.reader import MANIFEST, Store, foreign_entries, location_problem
from potstill.store.verify import clean_leftovers, find_leftovers

_BLOCK = 8 << 20
Progress = Callable[[str, int, int], None]  # (shard, shards done, shards in all)


@dataclass
class CopyReport:
    source: str
    destination: str
    shards_copied: list[str] = field(default_factory=list)
    shards_skipped: list[str] = field(default_factory=list)  # already committed at the destination
    shards_repaired: list[str] = field(default_factory=list)  # committed there, but its commit record differed
    cleaned: list[str] = field(default_factory=list)  # leftovers of interrupted runs removed at the destination
    runs: int = 0  # run records (format §10) copied or updated
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

    problem = location_problem(fs, root)
    if problem is not None:
        raise StoreError(f"{destination} {problem}: not copying there")
    manifest_path = join(root, MANIFEST)
    if fs.exists(manifest_path):
        if read_bytes(fs, manifest_path) != manifest_bytes:
            raise StoreError(f"{destination} is another store (its manifest differs from {source}'s); not copying into it")
    else:
        # (a temporary manifest is what a copy killed while creating the destination leaves)
        strays = foreign_entries(fs, root)
        if strays:
            raise StoreError(f"{destination} exists and is not a potstill store (it holds {', '.join(strays[:3])}); "
                             "copy into a new or empty folder")
        for entry in src.manifest.tokenizer.files:
            _copy_file(src, entry, fs, root, f"{source}/{MANIFEST}")
        write_bytes(fs, manifest_path, manifest_bytes, exclusive=True, atomic=True)

    dest = Store(destination, destination_options, strict=False)  # its commits are compared below, not trusted
    report.cleaned = clean_leftovers(dest, find_leftovers(dest))
    done = {c.shard for c in dest.commits} | {shard for shard, _ in dest.bad_commits}
    lease: WriterLease | None = None
    try:
        for i, commit in enumerate(src.commits):
            name = f"{commit.shard}.json"
            record = read_bytes(src.fs, join(src.root, "commits", name))
            target = join(root, "commits", name)
            if commit.shard in done and read_bytes(fs, target) == record:
                report.shards_skipped.append(commit.shard)
            else:
                # Hold the shard's writer id at the destination while its files are uncommitted there,
                # so that a `verify --clean` running meanwhile sees a live writer, not a leftover.
                if lease is None or lease.writer_id != commit.writer_id:
                    if lease is not None:
                        lease.release()
                    lease = WriterLease(dest, commit.writer_id, extra={"copy_of": source}).start()
                for entry in commit.files:
                    _copy_file(src, entry, fs, root, f"{source}/commits/{name}")
                # The commit record goes last, atomically and as it was: a reader sees the whole shard
                # or nothing. One that exists but differs from the source's is damage at the
                # destination: its files were just copied again, and it is replaced.
                repair = commit.shard in done
                write_bytes(fs, target, record, exclusive=not repair, atomic=True)
                (report.shards_repaired if repair else report.shards_copied).append(commit.shard)
                report.records += commit.records
                report.bytes += commit.bytes
            if progress is not None:
                progress(commit.shard, i + 1, len(src.commits))
    finally:
        if lease is not None:
            lease.release()
    report.runs = _copy_runs(src, fs, root)
    return report


def _copy_runs(src: Store, fs: Any, root: str) -> int:
    """Copy the run records (format §10) the destination lacks or holds in an older state: small files, no
    checksum to keep, each written atomically. A run still going at the source is copied as it is now;
    copying again brings its end."""
    copied = 0
    for name in listdir_names(src.fs, join(src.root, RUNS)):
        if RUN_NAME_RE.match(name) is None:
            continue  # temporary files, strays
        body = read_bytes(src.fs, join(src.root, RUNS, name))
        target = join(root, RUNS, name)
        if fs.exists(target) and read_bytes(fs, target) == body:
            continue
        write_bytes(fs, target, body, atomic=True)
        copied += 1
    return copied


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
