"""The writer that runs beside the model: a thread fed through a bounded queue.

The model loop hands over each captured batch and goes on; the thread builds the records and
writes them through a `ShardWriter`, which commits a shard every `shard_records` records or
`shard_bytes` bytes. The queue is bounded, so a slow disk slows the model down instead of
filling memory; a failed write stops the run at the next hand-over, with the error.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from potstill.store import CommitRecord, Record, Store
from potstill.teacher_gen.errors import GenerateError

_STOP = object()


class BackgroundWriter:
    def __init__(
        self,
        store: Store,
        writer_id: str,
        build: Callable[[Any, Any], Record],
        *,
        shard_records: int,
        shard_bytes: int,
        max_batches: int,
    ) -> None:
        self.store = store
        self.build = build
        self.writer = store.writer(writer_id, shard_records=shard_records, shard_bytes=shard_bytes)
        self.queue: queue.Queue = queue.Queue(maxsize=max_batches)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"writer-{writer_id}", daemon=True)
        self._thread.start()

    @property
    def writer_id(self) -> str:
        return self.writer.writer_id

    @property
    def commits(self) -> list[CommitRecord]:
        return self.writer.committed

    def put(self, pairs: list[tuple[Any, Any]]) -> None:
        """Hand over one batch of (job, capture); blocks while the queue is full."""
        while True:
            self._raise_if_failed()
            try:
                self.queue.put(pairs, timeout=0.5)
                return
            except queue.Full:
                continue

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is _STOP:
                return
            if self.error is not None:
                continue  # drain without writing: the run is stopping
            try:
                for job, capture in item:
                    self.writer.write(self.build(job, capture))
            except BaseException as e:  # reported to the model loop; the thread keeps draining
                self.error = e

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise GenerateError(f"writing to store {self.store.url} failed: {self.error}") from self.error

    def close(self) -> list[CommitRecord]:
        """Write what is queued, commit the last shard and release the lease."""
        self.queue.put(_STOP)
        self._thread.join()
        if self.error is not None:
            self.writer.abort()
            self._raise_if_failed()
        try:
            return self.writer.close()
        except Exception as e:
            raise GenerateError(f"committing to store {self.store.url} failed: {e}") from e

    def abort(self) -> None:
        """Stop without committing what is not committed yet (it stays invisible)."""
        self.error = self.error or GenerateError("aborted")
        self.queue.put(_STOP)
        self._thread.join()
        self.writer.abort()


class WriterPool:
    """Several `BackgroundWriter`s, fed batch by batch in turn, each with its own writer id.

    One Python thread hashes, copies and fsyncs maybe 1 GB/s; a teacher storing three
    2048-wide hidden layers produces ~2 GB/s at full GPU speed. Writers share nothing (each has
    its own shards, lease and sequence numbers), so they run in parallel safely.
    """

    def __init__(self, store: Store, writer_id: str, build: Callable[[Any, Any], Record], *, threads: int,
                 shard_records: int, shard_bytes: int, max_batches: int) -> None:
        ids = [writer_id] if threads == 1 else [f"{writer_id}.{j}" for j in range(threads)]
        per_writer = max(1, max_batches // len(ids))
        self.writers: list[BackgroundWriter] = []
        try:
            for wid in ids:
                self.writers.append(BackgroundWriter(store, wid, build, shard_records=shard_records,
                                                     shard_bytes=shard_bytes, max_batches=per_writer))
        except BaseException:
            self.abort()
            raise
        self._turn = 0

    @property
    def commits(self) -> list[CommitRecord]:
        return [c for w in self.writers for c in w.commits]

    def put(self, pairs: list[tuple[Any, Any]]) -> None:
        writer = self.writers[self._turn % len(self.writers)]
        self._turn += 1
        writer.put(pairs)

    def close(self) -> list[CommitRecord]:
        """Close every writer (even when one fails), then raise the first failure."""
        failure: BaseException | None = None
        for writer in self.writers:
            try:
                writer.close()
            except BaseException as e:
                failure = failure or e
        if failure is not None:
            raise failure
        return self.commits

    def abort(self) -> None:
        for writer in self.writers:
            writer.abort()
