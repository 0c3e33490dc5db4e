"""Writing shards (docs/reference/store-format.md §3, §5, §6): `ShardWriter` takes records, rolls them into
shards, and commits each shard with a commit record written last."""

from __future__ import annotations

import ctypes
import hashlib
import os
import secrets
import shutil
import socket
import tempfile
from typing import Any, Protocol

import pyarrow as pa

from potstill.store.commit import CommitRecord, check_writer_id, shard_name
from potstill.store.errors import StoreError
from potstill.store.fs import (
    StoreLocation,
    fsync_dir,
    fsync_file,
    is_local,
    join,
    sha256_bytes,
    sha256_file,
    write_bytes,
)
from potstill.store.hidden import HiddenShardWriter
from potstill.store.ids import IDS_FILE, ids_file_bytes
from potstill.store.leases import HEARTBEAT_S, WriterLease
from potstill.store.manifest import FileEntry, StoreManifest
from potstill.store.pieces import PIECES_FILE, PieceCrcs, piece_crcs, pieces_file_bytes
from potstill.store.records import Record, records_to_batch, target_nbytes, validate_record


class WritableStore(StoreLocation, Protocol):
    """What a `ShardWriter` needs of a `Store` (which builds writers, so the writer does not import it)."""

    manifest: StoreManifest

    def next_seq(self, writer_id: str) -> int: ...


def new_writer_id(prefix: str = "w") -> str:
    """A writer id unique across hosts and processes: prefix, host, pid and a random nonce."""
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:20] or "host"
    return f"{prefix}-{host}-{os.getpid()}-{secrets.token_hex(3)}"


