"""`GenerateConfig`: every setting of a teacher run, with its default, in one place.

A YAML or TOML file (`--config FILE`) and CLI flags fill the same dataclass; a flag given on the
command line wins over the file, and anything given nowhere keeps the default below.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from potstill.store.targets import codec_named, codec_names, kind_named, kind_names
from potstill.teacher_gen.errors import GenerateError
from potstill.teacher_gen.gguf import is_gguf
from potstill.teacher_gen.rationale import DEFAULT_ANSWER_PATTERN, DEFAULT_RATIONALE_TEMPLATE

Mode = Literal["score", "generate"]
Backend = Literal["hf", "vllm"]


@dataclass
class GenerateConfig:
    # -- what to run ---------------------------------------------------------------------------
    teacher: str = ""  # hub name or local folder of the teacher (required)
    prompts: str = ""  # JSONL / JSON / Parquet / CSV file, or a saved `datasets` folder (required)
    store: str = ""  # store path or URL; created if missing (required)
    mode: Mode = "score"
    backend: Backend = "hf"
    tokenizer: str | None = None  # defaults to the teacher's
    revision: str | None = None
    trust_remote_code: bool = False

    # -- what is captured ----------------------------------------------------------------------
    top_k: int = 64
    logprob_dtype: Literal["float16", "float32"] = "float16"
    # top-k log-probs, N draws per position, both, or hybrid (the exact top-k plus N draws from the rest)
    targets: Literal["topk", "sampled", "both", "hybrid"] = "topk"
    samples: int = 50  # draws per scored position for sampled targets (from the T=1 distribution)
    sampler: Literal["iid", "systematic", "stratified"] = "iid"  # how the N draws are placed (format §4.2)
    codec: Literal["none", "packed", "compact", "compact2"] = "none"  # packed: bit-packed ids and counts, quantised
    # log-probs; compact: packed, with sampled ids gap-coded and counts gamma-coded (about 0.6x the sampled bytes);
    # compact2: draws split into head and tail, ids in the prompts' frequency order (about 0.85x compact)
    logprob_bits: int = 12  # packed codec: bits per log-prob (uniform over [logprob_min, 0])
    logprob_min: float = -24.0  # packed codec: log-probs are clamped to [logprob_min, 0]
    hidden_layers: list[int] = field(default_factory=list)  # HF indexing: 0 = embeddings, -1 = last (post-norm)
    hidden_dtype: Literal["bfloat16", "float16"] = "bfloat16"
    hidden_tokens: Literal["all", "scored"] = "all"  # rows stored per record: every token, or scored ones
    hidden_chunk_tokens: int = 1024  # Zarr chunk length along tokens
    score_prompt: bool = False  # score every token, not only the completion's
    append_eos: bool = True  # score mode: end a given completion with EOS, as a generated one ends

    # -- generation ----------------------------------------------------------------------------
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    num_samples: int = 1
    seed: int = 0
    rationale: bool = False
    rationale_template: str = DEFAULT_RATIONALE_TEMPLATE
    answer_pattern: str = DEFAULT_ANSWER_PATTERN
    answer_match: Literal["last", "first"] = "last"  # which match of answer_pattern names the answer

    # -- input ---------------------------------------------------------------------------------
    id_field: str = "id"
    prompt_field: str = "prompt"
    messages_field: str = "messages"
    completion_field: str = "completion"
    max_length: int | None = None  # defaults to the teacher's context length
    truncate: bool = False
    max_errors: int | None = None  # fail fast after this many bad inputs (None = never)

    # -- how it runs ---------------------------------------------------------------------------
    device: str = "auto"  # auto = cuda when available
    dtype: str = "auto"  # auto = the checkpoint's dtype
    batch_tokens: int = 16384  # padded tokens per forward batch
    chunk_positions: int = 1024  # positions per LM-head chunk (bounds the [positions, vocab] logits)
    compile: bool | None = None  # fuse the fp32 logsumexp with torch.compile (None: on for CUDA)
    capture_kernel: Literal["auto", "triton", "torch"] = "auto"  # auto: the fused Triton kernel on CUDA if installed
    workers: int | None = None  # None: WORLD_SIZE from torchrun, else 1
    worker_index: int | None = None  # None: RANK from torchrun, else 0
    writer_id: str | None = None
    shard_records: int = 1024
    shard_bytes: int = 1 << 30
    queue_batches: int = 4  # captured batches waiting for the writer threads before the model waits
    writer_threads: int = 2  # parallel writers (each its own shards): hashing and fsync keep up with the GPU
    progress: bool = True
    gpu_memory_utilization: float | None = None  # vLLM: GPU memory share (None: 0.9 on a GPU; see vllm_backend)
    tensor_parallel_size: int = 1  # vLLM
    enforce_eager: bool | None = None  # vLLM: skip compilation and graph capture (None: on for CPU, off for GPU)

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str) -> dict[str, Any]:
        """The settings a YAML or TOML file holds (keys as in this class; '-' may stand for '_')."""
        if not os.path.isfile(path):
            raise GenerateError(f"config file {path} does not exist")
        with open(path, "rb") as f:
            raw = f.read()
        try:
            if path.endswith(".toml"):
                import tomllib

                data = tomllib.loads(raw.decode())
            else:
                import yaml

                data = yaml.safe_load(raw) or {}
        except Exception as e:  # yaml and toml raise their own types; all mean the same to a user
            raise GenerateError(f"config file {path}: cannot parse ({type(e).__name__}: {e})") from None
        if not isinstance(data, dict):
            raise GenerateError(f"config file {path}: expected a mapping of settings at the top level")
        if isinstance(data.get("generate"), dict):  # allow a [generate] section / generate: block
            data = data["generate"]
        return {str(k).replace("-", "_"): v for k, v in data.items()}

    @classmethod
    def build(cls, config_file: str | None = None, **overrides: Any) -> GenerateConfig:
        """Defaults, then the file, then the non-None overrides (CLI flags); checked."""
        values: dict[str, Any] = {}
        source = "settings"
        if config_file:
            values.update(cls.from_file(config_file))
            source = f"config file {config_file}"
        known = {f.name: f for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                raise GenerateError(f"{source}: unknown setting {key!r}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        kwargs = {}
        for key, value in values.items():
            if key not in known:
                raise GenerateError(f"unknown setting {key!r}")
            kwargs[key] = _coerce(key, value, _field_type(cls, key))
        config = cls(**kwargs)
        config.validate()
        return config

    def validate(self) -> None:
        for name, flag in (("teacher", "--teacher"), ("prompts", "--prompts"), ("store", "--out")):
            if not getattr(self, name):  # `store` is the setting's name in a --config file
                raise GenerateError(f"{flag} is required")
        checks = [
            (self.top_k >= 1, f"--top-k must be at least 1, got {self.top_k}"),
            (self.targets in kind_names(), f"--targets must be one of {', '.join(kind_names())}, got {self.targets!r}"),
            (1 <= self.samples <= 65535, f"--samples must be between 1 and 65535, got {self.samples}"),
            (self.codec in codec_names(), f"--codec must be one of {', '.join(codec_names())}, got {self.codec!r}"),
            (self.codec not in codec_names() or self.targets not in kind_names() or self.codec in kind_named(self.targets).codecs,
             f"--codec {self.codec} codes sampled draws: use it with --targets sampled, both or hybrid (top-k targets: --codec packed)"
             if self.codec in codec_names() and codec_named(self.codec).sampled_only
             else f"--codec {self.codec} cannot store --targets {self.targets} targets"),
            (2 <= self.logprob_bits <= 16, f"--logprob-bits must be between 2 and 16, got {self.logprob_bits}"),
            (self.logprob_min < 0, f"--logprob-min must be negative, got {self.logprob_min}"),
            (self.max_new_tokens >= 1, f"--max-new-tokens must be at least 1, got {self.max_new_tokens}"),
            (self.temperature >= 0, f"--temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}"),
            (self.num_samples >= 1, f"--num-samples must be at least 1, got {self.num_samples}"),
            (self.batch_tokens >= 1, f"--batch-tokens must be positive, got {self.batch_tokens}"),
            (self.chunk_positions >= 1, f"--chunk-positions must be positive, got {self.chunk_positions}"),
            (self.hidden_chunk_tokens >= 1, "--hidden-chunk-tokens must be positive"),
            (self.shard_records >= 1 and self.shard_bytes >= 1, "--shard-records and --shard-bytes must be positive"),
            (self.queue_batches >= 1, "--queue-batches must be at least 1"),
            (self.gpu_memory_utilization is None or 0 < self.gpu_memory_utilization <= 1,
             f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}"),
            (1 <= self.writer_threads <= 16, "--writer-threads must be between 1 and 16"),
            (self.max_length is None or self.max_length >= 2, "--max-length must be at least 2"),
            (self.max_errors is None or self.max_errors >= 0, "--max-errors must be >= 0"),
            (self.mode in ("score", "generate"), f"--mode must be score or generate, got {self.mode!r}"),
            (self.backend in ("hf", "vllm"), f"--backend must be hf or vllm, got {self.backend!r}"),
            (self.logprob_dtype in ("float16", "float32"), "--logprob-dtype must be float16 or float32"),
            (self.hidden_dtype in ("bfloat16", "float16"), "--hidden-dtype must be bfloat16 or float16"),
            (self.hidden_tokens in ("all", "scored"), "--hidden-tokens must be all or scored"),
        ]
        for ok, message in checks:
            if not ok:
                raise GenerateError(message)
        if self.backend == "vllm" and self.targets != "topk":
            raise GenerateError(
                f"--backend vllm cannot make --targets {self.targets}: vLLM returns only the top log-probs, "
                "not the full distribution the draws need; use --backend hf"
            )
        if self.backend == "vllm" and self.hidden_layers:
            raise GenerateError(
                "--backend vllm cannot capture hidden states: drop --hidden-layers or use --backend hf"
            )
        if self.backend == "vllm" and (is_gguf(self.teacher) or is_gguf(self.tokenizer)):
            raise GenerateError(
                f"--backend vllm cannot load the GGUF file {self.teacher if is_gguf(self.teacher) else self.tokenizer}: "
                "use --backend hf, or convert it to a model folder first (python -m potstill.teacher_gen.gguf FILE.gguf FOLDER)"
            )
        if self.rationale and "{prompt}" not in self.rationale_template:
            raise GenerateError("--rationale-template must contain {prompt}")
        workers, index = self.resolve_workers()
        if workers < 1 or not 0 <= index < workers:
            raise GenerateError(f"--worker-index {index} is outside [0, --workers {workers})")

    def resolve_workers(self) -> tuple[int, int]:
        """(workers, index): the flags, else torchrun's WORLD_SIZE / RANK, else one worker."""
        try:
            workers = self.workers if self.workers is not None else int(os.environ.get("WORLD_SIZE", "1"))
            index = self.worker_index if self.worker_index is not None else int(os.environ.get("RANK", "0"))
        except ValueError:
            raise GenerateError("WORLD_SIZE and RANK must be integers") from None
        return workers, index

    # -- what defines the data -----------------------------------------------------------------
    def data_settings(self, chat_template: Any = None) -> dict[str, Any]:
        """The settings that decide what a record contains, for `manifest.generation`.

        Several workers (and reruns) write one store only if these agree, so nothing that may
        differ between workers of one job (index, batch size, device, paths) belongs here.
        """
        settings: dict[str, Any] = {
            "mode": self.mode,
            "backend": self.backend,
            "hidden_tokens": self.hidden_tokens,
            "score_prompt": self.score_prompt,
            "append_eos": self.append_eos,
            "max_length": self.max_length,
            "truncate": self.truncate,
            "fields": {
                "id": self.id_field,
                "prompt": self.prompt_field,
                "messages": self.messages_field,
                "completion": self.completion_field,
            },
            "chat_template_sha256": _template_hash(chat_template),
            "rationale": self.rationale,
        }
        if self.rationale:
            settings["rationale_template"] = self.rationale_template
            settings["answer_pattern"] = self.answer_pattern
            settings["answer_match"] = self.answer_match
        if self.mode == "generate":
            settings.update(
                max_new_tokens=self.max_new_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
                num_samples=self.num_samples,
                seed=self.seed,
            )
        return settings

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _template_hash(template: Any) -> str | None:
    if not template:
        return None
    text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)  # named templates
    return hashlib.sha256(text.encode()).hexdigest()


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Turn a file or CLI value into the field's type, or fail naming the setting."""
    flag = "--" + name.replace("_", "-")
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # X | None
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner[0])
    if origin is Literal:
        if value not in args:
            raise GenerateError(f"{flag} must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin is list:
        return parse_int_list(value, flag)
    try:
        if hint is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if hint is float:
            return float(value)
        if hint is str:
            if not isinstance(value, str | int | float):
                raise ValueError(value)
            return str(value)
    except (TypeError, ValueError):
        raise GenerateError(f"{flag}: expected {getattr(hint, '__name__', hint)}, got {value!r}") from None
    return value


def coerce_setting(name: str, value: Any, hint: Any = None) -> Any:
    """A file, CLI or API value turned into a setting's type (by default the `GenerateConfig` field's),
    or a `GenerateError` naming the flag. Other config classes (`potstill serve`) use it too."""
    return _coerce(name, value, hint if hint is not None else _field_type(GenerateConfig, name))


def parse_int_list(value: Any, flag: str = "--hidden-layers") -> list[int]:
    """'4,8,-1', '4 8 -1', [4, 8, -1] or 4 -> [4, 8, -1]."""
    if value is None or value == "":
        return []
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    items = value.replace(",", " ").split() if isinstance(value, str) else value
    try:
        return [int(x) for x in items]
    except (TypeError, ValueError):
        raise GenerateError(f"{flag}: expected integers such as '4,8,-1', got {value!r}") from None
