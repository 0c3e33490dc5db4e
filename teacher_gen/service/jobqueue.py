"""`JobQueue`: the service's jobs in SQLite (`<state>/jobs.sqlite`), so that a restart loses none.

A job goes queued -> running -> done | failed | cancelled (a queued one may be cancelled at once).
A job still `running` when the service starts was interrupted (kill -9, power cut): it is taken
again first, and `generate`'s exactly-once resume finishes it from what the store committed.

One connection, guarded by a lock, serves the API threads and the worker; every change is its
own transaction in WAL mode with `synchronous=FULL`, so an accepted job survives a power cut.
Progress is written at most about once a second by the worker.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from potstill.teacher_gen.service.settings import ServiceError

SCHEMA_VERSION = 1
STATES = ("queued", "running", "done", "failed", "cancelled")
FINISHED = ("done", "failed", "cancelled")
INPUT_ERRORS_SHOWN = 20

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,      -- submission order
    id TEXT UNIQUE NOT NULL,
    state TEXT NOT NULL,
    spec TEXT NOT NULL,                         -- JSON: the settings the submitter gave
    teacher TEXT NOT NULL,                      -- the teacher served when it was accepted
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,        -- times a run of it started
    crashes INTEGER NOT NULL DEFAULT 0,         -- times the service died while running it
    clean_stop INTEGER NOT NULL DEFAULT 0,      -- the last run was stopped by a shutdown, not a crash
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    records_done INTEGER NOT NULL DEFAULT 0,    -- of its prompt set, in the store
    records_total INTEGER,
    tokens_done INTEGER NOT NULL DEFAULT 0,
    records_per_s REAL,
    progress_at REAL,
    error TEXT,                                 -- why it failed
    input_errors TEXT NOT NULL DEFAULT '[]',    -- JSON: bad inputs skipped (first ones)
    input_error_count INTEGER NOT NULL DEFAULT 0,
    summary TEXT                                -- JSON: the last run's GenerateSummary
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs(state, seq);
"""


@dataclass
class Job:
    id: str
    seq: int
    state: str
    spec: dict[str, Any]
    teacher: str
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    crashes: int = 0
    cancel_requested: bool = False
    records_done: int = 0
    records_total: int | None = None
    tokens_done: int = 0
    records_per_s: float | None = None
    progress_at: float | None = None
    error: str | None = None
    input_errors: list[str] = field(default_factory=list)
    input_error_count: int = 0
    summary: dict[str, Any] | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        return cls(
            id=row["id"], seq=row["seq"], state=row["state"], spec=json.loads(row["spec"]),
            teacher=row["teacher"], created_at=row["created_at"], started_at=row["started_at"],
            finished_at=row["finished_at"], attempts=row["attempts"], crashes=row["crashes"],
            cancel_requested=bool(row["cancel_requested"]), records_done=row["records_done"],
            records_total=row["records_total"], tokens_done=row["tokens_done"],
            records_per_s=row["records_per_s"], progress_at=row["progress_at"], error=row["error"],
            input_errors=json.loads(row["input_errors"]), input_error_count=row["input_error_count"],
            summary=json.loads(row["summary"]) if row["summary"] else None,
        )

    def eta_seconds(self, now: float) -> float | None:
        """Seconds left at the current attempt's rate; None while unknown."""
        if self.state != "running" or not self.records_per_s or self.records_total is None:
            return None
        left = (self.records_total - self.records_done) / self.records_per_s
        return max(0.0, left - (now - (self.progress_at or now)))


