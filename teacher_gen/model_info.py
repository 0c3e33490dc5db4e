"""What the store must know about a teacher, read from its config alone (no weights loaded).

The store is created (or reopened) before the model is loaded, so a rerun that finds every
record already committed finishes without touching the GPU.
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass
from typing import Any

from potstill.store import TeacherInfo, config_hash
from potstill.teacher_gen.config import GenerateConfig
from potstill.teacher_gen.errors import GenerateError, describe_load_error
from potstill.teacher_gen.gguf import gguf_identity, pretrained_source

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "half": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


@dataclass
class TeacherSpec:
    hf_config: Any
    info: TeacherInfo
    dtype: str  # resolved: float32 / float16 / bfloat16
    num_layers: int
    hidden_size: int
    vocab_size: int


def _config_json(config: GenerateConfig) -> dict[str, Any] | None:
    """The teacher's config.json as stored (local folder or hub cache), for `teacher.config_hash`."""
    from transformers.utils import cached_file

    try:
        path = cached_file(config.teacher, "config.json", revision=config.revision,
                           _raise_exceptions_for_missing_entries=False)
    except Exception:  # offline hub, gated repo...: fall back to the parsed config
        return None
    if not path:
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def resolve_dtype(flag: str, hf_config: Any) -> str:
    if flag != "auto":
        if flag not in DTYPES:
            raise GenerateError(f"--dtype must be auto, float32, float16 or bfloat16; got {flag!r}")
        return DTYPES[flag]
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    for source in (text, hf_config):
        value = getattr(source, "dtype", None)  # (`torch_dtype` is its deprecated alias: reading it warns)
        if value is not None:
            name = str(value).replace("torch.", "")
            if name in DTYPES:
                return DTYPES[name]
    return "float32"


# A hub id: `name` or `owner/name` (a local path that does not exist is left to the loader's message).
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
PROBE_SECONDS = 2.0


_USABLE: set[tuple[str, str | None]] = set()  # (teacher, revision) found usable in this process


def check_hub_teacher(name: str, revision: str | None = None, error: type[Exception] = GenerateError) -> None:
    """Refuse at once, in one line, a hub teacher that is not in the local cache when the hub cannot be
    reached (`HF_HUB_OFFLINE`, or no connection): the hub client would otherwise retry for half a minute.

    When the hub cannot be reached but the teacher is cached, offline mode is switched on for this
    process, so that every later load reads the cache without trying the network first. A teacher
    found usable is not probed again in this process (the command checks before its start-up
    phases, the runner again for callers of the library)."""
    if os.path.exists(name) or not _HUB_ID.match(name) or name.lower().endswith(".gguf"):
        return
    if (name, revision or None) in _USABLE:
        return
    from huggingface_hub import constants, try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(name, "config.json", revision=revision or None), str)
    missing = f"teacher {name} is neither a local folder nor in the local Hugging Face cache"
    fix = f"download it where there is a network (`hf download {name}`), or give a local folder or .gguf file"
    if constants.HF_HUB_OFFLINE:
        if not cached:
            raise error(f"{missing}, and HF_HUB_OFFLINE is set: {fix}, or unset HF_HUB_OFFLINE")
    elif not (_behind_proxy() or _reachable(constants.ENDPOINT)):
        if not cached:
            raise error(f"{missing}, and {constants.ENDPOINT} cannot be reached: {fix}")
        constants.HF_HUB_OFFLINE = True  # what the hub client reads before each request
        os.environ["HF_HUB_OFFLINE"] = "1"  # and the processes this one starts
    _USABLE.add((name, revision or None))


def _behind_proxy() -> bool:
    """A proxy may reach the hub where a direct connection cannot: then the hub client decides."""
    return any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))


def _reachable(endpoint: str, seconds: float = PROBE_SECONDS) -> bool:
    """Whether a TCP connection to the endpoint's host opens within `seconds` (name lookup included,
    which a socket timeout does not bound: it runs in a thread that is given up on)."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(endpoint)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    result: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=seconds).close()
            result.append(True)
        except OSError:
            result.append(False)

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(seconds)
    return bool(result and result[0])


def describe_teacher(config: GenerateConfig) -> TeacherSpec:
    check_hub_teacher(config.teacher, config.revision)
    from transformers import AutoConfig

    source, gguf = pretrained_source(config.teacher)
    try:
        hf_config = AutoConfig.from_pretrained(
            source, revision=config.revision, trust_remote_code=config.trust_remote_code, **gguf
        )
    except Exception as e:  # missing folder, unknown architecture, remote code refused...
        first = describe_load_error(e)
        raise GenerateError(f"teacher {config.teacher}: cannot load its config ({first})") from None
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    num_layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None)
    hidden_size = getattr(text, "hidden_size", None) or getattr(text, "n_embd", None)
    vocab_size = getattr(text, "vocab_size", None)
    if not (num_layers and hidden_size and vocab_size):
        raise GenerateError(f"teacher {config.teacher}: its config names no layer count, width or vocabulary size")
    # A GGUF file has no config.json: its identity is the parsed config and the file's own hash.
    raw = gguf_identity(config.teacher, hf_config.to_dict()) if gguf else _config_json(config) or hf_config.to_dict()
    dtype = resolve_dtype(config.dtype, hf_config)
    architectures = getattr(hf_config, "architectures", None) or []
    if gguf and not architectures:  # a GGUF file names its model type only: the class that loads it
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        causal_lm = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(hf_config, "model_type", ""))
        architectures = [causal_lm] if causal_lm else []
    info = TeacherInfo(
        name_or_path=config.teacher,
        revision=config.revision,
        config_hash=config_hash(raw),
        dtype=dtype,
        architecture=architectures[0] if architectures else None,
        num_hidden_layers=int(num_layers),
        hidden_size=int(hidden_size),
        vocab_size=int(vocab_size),
    )
    return TeacherSpec(hf_config, info, dtype, int(num_layers), int(hidden_size), int(vocab_size))
