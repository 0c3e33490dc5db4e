"""`ServeConfig`: the settings of `potstill serve`, and the bearer token shared with `potstill jobs`.

A YAML, TOML or JSON file (`--config FILE`, keys as the fields, optionally under a `serve` section)
and CLI flags fill the dataclass, flags winning (potstill/settings.py). The teacher settings are
`GenerateConfig`'s, with its defaults and help, so `potstill generate` and a job run on the service
resolve a teacher the same way. Repeatable flags (`--data-root`, ...) are lists; a file may give one
value or a list.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from typing import Any

from potstill.settings import check_settings, load_settings, same_as, setting
from potstill.store.errors import PotstillError
from potstill.teacher_gen.config import Backend, GenerateConfig

TOKEN_ENV = "POTSTILL_TOKEN"
SERVER_ENV = "POTSTILL_SERVER"
DEFAULT_PORT = 8000  # as in docker/generate.Dockerfile
DEFAULT_SERVER = f"http://127.0.0.1:{DEFAULT_PORT}"
MIN_TOKEN_CHARS = 16
DEFAULT_MAX_BODY_BYTES = 4 << 20  # a job spec is a few hundred bytes; 4 MiB leaves room for long templates
URL_SCHEME_RE = re.compile(r"^[a-z][a-z0-9+.-]*$")

# `GenerateConfig` settings fixed when the teacher is loaded: a job may repeat the service's value
# but not ask for another one (that would need another model load).
LOAD_FIELDS = ("teacher", "backend", "tokenizer", "revision", "dtype", "device", "trust_remote_code",
               "gpu_memory_utilization", "tensor_parallel_size", "enforce_eager")


class ServiceError(PotstillError):
    """The service cannot start, or a client cannot talk to it; one line for the user."""


class SpecError(PotstillError):
    """A job spec the service refuses (422 at submission; the job's `error` at run time).
    `field` is the setting at fault."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


@dataclass
class ServeConfig:
    # -- the teacher, loaded once (same meaning and defaults as in `potstill generate`) ----------
    teacher: str = same_as(GenerateConfig, "teacher", help="Teacher, loaded once: hub name, local folder or .gguf file.")
    backend: Backend = same_as(GenerateConfig, "backend")
    tokenizer: str | None = same_as(GenerateConfig, "tokenizer")
    revision: str | None = same_as(GenerateConfig, "revision")
    dtype: str = same_as(GenerateConfig, "dtype")
    device: str = same_as(GenerateConfig, "device")
    trust_remote_code: bool = same_as(GenerateConfig, "trust_remote_code", help="Allow the teacher's own modeling code (jobs cannot turn it on).")
    gpu_memory_utilization: float | None = same_as(GenerateConfig, "gpu_memory_utilization")
    tensor_parallel_size: int = same_as(GenerateConfig, "tensor_parallel_size")
    enforce_eager: bool | None = same_as(GenerateConfig, "enforce_eager")
    max_top_k: int | None = setting(None, shown_default="none: up to the teacher's vocabulary",
                                    help="Largest --top-k a job may ask for.")

    # -- the service ---------------------------------------------------------------------------
    host: str = setting("127.0.0.1", help="Address to listen on; anything but loopback needs a token.")
    port: int = setting(DEFAULT_PORT, help="Port (0: any free one, written to <state>/service.json).")
    state: str = setting(".potstill-serve", help="Folder of the job queue (SQLite) and the service's files.")
    token_file: str | None = setting(None, shown_default=f"none: the token is ${TOKEN_ENV}, if set",
                                     help="File holding the bearer token.")
    max_crashes: int = setting(3, help="Fail a job after the service died this often while running it.")

    # -- what a job may touch (the path policy, teacher_gen/service/paths.py) -------------------
    data_root: list[str] = setting(factory=list, metavar="DIR", help=(
        "Folder jobs may read prompt sets from and write stores to (repeatable). Without any root, "
        "jobs can name no local path."))
    read_root: list[str] = setting(factory=list, metavar="DIR",
                                   help="Folder jobs may read prompt sets from (repeatable).")
    write_root: list[str] = setting(factory=list, metavar="DIR",
                                    help="Folder jobs may write (and read) stores in (repeatable).")
    allow_url_scheme: list[str] = setting(factory=list, metavar="SCHEME",
                                          help="Remote URL scheme jobs may name, e.g. s3 or gs (repeatable).")

    # -- HTTP limits -----------------------------------------------------------------------------
    max_body_bytes: int = setting(DEFAULT_MAX_BODY_BYTES, help="Largest request body; larger ones get 413.")
    allow_host: list[str] = setting(factory=list, metavar="NAME", help=(
        "Host name to answer to besides loopback and --host (repeatable; checked when no token is set, "
        "or whenever given)."))

    @classmethod
    def build(cls, config_file: str | None = None, **overrides: Any) -> ServeConfig:
        """Defaults, then the file (keys as the fields, optionally under `serve`), then the non-None
        overrides (CLI flags); checked."""
        return load_settings(cls, config_file, overrides, error=ServiceError, section="serve")

    def validate(self) -> None:
        check_settings(self, ServiceError)
        if not 0 <= self.port <= 65535:
            raise ServiceError(f"--port must be in 0..65535, got {self.port}")
        if self.max_crashes < 1:
            raise ServiceError("--max-crashes must be at least 1")
        if self.max_top_k is not None and self.max_top_k < 1:
            raise ServiceError("--max-top-k must be at least 1")
        if not self.host:
            raise ServiceError("--host is empty")
        if os.path.exists(self.state) and not os.path.isdir(self.state):
            raise ServiceError(f"--state {self.state}: exists and is not a folder (the service keeps its queue in it)")
        if self.max_body_bytes < 1024:
            raise ServiceError(f"--max-body-bytes must be at least 1024, got {self.max_body_bytes}")
        self.allow_url_scheme = [s.lower().removesuffix("://") for s in self.allow_url_scheme]
        for scheme in self.allow_url_scheme:
            if not URL_SCHEME_RE.match(scheme):
                raise ServiceError(f"--allow-url-scheme {scheme!r}: expected a URL scheme such as s3 or gs")
        self.allow_host = [h.lower() for h in self.allow_host]
        for name in self.allow_host:
            if not name or "/" in name or any(c.isspace() for c in name):
                raise ServiceError(f"--allow-host {name!r}: expected a host name such as gpu-box.internal")

    def load_settings(self) -> dict[str, Any]:
        """The `GenerateConfig` values of the loaded teacher (`LOAD_FIELDS`)."""
        return {name: getattr(self, name) for name in LOAD_FIELDS}


def is_loopback(host: str) -> bool:
    """True when `host` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_token(token_file: str | None) -> str | None:
    """The bearer token: the file's content (stripped) if a file is given, else $POTSTILL_TOKEN."""
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as f:
                text = f.read().strip()
        except OSError as e:
            raise ServiceError(f"--token-file {token_file}: cannot read it ({e.strerror})") from None
        if not text:
            raise ServiceError(f"--token-file {token_file} is empty")
        return text
    return os.environ.get(TOKEN_ENV, "").strip() or None


def server_token(host: str, token_file: str | None) -> str | None:
    """The token the service demands, or None (loopback only); refuses an open non-loopback bind."""
    token = read_token(token_file)
    if token is None and not is_loopback(host):
        raise ServiceError(
            f"--host {host} accepts connections from other machines: give a bearer token in ${TOKEN_ENV} "
            f"or --token-file (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise ServiceError(f"the bearer token has {len(token)} characters; use at least {MIN_TOKEN_CHARS}")
    return token
