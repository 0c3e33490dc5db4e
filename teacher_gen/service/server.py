"""`serve(settings)`: start the generation service and run until SIGINT / SIGTERM.

Order: the bearer-token rule and the path policy's roots and schemes (before anything is written),
the state folder and its lock (one service per state folder: two would run the same job twice), a
quick teacher check (config and tokenizer, which also gives the vocabulary size that caps `top_k`:
a wrong name fails in one line before the service listens), the socket, then uvicorn. The weights
load in the job thread while the API already answers (/health says `loading`); if they cannot
load, the service stops with that reason.

On SIGINT / SIGTERM uvicorn stops taking requests and the app's shutdown stops the running job
after its current batch (it stays `running` and resumes first at the next start); uvicorn then
re-raises the signal, and the OS releases the lock.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from typing import Any

from potstill.teacher_gen.service.paths import PathPolicy
from potstill.teacher_gen.service.settings import ServeConfig, ServiceError, server_token

log = logging.getLogger("potstill.serve")


def require_serve_extra() -> None:
    """`potstill serve` needs FastAPI and uvicorn: say so in one line, before anything is written."""
    import importlib.util

    missing = []
    for name in ("fastapi", "uvicorn"):
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a module set to None in sys.modules, or a broken one
            found = False
        if not found:
            missing.append(name)
    if missing:
        raise ServiceError(f"potstill serve needs {' and '.join(missing)}: pip install 'potstill[serve]'")


def serve(settings: ServeConfig) -> None:
    require_serve_extra()
    token = server_token(settings.host, settings.token_file)
    policy = PathPolicy.from_settings(settings)
    _setup_logging()
    try:
        os.makedirs(settings.state, exist_ok=True)
    except OSError as e:
        raise ServiceError(f"--state {settings.state}: cannot create the state folder ({e.strerror})") from None
    lock = _lock_state(settings.state)
    try:
        _serve_locked(settings, token, policy)
    finally:
        lock.close()


def _serve_locked(settings: ServeConfig, token: str | None, policy: PathPolicy) -> None:
    import uvicorn

    from potstill.teacher_gen.service.app import Service, create_app
    from potstill.teacher_gen.service.jobqueue import JobQueue
    from potstill.teacher_gen.service.worker import JobRunner, ServiceTeacher

    teacher = ServiceTeacher(settings)
    teacher.check()
    queue = JobQueue(os.path.join(settings.state, "jobs.sqlite"))
    sock = bind_socket(settings.host, settings.port)
    port = sock.getsockname()[1]
    url = f"http://{_url_host(settings.host)}:{port}"
    runner = JobRunner(queue, settings, policy, teacher, os.path.join(settings.state, "inputs"))
    app = create_app(Service(settings, queue, runner, token, policy))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5))
    runner.on_fatal = lambda _reason: setattr(server, "should_exit", True)
    _write_service_file(settings.state, url, settings)

    log.info("serving %s on %s (state %s, %s)", settings.teacher, url, os.path.abspath(settings.state),
             "bearer token required" if token else "no token: local connections only")
    _log_policy(policy)
    try:
        server.run(sockets=[sock])  # the app's lifespan starts and stops the job thread
    finally:
        queue.close()
        sock.close()
    if runner.failure:
        raise ServiceError(f"cannot load the teacher: {runner.failure}")


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready socket on (host, port); port 0 picks a free one."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)  # before service.json names the port: a client that reads it can connect at once
    except OSError as e:
        raise ServiceError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def _lock_state(state: str) -> Any:
    """Hold an exclusive lock on <state>/lock for the life of the process (freed by the OS on kill -9)."""
    import fcntl

    path = os.path.join(state, "lock")
    f = open(path, "a+")  # noqa: SIM115 - held open until the service ends
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise ServiceError(f"state folder {state} is in use by another potstill serve ({holder})") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


def _write_service_file(state: str, url: str, settings: ServeConfig) -> None:
    """<state>/service.json: where this service listens (how tests and scripts find a --port 0 service)."""
    info = {"url": url, "pid": os.getpid(), "teacher": settings.teacher, "backend": settings.backend}
    tmp = os.path.join(state, "service.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(info, f)
    os.replace(tmp, os.path.join(state, "service.json"))


def _log_policy(policy: PathPolicy) -> None:
    paths = policy.describe()
    log.info("jobs may read %s, write %s, open URLs %s", ", ".join(paths["read_roots"]) or "nothing",
             ", ".join(paths["write_roots"]) or "nothing",
             ", ".join(s + "://" for s in paths["url_schemes"]) or "of no scheme")
    if not (paths["read_roots"] or paths["url_schemes"]):
        log.warning("no --data-root, --read-root or --allow-url-scheme: every job will be refused")


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return socket.gethostname()
    return f"[{host}]" if ":" in host else host


def _setup_logging() -> None:
    logger = logging.getLogger("potstill.serve")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s potstill serve: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