class ShardWriter:
    """Appends records to a store, one shard at a time, each committed atomically.

    A shard closes when it holds `shard_records` records or `shard_bytes` bytes, or on `commit()`
    / `close()`. Records are validated against the manifest as they arrive; a bad record raises
    `StoreError` naming it, and nothing already committed is touched. Use as a context manager:
    leaving the block commits the records written so far.
    """

    def __init__(
        self,
        store: WritableStore,
        writer_id: str | None = None,
        *,
        shard_records: int = 1024,
        shard_bytes: int = 1 << 30,
        heartbeat_s: float = HEARTBEAT_S,
    ) -> None:
        if shard_records < 1 or shard_bytes < 1:
            raise StoreError("shard_records and shard_bytes must be positive")
        self.store = store
        self.manifest = store.manifest
        self.writer_id = check_writer_id(writer_id or new_writer_id())
        self.shard_records = shard_records
        self.shard_bytes = shard_bytes
        self.local = is_local(store.fs)
        self.committed: list[CommitRecord] = []
        self._lease = WriterLease(store, self.writer_id, heartbeat_s)
        self._lease.start()
        self._seq = store.next_seq(self.writer_id)
        self._records: list[Record] = []
        self._offsets: list[int] = []
        self._hidden: HiddenShardWriter | None = None
        self._staging: str | None = None
        self._bytes = 0
        self._closed = False

    # -- writing ------------------------------------------------------------------------------
    @property
    def current_shard(self) -> str:
        return shard_name(self.writer_id, self._seq)

    def write(self, record: Record) -> None:
        if self._closed:
            raise StoreError(f"writer {self.writer_id} is closed")
        rec = validate_record(record, self.manifest)
        if self.manifest.hidden.layers:
            if self._hidden is None:
                self._hidden = self._open_hidden()
            self._offsets.append(self._hidden.rows)
            self._hidden.add(rec.hidden, rec.hidden_rows)
            self._bytes += sum(a.nbytes for a in rec.hidden.values())
        else:
            self._offsets.append(0)
        rec.hidden = {}  # now owned by the Zarr buffer; keep the Arrow side small
        self._records.append(rec)
        self._bytes += rec.input_ids.nbytes + target_nbytes(rec, self.manifest)
        if len(self._records) >= self.shard_records or self._bytes >= self.shard_bytes:
            self.commit()

    def write_many(self, records: Any) -> None:
        for rec in records:
            self.write(rec)

    def _shard_dir(self) -> str:
        return join(self.store.root, "shards", self.current_shard)

    def _commit_path(self) -> str:
        return join(self.store.root, "commits", f"{self.current_shard}.json")

    def _open_hidden(self) -> HiddenShardWriter:
        if self.local:
            local_dir = os.path.join(self._shard_dir(), "hidden")
            if self.store.fs.exists(self._commit_path()):
                raise self._taken()
            if os.path.exists(local_dir):  # a leftover of a crashed writer with our id: ours to replace
                shutil.rmtree(local_dir)
        else:
            self._staging = tempfile.mkdtemp(prefix=f"potstill-{self.current_shard}-")
            local_dir = os.path.join(self._staging, "hidden")
        spec = self.manifest.hidden
        return HiddenShardWriter(spec.layers, spec.chunk_tokens, local_dir)

    # -- committing ---------------------------------------------------------------------------
    def commit(self) -> CommitRecord | None:
        """Close the current shard: write its files, then its commit record, last."""
        if not self._records:
            return None
        fs, name = self.store.fs, self.current_shard
        if fs.exists(self._commit_path()):  # what another writer committed is never overwritten
            raise self._taken()
        prefix = f"shards/{name}"
        batch = records_to_batch(self._records, self._offsets, self.manifest)
        arrow_path = join(self.store.root, prefix, "records.arrow")
        if self.local:
            size, digest, crcs = _write_batch_file(arrow_path, batch)
        else:
            sink = pa.BufferOutputStream()
            with pa.ipc.new_file(sink, batch.schema) as ipc_writer:
                ipc_writer.write_batch(batch)
            arrow_bytes = memoryview(sink.getvalue())
            size, digest, crcs = arrow_bytes.nbytes, sha256_bytes(arrow_bytes), piece_crcs(arrow_bytes)
            write_bytes(fs, arrow_path, arrow_bytes.tobytes())
        files = [FileEntry(f"{prefix}/records.arrow", size, digest)]
        pieces = pieces_file_bytes(crcs)
        files.append(FileEntry(f"{prefix}/{PIECES_FILE}", pieces.size, sha256_bytes(memoryview(pieces))))
        write_bytes(fs, join(self.store.root, files[-1].path), pieces.to_pybytes() if not self.local else memoryview(pieces))
        field_bytes = {f.name: batch.column(i).nbytes for i, f in enumerate(batch.schema)}
        ids_buf = ids_file_bytes([r.id for r in self._records])
        files.append(FileEntry(f"{prefix}/{IDS_FILE}", ids_buf.size, sha256_bytes(memoryview(ids_buf))))
        write_bytes(fs, join(self.store.root, files[-1].path), ids_buf.to_pybytes() if not self.local else memoryview(ids_buf))

        hidden_rows = 0
        if self._hidden is not None:
            self._hidden.finish()
            hidden_rows = self._hidden.rows
            for local_path, rel in self._hidden.files():
                known = self._hidden.digests.get(rel)  # data files were hashed as they were written
                digest, size = known if known is not None else sha256_file(_LOCAL, local_path)
                remote = f"{prefix}/hidden/{rel}"
                if self.local:
                    fsync_file(local_path)
                else:
                    fs.put_file(local_path, join(self.store.root, remote))
                files.append(FileEntry(remote, size, digest))
                top = rel.split("/", 1)[0]
                if top.startswith("layer_"):
                    field_bytes[f"hidden/{top}"] = field_bytes.get(f"hidden/{top}", 0) + size

        if self.local:  # the files' folder entries too must be durable before the commit names them
            for folder in sorted({os.path.dirname(join(self.store.root, f.path)) for f in files}):
                fsync_dir(folder)
        commit = CommitRecord(
            shard=name,
            writer_id=self.writer_id,
            seq=self._seq,
            records=len(self._records),
            tokens=sum(r.num_tokens for r in self._records),
            scored_tokens=sum(r.num_scored for r in self._records),
            hidden_rows=hidden_rows,
            files=files,
            bytes=sum(f.bytes for f in files),
            field_bytes=field_bytes,
            format_version=self.manifest.format_version,  # a 1.x reader then refuses a 2.0 shard too
        )
        # Last, atomically and never over another: a commit record that exists is whole, so one that
        # does not parse can only be damage (never a crash), and its shard is never deleted.
        write_bytes(fs, self._commit_path(), commit.to_json(), exclusive=True, atomic=True)
        self._lease.beat()
        self.committed.append(commit)
        self._reset()
        self._seq += 1
        return commit

    def _taken(self) -> StoreError:
        return StoreError(f"shard {self.current_shard} of store {self.store.url} is already committed by another "
                          f"writer with id {self.writer_id}: writer ids must be unique; nothing of it was changed")

    def _reset(self) -> None:
        if self._hidden is not None:
            self._hidden.close()
        self._records, self._offsets, self._hidden, self._bytes = [], [], None, 0
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None

    def close(self) -> list[CommitRecord]:
        """Commit what is pending and release the lease. Returns every commit of this writer."""
        if self._closed:
            return self.committed
        try:
            self.commit()
        finally:
            self._closed = True
            self._reset()
            self._lease.release()
        return self.committed

    def abort(self) -> None:
        """Drop pending records without committing them (they stay invisible); release the lease."""
        if self._closed:
            return
        self._closed = True
        if self.local and self._records and not self.store.fs.exists(self._commit_path()):
            shutil.rmtree(self._shard_dir(), ignore_errors=True)
        self._reset()
        self._lease.release()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close()


