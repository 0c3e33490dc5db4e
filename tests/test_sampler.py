"""The sampled-target sampler (docs/reference/store-format.md §4.2) against exact float64 computations: draws
match p in a chi-square test on a small vocabulary, the distribution it implies is within 1e-9 in
total variation of the exact one on a 128k vocabulary (where an fp32 running sum is 1e-4 off), and
every token, however unlikely, can be drawn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from genhelpers import chi_square

import potstill.teacher_gen.capture as capture
from potstill.teacher_gen.capture import sample_chunk, sampling_cdf
from potstill.teacher_gen.jobs import target_uniforms


def exact_probs(logits: torch.Tensor) -> np.ndarray:
    """p = softmax of the float32 logits, in float64 with an exactly rounded normaliser (math.fsum)."""
    x = logits.float().double().numpy()
    out = np.empty_like(x)
    for r, row in enumerate(x):
        e = np.exp(row - row.max())
        out[r] = e / math.fsum(e)
    return out


def implied_probs(cdf: torch.Tensor) -> np.ndarray:
    """The probability each id is drawn with under inverse CDF on `cdf`: its step over the total."""
    c = cdf.double().numpy()
    return np.diff(c, axis=-1, prepend=0.0) / c[:, -1:]


def teacher_logits(rows: int, vocab: int, seed: int = 0, flat: bool = False) -> torch.Tensor:
    """Logits shaped like a real teacher's, in bfloat16 as it computes them: a bulk of spread ~2 and
    (unless `flat`, the teacher unsure) a handful of tokens 15-30 above it."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g) * 2.0
    if not flat:
        peaks = torch.randint(0, vocab, (rows, 6), generator=g)
        x.scatter_(-1, peaks, torch.tensor([30.0, 27.0, 25.0, 22.0, 19.0, 15.0]).expand(rows, 6))
    return x.to(torch.bfloat16)


def chi_square_p_value(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson's goodness of fit; its p-value from the chi-square survival function, Q(dof / 2, stat / 2)."""
    stat, dof = chi_square(counts, probs)
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))


def test_draws_pass_a_chi_square_test_against_p_and_a_wrong_p_fails_it() -> None:
    """200,000 draws (fixed seed: deterministic) from a 16-token distribution with probabilities from
    0.4 down to 1e-6, uniforms made the way a store's are."""
    logits = torch.log(torch.tensor([[0.4, 0.2, 0.15, 0.1, 0.05, 0.04, 0.03, 0.02, 0.004, 0.003, 0.002, 0.0005,
                                      0.0004, 0.0001, 1e-5, 1e-6]])).float()
    n = 200_000
    uniforms = torch.from_numpy(target_uniforms(7, "chi-square", 1, n))
    draws = sample_chunk(logits, uniforms).numpy()[0]
    counts = np.bincount(draws, minlength=16)
    p = exact_probs(logits)[0]
    assert chi_square_p_value(counts, p) > 1e-3  # the level of the test: one false alarm in 1,000
    tempered = p**0.97 / (p**0.97).sum()  # the same distribution at T = 1.03
    assert chi_square_p_value(counts, tempered) < 1e-6  # and it has the power to see a 3% temperature


@pytest.mark.parametrize("vocab", [128_256, 152_064])
@pytest.mark.parametrize("flat", [False, True])
def test_the_implied_distribution_is_within_1e_9_of_p_in_total_variation(vocab: int, flat: bool) -> None:
    """The sampler inverts `sampling_cdf`, so a draw is id v with probability (cdf_v − cdf_{v−1}) / total
    (to the 2^-53 grain of the uniforms). That is within 1e-9 of the exact p in total variation, for
    a confident teacher and an unsure one. The float32 running sum of format 2.0's sampler is 1e-5 to
    1e-4 off on the unsure one and, on the confident one, never draws thousands of ids."""
    logits = teacher_logits(3, vocab, flat=flat)
    p = exact_probs(logits)
    tv = 0.5 * np.abs(implied_probs(sampling_cdf(logits)) - p).sum(-1)
    assert tv.max() <= 1e-9, tv
    x = logits.float()
    implied32 = implied_probs(torch.cumsum(torch.exp(x - torch.logsumexp(x, -1, keepdim=True)), -1))
    if flat:
        assert (0.5 * np.abs(implied32 - p).sum(-1)).min() > 1e-5
    else:
        never = (implied32 == 0) & (p > 1e-14)  # ids the fp32 sampler cannot draw
        assert never.sum(-1).min() > 1000


def test_every_id_can_be_drawn_even_where_an_fp32_running_sum_stops_growing() -> None:
    """A uniform in the middle of an id's step draws that id: the 3,000 least likely ids with p above
    1e-14 (100 times float64's resolution; all but a 1e-10 share of the mass) and 3,000 at random,
    in every row of a confident 128k teacher, where float32 steps of most of them are 0."""
    logits = teacher_logits(2, 128_256, seed=3)
    cdf = sampling_cdf(logits)
    total = cdf[:, -1:]
    p = exact_probs(logits)
    rng = np.random.default_rng(0)
    for r in range(2):
        drawable = np.flatnonzero(p[r] > 1e-14)
        assert p[r, p[r] <= 1e-14].sum() < 1e-9
        ids = np.concatenate([drawable[np.argsort(p[r, drawable])[:3000]], rng.choice(drawable, 3000, replace=False)])
        lo = torch.where(torch.from_numpy(ids) > 0, cdf[r, np.maximum(ids - 1, 0)], torch.zeros(len(ids), dtype=torch.float64))
        u = ((lo + cdf[r, ids]) / 2 / total[r]).unsqueeze(0)
        got = sample_chunk(logits[r : r + 1], u).numpy()[0]
        assert np.array_equal(got, ids.astype(np.int32))


def test_draws_do_not_depend_on_how_rows_are_blocked(monkeypatch) -> None:
    """Rows are sampled SAMPLE_BLOCK_ELEMENTS at a time to bound memory; the draws are the same for
    any block (each depends on its row's logits and uniforms only)."""
    logits = teacher_logits(7, 4096, seed=5)
    uniforms = torch.from_numpy(np.random.default_rng(1).random((7, 50)))
    whole = sample_chunk(logits, uniforms)
    monkeypatch.setattr(capture, "SAMPLE_BLOCK_ELEMENTS", 3 * 4096)  # 3 rows per block
    assert torch.equal(sample_chunk(logits, uniforms), whole)
    monkeypatch.setattr(capture, "SAMPLE_BLOCK_ELEMENTS", 1)  # one row per block
    assert torch.equal(sample_chunk(logits, uniforms), whole)
    assert torch.equal(sample_chunk(logits[2:3], uniforms[2:3]), whole[2:3])
