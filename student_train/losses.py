"""Distillation losses: small pure functions on already-aligned tensors.

Shapes: N scored positions (flattened over the batch), V the student's vocabulary, K the store's
top-K. Row i of every [N, ...] tensor is one position: the student's logits `z[i]` there, and the
teacher's top-K ids / log-probs and tail mass for the same next token (docs/store-format.md §4).

**Buckets.** The store keeps the teacher's K most likely tokens and the mass of everything else,
`m = 1 − Σ_k p_k`. Both distributions are compared on the same K + 1 buckets: the K ids plus one
*tail* bucket holding all other tokens. For the student, with `q = softmax(z)`:

    q_k    = q[id_k]                          (log q_k = z[id_k] − logsumexp(z))
    q_tail = 1 − Σ_k q_k = Σ_{v ∉ ids} q_v     computed as log1p(−exp(logsumexp_k log q_k))

Ids of −1 (the store pads the top-K with −1 / −inf when the vocabulary is smaller than K; the
collator uses all −1 for positions without a target) are empty buckets: log-prob `EMPTY` (exp = 0)
on both sides, no contribution, no gradient. The no-tail variant drops the
tail bucket and renormalises both sides over the K ids.

Every divergence returns one value per position ([N]); callers average (`masked_mean`).
Computation is in float32 (or float64 in tests): pass `logits.float()`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Smallest tail mass used anywhere. The teacher's stored tail is 0 when its top-K holds all the
# mass (to fp32 rounding, i.e. the true tail is below ~1e-7); a log of 0 would make reverse KL
# infinite. Tiny, because temperature raises it to the power 1/T (1e-20 at T = 4 is 1e-5). The
# student's tail below ~1e-7 is float32 noise anyway.
TAIL_FLOOR = 1e-20
# The log-prob of an empty bucket. Finite on purpose: exp() of it is exactly 0, yet no -inf can
# turn into inf − inf = NaN in a forward or backward pass (rows with no valid bucket included).
EMPTY = -1e30


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x ≤ 0, accurate at both ends (Mächler 2012); x is clamped to ≤ log(1 − TAIL_FLOOR).
    Each branch only sees inputs it is defined on, so the unused one cannot put NaN in the gradient."""
    x = x.clamp(max=math.log1p(-TAIL_FLOOR))
    near_zero = x > -math.log(2.0)
    small = torch.log(-torch.expm1(torch.where(near_zero, x, -1.0)))
    large = torch.log1p(-torch.exp(torch.where(near_zero, -1.0, x)))
    return torch.where(near_zero, small, large)


def bucket_valid(topk_ids: torch.Tensor, tail: bool = True) -> torch.Tensor:
    """[N, K(+1)] bool: which buckets exist (id ≥ 0; the tail bucket always)."""
    valid = topk_ids >= 0
    if tail:
        valid = torch.cat([valid, valid.new_ones(valid.shape[0], 1)], dim=-1)
    return valid


def student_buckets(
    logits: torch.Tensor, topk_ids: torch.Tensor, *, tail: bool = True, lse: torch.Tensor | None = None
) -> torch.Tensor:
    """The student's log-probs on the teacher's buckets, [N, K + 1] (or [N, K] without tail).

    With tail:    [log q_{id_1}, …, log q_{id_K}, log(1 − Σ_k q_{id_k})]
    Without tail: log q_{id_k} − logsumexp_k log q_{id_k}   (renormalised over the K ids)

    `lse` = logsumexp(logits, −1) may be passed when the caller already has it (cross-entropy needs
    it too). Empty buckets (id −1) hold EMPTY.
    """
    if lse is None:
        lse = torch.logsumexp(logits, dim=-1)
    valid = topk_ids >= 0
    top = logits.gather(-1, topk_ids.clamp(min=0)) - lse.unsqueeze(-1)
    top = top.masked_fill(~valid, EMPTY)
    top_mass = torch.logsumexp(top, dim=-1)  # log Σ_k q_k
    if not tail:
        return top - top_mass.unsqueeze(-1)
    return torch.cat([top, log1mexp(top_mass).unsqueeze(-1)], dim=-1)


def teacher_buckets(
    topk_logprobs: torch.Tensor, tail_mass: torch.Tensor, topk_ids: torch.Tensor, *, tail: bool = True
) -> torch.Tensor:
    """The teacher's log-probs on the buckets, [N, K + 1] (or [N, K] without tail), normalised.

    With tail: [log p_1, …, log p_K, log max(m, TAIL_FLOOR)] − logsumexp(same). The stored log-probs
    are rounded (fp16) while m was computed before rounding, so the K + 1 values do not sum to
    exactly 1; renormalising makes the loss exactly 0 when the student matches. Without tail:
    log p_k − logsumexp_k log p_k. Empty buckets (id −1) hold EMPTY.
    """
    lp = topk_logprobs.to(tail_mass.dtype).clamp(min=EMPTY).masked_fill(topk_ids < 0, EMPTY)
    if tail:
        lp = torch.cat([lp, tail_mass.clamp(min=TAIL_FLOOR).log().unsqueeze(-1)], dim=-1)
    return lp - torch.logsumexp(lp, dim=-1, keepdim=True)


