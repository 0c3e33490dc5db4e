"""`GenerateConfig`: every setting of a teacher run, with its default, in one place.

A YAML, TOML or JSON file (`--config FILE`) and CLI flags fill the same dataclass; a flag given on
the command line wins over the file, and anything given nowhere keeps the default below. Each
field's flag, help and shown default are declared with it (potstill/settings.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Literal

from potstill.settings import (
    check_settings,
    coerce,
    fields_of,
    info_of,
    load_settings,
    note,
    read_config_file,
    setting,
)
from potstill.store.codec import logprob_min_problem
from potstill.store.targets import codec_named, codec_names, kind_named, kind_names
from potstill.teacher_gen.errors import GenerateError
from potstill.teacher_gen.gguf import is_gguf
from potstill.teacher_gen.rationale import (
    DEFAULT_ANSWER_PATTERN,
    DEFAULT_RATIONALE_TEMPLATE,
    check_answer_pattern,
)

Mode = Literal["score", "generate"]
Backend = Literal["hf", "vllm"]


def _codec_name(value: Any) -> Any:
    """`--codec`: the compact codec's old name still selects it, with a note."""
    if value == "compact2":
        note("--codec compact2 is now called compact")
        return "compact"
    return value


@dataclass
class GenerateConfig:
    # -- what to run ---------------------------------------------------------------------------
    teacher: str = setting("", required=True, help="Teacher: hub name, local folder or .gguf file.")
    prompts: str = setting("", required=True,
                           help="Prompts: .jsonl, .json, .parquet, .csv or a saved datasets folder.")
    store: str = setting("", required=True, flag="--out", aliases=("--store",),
                         help="Store to write, path or URL (created if missing; reruns resume it).")
    mode: Mode = setting("score", help="score (teacher forcing over given completions) or generate.")
    backend: Backend = setting("hf", help="hf (transformers) or vllm.")
    tokenizer: str | None = setting(None, shown_default="the teacher's", help="Tokenizer, if not the teacher's.")
    revision: str | None = setting(None, shown_default="the hub's default branch",
                                   help="Model revision (hub branch, tag or commit).")
    trust_remote_code: bool = setting(False, help="Allow the teacher's own modeling code.")
    license: str | None = setting(
        None, shown_default="none (required to publish)",
        help="Licence of the data this run writes: an SPDX id (apache-2.0, cc-by-4.0) or free text; recorded "
             "in the store's provenance beside the teacher's own licence (from its model card).")
    hash_teacher: bool = setting(
        False, help="Record the sha256 of a local teacher's files in the store's provenance (one more read of "
                    "the whole model); without it a local teacher is recorded by its files' sizes and times.")

    # -- what is captured ----------------------------------------------------------------------
    top_k: int = setting(64, help="Top-k log-probs kept per position.")
    logprob_dtype: Literal["float16", "float32"] = setting("float16", help="Storage of log-probs.")
    # The defaults are the measured best (docs/results.md, "Fidelity"): N = 64 systematic draws in compact keep
    # 97-99% of full KD's gain at about 35 target bytes per token, where top-64 keeps 44%.
    targets: str = setting(
        "sampled", choices=kind_names, help="sampled (N draws per position as ids + counts), topk (log-probs), both, or hybrid "
                        "(the exact top-k plus N draws from the rest).")
    samples: int = setting(64, help="Draws per scored position for sampled targets (from the T=1 distribution).")
    sampler: Literal["iid", "systematic", "stratified"] = setting(
        "systematic", help="How the N draws are placed: systematic or stratified (lower variance, still unbiased), "
                           "or iid.")
    codec: str | None = setting(
        None, choices=codec_names, parse=_codec_name, shown_default="compact; none with --targets topk",
        help="none; packed: bit-packed ids and counts, quantised log-probs; compact: packed, with the sampled "
             "draws coded by value (ids as Rice-coded gaps in an order of frequent tokens, counts gamma-coded), "
             "for sampled targets.")
    logprob_bits: int = setting(12, help="Packed codec: bits per log-prob (uniform over [--logprob-min, 0]).")
    logprob_min: float = setting(-24.0, help="Packed codec: log-probs are clamped to [MIN, 0].")
    hidden_layers: list[int] = setting(
        factory=list, metavar="LAYERS", shown_default="none",
        help="Hidden states to store, HF indexing: '4,8,-1' (0 = embeddings, -1 = last, after the final norm).")
    hidden_dtype: Literal["bfloat16", "float16"] = setting("bfloat16", help="Storage of hidden states.")
    hidden_tokens: Literal["all", "scored"] = setting("all", help="Hidden rows for all tokens or only scored ones.")
    hidden_chunk_tokens: int = setting(1024, help="Zarr chunk length along tokens.")
    score_prompt: bool = setting(False, help="Score every token, not only the completion.")
    append_eos: bool = setting(True, help="Score mode: end given completions with EOS, as a generated one ends.")

    # -- generation ----------------------------------------------------------------------------
    max_new_tokens: int = setting(256, help="Generate mode: tokens per completion.")
    sampling_temperature: float = setting(1.0, aliases=("--temperature",),
                                          help="Generate mode: sampling temperature (0 = greedy).")
    top_p: float = setting(1.0, help="Generate mode: nucleus sampling.")
    num_samples: int = setting(1, help="Completions per prompt (ids become ID#k).")
    seed: int = setting(0, help="Sampling seed (each sample's RNG derives from it and its id).")
    rationale: bool = setting(False, help="Chain-of-thought prompting; split output into rationale and answer.")
    rationale_template: str = setting(DEFAULT_RATIONALE_TEMPLATE, shown_default=repr(DEFAULT_RATIONALE_TEMPLATE),
                                      help="Prompt template with {prompt}.")
    answer_pattern: str = setting(DEFAULT_ANSWER_PATTERN, shown_default=repr(DEFAULT_ANSWER_PATTERN),
                                  help="Regex finding the answer (group 'answer').")
    answer_match: Literal["last", "first"] = setting(
        "last", help="Which match of the answer pattern names the answer.")

    # -- input ---------------------------------------------------------------------------------
    id_field: str = setting("id", help="Input field holding the id.")
    prompt_field: str = setting("prompt", help="Input field holding the prompt text.")
    messages_field: str = setting("messages", help="Input field holding chat messages.")
    completion_field: str = setting("completion", help="Input field holding the completion.")
    max_length: int | None = setting(None, shown_default="the teacher's context", help="Longest sequence in tokens.")
    truncate: bool = setting(False, help="Cut sequences longer than the context instead of skipping them.")
    max_errors: int | None = setting(None, shown_default="never", help="Fail after more than N bad inputs.")

    # -- how it runs ---------------------------------------------------------------------------
    device: str = setting("auto", help="cpu, cuda, cuda:1, or auto (cuda when available).")
    dtype: str = setting("auto", help="auto (the checkpoint's), bfloat16, float16 or float32.")
    batch_tokens: int = setting(16384, help="Padded tokens per forward batch.")
    chunk_positions: int = setting(
        1024, help="Positions per LM-head chunk (bounds the [positions, vocab] logits).")
    compile: bool | None = setting(None, shown_default="on for CUDA",
                                   help="Fuse the fp32 logsumexp with torch.compile.")
    capture_kernel: Literal["auto", "triton", "torch"] = setting(
        "auto", help="Top-k and log tail: auto (the fused Triton kernel on CUDA when Triton is installed), "
                     "triton, or torch.")
    workers: int | None = setting(None, shown_default="WORLD_SIZE or 1", help="Workers filling the store.")
    worker_index: int | None = setting(None, shown_default="RANK or 0", help="This worker's index.")
    writer_id: str | None = setting(None, shown_default="g<worker>-<random>", help="Writer id.")
    shard_records: int = setting(1024, help="Records per shard.")
    shard_bytes: int = setting(1 << 30, help="Bytes per shard (approximate).")
    queue_batches: int = setting(
        4, help="Captured batches queued for the writers before the model waits.")
    writer_threads: int = setting(
        2, help="Parallel store writers, each its own shards (hashing and fsync keep up with the GPU).")
    progress: bool = setting(True, help="Progress bar on stderr.")
    executor: Literal["local", "ray"] = setting(
        "local", help="local: this process runs the teacher (one share of the prompts with --workers); ray: a pool "
                      "of Ray actors does, each block of records going to whichever actor is free "
                      "(pip install 'potstill[ray]').")
    ray_address: str | None = setting(None, shown_default="a new local Ray instance",
                                      help="--executor ray: the Ray cluster to run on (host:6379, ray://host:10001, auto).")
    num_actors: int | None = setting(None, shown_default="one per --gpus-per-actor GPUs of the cluster, else 1",
                                     help="--executor ray: teacher actors (more than fit wait for the autoscaler).")
    gpus_per_actor: float | None = setting(None, shown_default="1 when the cluster has GPUs, else 0",
                                           help="--executor ray: GPUs per actor (above 1: vLLM's tensor parallel).")
    gpu_memory_utilization: float | None = setting(
        None, shown_default="0.9 on a GPU; on CPU a 1 GiB KV cache, or $VLLM_CPU_KVCACHE_SPACE GiB",
        help="vLLM: GPU memory share.")
    tensor_parallel_size: int = setting(1, help="vLLM: tensor parallel size.")
    enforce_eager: bool | None = setting(None, shown_default="on for CPU, off for GPU",
                                         help="vLLM: run eagerly, no compilation at start-up.")

    def __post_init__(self) -> None:
        if self.codec is None:  # the compact codec codes draws; targets without draws keep the plain layout
            allowed = kind_named(self.targets).codecs if self.targets in kind_names() else ()
            self.codec = "compact" if "compact" in allowed else "none"

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def build(cls, config_file: str | None = None, **overrides: Any) -> GenerateConfig:
        """Defaults, then the file (keys as the fields, optionally under `[generate]`), then the
        non-None overrides (CLI flags); checked."""
        return load_settings(cls, config_file, overrides, error=GenerateError, section="generate")

    @classmethod
    def from_file(cls, path: str) -> dict[str, Any]:
        """The settings a YAML, TOML or JSON file holds (keys as in this class; '-' may stand for '_')."""
        return read_config_file(path, GenerateError, section="generate")

    def validate(self) -> None:
        check_settings(self, GenerateError)
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
            (logprob_min_problem(self.logprob_bits, self.logprob_min) is None,
             f"--logprob-min: {logprob_min_problem(self.logprob_bits, self.logprob_min)}"),
            (self.max_new_tokens >= 1, f"--max-new-tokens must be at least 1, got {self.max_new_tokens}"),
            (self.sampling_temperature >= 0, f"--sampling-temperature must be >= 0, got {self.sampling_temperature}"),
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
            (self.num_actors is None or self.num_actors >= 1, f"--num-actors must be at least 1, got {self.num_actors}"),
            (self.gpus_per_actor is None or self.gpus_per_actor >= 0,
             f"--gpus-per-actor must be >= 0, got {self.gpus_per_actor}"),
            (self.license is None or bool(self.license.strip()), "--license must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise GenerateError(message)
        if self.backend == "vllm" and (is_gguf(self.teacher) or is_gguf(self.tokenizer)):
            raise GenerateError(
                f"--backend vllm cannot load the GGUF file {self.teacher if is_gguf(self.teacher) else self.tokenizer}: "
                "use --backend hf, or convert it to a model folder first (python -m potstill.teacher_gen.gguf FILE.gguf FOLDER)"
            )
        if self.executor == "local" and (given := [flag for flag, value in (
                ("--ray-address", self.ray_address), ("--num-actors", self.num_actors),
                ("--gpus-per-actor", self.gpus_per_actor)) if value is not None]):
            raise GenerateError(f"{', '.join(given)} only apply with --executor ray")
        if self.backend == "hf" and (self.gpus_per_actor or 0) > 1:
            raise GenerateError(f"--gpus-per-actor {self.gpus_per_actor}: an HF teacher runs on one GPU; "
                                "tensor parallel needs --backend vllm")
        if self.rationale and "{prompt}" not in self.rationale_template:
            raise GenerateError("--rationale-template must contain {prompt}")
        check_answer_pattern(self.answer_pattern)
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
                temperature=self.sampling_temperature,  # the store's key
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


def coerce_setting(name: str, value: Any) -> Any:
    """A CLI or API value turned into the type of `GenerateConfig`'s field `name`, or a `GenerateError`
    naming its flag (`potstill jobs submit` reads generate flags with it)."""
    f, hint = next((f, hint) for f, hint in fields_of(GenerateConfig) if f.name == name)
    return coerce(name, value, hint, GenerateError, info_of(f))

