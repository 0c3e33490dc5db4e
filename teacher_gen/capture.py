"""Backend-independent capture math: top-k log-probs from final hidden states, and hidden-state taps.

The memory rule: never hold a [batch, seq, vocab] tensor, let alone in fp32. The LM head runs
on `chunk` positions at a time, and only that chunk's logits are widened to fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from potstill.teacher_gen.errors import GenerateError

LogitTransform = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class TopKLogprobs:
    """The teacher's targets at S scored positions (row j: distribution over the j-th scored token).

    `logprobs` holds fp32 values or, when the device already rounded them, the store's dtype;
    `ids` are padded with -1 (log-prob -inf) when the vocabulary is smaller than K.
    """

    ids: np.ndarray  # [S, K] int32, by descending probability
    logprobs: np.ndarray  # [S, K]
    token_logprob: np.ndarray  # [S] float32: log-prob of the token that actually follows
    tail_logprob: np.ndarray  # [S] float32: log of the mass outside the top-K (-inf when K covers the vocabulary)

    def __len__(self) -> int:
        return len(self.token_logprob)


# -- logits ------------------------------------------------------------------------------------
def logit_transform_params(model_config: Any) -> tuple[float | None, float | None, float | None]:
    """(scale, divide, cap) of `logit_transform`, as numbers (the fused kernel applies them itself)."""
    text_config = getattr(model_config, "get_text_config", lambda: model_config)()
    return (getattr(text_config, "logit_scale", None), getattr(text_config, "logits_scaling", None),
            getattr(text_config, "final_logit_softcapping", None))


def logit_transform(model_config: Any) -> LogitTransform | None:
    """What the model does to its LM-head output before returning logits, if anything.

    Covers the transforms of transformers' causal LMs: Cohere's `logit_scale` (multiply),
    Granite's `logits_scaling` (divide) and Gemma 2/3's `final_logit_softcapping` (tanh cap).
    `HFTeacher` checks the result against the model's own logits at load time, so a model
    with a transform missing here fails loudly instead of writing wrong targets.
    """
    scale, divide, cap = logit_transform_params(model_config)
    if not (scale or divide or cap):
        return None
    if (scale and scale < 0) or (divide and divide < 0) or (cap and cap < 0):
        # the capture picks the top-k before the transform, which needs it to be increasing
        raise GenerateError("the teacher's config has a negative logit scale or cap; potstill cannot capture it")

    def apply(logits: torch.Tensor) -> torch.Tensor:
        if scale:
            logits = logits * scale
        if divide:
            logits = logits / divide
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return apply


def choose_block(vocab: int, k: int) -> int | None:
    """A block length for `block_topk` that divides the vocabulary into plenty of blocks, if any."""
    for block in (256, 512, 128, 1024, 64):
        if vocab % block == 0 and vocab // block >= 4 * k:
            return block
    return None


def block_topk(x: torch.Tensor, k: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k over the last dim, reading a full row once and sorting only k * block candidates.

    Every one of the k largest values lies in one of the k blocks with the largest maxima (if a
    value's block were not among them, those k blocks would hold k larger values). So: block
    maxima, top-k blocks, then top-k among their elements. Equal values may come in another
    order than `torch.topk`'s; the values are the same.
    """
    m, v = x.shape
    blocks = x.view(m, v // block, block)
    _, block_ids = blocks.amax(dim=-1).topk(k, dim=-1)  # [m, k]
    candidates = blocks.gather(1, block_ids[..., None].expand(m, k, block)).reshape(m, k * block)
    values, pos = candidates.topk(k, dim=-1)
    return values, block_ids.gather(1, pos // block) * block + pos % block


Reduction = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
FusedTopKFn = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def make_logsumexp(transform: LogitTransform | None, compile: bool = False) -> Reduction:
    """`lse(logits, top_idx)`: the fp32 logsumexp of a chunk's (transformed) logits in the model
    dtype, over the ids NOT in `top_idx` (every id when it is None); −inf when `top_idx` holds them all.

    With the top-K values this is all the capture needs: the logsumexp of every logit is the
    logsumexp of [top-K logits, this], and the log tail (format §4.4) is this minus that, formed
    directly rather than as 1 − Σ exp(top-K), which cancels below ~1e-6 (`normalise_topk`).
    Eager PyTorch materializes an fp32 copy of the chunk; compiled, the widening, the transform,
    the masking and the reduction fuse into one pass that reads the logits once.
    """

    def lse(logits: torch.Tensor, top_idx: torch.Tensor | None) -> torch.Tensor:
        x = logits.float()
        if transform is not None:
            x = transform(x)
        if top_idx is not None:
            if x is logits:  # an fp32 model: .float() returned the logits themselves, which the caller still needs
                x = x.clone()
            x.scatter_(-1, top_idx, float("-inf"))
        return torch.logsumexp(x, dim=-1)

    if not compile:
        return lse
    compiled = torch.compile(lse, dynamic=True)
    state = {"fn": compiled}

    def guarded(logits: torch.Tensor, top_idx: torch.Tensor | None) -> torch.Tensor:
        try:
            return state["fn"](logits, top_idx)
        except Exception as e:  # a compiler problem must not stop a capture: fall back once, loudly
            if state["fn"] is lse:
                raise
            import warnings

            warnings.warn(f"torch.compile of the logsumexp failed ({type(e).__name__}); using eager", stacklevel=2)
            state["fn"] = lse
            return lse(logits, top_idx)

    return guarded


@torch.no_grad()
def topk_logprobs(
    hidden: torch.Tensor,
    head: nn.Module,
    targets: torch.Tensor,
    k: int,
    *,
    chunk: int = 1024,
    transform: LogitTransform | None = None,
    out_dtype: torch.dtype = torch.float32,
    logsumexp: Reduction | None = None,
    block: int | None = None,
    uniforms: torch.Tensor | None = None,
    draws_out: torch.Tensor | None = None,
    sampler: str = "iid",
    draw_from_rest: bool = False,
    fused: FusedTopKFn | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k ids/log-probs, the target token's log-prob and the log tail for M positions.

    `hidden` [M, H] are final hidden states (after the final norm) at the positions that predict
    `targets` [M]. Returns device tensors: ids [M, K] int32, log-probs [M, K] `out_dtype`,
    token log-probs [M] fp32, log tail [M] fp32 (the log of the mass outside the top-K, formed
    directly: `normalise_topk`; −inf when K covers the vocabulary, 0 when K is 0). Log-probs are
    computed in fp32. K may be 0.

    With `uniforms` [M, N] (float64 in [0, 1)), also fills `draws_out` [M, N] (int32) with N
    draws per position from the distribution, inside the same chunk loop (`sample_chunk`), placed
    by `sampler` (`sampling_points`); with `draw_from_rest` (hybrid targets) from the distribution
    restricted to the ids outside the top-K.

    `fused(logits, k) -> (top logits, top ids, rest)` (`fused_capture.FusedTopK`) replaces the
    top-k and `logsumexp` with one read of each chunk's logits; the results are the same.

    The top-k and the target's logit are picked from the model-dtype logits and widened
    afterwards: widening is exact and the logit transforms are increasing, so they are the
    same values as in an fp32 copy. Only the logsumexp outside the top-K needs all logits in fp32.
    """
    m = hidden.shape[0]
    device = hidden.device
    lse_fn = logsumexp or make_logsumexp(transform)
    ids_out = torch.full((m, k), -1, dtype=torch.int32, device=device)
    lp_out = torch.full((m, k), float("-inf"), dtype=out_dtype, device=device)
    token_out = torch.empty(m, dtype=torch.float32, device=device)
    tail_out = torch.empty(m, dtype=torch.float32, device=device)

    def finish(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return transform(x) if transform is not None else x

    for start in range(0, m, chunk):
        stop = min(start + chunk, m)
        logits = head(hidden[start:stop])
        k_eff = min(k, logits.shape[-1])
        rest = None
        if fused is not None and k_eff == k > 0:
            top_val, top_idx, rest = fused(logits, k)
        elif block is not None and k_eff == k > 0:
            top_val, top_idx = block_topk(logits, k, block)
        else:
            top_val, top_idx = logits.topk(k_eff, dim=-1)
        token_x = finish(logits.gather(1, targets[start:stop, None].long()).squeeze(1))
        if rest is None:
            rest = lse_fn(logits, top_idx if k_eff else None)
        if uniforms is not None and draws_out is not None:
            exclude = top_idx if draw_from_rest and k_eff else None
            draws_out[start:stop] = sample_chunk(logits, uniforms[start:stop], transform, sampler=sampler, exclude=exclude)
        del logits
        if k_eff:
            top_lp, token_lp, tail = normalise_topk(finish(top_val), rest, token_x)
            ids_out[start:stop, :k_eff] = top_idx.to(torch.int32)
            lp_out[start:stop, :k_eff] = top_lp.to(out_dtype)
            tail_out[start:stop] = tail
        else:  # no top-K (sampled targets only): `rest` is the logsumexp of every logit
            token_lp = token_x - rest
            tail_out[start:stop] = 0.0
        token_out[start:stop] = token_lp
    return ids_out, lp_out, token_out, tail_out


def normalise_topk(top_x: torch.Tensor, rest: torch.Tensor, token_x: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probs from fp32 logits: the top-K [m, K], the actual token [m], and the log tail [m].

    The logsumexp of all logits is that of the K + 1 values [top-K logits, `rest`] (`rest` = the
    logsumexp outside the top-K), taken as μ + log1p(Σ_{others} exp(v − μ)) with μ the largest of
    them, whose exp is exactly 1. Each result is then (value − μ) − log1p(…): exact to float32's
    relative precision even near 0 (a confident top token, a tail near 1), where x − logsumexp(x)
    carries the rounding of a value ~30. The tail is `rest` minus that logsumexp: −inf when the
    top-K covers the vocabulary (`rest` is −inf), never 1 − Σ exp(top-K).
    """
    values = torch.cat([top_x, rest.unsqueeze(-1)], dim=-1)
    mu, big = values.max(dim=-1, keepdim=True)
    offset = torch.log1p(torch.exp(values - mu).scatter_(-1, big, 0.0).sum(dim=-1, keepdim=True))
    top_lp = (top_x - mu) - offset
    mu, offset = mu.squeeze(-1), offset.squeeze(-1)
    return top_lp, (token_x - mu) - offset, (rest - mu) - offset


# Float64 elements of one sampling block: rows of a chunk are sampled this many vocabulary entries
# at a time (128 MiB: 110 rows at V = 152k), so memory does not grow with the chunk size.
SAMPLE_BLOCK_ELEMENTS = 1 << 24


def sampling_cdf(logits: torch.Tensor, transform: LogitTransform | None = None,
                 exclude: torch.Tensor | None = None) -> torch.Tensor:
    """The float64 cumulative distribution the sampler inverts, [m, V] (format §4.2).

    x = the fp32 logits (after the model's transform, in fp32) widened to float64;
    p = exp(x − logsumexp(x)), all in float64; the result is the running sum of p in float64.
    Its consecutive differences are p to float64 rounding: the draws are exact to ~1e-12 in total
    variation, where an fp32 running sum is 1e-4 to 1e-3 off at V = 32k–152k and never reaches
    the tokens after the point where it stops growing. `exclude` [m, H]: ids whose p is set to 0
    before the running sum (hybrid targets draw from the rest only).
    """
    x = logits.float()
    if transform is not None:
        x = transform(x)
    x = x.double()
    x -= torch.logsumexp(x, dim=-1, keepdim=True)
    p = x.exp_()
    if exclude is not None:
        p.scatter_(-1, exclude.long(), 0.0)
    return p.cumsum_(dim=-1)


SAMPLERS = ("iid", "systematic", "stratified")


def sampling_points(uniforms: torch.Tensor, sampler: str = "iid") -> torch.Tensor:
    """Where a row's N draws fall in [0, 1), from its N uniforms u_0 … u_{N−1} (format §4.2).

    "iid": the uniforms themselves (N independent draws). "systematic": (j + u_0) / N for
    j = 0 … N−1, one uniform per row, evenly spaced points. "stratified": (j + u_j) / N, one point
    in each of the N strata [j/N, (j+1)/N). Each point is uniform on [0, 1), so every token's
    expected count is N · p_v under all three and counts / N stays an unbiased estimate of p; the
    spaced points make the counts far less variable (systematic: within floor/ceil of N · p_v).
    """
    if sampler == "iid":
        return uniforms
    n = uniforms.shape[-1]
    j = torch.arange(n, dtype=torch.float64, device=uniforms.device)
    u = uniforms.to(torch.float64)
    if sampler == "systematic":
        return (j + u[..., :1]) / n
    if sampler == "stratified":
        return (j + u) / n
    raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")


def sample_chunk(logits: torch.Tensor, uniforms: torch.Tensor, transform: LogitTransform | None = None, *,
                 sampler: str = "iid", exclude: torch.Tensor | None = None) -> torch.Tensor:
    """N draws per row from softmax(logits) by inverse CDF: [m, V] logits, [m, N] uniforms in
    [0, 1) -> [m, N] int32 token ids.

    Point t (`sampling_points` of the uniforms) picks the first token whose cumulative probability
    (`sampling_cdf`) exceeds t · total (total = the last cumulative value, 1 up to rounding), so a
    token of probability 0 is never drawn and every token v is drawn with probability p_v to
    float64 rounding. With `exclude` [m, H] (the row's top-H ids), those tokens get probability 0
    before the running sum: the draws come from p restricted to the rest, renormalised by the rest's
    mass (total). A row whose rest is empty draws its last token (weight 0 in the hybrid estimate).
    The draws depend only on the row's logits and its uniforms, never on the other rows of the
    batch. Rows go through in blocks of SAMPLE_BLOCK_ELEMENTS float64 values.
    """
    m, v = logits.shape
    out = torch.empty(uniforms.shape, dtype=torch.int32, device=logits.device)
    rows = max(1, SAMPLE_BLOCK_ELEMENTS // max(v, 1))
    for start in range(0, m, rows):
        cdf = sampling_cdf(logits[start : start + rows], transform,
                           None if exclude is None else exclude[start : start + rows])
        total = cdf[:, -1:]
        points = sampling_points(uniforms[start : start + rows].to(cdf.device, torch.float64), sampler) * total
        # Below the total even after rounding, so the first cumulative value above it always exists.
        points = torch.minimum(points, torch.nextafter(total, torch.zeros_like(total)))
        found = torch.searchsorted(cdf, points.contiguous(), right=True)
        out[start : start + rows] = found.clamp_(max=v - 1).to(torch.int32)  # only an empty rest reaches v
        del cdf
    return out


def reference_topk(logprobs: np.ndarray, targets: np.ndarray, k: int) -> TopKLogprobs:
    """Top-k targets from a full [S, V] log-prob matrix (fp32), for tests and the vLLM adapter's
    differential check. Ties are broken by lower token id; the log tail is formed directly in float64."""
    s, v = logprobs.shape
    k_eff = min(k, v)
    order = np.argsort(-logprobs, axis=-1, kind="stable")[:, :k_eff]
    top = np.take_along_axis(logprobs, order, -1).astype(np.float32)
    ids = np.full((s, k), -1, dtype=np.int32)
    lps = np.full((s, k), -np.inf, dtype=np.float32)
    ids[:, :k_eff] = order
    lps[:, :k_eff] = top
    token = logprobs[np.arange(s), targets].astype(np.float32)
    rest = logprobs.astype(np.float64)
    np.put_along_axis(rest, order, -np.inf, axis=-1)
    peak = rest.max(-1, keepdims=True, initial=-np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        tail = (np.log(np.exp(rest - peak).sum(-1)) + peak[:, 0]).astype(np.float32)
    tail[np.isneginf(peak[:, 0])] = -np.inf
    return TopKLogprobs(ids, lps, token, tail)


# -- hidden states -----------------------------------------------------------------------------
def resolve_layers(indices: list[int], num_layers: int) -> list[int]:
    """HF `hidden_states` indices (negative from the end) as sorted, distinct, non-negative ones."""
    out = set()
    for i in indices:
        j = i + num_layers + 1 if i < 0 else i
        if not 0 <= j <= num_layers:
            raise GenerateError(
                f"--hidden-layers {i}: the teacher has {num_layers} layers, so indices run from "
                f"{-(num_layers + 1)} to {num_layers} (0 = embeddings, {num_layers} or -1 = last, after the final norm)"
            )
        out.add(j)
    return sorted(out)


def decoder_layers(base_model: nn.Module, num_layers: int) -> nn.ModuleList:
    """The model's list of decoder layers (`layers`, `h`, `blocks`, ... : the ModuleList of length L)."""
    for name in ("layers", "h", "blocks", "decoder.layers"):
        module: Any = base_model
        for part in name.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    for module in base_model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    raise GenerateError(f"cannot find the {num_layers} decoder layers of {type(base_model).__name__}")


def _tensor_of(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, tuple | list) else value


class LayerTaps:
    """Forward hooks on exactly the modules that produce the requested hidden states.

    HF `hidden_states[i]` is the input of decoder layer i (i = 0: the embeddings, as the model
    passes them on) and, for 1 <= i < L, the output of layer i - 1. Index L is the final
    hidden state after the norm, which the caller already has: no hook is needed for it.
    """

    def __init__(self, layers: nn.ModuleList, indices: list[int]) -> None:
        self.num_layers = len(layers)
        self.indices = indices
        self.captured: dict[int, torch.Tensor] = {}
        self.steps: dict[int, list[torch.Tensor]] | None = None  # while `over_steps`: every forward's states
        self._handles = []
        for i in indices:
            if i == 0:
                self._handles.append(layers[0].register_forward_pre_hook(self._pre_hook(0), with_kwargs=True))
            elif i < self.num_layers:
                self._handles.append(layers[i - 1].register_forward_hook(self._hook(i)))

    def _hook(self, index: int) -> Callable:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._keep(index, _tensor_of(output))

        return hook

    def _pre_hook(self, index: int) -> Callable:
        def hook(module: nn.Module, args: Any, kwargs: dict) -> None:
            self._keep(index, args[0] if args else kwargs["hidden_states"])

        return hook

    def _keep(self, index: int, states: torch.Tensor) -> None:
        if self.steps is not None:
            self.steps[index].append(states)
        else:
            self.captured[index] = states

    @contextmanager
    def over_steps(self, body: nn.Module) -> Iterator[dict[int, list[torch.Tensor]]]:
        """Keep the states of every forward inside (one per decoding step of `generate`), in order,
        instead of the last one's; index L, the final state after the norm, from `body`'s output."""
        self.steps = {i: [] for i in self.indices}
        handle = None
        if self.num_layers in self.indices:
            handle = body.register_forward_hook(lambda module, args, output: self._keep(self.num_layers, output[0]))
        try:
            yield self.steps
        finally:
            self.steps = None
            if handle is not None:
                handle.remove()

    def take(self, index: int, final_hidden: torch.Tensor) -> torch.Tensor:
        return final_hidden if index == self.num_layers else self.captured[index]

    def clear(self) -> None:
        self.captured.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.captured.clear()


def to_storage(t: torch.Tensor, dtype: str) -> torch.Tensor:
    """Hidden states in the stored element type: float16, or bfloat16 bits as int16 (read back as uint16)."""
    if dtype == "float16":
        return t.to(torch.float16)
    return t.to(torch.bfloat16).view(torch.int16)


def storage_numpy(t: torch.Tensor, dtype: str) -> np.ndarray:
    arr = t.numpy()
    return arr.view(np.uint16) if dtype == "bfloat16" else arr