def temper(buckets: torch.Tensor, temperature: float) -> torch.Tensor:
    """Bucket log-probs at temperature T: log softmax(b / T) over the buckets.

    The tail is treated as one token at every T: its log-mass is divided by T like a top-K entry,
    i.e. q_T(tail) ∝ q(tail)^{1/T}. The exact tempered tail, Σ_{v ∉ ids} q_v^{1/T}, cannot be formed
    for the teacher (the store only has the sum m), so the same bucket-level rule is applied to both
    sides: the loss is then exactly 0 when the student's buckets equal the teacher's, at any T. For
    T > 1 this gives the tail less weight than full-vocabulary tempering would.
    """
    if temperature == 1.0:
        return buckets
    scaled = buckets / temperature
    return scaled - torch.logsumexp(scaled, dim=-1, keepdim=True)


def _kl_terms(p_log: torch.Tensor, q_log: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Σ_b p_b (log p_b − log q_b) over valid buckets, [N]."""
    p_log = p_log.masked_fill(~valid, 0.0)
    q_log = q_log.masked_fill(~valid, 0.0)
    return (p_log.exp() * (p_log - q_log)).masked_fill(~valid, 0.0).sum(-1)


def forward_kl(s_buckets: torch.Tensor, t_buckets: torch.Tensor, valid: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T² · KL(p_T ‖ q_T) = T² Σ_b p_T(b) (log p_T(b) − log q_T(b)), per position [N].

    p = teacher buckets, q = student buckets, both tempered by `temper`. Mass-covering: the student
    is pushed to put mass wherever the teacher does, including the tail.
    """
    p, q = temper(t_buckets, temperature), temper(s_buckets, temperature)
    return temperature**2 * _kl_terms(p, q, valid)


def reverse_kl(s_buckets: torch.Tensor, t_buckets: torch.Tensor, valid: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T² · KL(q_T ‖ p_T) = T² Σ_b q_T(b) (log q_T(b) − log p_T(b)), per position [N].

    Mode-seeking: the student is penalised for mass where the teacher has little. The teacher's
    tail is floored at TAIL_FLOOR so an empty teacher tail gives a large but finite penalty.
    """
    p, q = temper(t_buckets, temperature), temper(s_buckets, temperature)
    return temperature**2 * _kl_terms(q, p, valid)


def jsd(
    s_buckets: torch.Tensor, t_buckets: torch.Tensor, valid: torch.Tensor, beta: float = 0.5, temperature: float = 1.0
) -> torch.Tensor:
    """Generalized Jensen–Shannon divergence (Agarwal et al. 2024, GKD), per position [N]:

        M = β p_T + (1 − β) q_T
        JSD_β = T² · [β KL(p_T ‖ M) + (1 − β) KL(q_T ‖ M)],   0 < β < 1

    β = 0.5 is the symmetric JSD (bounded by log 2); small β behaves like forward KL, large β like
    reverse KL, scaled by β(1 − β). log M is formed in log space (logsumexp).
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must lie strictly between 0 and 1, got {beta}")
    p, q = temper(t_buckets, temperature), temper(s_buckets, temperature)
    m = torch.logsumexp(torch.stack([p + math.log(beta), q + math.log1p(-beta)]), dim=0)
    return temperature**2 * (beta * _kl_terms(p, m, valid) + (1 - beta) * _kl_terms(q, m, valid))


DIVERGENCES = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": jsd}


def sparse_kd(
    logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_mass: torch.Tensor,
    *,
    loss: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    tail: bool = True,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """The KD loss per position [N]: buckets on both sides, then the chosen divergence at T."""
    s = student_buckets(logits, topk_ids, tail=tail, lse=lse)
    t = teacher_buckets(topk_logprobs, tail_mass.to(logits.dtype), topk_ids, tail=tail)
    valid = bucket_valid(topk_ids, tail)
    if loss == "jsd":
        return jsd(s, t, valid, beta=beta, temperature=temperature)
    return DIVERGENCES[loss](s, t, valid, temperature=temperature)


def sampled_kd(
    logits: torch.Tensor,
    sampled_ids: torch.Tensor,
    sampled_probs: torch.Tensor,
    *,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Forward KL against sampled targets, per position [N]: KL(p̂ ‖ q) = Σ_u p̂_u (log p̂_u − log q_u).

    The store keeps, per position, N draws x_1..x_N from the teacher's distribution p (temperature
    1) as distinct ids u with counts c_u; `sampled_probs` holds p̂_u = c_u / N (ids −1 / weight 0
    pad the rows to a common width and contribute nothing). With q = softmax(z):

        loss(z)   = Σ_u p̂_u log p̂_u − Σ_u p̂_u log q_u              (the first sum does not depend on z)
        ∂loss/∂z  = (Σ_u p̂_u) q − p̂  =  q − p̂                      (Σ_u p̂_u = 1)

    Each draw is a one-hot sample of p, so E[p̂] = p and E[∂loss/∂z] = q − p, exactly the gradient of
    the full-vocabulary forward KL(p ‖ q) = Σ_v p_v log p_v − Σ_v p_v log q_v: an **unbiased**
    estimate of full KD's gradient from N·(bytes per draw) of storage. In value, E[loss] =
    KL(p ‖ q) + (H(p) − E[H(p̂)]): the full KL plus a constant in z (≥ 0, shrinking as N grows),
    so the loss is ≥ 0, 0 only when q = p̂, and its differences between students are unbiased
    estimates of differences in full KL. Contrast top-K: renormalising over K ids or lumping the
    rest into one bucket changes the target itself, a bias no amount of data removes.

    Only T = 1 is unbiased (the draws are from p, not from p^(1/T)), and only forward KL is linear in
    p; the trainer refuses other settings for sampled targets. Ids ≥ the student's vocabulary are
    dropped by the collator (their weight is lost, not renormalised).
    """
    if lse is None:
        lse = torch.logsumexp(logits, dim=-1)
    valid = sampled_ids >= 0
    log_q = logits.gather(-1, sampled_ids.clamp(min=0)) - lse.unsqueeze(-1)
    weight = sampled_probs.to(logits.dtype).masked_fill(~valid, 0.0)
    log_weight = torch.where(weight > 0, weight, torch.ones_like(weight)).log()  # 0 where the weight is 0
    return (weight * (log_weight - log_q)).sum(-1)


def token_cross_entropy(logits: torch.Tensor, hard_ids: torch.Tensor, lse: torch.Tensor | None = None) -> torch.Tensor:
    """−log q(x_i) = logsumexp(z_i) − z_i[x_i] per position [N], on the hard (actual) next tokens, at T = 1."""
    if lse is None:
        lse = torch.logsumexp(logits, dim=-1)
    return lse - logits.gather(-1, hard_ids.unsqueeze(-1)).squeeze(-1)


def mix_ce_kd(ce: torch.Tensor, kd: torch.Tensor, has_kd: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-position loss: α · CE + (1 − α) · KD where the position has teacher targets, CE alone
    where it has none (multitask answer tokens, which the teacher never scored)."""
    return torch.where(has_kd, alpha * ce + (1 - alpha) * kd, ce)


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error per position, [M]: (1/W) Σ_d (h_s[d] − h_t[d])², where h_s is the student's
    hidden state already projected to the teacher's width W."""
    return (student - teacher).pow(2).mean(-1)


def hidden_cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Cosine distance per position, [M]: 1 − ⟨h_s, h_t⟩ / (‖h_s‖ ‖h_t‖) (scale-free)."""
    return 1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)


HIDDEN_LOSSES = {"mse": hidden_mse, "cosine": hidden_cosine}


def relation_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Relation-based KD: match token–token cosine-similarity matrices within each sequence.

    For sequence b with valid positions (mask) i, j:

        S_s[b, i, j] = cos(h_s[b, i], h_s[b, j]),   S_t likewise from the teacher's stored states
        loss = Σ_b Σ_{i,j valid} (S_s − S_t)² / Σ_b n_b²

    Widths may differ (no projection: only angles between a sequence's own tokens are compared).
    student [B, T, Ws], teacher [B, T, Wt], mask [B, T] bool. Returns a scalar; 0 when nothing is valid.
    """
    s = F.normalize(student, dim=-1, eps=1e-8)
    t = F.normalize(teacher, dim=-1, eps=1e-8)
    sim_s = s @ s.transpose(1, 2)
    sim_t = t @ t.transpose(1, 2)
    pairs = mask.unsqueeze(2) & mask.unsqueeze(1)
    diff = (sim_s - sim_t).pow(2).masked_fill(~pairs, 0.0)
    return diff.sum() / pairs.sum().clamp(min=1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask` is true; 0 (with a gradient path) when nothing is selected."""
    total = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum()
    return total / mask.sum().clamp(min=1).to(values.dtype)
