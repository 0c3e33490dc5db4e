"""Every loss against a dense float64 reference written independently (values and gradients),
including the tail bucket, empty buckets (id −1), temperature and the no-tail variant."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from student_train import losses

N, V, K = 7, 40, 6


@pytest.fixture(autouse=True)
def float64_by_default():
    """References are float64; restore the default afterwards, other test modules share the process."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def make_case(seed: int = 0, vocab: int = V, k: int = K, sharp: float = 3.0):
    """Teacher probabilities P [N, V], its stored top-K view, and student logits z (requires grad)."""
    g = torch.Generator().manual_seed(seed)
    teacher_logits = torch.randn(N, vocab, generator=g, dtype=torch.float64) * sharp
    P = torch.softmax(teacher_logits, -1)
    kk = min(k, vocab)
    top_p, top_ids = P.topk(kk, -1)
    if k > vocab:  # the store pads with id -1 / log-prob -inf
        top_ids = torch.cat([top_ids, torch.full((N, k - vocab), -1)], -1)
        top_p = torch.cat([top_p, torch.zeros(N, k - vocab)], -1)
    tail = (1 - top_p.sum(-1)).clamp(min=0)
    z = (torch.randn(N, vocab, generator=g, dtype=torch.float64) * 2).requires_grad_()
    return P, top_ids, top_p.log(), tail, z


def dense_buckets(probs: torch.Tensor, ids: torch.Tensor, tail: bool) -> torch.Tensor:
    """Bucket probabilities from a full distribution by explicit sums over a one-hot mask."""
    valid = ids >= 0
    onehot = torch.zeros_like(probs).scatter_add(-1, ids.clamp(min=0), valid.to(probs.dtype))
    top = torch.where(valid, probs.gather(-1, ids.clamp(min=0)), torch.zeros(()))
    if not tail:
        return top / top.sum(-1, keepdim=True)
    rest = (probs * (1 - onehot)).sum(-1, keepdim=True)  # Σ over tokens outside the top-K
    return torch.cat([top, rest], -1)


def dense_temper(b: torch.Tensor, T: float) -> torch.Tensor:
    powered = b.clamp(min=0) ** (1 / T)
    return powered / powered.sum(-1, keepdim=True)


