"""`ServiceClient`: talk to a `potstill serve` over HTTP (used by `potstill jobs` and bench/serve_load.py).

Every failure is a `ServiceError` with one line: the service cannot be reached, refused the token,
knows no such job, or refused the spec (its 422 message names the setting).
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from teacher_gen.service.settings import TOKEN_ENV, ServiceError

FINISHED = ("done", "failed", "cancelled")


class ServiceClient:
    def __init__(self, server: str, token: str | None = None, timeout: float = 30.0) -> None:
        if not server.startswith(("http://", "https://")):
            raise ServiceError(f"--server {server!r}: expected an http:// or https:// URL")
        self.server = server.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.server, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise ServiceError(f"the service at {self.server} did not answer {method} {path} in time") from None
        except httpx.HTTPError as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ServiceError(f"cannot reach the potstill service at {self.server} ({reason}); "
                               "is `potstill serve` running there?") from None
        if response.status_code < 400:
            return response.json()
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text.strip() or response.reason_phrase
        if response.status_code == 401:
            raise ServiceError(f"the service at {self.server} refused the request (401: {detail}); "
                               f"set ${TOKEN_ENV} or --token-file to its token")
        if response.status_code == 422:
            raise ServiceError(f"the service refused the job: {detail}")
        raise ServiceError(f"{detail} ({method} {path}: HTTP {response.status_code})")

    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/jobs", json=spec)

    def status(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/jobs/{job_id}")

    def list(self, state: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        params = {k: v for k, v in (("state", state), ("limit", limit)) if v is not None}
        return self._call("GET", "/jobs", params=params)

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("DELETE", f"/jobs/{job_id}")

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/health")

    def wait(self, job_id: str, *, poll_s: float = 1.0, timeout_s: float | None = None) -> dict[str, Any]:
        """Poll until the job is done, failed or cancelled; its last status."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            status = self.status(job_id)
            if status["state"] in FINISHED:
                return status
            if deadline is not None and time.monotonic() >= deadline:
                raise ServiceError(f"job {job_id} is still {status['state']} after {timeout_s:g} s")
            time.sleep(poll_s)


def describe(status: dict[str, Any]) -> str:
    """One line for a job status, as `potstill jobs status` prints it."""
    total = status.get("records_total")
    records = f"{status['records_done']}/{total}" if total is not None else str(status["records_done"])
    parts = [f"job {status['id']}: {status['state']}", f"{records} records", f"{status['tokens_done']:,} tokens"]
    eta = status.get("eta_seconds")
    if eta is not None:
        parts.append(f"ETA {format_seconds(eta)}")
    if status.get("input_error_count"):
        parts.append(f"{status['input_error_count']} bad inputs skipped")
    if status.get("cancel_requested") and status["state"] == "running":
        parts.append("cancelling after the current batch")
    line = ", ".join(parts)
    if status.get("error"):
        line += f"\n  error: {status['error']}"
    return line


def format_seconds(seconds: float) -> str:
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