class JobQueue:
    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise ServiceError(f"{path}: job database of a newer potstill (schema {version})")
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as e:
            raise ServiceError(f"{path}: cannot open the job database ({e})") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _one(self, sql: str, args: tuple = ()) -> sqlite3.Row | None:
        return self._db.execute(sql, args).fetchone()

    # -- submitting and reading ----------------------------------------------------------------
    def add(self, spec: dict[str, Any], teacher: str) -> Job:
        job_id = secrets.token_hex(6)
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, state, spec, teacher, created_at) VALUES (?, 'queued', ?, ?, ?)",
                (job_id, json.dumps(spec, sort_keys=True), teacher, time.time()),
            )
            row = self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        assert row is not None
        return Job.from_row(row)

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return Job.from_row(row) if row else None

    def list_jobs(self, state: str | None = None, limit: int | None = None) -> list[Job]:
        """Jobs oldest first (in `state` if given); with `limit`, only the newest `limit` of them."""
        sql = "SELECT * FROM jobs" + (" WHERE state = ?" if state else "") + " ORDER BY seq DESC"
        args: tuple = (state,) if state else ()
        if limit is not None:
            sql += " LIMIT ?"
            args += (limit,)
        sql = f"SELECT * FROM ({sql}) ORDER BY seq"
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [Job.from_row(r) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetchall()
        counts = dict.fromkeys(STATES, 0)
        counts.update({r["state"]: r["n"] for r in rows})
        return counts

    # -- the worker's side ---------------------------------------------------------------------
    def claim_next(self, max_crashes: int) -> Job | None:
        """The next job to run, marked running: an interrupted one first, then the oldest queued.

        A job found `running` that was not stopped cleanly was running when the service died; after
        `max_crashes` such deaths it is failed instead of retried (it may be what kills the service).
        """
        now = time.time()
        with self._lock:
            while True:
                row = self._one("SELECT * FROM jobs WHERE state = 'running' ORDER BY started_at, seq LIMIT 1")
                if row is None:
                    row = self._one("SELECT * FROM jobs WHERE state = 'queued' ORDER BY seq LIMIT 1")
                if row is None:
                    return None
                crashes = row["crashes"] + (row["state"] == "running" and not row["clean_stop"])
                if crashes >= max_crashes:
                    self._db.execute(
                        "UPDATE jobs SET state = 'failed', crashes = ?, finished_at = ?, error = ? WHERE id = ?",
                        (crashes, now, f"the service died {crashes} times while running this job; "
                                       "not retried (resubmit it to try again)", row["id"]),
                    )
                    continue
                self._db.execute(
                    "UPDATE jobs SET state = 'running', attempts = attempts + 1, crashes = ?, clean_stop = 0, "
                    "started_at = COALESCE(started_at, ?) WHERE id = ?",
                    (crashes, now, row["id"]),
                )
                claimed = self._one("SELECT * FROM jobs WHERE id = ?", (row["id"],))
                assert claimed is not None
                return Job.from_row(claimed)

    def record_progress(self, job_id: str, records_done: int, records_total: int, tokens_done: int,
                        records_per_s: float | None) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET records_done = ?, records_total = ?, tokens_done = ?, records_per_s = ?, "
                "progress_at = ? WHERE id = ?",
                (records_done, records_total, tokens_done, records_per_s, time.time(), job_id),
            )

    def finish(self, job_id: str, state: str, *, error: str | None = None, summary: dict[str, Any] | None = None,
               records_done: int | None = None, records_total: int | None = None, tokens_done: int | None = None,
               input_errors: list[str] | None = None) -> None:
        assert state in FINISHED
        errors = input_errors or []
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET state = ?, finished_at = ?, error = ?, summary = ?, "
                "records_done = COALESCE(?, records_done), records_total = COALESCE(?, records_total), "
                "tokens_done = COALESCE(?, tokens_done), input_errors = ?, input_error_count = ?, "
                "records_per_s = NULL WHERE id = ?",
                (state, time.time(), error, json.dumps(summary) if summary else None, records_done, records_total,
                 tokens_done, json.dumps(errors[:INPUT_ERRORS_SHOWN]), len(errors), job_id),
            )

    def mark_stopped_cleanly(self, job_id: str) -> None:
        """The service is shutting down mid-job: it stays `running` and resumes first, no crash counted."""
        with self._lock:
            self._db.execute("UPDATE jobs SET clean_stop = 1 WHERE id = ?", (job_id,))

    # -- cancelling ----------------------------------------------------------------------------
    def request_cancel(self, job_id: str) -> Job | None:
        """Cancel a queued job at once; flag a running one (the worker stops it between batches).

        A finished job is returned unchanged; None when there is no such job.
        """
        with self._lock:
            now = time.time()
            self._db.execute(
                "UPDATE jobs SET state = 'cancelled', finished_at = ?, cancel_requested = 1 "
                "WHERE id = ? AND state = 'queued'", (now, job_id),
            )
            self._db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND state = 'running'", (job_id,))
            row = self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return Job.from_row(row) if row else None
