"""potstill's capture inside a vLLM engine: a worker extension (`vllm.LLM(worker_extension_cls=...)`).

vLLM 0.32 has no public hook for "the final hidden states of these positions", and its own log-prob
outputs hold only the top-K (no direct tail, no full distribution to draw from) and come back as
per-token Python objects. So the extension wraps the worker's model runner instead:

- After each `execute_model` (one engine step: the forward of every scheduled token, before
  sampling), the runner's `execute_model_state.hidden_states` holds the final hidden state (after
  the model's final norm) of every scheduled token, in the input batch's order; rows of request i
  are `query_start_loc[i] ...` for `num_scheduled_tokens[req]` tokens from position
  `num_computed_tokens_cpu[i]`. A request asks for capture through `SamplingParams.extra_args`
  (`{"potstill": {"key", "from", "hidden_from"}}`); the rows from its position `from` on (the
  positions that predict a scored token) are kept on the device, and so are the rows of the chosen
  decoder layers from `hidden_from` on (forward hooks: a vLLM Llama layer returns (hidden, residual),
  and the residual stream HF reports as `hidden_states[i]` is their sum).
- `potstill_take(takes)` (called with `LLM.collective_rpc` after `LLM.generate` returns) turns each
  finished request's rows into targets with `capture.topk_logprobs`, the same math as the HF
  backend (top-K, direct log tail, the actual token, draws from the record's own uniforms), with
  the model's own `compute_logits` as the LM head (vLLM's logit scale and soft cap included; under
  tensor parallelism it all-gathers the vocabulary shards, so every rank computes the same result).
- A request scored while it is decoded (`"decode"` in its ask) keeps no hidden rows: the runner's
  `_sample` is wrapped, and each step's logits rows of such requests (one per request, the logits
  vLLM samples from, copied first: the sampler scales them in place) go through the same
  `topk_logprobs` with the sampled token as the target; its draws use row j of the record's uniforms,
  from a PCG64 moved to that row.

Rows are kept by position, so a request that vLLM preempts and recomputes overwrites its own rows.
Hooks do not run inside CUDA graphs: the backend starts the engine eager when it taps hidden layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from potstill.teacher_gen.capture import decoder_layers, storage_numpy, to_storage, topk_logprobs

KEY = "potstill"  # the SamplingParams.extra_args entry of a request to capture


@dataclass
class CaptureSettings:
    """What a run asks of the capture (the same for every request of the run)."""

    top_k: int
    samples: int = 0
    sampler: str = "iid"
    draw_from_rest: bool = False
    hidden_layers: list[int] = field(default_factory=list)  # HF `hidden_states` indices, non-negative
    hidden_dtype: str = "bfloat16"
    logprob_dtype: str = "float32"  # float16: rounded on the device, as the HF backend does for unpacked stores
    chunk: int = 1024


@dataclass
class Take:
    """One finished request to turn into targets: its key, the ids its kept rows predict, in order,
    and the uniforms of its draws ([len(targets), N] float64; None without sampled targets)."""

    key: str
    targets: np.ndarray
    uniforms: np.ndarray | None = None
    hidden_rows: int = 0  # how many hidden-layer rows the record stores (from `hidden_from`)


class _Rows:
    """One request's kept rows: position-ordered chunks of [rows, width] device tensors."""

    def __init__(self) -> None:
        self.chunks: list[tuple[int, torch.Tensor]] = []

    def add(self, start: int, rows: torch.Tensor) -> None:
        # A recomputation (preemption) starts again at an earlier position: it replaces what is after it.
        kept = []
        for s, t in self.chunks:
            if s >= start:
                continue
            kept.append((s, t[: start - s]))
        kept.append((start, rows))
        self.chunks = kept

    def stacked(self) -> torch.Tensor | None:
        return torch.cat([t for _, t in self.chunks]) if self.chunks else None


