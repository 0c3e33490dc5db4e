"""S3 that misbehaves: a small HTTP proxy between potstill (s3fs) and an S3 server (moto) that answers
some requests with 500 InternalError or 503 SlowDown, holds some past the client's read timeout,
and drops the connection on others (before the request reaches S3, or after S3 applied it: the
client cannot tell whether a PUT happened). Which request gets which fault is drawn from a seeded
generator; the proxy counts the faults it injected, i.e. what reached the client (s3fs and botocore
retry most of them unseen).

    proxy = FaultProxy("http://127.0.0.1:5000", seed=7, rate=0.1)
    url = proxy.start()          # point AWS_ENDPOINT_URL at it
    ...
    proxy.stop(); proxy.injected # {"500": 3, "503 SlowDown": 2, "timeout": 1, "drop": 2}

Shared by bench/reliability.py (the `s3` campaign) and tests/test_s3_faults.py.
"""

from __future__ import annotations

import http.client
import http.server
import json
import logging
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from diskfaults import one_line_refusal
from faultcampaigns import ENV, FINAL, REPO, Outcome, compare_records, repeated, store_contents, tally

FAULTS = ("500", "503 SlowDown", "timeout", "drop before", "drop after")
# botocore's read timeout for these runs (FSSPEC_S3 in `client_env`): a held request outlasts it
READ_TIMEOUT_S = 1.0
_ERRORS = {
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "503 SlowDown": (503, "SlowDown", "Please reduce your request rate."),
}
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "upgrade", "trailer"}


