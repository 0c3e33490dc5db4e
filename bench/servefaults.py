"""kill -9 of `potstill serve` in the middle of a job, from outside, at seeded moments: the service
is started again on the same state folder each time, and the job must finish exactly once: done,
every record of an uninterrupted `generate` run of the same settings once and byte for byte, the
store verified with nothing left behind, and each crash counted as an attempt.

Shared by bench/reliability.py (the serve row of the kill campaigns).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from faultcampaigns import (
    ENV,
    FINAL,
    REPO,
    count_entries,
    store_invariants,
    strays,
    tally,
)

# The job's settings: those of faultcampaigns.generate_args, so that its records equal that run's.
JOB = {"shard_records": 2, "writer_threads": 2, "batch_tokens": 1, "hidden_layers": [0, -1],
       "hidden_chunk_tokens": 8, "targets": "topk", "top_k": 8}


@dataclass
class Service:
    proc: subprocess.Popen
    url: str


def start(teacher: str, state: str, data_root: str, timeout: float = 180) -> Service:
    """`potstill serve --port 0`, in its own process group, once it answers ready."""
    import httpx

    service_file = os.path.join(state, "service.json")
    with contextlib.suppress(FileNotFoundError):
        os.remove(service_file)
    log = open(os.path.join(state, f"serve-{time.monotonic_ns()}.log"), "w")  # noqa: SIM115 (the child keeps it)
    proc = subprocess.Popen([sys.executable, "-m", "potstill.cli.main", "serve", "--teacher", teacher, "--device",
                             "cpu", "--state", state, "--port", "0", "--data-root", data_root, "--max-crashes", "6"],
                            stdout=log, stderr=subprocess.STDOUT, env=ENV, cwd=REPO, start_new_session=True)
    log.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with open(service_file) as f:
                info = json.load(f)
            if info["pid"] == proc.pid and httpx.get(f"{info['url']}/health", timeout=5).json()["status"] == "ready":
                return Service(proc, info["url"])
        except (FileNotFoundError, ValueError, KeyError, httpx.TransportError):
            pass
        time.sleep(0.05)
    kill(proc)
    raise RuntimeError(f"the service did not start (exit {proc.poll()})")


def kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@dataclass
class ServeRound:
    name: str
    kills: list[str] = field(default_factory=list)  # what each landed kill was
    violations: list[str] = field(default_factory=list)
    lost: int = 0
    doubled: int = 0
    altered: int = 0

    @property
    def survived(self) -> int:
        return 0 if self.violations else len(self.kills)


def serve_round(teacher: str, prompts: str, workdir: str, reference: dict[str, Any], kills: int,
                rng: random.Random, name: str, log: Callable[[str], None] | None = None) -> ServeRound:
    """Submit one job, kill the service `kills` times while it runs it (a seeded delay after the N-th
    new commit record), restarting it after each; then let it finish."""
    import httpx

    result = ServeRound(name)
    state, store = os.path.join(workdir, f"{name}-state"), os.path.join(workdir, f"{name}.store")
    os.makedirs(state)
    service = start(teacher, state, workdir)
    with httpx.Client(base_url=service.url, timeout=30) as client:
        response = client.post("/jobs", json={"prompts": prompts, "store": store, **JOB})
        if response.status_code != 201:
            kill(service.proc)
            result.violations.append(f"the job was refused: {response.status_code} {response.text[:200]}")
            return result
        job = response.json()["id"]
    commits = os.path.join(store, "commits")
    for _ in range(kills):
        base = count_entries(commits)
        # (both after a new commit record: the job is running again, not the service still starting)
        n = rng.randint(1, 2)
        delay = round(rng.uniform(0.0, 0.05) if rng.random() < 0.5 else rng.uniform(0.0, 0.5), 3)
        what = f"kill -9 {delay:.3f} s after the {n}th new commit record"
        ready = lambda n=n, base=base: count_entries(commits) >= base + n  # noqa: E731
        deadline, asked = time.monotonic() + 300, time.monotonic()
        finished = False
        while not ready() and service.proc.poll() is None and time.monotonic() < deadline and not finished:
            time.sleep(0.003)
            if time.monotonic() > asked + 0.5:
                finished, asked = _job(service.url, job).get("state") == "done", time.monotonic()
        time.sleep(delay)
        if finished or _job(service.url, job).get("state") == "done":
            break  # the job ended first: no kill lands, and the final check asks this service
        kill(service.proc)
        result.kills.append(what)
        if log is not None:
            log(f"  serve {name} kill {len(result.kills)}: {what}")
        if os.path.exists(os.path.join(store, "manifest.json")):
            result.violations += store_invariants(store, reference, f"after kill {len(result.kills)}",
                                                  leftovers_allowed=True)
        service = start(teacher, state, workdir)
    deadline = time.monotonic() + 600
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = _job(service.url, job)
        if status.get("state") in ("done", "failed", "cancelled"):
            break
        time.sleep(0.1)
    service.proc.send_signal(signal.SIGTERM)
    try:
        service.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        kill(service.proc)
    if status.get("state") != "done":
        result.violations.append(f"{FINAL}: the job ended {status.get('state')}: {status.get('error')}")
    elif status.get("records_done") != len(reference):
        result.violations.append(f"{FINAL}: the job counts {status.get('records_done')} records of {len(reference)}")
    elif status.get("attempts") != len(result.kills) + 1:
        result.violations.append(f"{FINAL}: {status.get('attempts')} attempts after {len(result.kills)} kills")
    result.violations += store_invariants(store, reference, FINAL, leftovers_allowed=False)
    result.violations += [f"{FINAL}: {s} remains in the store" for s in strays(store)]
    result.lost, result.doubled, result.altered = tally(store, reference)
    if result.lost:
        result.violations.append(f"{FINAL}: {result.lost} record(s) missing")
    return result


def _job(url: str, job: str) -> dict[str, Any]:
    import httpx

    try:
        return httpx.get(f"{url}/jobs/{job}", timeout=10).json()
    except (httpx.TransportError, ValueError):
        return {}