def _write_batch_file(path: str, batch: pa.RecordBatch) -> tuple[int, str, list[int]]:
    """Serialise `batch` as an Arrow IPC file straight into the local file `path` and fsync it; returns its
    size, sha256 and pieces' CRC-32Cs (`store.pieces`). No copy of the file is made in memory: each piece the IPC writer hands over (the
    columns' own buffers) is hashed and written, and the disk is asked to start writing it at once
    (`HashedFile`), so the disk works while the rest is hashed and written, and the fsync at the end
    waits only for the last pieces."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with HashedFile(path) as out:
        with pa.ipc.new_file(out, batch.schema) as ipc_writer:
            ipc_writer.write_batch(batch)
        os.fsync(out.fd)
    return out.size, out.sha256.hexdigest(), out.pieces.finish()


class HashedFile:
    """A write-only local file for pyarrow's IPC writer that hashes what it writes (sha256, and the CRC-32C
    of each piece for the pieces file) and starts the disk's
    writeback every `KICK` bytes (`sync_file_range`, where the platform has it: a hint, the fsync
    after is what makes the file durable)."""

    KICK = 8 << 20
    closed = False

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.sha256 = hashlib.sha256()
        self.pieces = PieceCrcs()
        self.size = self._kicked = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        for at in range(0, len(view), self.KICK):
            piece = view[at : at + self.KICK]
            self.sha256.update(piece)
            self.pieces.update(piece)
            while piece:  # a raw write may take part of what it is given
                piece = piece[os.write(self.fd, piece) :]
            self.size += min(self.KICK, len(view) - at)
            if self.size - self._kicked >= self.KICK:
                _start_writeback(self.fd, self._kicked, self.size - self._kicked)
                self._kicked = self.size
        return len(view)

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)

    def __enter__(self) -> HashedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _sync_file_range() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.sync_file_range
    except (OSError, AttributeError):  # not Linux
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return call


_SYNC_FILE_RANGE = _sync_file_range()


def _start_writeback(fd: int, offset: int, length: int) -> None:
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, length, 2)  # SYNC_FILE_RANGE_WRITE: start writing, do not wait


class _LocalFS:
    """Minimal stand-in so `sha256_file` can hash staging files without an fsspec instance."""

    @staticmethod
    def open(path: str, mode: str = "rb") -> Any:
        return open(path, mode)


_LOCAL = _LocalFS()