def xlogy_ratio(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ a log(a / b) with 0 log 0 = 0."""
    return torch.where(a > 0, a * (a.clamp(min=1e-300).log() - b.clamp(min=1e-300).log()), torch.zeros(())).sum(-1)


def reference(kind: str, P, ids, z, T: float, tail: bool, beta: float = 0.5) -> torch.Tensor:
    p = dense_temper(dense_buckets(P, ids, tail), T)
    q = dense_temper(dense_buckets(torch.softmax(z, -1), ids, tail), T)
    if kind == "forward_kl":
        return T * T * xlogy_ratio(p, q)
    if kind == "reverse_kl":
        return T * T * xlogy_ratio(q, p)
    m = beta * p + (1 - beta) * q
    return T * T * (beta * xlogy_ratio(p, m) + (1 - beta) * xlogy_ratio(q, m))


def implementation(kind: str, ids, lp, tail_mass, z, T: float, tail: bool, beta: float = 0.5) -> torch.Tensor:
    return losses.sparse_kd(z, ids, lp, tail_mass, loss=kind, temperature=T, beta=beta, tail=tail)


CASES = [
    (kind, T, tail)
    for kind in ("forward_kl", "reverse_kl", "jsd")
    for T in (1.0, 2.0, 0.7)
    for tail in (True, False)
]


@pytest.mark.parametrize(("kind", "T", "tail"), CASES)
def test_divergence_matches_dense_reference(kind: str, T: float, tail: bool) -> None:
    P, ids, lp, tail_mass, z = make_case()
    ref = reference(kind, P, ids, z, T, tail)
    got = implementation(kind, ids, lp, tail_mass, z, T, tail)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-10)
    (g_ref,) = torch.autograd.grad(ref.sum(), z)
    (g_got,) = torch.autograd.grad(got.sum(), z)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-8, atol=1e-10)
    assert g_got.abs().sum() > 0


@pytest.mark.parametrize("beta", [0.1, 0.9])
def test_jsd_beta_matches_reference(beta: float) -> None:
    P, ids, lp, tail_mass, z = make_case(seed=3)
    ref = reference("jsd", P, ids, z, 1.5, True, beta)
    got = implementation("jsd", ids, lp, tail_mass, z, 1.5, True, beta)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), z)[0], torch.autograd.grad(ref.sum(), z)[0])


def test_tail_bucket_is_the_student_mass_outside_the_top_k() -> None:
    _, ids, _, _, z = make_case(seed=1)
    buckets = losses.student_buckets(z, ids, tail=True).exp()
    q = torch.softmax(z, -1)
    outside = q.sum(-1) - q.gather(-1, ids).sum(-1)
    torch.testing.assert_close(buckets[:, -1], outside, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(buckets.sum(-1), torch.ones(N))


def test_forward_kl_with_all_tokens_in_the_top_k_is_the_full_vocabulary_kl() -> None:
    P, ids, lp, tail_mass, z = make_case(seed=2, vocab=12, k=12)
    full = F.kl_div(torch.log_softmax(z, -1), P.log(), log_target=True, reduction="none").sum(-1)
    got = implementation("forward_kl", ids, lp, tail_mass, z, 1.0, True)
    torch.testing.assert_close(got, full, rtol=1e-10, atol=1e-12)


def test_sparse_forward_kl_never_exceeds_the_full_kl() -> None:
    """Merging tokens into one bucket can only lose information (data-processing inequality)."""
    P, ids, lp, tail_mass, z = make_case(seed=4, sharp=1.0)
    full = F.kl_div(torch.log_softmax(z, -1), P.log(), log_target=True, reduction="none").sum(-1)
    sparse = implementation("forward_kl", ids, lp, tail_mass, z, 1.0, True)
    assert torch.all(sparse <= full + 1e-12) and torch.all(sparse > 0)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_empty_buckets_from_a_small_vocabulary_give_finite_values_and_gradients(kind: str) -> None:
    P, ids, lp, tail_mass, z = make_case(seed=5, vocab=4, k=6)  # ids padded with -1, tail 0
    assert (ids < 0).any() and torch.all(tail_mass < 1e-12)
    got = implementation(kind, ids, lp, tail_mass, z, 2.0, True)
    ref = reference(kind, P, ids, z, 2.0, True)
    # the empty tail holds only rounding noise (~1e-16), which temperature lifts to ~1e-8
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    (grad,) = torch.autograd.grad(got.sum(), z)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("tail", [True, False])
def test_rows_without_targets_contribute_nothing_and_keep_gradients_finite(kind: str, tail: bool) -> None:
    """The collator gives positions without a teacher target all-empty buckets (ids −1, tail 1)."""
    _, ids, lp, tail_mass, z = make_case(seed=11)
    ids[2:4], lp[2:4], tail_mass[2:4] = -1, 0.0, 1.0
    got = implementation(kind, ids, lp, tail_mass, z, 2.0, tail)
    assert got[2:4].abs().max() < 1e-12
    (grad,) = torch.autograd.grad(got.sum(), z)
    assert torch.isfinite(grad).all() and grad[2:4].abs().max() < 1e-12


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("T", [1.0, 3.0])
def test_a_student_equal_to_the_teacher_has_zero_loss(kind: str, T: float) -> None:
    P, ids, lp, tail_mass, _ = make_case(seed=6)
    z = P.log().clone().requires_grad_()
    got = implementation(kind, ids, lp, tail_mass, z, T, True)
    torch.testing.assert_close(got, torch.zeros(N), atol=1e-12, rtol=0)


def test_float16_targets_and_float32_logits_stay_close_to_the_reference() -> None:
    P, ids, lp, tail_mass, z = make_case(seed=7)
    got = losses.sparse_kd(z.float(), ids, lp.half(), tail_mass.float())
    ref = reference("forward_kl", P, ids, z, 1.0, True)
    torch.testing.assert_close(got.double(), ref, rtol=5e-3, atol=5e-4)


def test_cross_entropy_matches_torch() -> None:
    _, _, _, _, z = make_case(seed=8)
    hard = torch.arange(N) % V
    got = losses.token_cross_entropy(z, hard)
    ref = F.cross_entropy(z, hard, reduction="none")
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), z)[0], torch.autograd.grad(ref.sum(), z)[0])


def test_mix_uses_ce_alone_where_there_is_no_target() -> None:
    ce, kd = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 30.0])
    got = losses.mix_ce_kd(ce, kd, torch.tensor([True, False, True]), alpha=0.25)
    torch.testing.assert_close(got, torch.tensor([0.25 * 1 + 0.75 * 10, 2.0, 0.25 * 3 + 0.75 * 30]))


def test_log1mexp_is_accurate_across_its_range() -> None:
    x = -torch.logspace(-7, 2, 50)
    torch.testing.assert_close(losses.log1mexp(x), torch.log(-torch.expm1(x)), rtol=1e-12, atol=1e-15)
    assert losses.log1mexp(torch.tensor(0.0)) == pytest.approx(math.log(losses.TAIL_FLOOR), rel=1e-6)


def test_hidden_losses_match_their_definitions() -> None:
    g = torch.Generator().manual_seed(9)
    s = torch.randn(5, 8, generator=g).requires_grad_()
    t = torch.randn(5, 8, generator=g)
    mse_ref = ((s - t) ** 2).sum(-1) / 8
    cos_ref = 1 - (s * t).sum(-1) / (s.norm(dim=-1) * t.norm(dim=-1))
    for got, ref in ((losses.hidden_mse(s, t), mse_ref), (losses.hidden_cosine(s, t), cos_ref)):
        torch.testing.assert_close(got, ref)
        torch.testing.assert_close(torch.autograd.grad(got.sum(), s)[0], torch.autograd.grad(ref.sum(), s)[0])


def test_relation_loss_matches_a_per_sequence_loop() -> None:
    g = torch.Generator().manual_seed(10)
    student = torch.randn(3, 6, 4, generator=g).requires_grad_()
    teacher = torch.randn(3, 6, 9, generator=g)  # widths differ: no projection needed
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    total, pairs = torch.zeros(()), 0
    for b in range(3):
        hs, ht = student[b][mask[b]], teacher[b][mask[b]]
        sim_s = F.cosine_similarity(hs[:, None, :], hs[None, :, :], dim=-1)
        sim_t = F.cosine_similarity(ht[:, None, :], ht[None, :, :], dim=-1)
        total = total + ((sim_s - sim_t) ** 2).sum()
        pairs += len(hs) ** 2
    ref = total / pairs
    got = losses.relation_loss(student, teacher, mask)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(torch.autograd.grad(got, student)[0], torch.autograd.grad(ref, student)[0])
    assert losses.relation_loss(student, teacher, torch.zeros_like(mask)).item() == 0.0


def test_masked_mean_ignores_masked_values_even_if_not_finite() -> None:
    values = torch.tensor([1.0, float("inf"), 3.0])
    assert losses.masked_mean(values, torch.tensor([True, False, True])).item() == 2.0
    assert losses.masked_mean(values, torch.tensor([False, False, False])).item() == 0.0
