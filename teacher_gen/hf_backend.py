"""The Hugging Face transformers backend: scoring with hooks and a chunked LM head, and generation.

Scoring runs the decoder body once per batch (right padding, so pads only ever come after the
real tokens and cannot change them), taps the requested hidden states with forward hooks, and
applies the LM head only at the positions that are scored, a chunk at a time. Results are copied
to pinned host memory without blocking; `score()` returns before they arrive, so the next batch
is queued on the GPU while the previous one is handed to the writer.

Generation runs HF `model.generate` (KV cache, left padding) and captures each step's targets from
the logits it already computes: a forward hook on the LM head keeps the step's last-position
logits, and once the step's token is chosen (a stopping criterion, which HF calls with the new
token appended) the same `topk_logprobs` as score mode turns them into that step's top-K, token
log-prob, log tail and draws ([rows, K] per step, never [rows, steps, vocab]); the logits are then
dropped. The hidden layers come from the same forwards: the taps keep each step's rows (the
prompt's at the first step, then one token per step), and one extra decoder step over the last
generated token, which `generate` never feeds back, gives its row. So there is no second forward
over prompt + completion and no second LM head; the second forward still runs when the record
scores the prompt's tokens (`--score-prompt`).
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from potstill.store import decode_hidden
from potstill.store.targets import codec_named, kind_named
from potstill.teacher_gen.capture import (
    LayerTaps,
    choose_block,
    decoder_layers,
    logit_transform,
    logit_transform_params,
    make_logsumexp,
    storage_numpy,
    to_storage,
    topk_logprobs,
)
from potstill.teacher_gen.config import GenerateConfig
from potstill.teacher_gen.devices import pick_device
from potstill.teacher_gen.errors import GenerateError, describe_load_error
from potstill.teacher_gen.fused_capture import LogitParams, pick_fused
from potstill.teacher_gen.gguf import pretrained_source
from potstill.teacher_gen.jobs import (
    Capture,
    Generated,
    GenRequest,
    ScoreJob,
    TopKLogprobs,
    batches_by_tokens,
    target_uniforms,
)
from potstill.teacher_gen.model_info import TeacherSpec

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_CHECKED: weakref.WeakKeyDictionary[Any, set[tuple]] = weakref.WeakKeyDictionary()  # model -> setups checked


class HFTeacher:
    # Generate mode captures a completion's targets and hidden layers during decoding; False makes it
    # score every completion by a second forward instead (`--score-prompt` always does): a test's reference.
    capture_while_decoding = True

    def __init__(self, config: GenerateConfig, spec: TeacherSpec, tokenizer: Any, hidden_layers: list[int],
                 model: Any = None) -> None:
        """Load the teacher (or take an already built `model`, e.g. a benchmark's random one)."""
        self.config = config
        self.spec = spec
        self.device = pick_device(config.device)  # under torchrun, the rank's own GPU
        if model is None:
            model = load_model(config, spec)
        self.model = model.to(self.device).eval()
        self.body = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
        self.head = model.get_output_embeddings()
        if self.head is None:
            raise GenerateError(f"teacher {config.teacher}: the model has no LM head")
        self.transform = logit_transform(model.config)
        use_compile = config.compile if config.compile is not None else self.device.type == "cuda"
        self.logsumexp = make_logsumexp(self.transform, compile=use_compile)
        # Block top-k (exact) pays off on GPUs, where topk over a 100k+ row is costly; on CPU torch.topk is as fast.
        vocab = getattr(self.head, "out_features", spec.vocab_size)
        # What the store's kind asks of the capture: its own function of each chunk's logits, or the
        # standard one's top-k with the log tail and N draws.
        self.kind = kind_named(config.targets)
        needs = self.kind.capture_needs(config.top_k, config.samples)
        self.k, self.samples, self.draw_from_rest = needs.top_k, needs.samples, needs.draw_from_rest
        self.block = choose_block(vocab, self.k) if self.device.type == "cuda" and self.k else None
        # The fused Triton kernel (one read of the logits) when chosen; None: the torch path, its reference.
        self.fused = pick_fused(config.capture_kernel, self.device, LogitParams(*logit_transform_params(model.config)),
                                self.k, vocab, self.head.weight.dtype)
        self.hidden_layers = hidden_layers
        self.hidden_dtype = config.hidden_dtype
        self.taps = LayerTaps(decoder_layers(self.body, spec.num_layers), hidden_layers)
        # The packed codec quantises from the fp32 values; only unpacked float16 stores round on the device.
        self.lp_dtype = (torch.float16 if config.logprob_dtype == "float16" and not codec_named(config.codec).packed
                         else torch.float32)
        self.pad_id = _pad_id(tokenizer)
        self.eos_ids = _eos_ids(tokenizer, model)
        self.pinned = self.device.type == "cuda"
        # Device-to-host copies run on their own stream, so they overlap the next batch's compute.
        self.copy_stream = torch.cuda.Stream(self.device) if self.pinned else None
        # Once per loaded model and capture setup: a long-lived process (`potstill serve`, a preloaded
        # model) runs many jobs on one model.
        check = (tuple(hidden_layers), self.hidden_dtype, str(self.device), self.k, self.samples, str(self.lp_dtype),
                 self.block, config.chunk_positions, config.teacher, self.fused is not None)
        if check not in _CHECKED.setdefault(self.model, set()):
            self.self_check()
            _CHECKED[self.model].add(check)

    # -- scoring -------------------------------------------------------------------------------
    def score_batches(self, jobs: list[ScoreJob]) -> Iterator[list[ScoreJob]]:
        return score_batches(self.config, jobs)

    def _to_device(self, arr: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(arr)
        if self.pinned:
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _to_host(self, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Callable[[], None]]:
        """Start copying device tensors to pinned host memory; returns the copies and a waiter."""
        if not self.pinned:
            return tensors, lambda: None
        assert self.copy_stream is not None
        computed = torch.cuda.current_stream(self.device).record_event()
        hosts = {}
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(computed)
            for name, t in tensors.items():
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host.copy_(t, non_blocking=True)
                t.record_stream(self.copy_stream)  # keep the allocator off it until copied
                hosts[name] = host
            copied = self.copy_stream.record_event()
        return hosts, copied.synchronize

    @torch.inference_mode()
    def score(self, jobs: list[ScoreJob]) -> Callable[[], list[Capture]]:
        b, t = len(jobs), max(len(j) for j in jobs)
        ids = np.full((b, t), self.pad_id, dtype=np.int64)
        mask = np.zeros((b, t), dtype=np.int64)
        pred_rows, targets, hidden_rows = [], [], []
        for row, job in enumerate(jobs):
            n = len(job)
            ids[row, :n] = job.input_ids
            mask[row, :n] = 1
            # Logits at position p predict token p + 1: scored tokens s..n-1 come from positions s-1..n-2.
            pred_rows.append(row * t + np.arange(job.score_start - 1, n - 1))
            targets.append(job.input_ids[job.score_start :])
            hidden_rows.append(row * t + np.arange(job.hidden_start, n))
        pred_idx = self._to_device(np.concatenate(pred_rows).astype(np.int64))
        target_ids = self._to_device(np.concatenate(targets).astype(np.int64))
        ids_t = self._to_device(ids)
        mask_t = self._to_device(mask) if not mask.all() else None

        self.taps.clear()
        out = self.body(input_ids=ids_t, attention_mask=mask_t, use_cache=False)
        final = out[0].reshape(b * t, -1)
        device_out = self._targets(final.index_select(0, pred_idx), target_ids,
                                   self._uniforms([(job.record_id, len(job) - job.score_start) for job in jobs]))
        if self.hidden_layers:
            hid_idx = self._to_device(np.concatenate(hidden_rows).astype(np.int64))
            for index in self.hidden_layers:
                states = self.taps.take(index, final).reshape(b * t, -1).index_select(0, hid_idx)
                device_out[f"hidden{index}"] = to_storage(states, self.hidden_dtype)
        self.taps.clear()
        host, wait = self._to_host(device_out)

        def collect() -> list[Capture]:
            wait()
            rows = [(len(job) - job.score_start, len(job) - job.hidden_start) for job in jobs]
            return _split(rows, host, self.hidden_layers, self.hidden_dtype)

        return collect

    # -- generation ----------------------------------------------------------------------------
    def generate_batches(self, requests: list[GenRequest]) -> Iterator[list[GenRequest]]:
        return generate_batches(self.config, requests)

    @torch.inference_mode()
    def generate(self, requests: list[GenRequest], on_tokens: Callable[[int], None] | None = None) -> list[Generated]:
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        b, t = len(requests), max(len(r.prompt_ids) for r in requests)
        ids = np.full((b, t), self.pad_id, dtype=np.int64)
        mask = np.zeros((b, t), dtype=np.int64)
        for row, req in enumerate(requests):  # left padding: every row's next token lands at column t
            n = len(req.prompt_ids)
            ids[row, t - n :] = req.prompt_ids
            mask[row, t - n :] = 1
        gen_config = GenerationConfig(
            max_new_tokens=max(r.max_new_tokens for r in requests),
            do_sample=False,  # sampling happens in SeededSampler, row by row
            num_beams=1,
            pad_token_id=self.pad_id,
            eos_token_id=sorted(self.eos_ids) or None,
            return_dict_in_generate=True,  # with the KV cache, for the last token's hidden layers
        )
        processors = LogitsProcessorList()
        if self.config.sampling_temperature > 0:
            processors.append(SeededSampler(self.config.sampling_temperature, self.config.top_p,
                                            [r.seed for r in requests], self.device))
        # The completion's targets come from the logits `generate` computes, and its hidden layers
        # from the same forwards, unless the record scores the prompt's tokens too.
        steps = None
        hook = None
        criteria = StoppingCriteriaList([TokenCounter(b, self.eos_ids, self.device, on_tokens)] if on_tokens else [])
        if self.capture_while_decoding and not self.config.score_prompt:
            steps = StepTargets(self._step_capture(requests, gen_config.max_new_tokens), gen_config.max_new_tokens)
            hook = self.head.register_forward_hook(steps.keep)
            criteria.append(steps)
        layer_steps: dict[int, list[torch.Tensor]] = {}
        ids_t, mask_t = self._to_device(ids), self._to_device(mask)
        with contextlib.ExitStack() as stack:
            if steps is not None and self.hidden_layers:
                layer_steps = stack.enter_context(self.taps.over_steps(self.body))
            try:
                out = self.model.generate(
                    input_ids=ids_t,
                    attention_mask=mask_t,
                    generation_config=gen_config,
                    logits_processor=processors,
                    stopping_criteria=criteria,
                )
            finally:
                if hook is not None:
                    hook.remove()
            sequences = out.sequences
            new = sequences[:, t:].cpu().numpy()
            if layer_steps and new.shape[1]:
                self._last_step(sequences, mask_t, out)
        completions = [cut_at_eos(row, self.eos_ids, req.max_new_tokens) for row, req in zip(new, requests, strict=True)]
        # One head call and one capture per generated token, and one forward per token for the hidden
        # layers; anything else (a model that calls its head otherwise) is scored by the second pass instead.
        if (steps is None or not steps.complete(new.shape[1])
                or any(len(states) != new.shape[1] + 1 for states in layer_steps.values())):
            return [Generated(c) for c in completions]
        captures = self._decoded_captures(requests, steps.stacked(), completions, layer_steps)
        return [Generated(c, cap) for c, cap in zip(completions, captures, strict=True)]

    def _step_capture(self, requests: list[GenRequest],
                      max_steps: int) -> Callable[[torch.Tensor, torch.Tensor, int], dict[str, torch.Tensor]]:
        """`capture(logits, tokens, step)`: the targets of one decoding step from its [rows, vocab]
        head output and the tokens chosen, exactly as `_targets` computes them from final hidden
        states. Draws use row `step` of each record's own uniforms (`target_uniforms` makes a prefix
        of rows the same whatever the record's final length), kept [steps, rows, N] on the device."""
        uniforms = None
        if self.samples and self.kind.capture_chunk is None:
            uniforms = self._to_device(np.stack([
                target_uniforms(self.config.seed, r.record_id, max_steps, self.samples) for r in requests
            ], axis=1))

        def capture(logits: torch.Tensor, tokens: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
            return self._targets(logits, tokens, None if uniforms is None else uniforms[step], head=_LOGITS)

        return capture

    def _last_step(self, sequences: torch.Tensor, prompt_mask: torch.Tensor, out: Any) -> None:
        """One more decoder step, over the last generated token, which `generate` never feeds back:
        its hidden layers (the record stores a row per token). Positions as `generate` gives them
        under left padding: the count of real tokens before, from the attention mask."""
        b, length = sequences.shape
        mask = torch.cat([prompt_mask, prompt_mask.new_ones(b, length - prompt_mask.shape[1])], dim=1)
        # transformers 5.25 renamed the KV cache `cache` (it was `past_key_values`, with `cache_position`)
        if "cache" in inspect.signature(self.body.forward).parameters:
            cache = {"cache": out.cache}
        else:
            cache = {"past_key_values": out.past_key_values,
                     "cache_position": torch.tensor([length - 1], device=self.device)}
        self.body(input_ids=sequences[:, -1:], attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                  use_cache=True, **cache)

    def _decoded_captures(self, requests: list[GenRequest], targets: dict[str, torch.Tensor],
                          completions: list[np.ndarray], layer_steps: dict[int, list[torch.Tensor]]) -> list[Capture]:
        """Each completion's capture from the decoding steps' `targets` (each [rows, steps, ...]: step
        j of a row holds the targets of its generated token j) and its hidden layers from
        `layer_steps` (each layer's states of every forward of the left-padded batch: prompt, then
        one token per step): what `score` computes from a second forward over prompt + completion."""
        n_steps = next(iter(targets.values())).shape[1]
        rows = self._to_device(np.concatenate([row * n_steps + np.arange(len(c))
                                               for row, c in enumerate(completions)]).astype(np.int64))
        out = {name: value.flatten(0, 1).index_select(0, rows) for name, value in targets.items()}
        # Rows of token i of a record whose prompt has n tokens: column t - n + i of the padded batch,
        # from its hidden start (the runner's `make_job`: 0, or the first scored token) to its end.
        t = max(len(r.prompt_ids) for r in requests)
        starts = [0 if self.config.hidden_tokens == "all" else len(r.prompt_ids) for r in requests]
        rows_of = []
        for row, (req, c, start) in enumerate(zip(requests, completions, starts, strict=True)):
            n = len(req.prompt_ids)
            rows_of.append(row * (t + n_steps) + t - n + np.arange(start, n + len(c)))
        if layer_steps:
            hid_idx = self._to_device(np.concatenate(rows_of).astype(np.int64))
            for index in self.hidden_layers:
                states = torch.cat(layer_steps[index], dim=1)
                out[f"hidden{index}"] = to_storage(states.reshape(-1, states.shape[-1]).index_select(0, hid_idx),
                                                   self.hidden_dtype)
        host = {name: value.cpu() for name, value in out.items()}
        return _split([(len(c), len(req.prompt_ids) + len(c) - start if layer_steps else 0)
                       for req, c, start in zip(requests, completions, starts, strict=True)],
                      host, self.hidden_layers if layer_steps else [], self.hidden_dtype)

    def _uniforms(self, records: list[tuple[str, int]]) -> torch.Tensor | None:
        """The draws' uniforms of `records` ((record id, scored positions) each, in order): each
        record's own, never its batch-mates'; None without sampled targets."""
        if not self.samples or self.kind.capture_chunk is not None:
            return None
        return self._to_device(np.concatenate([
            target_uniforms(self.config.seed, record_id, n, self.samples) for record_id, n in records
        ]))

    def _targets(self, hidden: torch.Tensor, target_ids: torch.Tensor, uniforms: torch.Tensor | None,
                 head: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Top-k ids and log-probs, the token's log-prob, the log tail and (sampled targets) the draws,
        from `uniforms`, of the positions whose final hidden states are `hidden` (`head`: the LM head;
        `_LOGITS` when `hidden` are already its output). A kind with a capture of its own gets each
        chunk's fp32 logits instead (`capture_chunk`)."""
        head = self.head if head is None else head
        if self.kind.capture_chunk is not None:
            return self._kind_targets(hidden, target_ids, head)
        draws = None if uniforms is None else torch.empty(uniforms.shape, dtype=torch.int32, device=self.device)
        top_ids, top_lp, token_lp, tail = topk_logprobs(
            hidden, head, target_ids, self.k,
            chunk=self.config.chunk_positions, transform=self.transform, out_dtype=self.lp_dtype,
            logsumexp=self.logsumexp, block=self.block, uniforms=uniforms, draws_out=draws, fused=self.fused,
            sampler=self.config.sampler, draw_from_rest=self.draw_from_rest,
        )
        out = {"ids": top_ids, "lp": top_lp, "token": token_lp, "tail": tail}
        if draws is not None:
            out["draws"] = draws
        return out

    def _kind_targets(self, hidden: torch.Tensor, target_ids: torch.Tensor,
                      head: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The kind's `capture_chunk` on `chunk_positions` positions at a time: their logits widened to
        fp32 with the model's transform applied, never the whole [positions, vocab] matrix."""
        parts = []
        for start in range(0, hidden.shape[0], self.config.chunk_positions):
            stop = min(start + self.config.chunk_positions, hidden.shape[0])
            logits = head(hidden[start:stop]).float()
            if self.transform is not None:
                logits = self.transform(logits)
            parts.append(self.kind.capture_chunk(logits, target_ids[start:stop]))
            del logits
        # Prefixed: the batch's host dict holds the hidden states too (`_split` tells them apart).
        return {f"kind:{name}": torch.cat([p[name] for p in parts]) for name in parts[0]}

    # -- checks --------------------------------------------------------------------------------
    @torch.inference_mode()
    def self_check(self) -> None:
        """Compare this capture path with the model's own forward on a short probe, once.

        Catches an architecture whose logits get a transform `logit_transform` does not know,
        or whose hidden states are not where `LayerTaps` looks, before anything is written.
        """
        n = 12
        probe = ((np.arange(n) * 7919 + 3) % self.spec.vocab_size).astype(np.int32)
        job = ScoreJob("self-check", None, probe, score_start=1, hidden_start=0)  # type: ignore[arg-type]
        mine = self.score([job])()[0]
        ref = self.model(input_ids=torch.from_numpy(probe[None].astype(np.int64)).to(self.device),
                         output_hidden_states=True, use_cache=False)
        ref_lp = torch.log_softmax(ref.logits[0, :-1].float(), dim=-1).cpu()
        ref_token = ref_lp.gather(1, torch.from_numpy(probe[1:, None].astype(np.int64))).squeeze(1).numpy()
        tol = 1e-3 if self.spec.dtype == "float32" else 0.15
        diff = float(np.abs(ref_token - mine.targets.token_logprob).max())
        if not diff <= tol:
            raise GenerateError(
                f"teacher {self.config.teacher}: the chunked capture does not reproduce the model's logits "
                f"(max log-prob difference {diff:.3g}); its architecture transforms logits in a way potstill "
                "does not know"
            )
        for index in self.hidden_layers:
            want = ref.hidden_states[index][0].float().cpu().numpy()
            got = decode_hidden(mine.hidden[index], self.hidden_dtype)
            rel = float(np.abs(want - got).max()) / (float(np.abs(want).max()) + 1e-6)
            if not rel <= (1e-2 if self.spec.dtype == "float32" else 0.1):
                raise GenerateError(
                    f"teacher {self.config.teacher}: hidden layer {index} captured by hooks differs from "
                    f"output_hidden_states[{index}] (relative difference {rel:.3g})"
                )

    def close(self) -> None:
        self.taps.remove()


def score_batches(config: GenerateConfig, jobs: list[ScoreJob]) -> Iterator[list[ScoreJob]]:
    """The forward batches of `jobs` (a function of the settings alone: `--executor ray` plans its blocks
    as runs of these batches, so that every record is computed in the batch the local executor gives it)."""
    return batches_by_tokens(jobs, len, config.batch_tokens)


def generate_batches(config: GenerateConfig, requests: list[GenRequest]) -> Iterator[list[GenRequest]]:
    # Requests with different token budgets never share a batch, so a sample's length limit
    # does not depend on its batch-mates.
    return batches_by_tokens(
        requests, lambda r: len(r.prompt_ids) + r.max_new_tokens, config.batch_tokens,
        key=lambda r: r.max_new_tokens,
    )


def load_model(config: GenerateConfig, spec: TeacherSpec) -> Any:
    from transformers import AutoModelForCausalLM

    source, gguf = pretrained_source(config.teacher)  # a .gguf file is dequantized on load
    try:
        return AutoModelForCausalLM.from_pretrained(
            source,
            config=spec.hf_config,  # read once by describe_teacher: a GGUF file's header is parsed whole for it
            dtype=TORCH_DTYPES[spec.dtype],
            revision=config.revision,
            trust_remote_code=config.trust_remote_code,
            **gguf,
        )
    except Exception as e:
        raise GenerateError(f"teacher {config.teacher}: cannot load the model ({describe_load_error(e)})") from None


_LOGITS = torch.nn.Identity()  # the "head" of positions given as logits already


class StepTargets:
    """Captures every decoding step's targets from the logits `generate` computes anyway.

    `keep` is a forward hook on the LM head: it holds the step's last-position logits ([rows, vocab],
    the model's dtype, before its logit transform: what `topk_logprobs` gets from the head in score
    mode). HF then calls the stopping criteria with the step's token appended, and this one hands
    both to `capture` and drops the logits, so at most one step's logits are alive. It never stops
    a row."""

    def __init__(self, capture: Callable[[torch.Tensor, torch.Tensor, int], dict[str, torch.Tensor]],
                 max_steps: int) -> None:
        self.capture = capture
        self.max_steps = max_steps
        self.pending: torch.Tensor | None = None
        self.head_calls = 0
        self.steps: list[dict[str, torch.Tensor]] = []

    def keep(self, module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
        self.head_calls += 1
        self.pending = output[:, -1].contiguous()  # a view of the prefill's [rows, tokens, vocab] otherwise

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.pending is not None and len(self.steps) < self.max_steps:
            self.steps.append(self.capture(self.pending, input_ids[:, -1], len(self.steps)))
        self.pending = None
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def complete(self, n_steps: int) -> bool:
        """Whether every one of `n_steps` generated tokens got its targets from exactly one head call."""
        return n_steps > 0 and self.head_calls == len(self.steps) == n_steps

    def stacked(self) -> dict[str, torch.Tensor]:
        """Each target array of every step, [rows, steps, ...]."""
        return {name: torch.stack([step[name] for step in self.steps], dim=1) for name in self.steps[0]}


class TokenCounter:
    """A stopping criterion that never stops: after each decoding step it tells `on_tokens` how many
    rows got a real token (rows past their EOS get padding, not counted). Its one host read per step
    adds nothing to HF's loop, which reads its own stop flag every step anyway."""

    def __init__(self, rows: int, eos_ids: set[int], device: torch.device, on_tokens: Callable[[int], None]) -> None:
        self.running = torch.ones(rows, dtype=torch.bool, device=device)
        self.eos = torch.tensor(sorted(eos_ids) or [-1], dtype=torch.long, device=device)
        self.on_tokens = on_tokens

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        new = int(self.running.sum())
        self.running &= ~torch.isin(input_ids[:, -1], self.eos)
        self.on_tokens(new)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class SeededSampler:
    """Samples with one RNG per row, by the Gumbel-max trick, inside HF's greedy search.

    Each row's generator is seeded from (run seed, record id, sample index), so a sample is the
    same whatever batch it lands in and after a resume. Temperature and top-p are applied here;
    the greedy argmax of log p + Gumbel noise is then an exact sample of that distribution.
    """

    def __init__(self, temperature: float, top_p: float, seeds: list[int], device: torch.device) -> None:
        self.temperature = temperature
        self.top_p = top_p
        self.generators = []
        for seed in seeds:
            g = torch.Generator(device=device)
            g.manual_seed(seed)
            self.generators.append(g)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            logp = _top_p_filter(logp, self.top_p)
        noise = torch.empty_like(logp)
        for row, g in enumerate(self.generators):
            noise[row].exponential_(generator=g)
        # argmax(log p - log E), E ~ Exp(1), picks token i with probability p_i.
        return logp - noise.clamp_min_(1e-30).log_()


def _top_p_filter(logp: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_lp, order = logp.sort(dim=-1, descending=True)
    before = sorted_lp.exp().cumsum(-1) - sorted_lp.exp()  # mass of the tokens ranked above
    drop_sorted = before >= top_p  # the top token always stays (its "before" is 0)
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logp.masked_fill(drop, float("-inf"))


def cut_at_eos(tokens: np.ndarray, eos_ids: set[int], limit: int) -> np.ndarray:
    """A row's generated ids up to and including its first EOS (at most `limit` tokens)."""
    tokens = tokens[:limit]
    for i, tok in enumerate(tokens.tolist()):
        if tok in eos_ids:
            return tokens[: i + 1].astype(np.int32)
    return tokens.astype(np.int32)


def _pad_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def _eos_ids(tokenizer, model) -> set[int]:
    ids = set()
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return ids


def _split(rows: list[tuple[int, int]], host: dict[str, torch.Tensor], layers: list[int],
           hidden_dtype: str) -> list[Capture]:
    """Cut the batch's flat host tensors into one `Capture` per sequence, given its (scored rows,
    hidden rows) (numpy views, no copies)."""
    own = {name.removeprefix("kind:"): t.numpy() for name, t in host.items() if name.startswith("kind:")}
    if not own:
        top_ids, top_lp, token_lp, tail = (host[name].numpy() for name in ("ids", "lp", "token", "tail"))
    draws = host["draws"].numpy() if "draws" in host else None
    hidden = {i: storage_numpy(host[f"hidden{i}"], hidden_dtype) for i in layers}
    out = []
    t0 = h0 = 0
    for scored, hidden_rows in rows:
        t1 = t0 + scored
        h1 = h0 + hidden_rows
        targets = (SimpleNamespace(**{name: arr[t0:t1] for name, arr in own.items()}) if own
                   else TopKLogprobs(top_ids[t0:t1], top_lp[t0:t1], token_lp[t0:t1], tail[t0:t1]))
        out.append(Capture(targets, {i: arr[h0:h1] for i, arr in hidden.items()},
                           None if draws is None else draws[t0:t1]))
        t0, h0 = t1, h1
    return out