class EngineCapture:
    """The state the extension keeps on one worker's model runner."""

    def __init__(self, runner: Any) -> None:
        missing = [name for name in ("execute_model", "_sample", "input_batch", "query_start_loc", "requests")
                   if not hasattr(runner, name)]
        if missing:  # vLLM's Model Runner V2 (vllm/v1/worker/gpu/) is shaped otherwise
            raise RuntimeError(f"potstill's vLLM capture needs vLLM's V1 model runner ({type(runner).__name__} "
                               f"has no {', '.join(missing)}): set VLLM_USE_V2_MODEL_RUNNER=0")
        self.runner = runner
        self.settings = CaptureSettings(top_k=0)
        self.finals: dict[str, _Rows] = {}
        self.layers: dict[tuple[str, int], _Rows] = {}
        self.last: dict[int, torch.Tensor] = {}  # layer index -> the latest forward's states (hooks)
        self._handles: list[Any] = []
        model = runner.get_model()
        text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.num_layers = int(text_config.num_hidden_layers)
        self.model = model
        original = runner.execute_model

        def execute_model(scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
            out = original(scheduler_output, *args, **kwargs)
            self.after_forward(scheduler_output)
            return out

        runner.execute_model = execute_model
        self.pending: list[tuple[int, dict, int]] = []  # this step's logits rows to capture: (row, request's ask, position)
        self.decoded: dict[str, dict[str, _Rows]] = {}  # key -> field -> rows captured from the sampler's logits
        self._rngs: dict[str, tuple[int, np.random.Generator]] = {}
        original_sample = runner._sample

        def sample(logits: Any, *args: Any, **kwargs: Any) -> Any:
            pending, self.pending = self.pending, []
            if not pending or logits is None:
                return original_sample(logits, *args, **kwargs)
            rows = [row for row, _, _ in pending]
            kept = _take_rows(logits, rows).clone()  # a copy: the sampler may scale the logits in place
            out = original_sample(logits, *args, **kwargs)
            self.capture_decoded(kept, _take_rows(out.sampled_token_ids, rows)[:, 0], pending)
            return out

        runner._sample = sample

    # -- settings and hooks ------------------------------------------------------------------
    def configure(self, settings: CaptureSettings) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.settings = settings
        self.forget()
        wanted = [i for i in settings.hidden_layers if i < self.num_layers]
        if not wanted:
            return
        layers = decoder_layers(self.model.model, self.num_layers)
        for i in wanted:
            if i == 0:  # the embeddings: layer 0's input (its args: positions, hidden_states, residual)
                self._handles.append(layers[0].register_forward_pre_hook(self._keep_input(0)))
            else:
                self._handles.append(layers[i - 1].register_forward_hook(self._keep_output(i)))

    def _keep_input(self, index: int) -> Any:
        def hook(module: Any, args: tuple) -> None:
            self.last[index] = args[1]

        return hook

    def _keep_output(self, index: int) -> Any:
        def hook(module: Any, args: tuple, output: Any) -> None:
            if isinstance(output, tuple):  # (hidden, residual): the residual stream is their sum
                hidden, residual = output[0], output[1]
                self.last[index] = hidden if residual is None else hidden + residual
            else:
                self.last[index] = output

        return hook

    # -- each engine step ----------------------------------------------------------------------
    def after_forward(self, scheduler_output: Any) -> None:
        self.pending = []
        state = getattr(self.runner, "execute_model_state", None)
        if state is None or not scheduler_output.total_num_scheduled_tokens:
            return
        hidden = state.hidden_states
        batch = self.runner.input_batch
        starts = self.runner.query_start_loc.np
        scheduled = scheduler_output.num_scheduled_tokens
        for index, req_id in enumerate(batch.req_ids):
            count = scheduled.get(req_id)
            request = self.runner.requests.get(req_id)
            if not count or request is None or request.sampling_params is None:
                continue
            wanted = (request.sampling_params.extra_args or {}).get(KEY)
            if wanted is None:
                continue
            row0, pos0 = int(starts[index]), int(batch.num_computed_tokens_cpu[index])
            if wanted.get("decode"):  # the step's last row, its logits row, predicts the token sampled here
                if pos0 + count - 1 >= int(wanted["from"]):
                    self.pending.append((index, wanted, pos0 + count - 1))
                continue
            self._keep(self.finals, wanted["key"], hidden, row0, pos0, count, int(wanted["from"]))
            for layer in self.settings.hidden_layers:
                states = hidden if layer == self.num_layers else self.last.get(layer)
                if states is not None:
                    self._keep(self.layers, (wanted["key"], layer), states, row0, pos0, count,
                               int(wanted["hidden_from"]))
        self.last.clear()

    @staticmethod
    def _keep(store: dict, key: Any, states: torch.Tensor, row0: int, pos0: int, count: int, first: int) -> None:
        """Keep the rows of positions >= `first` among this step's `count` rows from position `pos0`."""
        skip = max(0, first - pos0)
        if skip >= count:
            return
        # A copy: the runner reuses its buffers from step to step.
        rows = states[row0 + skip : row0 + count].clone()
        store.setdefault(key, _Rows()).add(pos0 + skip, rows)

    def capture_decoded(self, logits: torch.Tensor, sampled: torch.Tensor, pending: list[tuple[int, dict, int]]) -> None:
        """Targets from the logits the engine sampled from (no second LM head), kept by position."""
        s = self.settings
        uniforms = draws = None
        if s.samples:
            rows = [self._uniforms(ask, position - int(ask["from"])) for _, ask, position in pending]
            uniforms = torch.from_numpy(np.stack(rows)).to(logits.device)
            draws = torch.empty(uniforms.shape, dtype=torch.int32, device=logits.device)
        ids, lps, token, tail = topk_logprobs(
            logits, _identity, sampled, s.top_k, chunk=s.chunk, out_dtype=_dtype(s), uniforms=uniforms,
            draws_out=draws, sampler=s.sampler, draw_from_rest=s.draw_from_rest)
        fields = {"ids": ids, "lp": lps, "token": token, "tail": tail}
        if draws is not None:
            fields["draws"] = draws
        for r, (_, ask, position) in enumerate(pending):
            kept = self.decoded.setdefault(ask["key"], {})
            for name, t in fields.items():
                kept.setdefault(name, _Rows()).add(position, t[r : r + 1])

    def _uniforms(self, ask: dict, row: int) -> np.ndarray:
        """Row `row` of the record's uniforms (`jobs.target_uniforms`: numpy PCG64, N doubles a row,
        one 64-bit step each), from a generator kept per request, moved when a row is not the next."""
        n = self.settings.samples
        at, rng = self._rngs.get(ask["key"], (-1, None))
        if rng is None or at != row:
            bits = np.random.PCG64(int(ask["seed"]))
            bits.advance(row * n)
            rng = np.random.Generator(bits)
        self._rngs[ask["key"]] = (row + 1, rng)
        return rng.random(n)

    # -- after a call ----------------------------------------------------------------------------
    @torch.inference_mode()
    def take(self, takes: list[Take]) -> list[dict[str, np.ndarray]]:
        """The targets (and hidden rows) of these finished requests, as host arrays; forgets their rows."""
        s = self.settings
        finals, targets, uniforms = [], [], []
        for t in takes:
            if t.key in self.decoded:
                continue
            rows = self.finals.pop(t.key, None)
            states = rows.stacked() if rows is not None else None
            n = len(t.targets)
            if states is None or states.shape[0] < n:
                got = 0 if states is None else states.shape[0]
                raise RuntimeError(f"potstill capture: request {t.key} kept {got} rows for {n} targets")
            finals.append(states[:n])
            targets.append(t.targets)
            if s.samples:
                uniforms.append(t.uniforms)
        out: dict[str, np.ndarray] = {}
        if finals:
            hidden = torch.cat(finals)
            device = hidden.device
            target_ids = torch.from_numpy(np.concatenate(targets).astype(np.int64)).to(device)
            u = draws = None
            if s.samples:
                u = torch.from_numpy(np.concatenate(uniforms)).to(device)
                draws = torch.empty(u.shape, dtype=torch.int32, device=device)
            ids, lps, token, tail = topk_logprobs(
                hidden, self.model.compute_logits, target_ids, s.top_k, chunk=s.chunk, out_dtype=_dtype(s),
                uniforms=u, draws_out=draws, sampler=s.sampler, draw_from_rest=s.draw_from_rest,
            )
            out = {"ids": ids.cpu().numpy(), "lp": lps.cpu().numpy(), "token": token.cpu().numpy(),
                   "tail": tail.cpu().numpy()}
            if draws is not None:
                out["draws"] = draws.cpu().numpy()
        result = []
        t0 = 0
        for t in takes:
            if t.key in self.decoded:
                result.append(self._decoded(t))
                continue
            t1 = t0 + len(t.targets)
            one = {name: arr[t0:t1] for name, arr in out.items()}
            for layer in s.hidden_layers:
                rows = self.layers.pop((t.key, layer), None)
                states = rows.stacked() if rows is not None else None
                if states is None or states.shape[0] < t.hidden_rows:
                    got = 0 if states is None else states.shape[0]
                    raise RuntimeError(f"potstill capture: request {t.key} kept {got} rows of hidden layer "
                                       f"{layer} for {t.hidden_rows}")
                one[f"hidden{layer}"] = storage_numpy(to_storage(states[: t.hidden_rows], s.hidden_dtype).cpu(), s.hidden_dtype)
            result.append(one)
            t0 = t1
        return result

    def _decoded(self, t: Take) -> dict[str, np.ndarray]:
        fields = self.decoded.pop(t.key)
        self._rngs.pop(t.key, None)
        n = len(t.targets)
        one = {}
        for name, rows in fields.items():
            states = rows.stacked()
            if states is None or states.shape[0] < n:
                got = 0 if states is None else states.shape[0]
                raise RuntimeError(f"potstill capture: request {t.key} decoded {got} rows for {n} tokens")
            one[name] = states[:n].cpu().numpy()
        return one

    def forget(self) -> None:
        self.finals.clear()
        self.layers.clear()
        self.decoded.clear()
        self._rngs.clear()
        self.pending = []


def _take_rows(t: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Rows of `t`: a view when they are consecutive (the usual case, every request captured), else
    stacked. index_select was ~35 ms a call on vLLM's CPU worker threads, against ~1 ms for this."""
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return t[rows[0] : rows[0] + len(rows)]
    return torch.stack([t[r] for r in rows])


def _identity(logits: torch.Tensor) -> torch.Tensor:
    return logits


def _dtype(settings: CaptureSettings) -> torch.dtype:
    return torch.float16 if settings.logprob_dtype == "float16" else torch.float32


class PotstillWorkerExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`); called through `LLM.collective_rpc`."""

    def potstill_configure(self, settings: CaptureSettings) -> bool:
        runner = self.model_runner  # type: ignore[attr-defined]
        capture = getattr(runner, "potstill_capture", None)
        if capture is None:
            capture = EngineCapture(runner)
            runner.potstill_capture = capture
        capture.configure(settings)
        return True

    def potstill_take(self, takes: list[Take]) -> list[dict[str, np.ndarray]]:
        return self.model_runner.potstill_capture.take(takes)  # type: ignore[attr-defined]

    def potstill_forget(self) -> None:
        self.model_runner.potstill_capture.forget()  # type: ignore[attr-defined]
