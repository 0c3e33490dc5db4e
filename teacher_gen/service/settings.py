"""`ServeConfig`: the settings of `potstill serve`, and the bearer token shared with `potstill jobs`.

A YAML or TOML file (`--config FILE`, keys as flags, optionally under a `serve` section) and CLI
flags fill the dataclass, flags winning. The teacher settings default to `GenerateConfig`'s, so
`potstill generate` and a job run on the service resolve a teacher the same way. Repeatable flags
(`--data-root`, ...) are lists; a file may give one value or a list.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any

from potstill.store.errors import PotstillError
from potstill.teacher_gen.config import Backend, GenerateConfig, coerce_setting

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

_G = GenerateConfig()


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
    teacher: str = ""
    backend: Backend = _G.backend
    tokenizer: str | None = _G.tokenizer
    revision: str | None = _G.revision
    dtype: str = _G.dtype
    device: str = _G.device
    trust_remote_code: bool = _G.trust_remote_code
    gpu_memory_utilization: float | None = _G.gpu_memory_utilization
    tensor_parallel_size: int = _G.tensor_parallel_size
    enforce_eager: bool | None = _G.enforce_eager
    max_top_k: int = 256  # vLLM: the engine's max_logprobs, the largest top_k a job may ask for

    # -- the service ---------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT  # 0: any free port (written to <state>/service.json)
    state: str = ".potstill-serve"  # SQLite queue, lock, fetched prompt sets
    token_file: str | None = None  # else $POTSTILL_TOKEN; required unless host is loopback
    max_crashes: int = 3  # a job found running this many times after a crash is failed, not retried

    # -- what a job may touch (the path policy, teacher_gen/service/paths.py) -------------------
    data_root: list[str] = field(default_factory=list)  # folders jobs may read prompts from and write stores to
    read_root: list[str] = field(default_factory=list)  # folders jobs may read prompts from
    write_root: list[str] = field(default_factory=list)  # folders jobs may write (and read) stores in
    allow_url_scheme: list[str] = field(default_factory=list)  # remote schemes jobs may name (s3, gs...)

    # -- HTTP limits -----------------------------------------------------------------------------
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # larger request bodies get 413
    allow_host: list[str] = field(default_factory=list)  # Host names accepted besides loopback and --host

    @classmethod
    def build(cls, config_file: str | None = None, **overrides: Any) -> ServeConfig:
        """Defaults, then the file, then the non-None overrides (CLI flags); checked."""
        values: dict[str, Any] = {}
        if config_file:
            data = GenerateConfig.from_file(config_file)
            if isinstance(data.get("serve"), dict):
                data = {str(k).replace("-", "_"): v for k, v in data["serve"].items()}
            values.update(data)
        values.update({k: v for k, v in overrides.items() if v is not None})
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in values.items():
            if key not in known:
                where = f"config file {config_file}" if config_file else "settings"
                raise ServiceError(f"{where}: unknown setting {key!r}")
            kwargs[key] = _string_list(key, value) if hints[key] == list[str] else coerce_setting(key, value, hints[key])
        config = cls(**kwargs)
        config.validate()
        return config

    def validate(self) -> None:
        if not self.teacher:
            raise ServiceError("--teacher is required")
        if not 0 <= self.port <= 65535:
            raise ServiceError(f"--port must be in 0..65535, got {self.port}")
        if self.max_crashes < 1:
            raise ServiceError("--max-crashes must be at least 1")
        if self.max_top_k < 1:
            raise ServiceError("--max-top-k must be at least 1")
        if not self.host:
            raise ServiceError("--host is empty")
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


def _string_list(key: str, value: Any) -> list[str]:
    """A repeatable setting: one string, or a list of strings."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(x, str) and x for x in items):
        raise ServiceError(f"--{key.replace('_', '-')}: expected a string or a list of strings, got {value!r}")
    return list(items)
