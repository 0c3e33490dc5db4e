"""The generation image's HEALTHCHECK: is the `potstill serve` in this container answering?

    python3 /opt/potstill/healthcheck.py [PID]       (PID: the container's main process, default 1)

Exit 0 when the service answers `GET /health` with status `loading` or `ready`; exit 1 when it does
not answer or reports `failed`. A container running a batch job (`potstill generate`, ...) has no
service to probe and is healthy while it runs. The service's address comes from the
`<state>/service.json` it writes once it listens (so `--port 0` and any `--host` work), else from
`--port` (default 8000); the bearer token from `--token-file` or $POTSTILL_TOKEN, as the service reads
it. Standard library only: it runs with the image's Python and nothing else.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from urllib.parse import urlsplit, urlunsplit

DEFAULT_PORT = 8000
DEFAULT_STATE = ".potstill-serve"  # `potstill serve --state`'s default, relative to its working folder


def option(argv: list[str], name: str) -> str | None:
    """The value of `--name VALUE` or `--name=VALUE` (the last one given), as typer reads it."""
    value = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def serve_argv(pid: str) -> tuple[list[str], str] | None:
    """The arguments after `serve` of a `potstill serve` process, and its working folder; None for
    any other command."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None
    if "serve" not in argv:
        return None
    return argv[argv.index("serve") + 1 :], cwd


def health_url(argv: list[str], cwd: str) -> str:
    state = option(argv, "--state") or DEFAULT_STATE
    try:
        with open(os.path.join(cwd, state, "service.json"), encoding="utf-8") as f:
            url = json.load(f)["url"]
    except (OSError, ValueError, KeyError):
        url = f"http://127.0.0.1:{option(argv, '--port') or DEFAULT_PORT}"
    parts = urlsplit(url)
    if parts.hostname in ("0.0.0.0", "::", None):  # listening on every address: ask on loopback
        parts = parts._replace(netloc=f"127.0.0.1:{parts.port or DEFAULT_PORT}")
    return urlunsplit(parts).rstrip("/") + "/health"


def token(argv: list[str], cwd: str) -> str | None:
    token_file = option(argv, "--token-file")
    if token_file:
        try:
            with open(os.path.join(cwd, token_file), encoding="utf-8") as f:
                return f.read().strip() or None
        except OSError:
            return None
    return os.environ.get("POTSTILL_TOKEN") or None


def main(pid: str = "1") -> int:
    found = serve_argv(pid)
    if found is None:
        return 0  # a batch job: nothing listens, nothing to probe
    argv, cwd = found
    url = health_url(argv, cwd)
    request = urllib.request.Request(url)
    secret = token(argv, cwd)
    if secret:
        request.add_header("Authorization", f"Bearer {secret}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            status = json.load(response).get("status")
    except (OSError, ValueError) as e:  # refused, timed out, 401, not JSON
        print(f"unhealthy: {url}: {e}")
        return 1
    if status in ("loading", "ready"):
        return 0
    print(f"unhealthy: {url} says status {status!r}")
    return 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