def client_env(endpoint: str) -> dict[str, str]:
    """The environment of a potstill process whose s3:// traffic goes to `endpoint`, with short
    timeouts (so that a held request fails in seconds) and botocore's standard retries."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "FSSPEC_S3": json.dumps({"config_kwargs": {"read_timeout": READ_TIMEOUT_S, "connect_timeout": READ_TIMEOUT_S,
                                                   "retries": {"max_attempts": 3, "mode": "standard"}}}),
    }


class FaultProxy:
    """A threaded HTTP proxy to `upstream` injecting a fault into about `rate` of the requests."""

    def __init__(self, upstream: str, seed: int, rate: float, faults: tuple[str, ...] = FAULTS) -> None:
        self.upstream = urlsplit(upstream)
        self.rng = random.Random(seed)
        self.rate = rate
        self.faults = faults
        self.lock = threading.Lock()
        self.injected: Counter[str] = Counter()
        self.requests = 0
        self.server: http.server.ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> str:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def handle_one(self) -> None:
                proxy.forward(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_one

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def draw(self) -> str | None:
        with self.lock:
            self.requests += 1
            if self.rng.random() >= self.rate:
                return None
            fault = self.rng.choice(self.faults)
            self.injected[fault] += 1
            return fault

    def forward(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        body = _read_body(handler)
        fault = self.draw()
        if fault in _ERRORS:
            status, code, message = _ERRORS[fault]
            xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                   f"<RequestId>potstill-fault</RequestId></Error>").encode()
            handler.send_response(status)
            handler.send_header("Content-Type", "application/xml")
            handler.send_header("Content-Length", str(len(xml)))
            handler.end_headers()
            if handler.command != "HEAD":
                handler.wfile.write(xml)
            return
        if fault == "drop before":
            _drop(handler)
            return
        if fault == "timeout":
            time.sleep(READ_TIMEOUT_S * 1.5)  # the client has given up on this one; S3 never sees it
            _drop(handler)
            return
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
        try:
            headers = {k: v for k, v in handler.headers.items() if k.lower() not in _HOP}
            if body is not None:
                headers["Content-Length"] = str(len(body))
            conn.request(handler.command, handler.path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        if fault == "drop after":  # S3 applied it; the client never hears so
            _drop(handler)
            return
        handler.send_response(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in _HOP and key.lower() != "content-length":
                handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(data)


def _read_body(handler: http.server.BaseHTTPRequestHandler) -> bytes | None:
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(handler.rfile.readline().strip().split(b";")[0], 16)
            if size == 0:
                while handler.rfile.readline().strip():  # trailers
                    pass
                return b"".join(chunks)
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else (b"" if handler.command in ("PUT", "POST") else None)


def _drop(handler: http.server.BaseHTTPRequestHandler) -> None:
    """Close the connection with no answer (a reset, as a crashed load balancer leaves it)."""
    handler.close_connection = True
    try:
        handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        handler.connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


# -- trials ----------------------------------------------------------------------------------------
@dataclass
class S3Trial:
    name: str
    injected: int = 0  # faults the proxy answered with (what reached the client)
    failed_runs: int = 0  # faulted runs that gave up (their retries exhausted)
    survived: int = 0
    lost: int = 0
    doubled: int = 0
    altered: int = 0
    violations: list[str] = field(default_factory=list)


class S3Server:
    """moto's S3 server on a free port of 127.0.0.1, with a bucket; this process's s3:// goes to it."""

    def __init__(self, bucket: str = "potstill-faults") -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # (a line a request otherwise)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.server.start()
        self.endpoint = f"http://127.0.0.1:{port}"
        self.saved = {k: os.environ.get(k) for k in client_env(self.endpoint)}
        os.environ.update(client_env(self.endpoint))
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem().mkdir(bucket)
        self.bucket = bucket

    def stop(self) -> None:
        self.server.stop()
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_through(args: list[str], endpoint: str, timeout: float = 600) -> Outcome:
    """`potstill ARGS` with its s3:// traffic sent to `endpoint`."""
    env = {**ENV, **client_env(endpoint)}
    proc = subprocess.run([sys.executable, "-m", "potstill.cli.main", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=timeout)
    return Outcome(None, False, proc.returncode, 0.0, proc.stdout, proc.stderr)


def s3_trial(s3: S3Server, args: list[str], url: str, reference: dict[str, Any], rng: random.Random, name: str,
             faulted_runs: int = 2, rates: tuple[float, float] = (0.05, 0.4)) -> S3Trial:
    """`potstill ARGS` (writing the store `url`) through a fault proxy `faulted_runs` times, each at a
    seeded fault rate (drawn from `rates`, a share of the requests), then once straight to S3: the
    store must end holding every record of `reference` once, byte for byte, and verify with nothing
    left behind. A faulted run
    may give up, in one line; after it what is committed must be the reference's, each once."""
    trial = S3Trial(name)
    for number in range(faulted_runs):
        proxy = FaultProxy(s3.endpoint, seed=rng.randrange(1 << 31), rate=rng.uniform(*rates))
        endpoint = proxy.start()
        try:
            outcome = run_through(args, endpoint)
        finally:
            proxy.stop()
        faults = sum(proxy.injected.values())
        trial.injected += faults
        where = f"faulted run {number + 1} ({faults} faults in {proxy.requests} requests)"
        if outcome.returncode != 0:
            trial.failed_runs += 1
            refusal = one_line_refusal(outcome)
            if refusal:
                trial.violations.append(f"{where}: {refusal}")
        trial.violations += store_checks(url, reference, where, leftovers_allowed=True)
    final = run_through(args, s3.endpoint)
    if final.returncode != 0:
        trial.violations.append(f"{FINAL}: exit {final.returncode}: {final.tail(3)}")
    trial.violations += store_checks(url, reference, FINAL, leftovers_allowed=False)
    trial.lost, trial.doubled, trial.altered = tally(url, reference)
    if trial.lost:
        trial.violations.append(f"{FINAL}: {trial.lost} record(s) missing")
    trial.survived = 0 if trial.violations else trial.injected
    return trial


def store_checks(url: str, reference: dict[str, Any], where: str, *, leftovers_allowed: bool) -> list[str]:
    """What is committed at `url` is the reference's, each record once; the store verifies."""
    from potstill.store import verify_store
    from potstill.store.fs import resolve

    fs, root = resolve(url)
    fs.invalidate_cache()
    if not fs.exists(f"{root}/manifest.json"):
        return [] if leftovers_allowed else [f"{where}: the store has no manifest"]
    try:
        ids, records = store_contents(url)
    except Exception as e:
        return [f"{where}: the store does not open: {type(e).__name__}: {e}"]
    problems = [f"{where}: record {rid!r} is committed more than once" for rid in repeated(ids)]
    problems += compare_records(records, reference, where)
    report = verify_store(url)
    problems += [f"{where}: verify: {p}" for p in report.problems]
    if not leftovers_allowed:
        problems += [f"{where}: leftover {left.path} ({left.kind}) remains" for left in report.leftovers]
    return problems
