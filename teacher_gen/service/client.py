"""`ServiceClient`: talk to a `potstill serve` over HTTP (used by `potstill jobs` and bench/serve_load.py).

Every failure is a `ServiceError` with one line: the service cannot be reached, refused the token,
knows no such job, or refused the spec (its 422 message names the setting).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from potstill.teacher_gen.service.settings import TOKEN_ENV, ServiceError

FINISHED = ("done", "failed", "cancelled")


class ServiceClient:
    """Standard library only (urllib): `potstill jobs` works on the base install, without the `[serve]` extra."""

    def __init__(self, server: str, token: str | None = None, timeout: float = 30.0) -> None:
        if not server.startswith(("http://", "https://")):
            raise ServiceError(f"--server {server!r}: expected an http:// or https:// URL")
        self.server = server.rstrip("/")
        self.timeout = timeout
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        # No proxy from the environment: the service is named directly, as a plain HTTP client would.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def close(self) -> None:
        """Nothing held open between calls (one connection per request)."""

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, *, json_body: Any = None, params: dict[str, Any] | None = None) -> Any:
        url = self.server + path + (f"?{urllib.parse.urlencode(params)}" if params else "")
        headers = dict(self._headers)
        data = None
        if json_body is not None:
            data = json.dumps(json_body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as e:
            status, reason, body = e.code, e.reason, e.read().decode(errors="replace")
        except TimeoutError:
            raise ServiceError(f"the service at {self.server} did not answer {method} {path} in time") from None
        except (urllib.error.URLError, OSError) as e:
            cause = getattr(e, "reason", e)
            if isinstance(cause, TimeoutError):
                raise ServiceError(f"the service at {self.server} did not answer {method} {path} in time") from None
            text = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
            raise ServiceError(f"cannot reach the potstill service at {self.server} ({text}); "
                               "is `potstill serve` running there?") from None
        except ValueError:
            raise ServiceError(f"the service at {self.server} answered {method} {path} with something not JSON") from None
        try:
            detail = json.loads(body).get("detail", body)
        except (ValueError, AttributeError):
            detail = body.strip() or str(reason)
        if status == 401:
            raise ServiceError(f"the service at {self.server} refused the request (401: {detail}); "
                               f"set ${TOKEN_ENV} or --token-file to its token")
        if status == 422:
            raise ServiceError(f"the service refused the job: {detail}")
        raise ServiceError(f"{detail} ({method} {path}: HTTP {status})")

    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/jobs", json_body=spec)

    def status(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/jobs/{urllib.parse.quote(job_id, safe='')}")

    def list(self, state: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        params = {k: v for k, v in (("state", state), ("limit", limit)) if v is not None}
        return self._call("GET", "/jobs", params=params)

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("DELETE", f"/jobs/{urllib.parse.quote(job_id, safe='')}")

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
