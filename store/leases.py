"""Writer leases (docs/reference/store-format.md §6): `writers/<writer>.json` says a writer is alive.

A lease decides three things: whether an uncommitted shard folder belongs to a writer that is
still running (then nobody may remove it), whether a `potstill generate` run already works on an
overlapping part of a prompt set (then a second run refuses: the two would write every record
twice), and who holds a writer id. A lease is created exclusively, so of two writers given one id
(a shared config file does it) the second refuses before it writes anything: both would name their
shards alike and overwrite each other's. It is rewritten atomically, so a reader never sees a
half-written lease.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from potstill.store.commit import loads_json_object
from potstill.store.errors import StoreError
from potstill.store.fs import StoreLocation, join, listdir_names, pid_alive, read_bytes, write_bytes
from potstill.store.manifest import utc_now

HEARTBEAT_S = 30.0  # a live writer refreshes its lease at least this often
STALE_AFTER_S = 600.0  # a lease of another host whose heartbeat is older than this is dead


def lease_path(store: StoreLocation, writer_id: str) -> str:
    return join(store.root, "writers", f"{writer_id}.json")


class WriterIdInUse(StoreError):
    """Another live writer holds the lease of this writer id (`why`: which process, in words)."""

    def __init__(self, writer_id: str, why: str) -> None:
        super().__init__(f"writer id {writer_id} is in use by a live writer ({why}; its lease is "
                         f"writers/{writer_id}.json): give each run its own writer id, or wait until that one ends")
        self.writer_id, self.why = writer_id, why


_HELD: set[tuple[str, str]] = set()  # (store root, lease path) of the leases this process holds now
_HELD_LOCK = threading.Lock()


class WriterLease:
    """The advisory lease of one writer: written at start, refreshed by a heartbeat thread and at
    every commit, removed at close. `extra` adds keys to the lease (a run's partition, say)."""

    def __init__(self, store: StoreLocation, writer_id: str, heartbeat_s: float = HEARTBEAT_S,
                 extra: dict[str, Any] | None = None) -> None:
        self.store = store
        self.writer_id = writer_id
        self.path = lease_path(store, writer_id)
        self.heartbeat_s = heartbeat_s
        self.extra = dict(extra or {})
        self.started_at = utc_now()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def body(self) -> dict[str, Any]:
        return {
            "writer_id": self.writer_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": self.started_at,
            "heartbeat_at": utc_now(),
            "heartbeat_unix": time.time(),
            **self.extra,
        }

    def beat(self) -> None:
        with self._lock:
            write_bytes(self.store.fs, self.path, json.dumps(self.body()).encode(), atomic=True)

    def start(self) -> WriterLease:
        self._acquire()
        self._thread = threading.Thread(target=self._run, name=f"lease-{self.writer_id}", daemon=True)
        self._thread.start()
        return self

    def _acquire(self) -> None:
        """Create the lease, never over a live writer's. A dead writer's lease is removed and the
        exclusive creation retried. (Two writers taking over one dead lease in the same instant can
        both succeed: a narrow window, only for a writer id whose last writer crashed.)"""
        key = (self.store.root, self.path)
        for _ in range(3):
            with self._lock:
                try:
                    write_bytes(self.store.fs, self.path, json.dumps(self.body()).encode(), exclusive=True, atomic=True)
                except FileExistsError:
                    pass
                else:
                    with _HELD_LOCK:
                        _HELD.add(key)
                    return
            status = lease_status(self.store, self.writer_id)
            lease = status.lease or {}
            ours = lease.get("host") == socket.gethostname() and lease.get("pid") == os.getpid()
            with _HELD_LOCK:
                held_here = key in _HELD
            if status.live and not (ours and not held_here):  # a lease of this process not held: a writer it abandoned
                raise WriterIdInUse(self.writer_id, status.why)
            with contextlib.suppress(FileNotFoundError):
                self.store.fs.rm(self.path)
        raise WriterIdInUse(self.writer_id, "other writers keep creating its lease")

    def _run(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with contextlib.suppress(Exception):  # a missed heartbeat only delays cleanup; never kill the writer
                self.beat()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(FileNotFoundError):
            self.store.fs.rm(self.path)
        with _HELD_LOCK:
            _HELD.discard((self.store.root, self.path))


@dataclass
class LeaseStatus:
    writer_id: str
    live: bool
    why: str  # in words, for reports: "its writer (pid 12 on this host) is not running"
    lease: dict[str, Any] | None  # the lease's content, None when missing or unreadable


def lease_status(store: StoreLocation, writer_id: str, stale_after_s: float = STALE_AFTER_S) -> LeaseStatus:
    """Whether a writer is alive, from its lease: on this host, whether its process runs; on
    another host, whether its heartbeat is recent."""
    try:
        lease = loads_json_object(read_bytes(store.fs, lease_path(store, writer_id)))
    except FileNotFoundError:
        return LeaseStatus(writer_id, False, "its writer holds no lease", None)
    if lease is None:
        return LeaseStatus(writer_id, False, "its writer's lease is unreadable", None)
    pid = lease.get("pid")
    if lease.get("host") == socket.gethostname() and isinstance(pid, int):
        if not pid_alive(pid):  # (a reused pid keeps a dead writer "alive": the safe direction)
            return LeaseStatus(writer_id, False, f"its writer (pid {pid} on this host) is not running", lease)
        return LeaseStatus(writer_id, True, f"its writer (pid {pid} on this host) is running", lease)
    try:
        age = time.time() - float(lease.get("heartbeat_unix", 0))
    except (TypeError, ValueError):
        return LeaseStatus(writer_id, False, "its writer's lease has no heartbeat", lease)
    host = lease.get("host", "another host")
    if age > stale_after_s:
        return LeaseStatus(writer_id, False, f"its writer's last heartbeat (on {host}) was {age:.0f} s ago", lease)
    return LeaseStatus(writer_id, True, f"its writer's heartbeat (on {host}) is {age:.0f} s old", lease)


def all_leases(store: StoreLocation, stale_after_s: float = STALE_AFTER_S) -> list[LeaseStatus]:
    """The status of every lease in the store."""
    names = listdir_names(store.fs, join(store.root, "writers"))
    return [lease_status(store, n[:-5], stale_after_s) for n in names if n.endswith(".json") and not n.startswith(".")]
