"""Distillation losses: small pure functions on already-aligned tensors.

Shapes: N scored positions (flattened over the batch), V the student's vocabulary, K the store's
top-K. Row i of every [N, ...] tensor is one position: the student's logits `z[i]` there, and the
teacher's top-K ids / log-probs and log tail for the same next token (docs/reference/store-format.md §4).

**Buckets.** The store keeps the teacher's K most likely tokens and the log of the mass of
everything else, `log m = log Σ_{v ∉ ids} p_v` (the log tail). Both distributions are compared on
the same K + 1 buckets: the K ids plus one *tail* bucket holding all other tokens. For the
student, with `q = softmax(z)`, the buckets are one log-softmax over K + 1 values:

    r = logsumexp_{v ∉ ids} z_v                                  (the logits outside the top-K, −inf if none)
    [log q_{id_1}, …, log q_{id_K}, log q_tail] = log_softmax([z_{id_1}, …, z_{id_K}, r])

because Σ_v exp(z_v) = Σ_k exp(z_{id_k}) + exp(r). The tail is thus formed directly, never as
`1 − Σ_k q_k`, which cancels in float32 once the top-K holds nearly all the mass (a confident
teacher); temperature raises the tail to the power 1/T and would turn that rounding noise into a
large error at T > 1. Every log-softmax here is `exact_log_softmax`: it subtracts the largest
entry and takes log1p of the rest, so log-probs near 0 (a confident top token, a tail near 1)
keep float32's relative precision, which x − logsumexp(x) loses to the rounding of a value ~30.
Tests hold values and gradients to 1e-4 of a float64 full-vocabulary reference at T = 0.5 … 4
(tests/test_losses.py).

Ids of −1 (the store pads the top-K with −1 / −inf when the vocabulary is smaller than K; the
collator uses all −1 for positions without a target) are empty buckets: log-prob `EMPTY` (exp = 0)
on both sides, no contribution, no gradient. The tail bucket is empty (log −inf) on a side whose
top-K ids cover its whole vocabulary; it exists when at least one side's is not empty, and an
empty side's tail is then floored at TAIL_FLOOR (`settle_tail`). With equal vocabularies and K = V
the loss is therefore exactly the full-vocabulary one. The no-tail variant drops the tail bucket
and renormalises both sides over the K ids.

Every divergence returns one value per position ([N]); callers average (`masked_mean`).
Computation is in float32 (or float64 in tests): pass `logits.float()`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# The tail mass that stands in for an empty tail when the other side's tail is not empty: a
# teacher whose top-K holds its whole vocabulary against a student with more tokens (reverse KL
# would be infinite), a complement tail (vLLM) that rounded to 0, or the reverse.
# Tiny, because temperature raises it to the power 1/T (1e-20 at T = 4 is 1e-5).
TAIL_FLOOR = 1e-20
# The log-prob of an empty bucket. Finite on purpose: exp() of it is exactly 0, yet no -inf can
# turn into inf − inf = NaN in a forward or backward pass (rows with no valid bucket included).
EMPTY = -1e30


def bucket_valid(topk_ids: torch.Tensor, tail: bool = True) -> torch.Tensor:
    """[N, K(+1)] bool: which top-K buckets exist (id ≥ 0), and the tail bucket (decided by `settle_tail`)."""
    valid = topk_ids >= 0
    if tail:
        valid = torch.cat([valid, valid.new_ones(valid.shape[0], 1)], dim=-1)
    return valid


class _ExactLogSoftmax(torch.autograd.Function):
    """Forward: (x − x_a) − log1p(Σ_{j ≠ a} exp(x_j − x_a)), a = the argmax. Backward: the usual
    g − softmax · Σ g, which stays accurate where differentiating the forward formula would not
    (it cancels at the argmax when the largest entry holds little of the mass)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        a = x.argmax(dim=-1, keepdim=True)
        top = x.gather(-1, a)
        others = torch.exp(x - top).scatter_(-1, a, 0.0).sum(dim=-1, keepdim=True)
        out = (x - top) - torch.log1p(others)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (out,) = ctx.saved_tensors
        return grad - out.exp() * grad.sum(dim=-1, keepdim=True)


def exact_log_softmax(x: torch.Tensor) -> torch.Tensor:
    """log softmax over the last dim, with the largest entry taken out of the sum exactly (its exp
    is 1), so that a result near 0 is not rounded at the resolution of 1 + ε as in
    x − logsumexp(x). Same values and gradients as torch.log_softmax otherwise; −inf and EMPTY
    entries stay (near) −inf and get no gradient."""
    return _ExactLogSoftmax.apply(x)


