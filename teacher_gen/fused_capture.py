"""A fused capture kernel (Triton): the top-K and the logsumexp outside it in one read of the logits.

The torch path (`capture.topk_logprobs` with `torch.topk` / `block_topk` and `make_logsumexp`) is
the reference and the fallback; this computes the same three things for a chunk of logits [m, V]:

  * the top-K ids and their logits (exactly `torch.topk`'s, up to the order of equal values),
  * `rest`, the fp32 logsumexp of the transformed logits NOT in the top-K (−inf when K covers the
    vocabulary), from which `normalise_topk` forms the log-probs and the direct log tail,

reading the logits from device memory once instead of three times (top-k, fp32 copy, reduction).

Stage 1 (Triton, grid = rows × vocabulary blocks): a program loads one block of one row, keys
every element by (logit, lower id first) packed into one int64 so that keys are distinct and order
like the logits, keeps the block's K largest keys (a bitonic top-K, `tl.topk`, over the maxima of
small groups of entries, then over the entries of the K best groups, which hold them all), and sums
exp(transformed logit) over the block's other elements (its "outside" logsumexp). The logit
transforms (scale, divide, tanh softcap) are applied in fp32 there, as the model applies them.
Stage 2 (torch, on num_blocks · K keys per row, a few percent of the logits): the row's top-K
keys (`torch.topk` on int64 keys: exact, no rounding), decoded to ids and logits; `rest` is the
logsumexp of every block's outside logsumexp and the candidates that did not make the top-K —
formed directly from the excluded terms, never as a difference, so a tail of 1e-9 keeps its digits.

Triton is optional (`pip install potstill[gpu]`); without it, or off CUDA, the torch path runs.
On a CPU, `TRITON_INTERPRET=1` runs the kernel through Triton's interpreter (the tests do).
NaN logits are outside the contract (neither path defines their rank).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from dataclasses import dataclass
from typing import Any

import torch

# Vocabulary entries per program. Bigger blocks mean fewer candidates for stage 2 (num_blocks · K
# per row, 2,048 at V = 128,256 and K = 64) and fewer programs; the two bitonic top-Ks inside a
# block run over about 2·sqrt(block · K) keys, not the whole block.
DEFAULT_BLOCK = 4096
MAX_K = 128  # K is rounded up to a power of two inside the kernel; 128 keeps the block's registers in bounds


@dataclass(frozen=True)
class LogitParams:
    """The model's logit transform as numbers (`capture.logit_transform` applies the same in torch):
    x · scale, then x / divide, then tanh(x / cap) · cap; None = that step is absent."""

    scale: float | None = None
    divide: float | None = None
    cap: float | None = None


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Triton's CPU interpreter is on: the kernel runs on CPU tensors (slowly; for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.cache
def _kernel() -> Any:
    """The stage-1 kernel, compiled on first use so importing this module never needs Triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def block_topk_kernel(
        logits_ptr, row_stride, vocab,
        keys_ptr, outside_ptr, num_blocks,
        scale, divide, cap,
        K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr, GROUP: tl.constexpr,
        HAS_SCALE: tl.constexpr, HAS_DIVIDE: tl.constexpr, HAS_CAP: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1)
        start = blk * BLOCK
        row_ptr = logits_ptr + row * row_stride
        ids = start + tl.arange(0, BLOCK)
        valid = ids < vocab
        raw = tl.load(row_ptr + ids, mask=valid, other=float("-inf")).to(tl.float32)

        # Sort key: the fp32 bits made order-preserving as a signed int (negative floats count down),
        # in the high word; the low word is 2^32 − 1 − id, so equal logits rank the lower id first.
        # Padding past the vocabulary gets the lowest high word: it ranks below every real -inf.
        bits = raw.to(tl.int32, bitcast=True)
        ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        ordered = tl.where(valid, ordered, -2147483647 - 1)
        keys = (ordered.to(tl.int64) << 32) | (0xFFFFFFFF - ids.to(tl.int64))

        # The block's K largest keys lie in the KP groups (of GROUP consecutive entries) with the
        # largest maxima: a key outside them is below KP group maxima, so below K larger keys. A
        # bitonic top-K over the group maxima, then over those groups' entries (read again: they
        # were just loaded, from cache), costs a fraction of one over the whole block.
        group_max = tl.max(tl.reshape(keys, [BLOCK // GROUP, GROUP]), axis=1)
        top_groups = tl.topk(group_max, KP)
        group_ids = 0xFFFFFFFF - (top_groups & 0xFFFFFFFF)
        first = group_ids - (group_ids - start) % GROUP  # the first id of each chosen group
        cand_ids = tl.reshape(first[:, None] + tl.arange(0, GROUP)[None, :], [KP * GROUP])
        cand_valid = cand_ids < vocab
        cand = tl.load(row_ptr + cand_ids, mask=cand_valid, other=float("-inf")).to(tl.float32)
        cand_bits = cand.to(tl.int32, bitcast=True)
        cand_ordered = tl.where(cand_bits < 0, cand_bits ^ 0x7FFFFFFF, cand_bits)
        cand_ordered = tl.where(cand_valid, cand_ordered, -2147483647 - 1)
        cand_keys = (cand_ordered.to(tl.int64) << 32) | (0xFFFFFFFF - cand_ids)
        top = tl.topk(cand_keys, KP)  # descending
        tl.store(keys_ptr + (row * num_blocks + blk) * K + tl.arange(0, KP), top, mask=tl.arange(0, KP) < K)

        # Everything below the K-th key is outside the block's candidates.
        kth = tl.sum(tl.where(tl.arange(0, KP) == K - 1, top, 0), axis=0)
        x = raw
        if HAS_SCALE:
            x = x * scale
        if HAS_DIVIDE:
            x = x / divide
        if HAS_CAP:
            # tanh to a few fp32 ulps without libdevice (the interpreter has none): an odd Taylor
            # polynomial near 0, where (1 − e)/(1 + e) would cancel, the exponential form elsewhere
            y = x / cap
            a = tl.abs(y)
            y2 = y * y
            near = y * (1.0 + y2 * (-1.0 / 3.0 + y2 * (2.0 / 15.0 + y2 * (-17.0 / 315.0 + y2 * (62.0 / 2835.0)))))
            e = tl.exp(-2.0 * a)
            far = (1.0 - e) / (1.0 + e)
            far = tl.where(y < 0, -far, far)
            x = tl.where(a < 0.25, near, far) * cap
        # (padding stays out after the transform too: a softcap maps -inf to -cap, which counts)
        x = tl.where((keys < kth) & valid, x, float("-inf"))
        peak = tl.max(x, axis=0)
        safe = tl.where(peak == float("-inf"), 0.0, peak)  # an all -inf block must give -inf, not NaN
        total = tl.sum(tl.exp(x - safe), axis=0)
        # total ≥ 1 unless the block has nothing outside its candidates (all -inf): then -inf
        tl.store(outside_ptr + row * num_blocks + blk, tl.where(total > 0, safe + tl.log(tl.maximum(total, 1.0)), float("-inf")))

    return block_topk_kernel


def decode_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage-1 keys -> (fp32 logits, int64 ids); padding keys decode to (-inf, an id ≥ V)."""
    ordered = (keys >> 32).to(torch.int32)
    bits = torch.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered)
    values = bits.view(torch.float32)
    values = torch.where(ordered == torch.iinfo(torch.int32).min, float("-inf"), values)
    ids = 0xFFFFFFFF - (keys & 0xFFFFFFFF)
    return values, ids


class FusedTopK:
    """`fused(logits, k) -> (top logits fp32 [m, k], top ids int64 [m, k], rest fp32 [m])` for a chunk
    of untransformed logits [m, V] (any float dtype, rows contiguous): what the torch path gets from
    `torch.topk` and `make_logsumexp(transform)(logits, top_idx)`, in one read of the logits."""

    def __init__(self, params: LogitParams | None = None, block: int = DEFAULT_BLOCK) -> None:
        if block & (block - 1):
            raise ValueError(f"the block length must be a power of two, got {block}")
        self.params = params or LogitParams()
        self.block = block

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """The fp32 transform, in torch, exactly as `capture.logit_transform` applies it."""
        p = self.params
        if p.scale:
            x = x * p.scale
        if p.divide:
            x = x / p.divide
        if p.cap:
            x = torch.tanh(x / p.cap) * p.cap
        return x

    def __call__(self, logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m, vocab = logits.shape
        if not 1 <= k <= min(MAX_K, vocab):
            raise ValueError(f"the fused capture kernel takes 1 ≤ K ≤ min({MAX_K}, vocabulary), got K = {k}")
        if logits.stride(1) != 1:
            logits = logits.contiguous()
        kp = max(2, next_pow2(k))  # tl.topk of a single element reduces to a scalar
        block = max(min(self.block, next_pow2(vocab)), 2 * kp)  # a small vocabulary needs no padded block
        # groups of about sqrt(block / kp) entries balance the two top-Ks (block / group maxima,
        # kp · group entries); at least kp groups
        group = min(next_pow2(math.isqrt(block // kp)), block // kp)
        num_blocks = -(-vocab // block)
        keys = torch.empty((m, num_blocks, k), dtype=torch.int64, device=logits.device)
        outside = torch.empty((m, num_blocks), dtype=torch.float32, device=logits.device)
        p = self.params
        if m:
            _kernel()[(m, num_blocks)](
                logits, logits.stride(0), vocab, keys, outside, num_blocks,
                float(p.scale or 1.0), float(p.divide or 1.0), float(p.cap or 1.0),
                K=k, KP=kp, BLOCK=block, GROUP=group,
                HAS_SCALE=bool(p.scale), HAS_DIVIDE=bool(p.divide), HAS_CAP=bool(p.cap),
                num_warps=8 if block >= 2048 else 4,
            )
        keys = keys.view(m, num_blocks * k)
        top_keys, chosen = keys.topk(k, dim=-1)  # distinct int64 keys: exact, no ties left
        top_val, top_idx = decode_keys(top_keys)
        cand_val, cand_ids = decode_keys(keys)
        cand_x = torch.where(cand_ids < vocab, self.transform(cand_val), float("-inf"))  # padding: no mass
        cand_x = cand_x.scatter_(-1, chosen, float("-inf"))
        rest = torch.logsumexp(torch.cat([outside, cand_x], dim=-1), dim=-1)
        return top_val, top_idx, rest


def probe(fused: FusedTopK, device: torch.device, dtype: torch.dtype, vocab: int, k: int) -> str | None:
    """Run the kernel once on random logits of the teacher's shape and dtype against torch.topk and
    the fp32 logsumexp: None when they agree, else what went wrong (a compiler error on this GPU,
    a result that differs)."""
    key = (type(fused), str(device), dtype, vocab, k, fused.params, fused.block)
    if key not in _PROBED:
        generator = torch.Generator(device=device).manual_seed(0)
        logits = (torch.randn(4, vocab, generator=generator, device=device) * 4).to(dtype)
        try:
            top_val, _, rest = fused(logits, k)
            ref_val, ref_idx = logits.topk(k, dim=-1)
            ref_rest = torch.logsumexp(fused.transform(logits.float()).scatter(-1, ref_idx, float("-inf")), dim=-1)
            # sorted values: the same up to the order of equal logits; `rest` to fp32 rounding
            same = torch.equal(top_val.sort(-1).values, ref_val.float().sort(-1).values) and torch.allclose(
                rest, ref_rest, rtol=1e-5, atol=1e-5)
            _PROBED[key] = None if same else "its top-k or logsumexp differs from torch's"
        except Exception as e:  # whatever Triton raises on a machine it cannot compile for
            _PROBED[key] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return _PROBED[key]


_PROBED: dict[tuple, str | None] = {}


def pick_fused(kernel: str, device: torch.device, params: LogitParams | None, k: int, vocab: int,
               dtype: torch.dtype) -> FusedTopK | None:
    """The fused kernel to use for `--capture-kernel` (auto | triton | torch), or None for the torch path.

    auto: Triton on a CUDA device when it is installed, 1 ≤ K ≤ 128 and the kernel passes its probe
    (`probe`; if not, a warning and the torch path); torch otherwise.
    triton: the same, and an error when it cannot run (no Triton, no CUDA device, K out of range,
    a failed probe); on a CPU it runs under Triton's interpreter when TRITON_INTERPRET=1 (tests: slow).
    """
    from potstill.teacher_gen.errors import GenerateError

    if kernel == "torch" or k == 0:
        return None
    if kernel == "auto":
        if not (device.type == "cuda" and triton_available() and k <= min(MAX_K, vocab)):
            return None
        fused = FusedTopK(params)
        problem = probe(fused, device, dtype, vocab, k)
        if problem is None:
            return fused
        import warnings

        warnings.warn(f"the fused capture kernel failed its check on {device} ({problem}); using the torch path",
                      stacklevel=2)
        return None
    if not triton_available():
        raise GenerateError("--capture-kernel triton: Triton is not installed (pip install 'potstill[gpu]')")
    if not (device.type == "cuda" or (device.type == "cpu" and interpreting())):
        raise GenerateError(f"--capture-kernel triton needs a CUDA device (the teacher runs on {device})")
    if not k <= min(MAX_K, vocab):
        raise GenerateError(f"--capture-kernel triton takes --top-k up to {min(MAX_K, vocab)}, got {k}")
    fused = FusedTopK(params)
    problem = probe(fused, device, dtype, vocab, k)
    if problem is not None:
        raise GenerateError(f"--capture-kernel triton: the fused kernel failed its check on {device} ({problem})")
    return fused
