"""A real `potstill serve` process for the service tests (tests/test_serve*.py): start it on a free
port of 127.0.0.1, talk to it, wait for jobs, check the stores they wrote."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx
from genhelpers import run_cli
from storehelpers import committed_ids  # (the serve tests import it from here)

from potstill.store import verify_store

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "test-token-0123456789abcdef"


# -- a real service process ---------------------------------------------------------------------
@dataclass
class Service:
    proc: subprocess.Popen
    url: str
    state: str
    log: str

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_text(self) -> str:
        return _read(self.log)


def start_service(teacher: str, state: str, *extra: str, env: dict[str, str] | None = None,
                  token: str | None = None) -> Service:
    """Start `potstill serve --port 0` and wait until it listens and the teacher is loaded."""
    os.makedirs(state, exist_ok=True)
    log = os.path.join(state, f"serve-{time.monotonic_ns()}.log")
    service_file = os.path.join(state, "service.json")
    if os.path.exists(service_file):
        os.remove(service_file)
    full_env = {**os.environ, **(env or {})}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "potstill.cli.main", "serve", "--teacher", teacher, "--device", "cpu", "--state", state,
             "--port", "0", *extra],
            stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=REPO,
        )
    deadline = time.monotonic() + 120
    url = None
    while True:
        assert proc.poll() is None, _read(log)
        assert time.monotonic() < deadline, "the service did not start in 120 s:\n" + _read(log)
        if url is None and os.path.exists(service_file):
            info = json.loads(_read(service_file))
            if info["pid"] == proc.pid:
                url = info["url"]
        if url is not None:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            try:
                if httpx.get(f"{url}/health", headers=headers, timeout=10).json()["status"] == "ready":
                    return Service(proc, url, state, log)
            except httpx.TransportError:  # bound, but the app not serving yet
                pass
        time.sleep(0.1)


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def wait_job(client: httpx.Client, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = client.get(f"/jobs/{job_id}").json()
        if status["state"] in ("done", "failed", "cancelled"):
            return status
        assert time.monotonic() < deadline, f"job {job_id} still {status['state']} after {timeout} s"
        time.sleep(0.1)


def submit(client: httpx.Client, **spec) -> str:
    response = client.post("/jobs", json=spec)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def assert_complete(store: str, n: int) -> None:
    """Every id r0000..r{n-1} exactly once, and the store verifies with no leftovers."""
    ids = committed_ids(store)
    assert len(ids) == len(set(ids)) == n
    assert set(ids) == {f"r{i:04d}" for i in range(n)}
    report = verify_store(store)
    assert report.ok, [str(p) for p in report.problems]
    assert not report.leftovers


def jobs_cli(service: Service, *args: str, token: str | None = None) -> subprocess.CompletedProcess:
    env = {"POTSTILL_SERVER": service.url}
    if token:
        env["POTSTILL_TOKEN"] = token
    return run_cli(["jobs", *args], env=env, timeout=60)