def outside_logsumexp(logits: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """logsumexp of each row's logits over the ids NOT in its top-K, [N]; −inf when they cover the row.

    Empty slots (id −1) point at an extra −inf column, so they mask nothing (not token 0); every
    scattered value is the same −inf, so the result does not depend on the order of the writes.
    One [N, V + 1] copy of the logits.
    """
    v = logits.shape[-1]
    slots = torch.where(topk_ids >= 0, topk_ids, v)
    rest = F.pad(logits, (0, 1), value=float("-inf")).scatter_(-1, slots, float("-inf"))
    return torch.logsumexp(rest, dim=-1)


def student_buckets(logits: torch.Tensor, topk_ids: torch.Tensor, *, tail: bool = True) -> torch.Tensor:
    """The student's log-probs on the teacher's buckets, [N, K + 1] (or [N, K] without tail).

    With tail:    log_softmax([z_{id_1}, …, z_{id_K}, logsumexp_{v ∉ ids} z_v])   (module doc; tail −inf when empty)
    Without tail: log_softmax([z_{id_1}, …, z_{id_K}])   (renormalised over the K ids)

    The top-K ids of a position must be distinct (as a store's are). Empty buckets (id −1) hold EMPTY.
    """
    top = logits.gather(-1, topk_ids.clamp(min=0)).masked_fill(topk_ids < 0, EMPTY)
    if tail:
        top = torch.cat([top, outside_logsumexp(logits, topk_ids).unsqueeze(-1)], dim=-1)
    return exact_log_softmax(top)


def teacher_buckets(
    topk_logprobs: torch.Tensor, tail_logprob: torch.Tensor, topk_ids: torch.Tensor, *, tail: bool = True
) -> torch.Tensor:
    """The teacher's log-probs on the buckets, [N, K + 1] (or [N, K] without tail), normalised.

    With tail: log_softmax([log p_1, …, log p_K, log m]), log m the stored log tail (−inf when
    empty). Stored log-probs may be rounded (fp16, or the packed codec) while log m was not, so the
    K + 1 values need not sum to exactly 1; renormalising makes the loss exactly 0 when the student
    matches. Without tail: log_softmax over the K log-probs. Empty buckets (id −1) hold EMPTY.
    """
    lp = topk_logprobs.to(tail_logprob.dtype).clamp(min=EMPTY).masked_fill(topk_ids < 0, EMPTY)
    if tail:
        lp = torch.cat([lp, tail_logprob.unsqueeze(-1)], dim=-1)
    return exact_log_softmax(lp)


def settle_tail(s_buckets: torch.Tensor, t_buckets: torch.Tensor, valid: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decide the tail bucket (the last column) of both sides: it exists where at least one side's
    tail is not empty; there an empty side gets log TAIL_FLOOR, elsewhere both get EMPTY."""
    s_tail, t_tail = s_buckets[:, -1], t_buckets[:, -1]
    s_has, t_has = s_tail > EMPTY, t_tail > EMPTY  # −inf and EMPTY both mean empty
    exists = s_has | t_has
    floor = torch.full_like(s_tail, math.log(TAIL_FLOOR))
    empty = torch.full_like(s_tail, EMPTY)
    s_tail = torch.where(s_has, s_tail, torch.where(exists, floor, empty))
    t_tail = torch.where(t_has, t_tail, torch.where(exists, floor, empty))
    valid = torch.cat([valid[:, :-1], exists.unsqueeze(-1)], dim=-1)
    return (torch.cat([s_buckets[:, :-1], s_tail.unsqueeze(-1)], dim=-1),
            torch.cat([t_buckets[:, :-1], t_tail.unsqueeze(-1)], dim=-1), valid)


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
    return exact_log_softmax(buckets / temperature)


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
    reverse KL, scaled by β(1 − β). The log ratios to M are formed from the difference d of the two
    log-probs (`_log_mixture_ratio`), exact where p and q nearly agree: log M itself would carry
    the rounding of log β (~6e-8), a first-order error in a divergence that is second order in d.
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must lie strictly between 0 and 1, got {beta}")
    p, q = temper(t_buckets, temperature), temper(s_buckets, temperature)
    p_over_m = -_log_mixture_ratio(q - p, 1.0 - beta)  # log p − log M
    q_over_m = -_log_mixture_ratio(p - q, beta)  # log q − log M
    terms = beta * p.exp() * p_over_m + (1 - beta) * q.exp() * q_over_m
    return temperature**2 * terms.masked_fill(~valid, 0.0).sum(-1)


def _log_mixture_ratio(d: torch.Tensor, c: float) -> torch.Tensor:
    """log((1 − c)·x + c·y) − log x, given d = log y − log x: log1p(c·expm1(d)), exact near d = 0;
    for large d the equal log(c) + d + log1p((1 − c)/c · e^(−d)), which cannot overflow."""
    near = torch.log1p(c * torch.expm1(d.clamp(max=30.0)))
    far = math.log(c) + d + torch.log1p((1 - c) / c * torch.exp(-d.clamp(min=30.0)))
    return torch.where(d > 30.0, far, near)


DIVERGENCES = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": jsd}


def sparse_kd(
    logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logprob: torch.Tensor,
    *,
    loss: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    tail: bool = True,
) -> torch.Tensor:
    """The KD loss per position [N]: buckets on both sides, then the chosen divergence at T.
    `tail_logprob` [N] is the teacher's log tail (log of its mass outside the top-K, −inf if none)."""
    s = student_buckets(logits, topk_ids, tail=tail)
    t = teacher_buckets(topk_logprobs, tail_logprob.to(logits.dtype), topk_ids, tail=tail)
    valid = bucket_valid(topk_ids, tail)
    if tail:
        s, t, valid = settle_tail(s, t, valid)
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


def standardize(hidden: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each token's vector with its mean over the width removed and divided by its standard deviation
    (a layer norm without weights): (h − mean(h)) / sqrt(var(h) + eps), the variance the biased one."""
    centred = hidden - hidden.mean(-1, keepdim=True)
    return centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)


def hidden_standardized_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE per position, [M], after standardising each side per token (`standardize`): scale-free,
    0 when the two vectors are equal up to an offset and a positive scale, at most 4. It equals
    2 · (1 − the Pearson correlation of the two vectors over the width)."""
    return (standardize(student) - standardize(teacher)).pow(2).mean(-1)


HIDDEN_LOSSES = {"mse": hidden_mse, "cosine": hidden_cosine, "standardized_mse": hidden_standardized_mse}


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


def uld(logits: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_tail: torch.Tensor,
        lse: torch.Tensor | None = None) -> torch.Tensor:
    """Universal Logit Distillation (Boizard et al. 2024) on a stored top-K, per position [N]:

        ULD = Σ_{r=1..K} |p_(r) − q_(r)| + |m_p − m_q|

    p_(r), q_(r): the teacher's and the student's r-th largest probabilities (each side sorted on its
    own: no vocabulary correspondence is needed); m_p = the teacher's stored tail (its mass outside its
    top-K), m_q = the student's mass outside its own K largest. ULD is the Wasserstein-1 distance
    between the two sorted distributions, Σ_r |p_(r) − q_(r)| over the whole vocabulary; the ranks past
    K, which the store does not keep, are lumped into one bucket on each side, which by the triangle
    inequality gives a lower bound of it, equal to it when the ranks past K agree in sign. Teacher
    entries of −inf (or ids the store padded) are probability 0. q_(r) are the student's top-K by value
    (`torch.topk`: the gradient flows to the logits holding them), m_q formed as exp(logsumexp of the
    other logits − lse), not 1 − Σ q.
    """
    k = teacher_logprobs.shape[-1]
    if lse is None:
        lse = torch.logsumexp(logits, dim=-1)
    p = teacher_logprobs.to(logits.dtype).exp().sort(dim=-1, descending=True).values
    top, idx = logits.topk(min(k, logits.shape[-1]), dim=-1)
    q = (top - lse.unsqueeze(-1)).exp()
    if q.shape[-1] < k:
        q = F.pad(q, (0, k - q.shape[-1]))
    m_q = (outside_logsumexp(logits, idx) - lse).exp()
    m_p = teacher_tail.to(logits.dtype).exp()
    return (p - q).abs().sum(-1) + (m_p - m_q).abs()


def chunk_kl(logits: torch.Tensor, hard_ids: torch.Tensor, teacher_logprob: torch.Tensor,
             lse: torch.Tensor | None = None) -> torch.Tensor:
    """Forward KL between two-bucket distributions, per position [N]: the student's actual next token
    u against everything else.

        P = exp(teacher_logprob)   (the teacher's probability of the text of u, token by token)
        q = softmax(z)[u]
        KL = P (log P − log q) + (1 − P) (log(1 − P) − log(1 − q)),   0 · log 0 = 0

    log(1 − q) is formed as logsumexp of the other logits − lse and log(1 − P) as log(−expm1(log P)),
    never as a difference near 1. A teacher_logprob of −inf (no chunk) gives P = 0."""
    if lse is None:
        lse = torch.logsumexp(logits, dim=-1)
    ids = hard_ids.unsqueeze(-1)
    log_q = logits.gather(-1, ids).squeeze(-1) - lse
    log_not_q = outside_logsumexp(logits, ids) - lse
    log_p = teacher_logprob.to(logits.dtype).clamp(min=EMPTY, max=0.0)
    p, not_p = log_p.exp(), -torch.expm1(log_p)
    log_not_p = torch.log(not_p.clamp(min=torch.finfo(logits.dtype).tiny))
    on = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    off = torch.where(not_p > 0, not_p * (log_not_p - log_not_q), torch.zeros_like(p))
    return on + off
