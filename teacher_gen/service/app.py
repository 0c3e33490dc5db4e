"""The HTTP API of `potstill serve` (FastAPI; the OpenAPI schema is at /openapi.json, docs at /docs).

    POST   /jobs        submit a job (a `JobSpec`)             201 -> JobStatus, 422 bad spec
    GET    /jobs        every job, oldest first (?state=; ?limit=N: the newest N, 1 <= N <= 1,000,000)
    GET    /jobs/{id}   one job: state, records and tokens done, errors, ETA      404 unknown
    DELETE /jobs/{id}   cancel: a queued job at once, a running one after its batch; 409 if finished
    GET    /health      teacher, load status, job counts

With a bearer token every request, /health and the schema included, must carry
`Authorization: Bearer <token>`, else 401. Without one, a request whose Host header is not a name
of the service gets 400 (DNS rebinding). A body over `--max-body-bytes` gets 413 (guards.py).
Every error body is `{"detail": "<one line>"}`.
Handlers are plain functions: FastAPI runs them in its thread pool, next to the job thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import anyio.to_thread
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel

import potstill.teacher_gen.service.spec as specs
from potstill.teacher_gen.service.guards import BodyLimit, HostCheck, TokenCheck, allowed_hosts
from potstill.teacher_gen.service.jobqueue import Job, JobQueue
from potstill.teacher_gen.service.paths import PathPolicy
from potstill.teacher_gen.service.settings import ServeConfig
from potstill.teacher_gen.service.worker import JobRunner

log = logging.getLogger("potstill.serve")
SHUTDOWN_WAIT_S = 120.0  # how long a shutdown waits for the running job's batch to finish
MAX_LIST_LIMIT = 1_000_000  # ?limit= above this is refused: SQLite integers end at 2**63
State = Literal["queued", "running", "done", "failed", "cancelled"]


class JobStatus(BaseModel):
    id: str
    state: State
    prompts: str
    store: str
    records_done: int  # records of the job's prompt set in the store (earlier runs included)
    records_total: int | None  # known once the prompt set is read
    tokens_done: int  # tokens captured by this job
    eta_seconds: float | None  # at the current rate, while running
    error: str | None  # why the job failed
    input_errors: list[str]  # bad inputs skipped (the first ones; all are in the store's errors/)
    input_error_count: int
    cancel_requested: bool
    attempts: int  # runs started (more than one after a restart)
    created_at: float  # unix seconds
    started_at: float | None
    finished_at: float | None
    spec: dict[str, Any]  # the settings given at submission
    summary: dict[str, Any] | None  # the last run's summary, as `potstill generate --json` prints it


class Health(BaseModel):
    status: Literal["loading", "ready", "failed"]
    teacher: str
    backend: str
    device: str | None
    running: str | None  # the running job's id
    jobs: dict[str, int]  # jobs per state
    auth: bool  # whether requests need the bearer token
    read_roots: list[str]  # where jobs may read prompt sets (the write roots included)
    write_roots: list[str]  # where jobs may write stores
    url_schemes: list[str]  # remote URL schemes jobs may name
    failure: str | None = None


class ErrorBody(BaseModel):
    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 404, 409, 413, 422)
}


@dataclass
class Service:
    settings: ServeConfig
    queue: JobQueue
    runner: JobRunner
    token: str | None
    policy: PathPolicy


def job_status(job: Job, now: float | None = None) -> JobStatus:
    return JobStatus(
        id=job.id, state=job.state, prompts=job.spec.get("prompts", ""), store=job.spec.get("store", ""),  # type: ignore[arg-type]
        records_done=job.records_done, records_total=job.records_total, tokens_done=job.tokens_done,
        eta_seconds=job.eta_seconds(now or time.time()), error=job.error, input_errors=job.input_errors,
        input_error_count=job.input_error_count, cancel_requested=job.cancel_requested, attempts=job.attempts,
        created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at, spec=job.spec,
        summary=job.summary,
    )


def create_app(service: Service) -> FastAPI:
    settings, queue, runner, policy = service.settings, service.queue, service.runner, service.policy

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The job thread lives as long as the app. At shutdown (SIGINT / SIGTERM) it stops after
        # its current batch, before uvicorn returns and re-raises the signal.
        runner.start()
        yield
        if not await anyio.to_thread.run_sync(runner.shutdown, SHUTDOWN_WAIT_S):
            log.warning("the running job did not stop within %.0f s; it resumes at the next start", SHUTDOWN_WAIT_S)

    app = FastAPI(
        title="potstill generation service",
        description="Runs `potstill generate` jobs one after another on a teacher loaded once.",
        version="1",
        lifespan=lifespan,
    )
    _install_error_format(app)
    if service.token is not None:
        app.add_middleware(TokenCheck, token=service.token)
    # Added last, so they run first: a refused request never reaches the token check or the routes.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    if service.token is None or settings.allow_host:  # with a token, rebinding gains nothing: opt-in
        app.add_middleware(HostCheck, allowed=allowed_hosts(settings.host, settings.allow_host))

    @app.post("/jobs", status_code=201, response_model=JobStatus, responses=ERRORS)
    def submit_job(spec: specs.JobSpec) -> JobStatus:  # type: ignore[valid-type]
        """Queue a generation job; 422 names the first setting that is wrong or not allowed."""
        given = specs.given_settings(spec)
        try:
            specs.check_spec(given, settings, policy, resolved_device=runner.teacher.device,
                             vocab_size=runner.teacher.spec.vocab_size)
        except specs.SpecError as e:
            raise HTTPException(422, str(e)) from None
        job = queue.add(given, settings.teacher)
        runner.notify()
        return job_status(job)

    @app.get("/jobs", response_model=list[JobStatus], responses=ERRORS)
    def list_jobs(state: State | None = None,
                  limit: int | None = Query(None, ge=1, le=MAX_LIST_LIMIT)) -> list[JobStatus]:
        """Every job (or those in `state`), oldest first; with `limit`, the newest `limit` of them."""
        now = time.time()
        return [job_status(j, now) for j in queue.list_jobs(state, limit)]

    @app.get("/jobs/{job_id}", response_model=JobStatus, responses=ERRORS)
    def get_job(job_id: str) -> JobStatus:
        job = queue.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        return job_status(job)

    @app.delete("/jobs/{job_id}", response_model=JobStatus, responses=ERRORS)
    def cancel_job(job_id: str) -> JobStatus:
        """Cancel: a queued job at once; a running one stops after its current batch (what is
        committed stays). Cancelling a cancelled job is a no-op; a done or failed one is a 409."""
        job = queue.request_cancel(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        if job.state in ("done", "failed"):
            raise HTTPException(409, f"job {job_id} is already {job.state}")
        if job.state == "running":
            runner.cancel(job_id)
        return job_status(job)

    @app.get("/health", response_model=Health, responses=ERRORS)
    def health() -> Health:
        return Health(
            status=runner.status,  # type: ignore[arg-type]
            teacher=settings.teacher, backend=settings.backend, device=runner.teacher.device,
            running=runner.current, jobs=queue.counts(), auth=service.token is not None, failure=runner.failure,
            **policy.describe(),
        )

    return app


def _install_error_format(app: FastAPI) -> None:
    """422s for malformed bodies as one line naming the field, like the service's own checks."""

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
            message = err.get("msg", "invalid")
            if err.get("type") == "extra_forbidden":
                message = "unknown setting (not a potstill generate option)"
            if tuple(err.get("loc", ())) == ("query", "limit"):
                message = f"{message}; give a whole number from 1 to {MAX_LIST_LIMIT:,}"
            parts.append(f"{where}: {message}")
        return JSONResponse({"detail": "; ".join(parts)}, status_code=422)
