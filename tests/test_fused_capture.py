"""The fused Triton capture kernel against the torch path and a float64 reference.

Runs the kernel through Triton's CPU interpreter (TRITON_INTERPRET=1, set before Triton is
imported), so it runs in CI without a GPU; skipped only where Triton is not installed.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("triton")

from potstill.teacher_gen.capture import topk_logprobs
from potstill.teacher_gen.errors import GenerateError
from potstill.teacher_gen.fused_capture import FusedTopK, LogitParams, pick_fused, probe


def transformed64(logits: torch.Tensor, p: LogitParams) -> np.ndarray:
    x = logits.double().numpy()
    if p.scale:
        x = x * p.scale
    if p.divide:
        x = x / p.divide
    if p.cap:
        x = np.tanh(x / p.cap) * p.cap
    return x


def make_logits(rows: int, vocab: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random logits with ties (values on a 0.25 grid in part of each row) and masked (-inf) entries;
    with several rows, the last has fewer finite entries than the largest K, so its top-K reaches into the -inf."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g) * 4
    x[:, : vocab // 3] = (x[:, : vocab // 3] * 4).round() / 4  # many exact ties, also at the top
    x[0, 5] = x[0, 7] = x[0].max() + 1  # a tie for first place
    x[:, -vocab // 5 :] = float("-inf")
    if rows > 1:
        x[-1, 40:] = float("-inf")
    return x.to(dtype)


CASES = [  # (K, block, vocab, dtype, transform, rows): vocabularies not a multiple of the block
    (1, 256, 700, torch.float32, LogitParams(), 2),
    (5, 256, 600, torch.bfloat16, LogitParams(scale=1.5, cap=3.0), 2),
    (64, 256, 520, torch.float16, LogitParams(divide=2.5), 2),
    (128, 256, 300, torch.float32, LogitParams(scale=0.7, cap=30.0), 2),
    (5, 1024, 2500, torch.bfloat16, LogitParams(cap=30.0), 2),  # groups of 16: the two-level top-K
    (64, 4096, 5000, torch.bfloat16, LogitParams(), 1),  # the block length and K of a GPU run
]


@pytest.mark.parametrize(("k", "block", "vocab", "dtype", "params", "rows"), CASES)
def test_fused_matches_torch_path_and_float64(k, block, vocab, dtype, params, rows):
    logits = make_logits(rows, vocab, dtype, seed=k)
    targets = torch.tensor([5, vocab - 1])[:rows]  # a tied top token; a masked one (log-prob -inf, not NaN)
    fused = FusedTopK(params, block=block)
    head = nn.Identity()  # the "hidden states" are the logits: topk_logprobs runs its own chunk loop
    transform = fused.transform if any((params.scale, params.divide, params.cap)) else None
    got = topk_logprobs(logits, head, targets, k, chunk=2, transform=transform, fused=fused)
    ref = topk_logprobs(logits, head, targets, k, chunk=2, transform=transform)
    ids, lp, token, tail = (t.numpy() for t in got)
    ref_ids, ref_lp, ref_token, ref_tail = (t.numpy() for t in ref)

    x = transformed64(logits, params)
    logp = x - np.logaddexp.reduce(x, axis=-1, keepdims=True)
    for r in range(rows):
        # the same values as torch.topk (equal values may be other ids), each id carrying its own value
        np.testing.assert_allclose(lp[r], ref_lp[r], rtol=2e-6, atol=1e-6)
        assert len(set(ids[r].tolist())) == k and ids[r].min() >= 0 and ids[r].max() < vocab
        np.testing.assert_allclose(lp[r], logp[r, ids[r]], rtol=2e-6, atol=1e-6)
        assert np.all(lp[r][:-1] >= lp[r][1:])  # descending
        # the tail: log of the mass outside the chosen ids, against float64
        rest = np.delete(logp[r], ids[r])
        want_tail = np.logaddexp.reduce(rest) if rest.size else -np.inf
        if np.isneginf(want_tail):
            assert np.isneginf(tail[r])
        else:
            np.testing.assert_allclose(tail[r], want_tail, rtol=2e-6, atol=2e-6)
            np.testing.assert_allclose(tail[r], ref_tail[r], rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(token, logp[np.arange(rows), targets.numpy()], rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(token, ref_token, rtol=2e-6, atol=1e-6)
    assert not np.isnan(lp).any() and not np.isnan(tail).any() and not np.isnan(token).any()
    untied_seen = 0
    for r in range(rows):  # a chosen logit that no other entry equals is chosen by both, whatever the tie order
        row_values = logits[r].float().numpy()
        values, counts = np.unique(row_values, return_counts=True)
        single = set(values[counts == 1].tolist())
        untied = {i for i in ref_ids[r].tolist() if row_values[i] in single}
        assert untied <= set(ids[r].tolist())
        untied_seen += len(untied)
    assert untied_seen > 0


def test_tiny_tail_keeps_its_digits():
    """A confident row: the mass outside the top-K is ~1e-15, far below fp32's 1 − Σ p resolution."""
    vocab, k = 500, 4
    logits = torch.full((1, vocab), -30.0)
    logits[0, :k] = torch.tensor([10.0, 9.0, 8.0, 7.0])
    top, ids, rest = FusedTopK(block=256)(logits, k)
    assert ids[0].tolist() == [0, 1, 2, 3] and top[0].tolist() == [10.0, 9.0, 8.0, 7.0]
    x = logits.double().numpy()[0]
    want = np.logaddexp.reduce(x[k:]) - np.logaddexp.reduce(x)
    got = rest[0].item() - torch.logsumexp(logits[0], 0).item()
    assert want < -30  # log(1e-13): 1 − Σ exp(top-K) would be 0 in fp32
    assert abs(got - want) < 1e-5


def test_all_masked_but_k_gives_minus_inf_tail_not_nan():
    vocab, k = 700, 5
    logits = torch.full((2, vocab), float("-inf"))
    logits[:, 300:305] = torch.arange(5.0)
    top, ids, rest = FusedTopK(block=256)(logits, k)
    assert torch.isneginf(rest).all()
    assert ids[0].tolist() == list(range(304, 299, -1)) and top[0].tolist() == [4.0, 3.0, 2.0, 1.0, 0.0]


def test_pick_fused(monkeypatch):
    cpu, f32 = torch.device("cpu"), torch.float32
    assert pick_fused("torch", cpu, None, 64, 300, f32) is None
    assert pick_fused("auto", cpu, None, 64, 300, f32) is None  # auto is Triton on CUDA only
    assert pick_fused("triton", cpu, None, 0, 300, f32) is None  # sampled targets only: nothing to fuse
    assert isinstance(pick_fused("triton", cpu, None, 4, 300, f32), FusedTopK)  # the interpreter is on
    with pytest.raises(GenerateError, match="up to 128"):
        pick_fused("triton", cpu, None, 129, 300, f32)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(GenerateError, match="needs a CUDA device"):
        pick_fused("triton", cpu, None, 64, 300, f32)


def test_probe_catches_a_kernel_that_is_wrong():
    """The check `auto` and `triton` run once before trusting the kernel: it fails a kernel that
    drops a block (as a miscompiled one might) and passes the real one."""

    class DropsLastBlock(FusedTopK):
        def __call__(self, logits, k):
            return super().__call__(logits[:, :256], k)

    cpu = torch.device("cpu")
    assert probe(FusedTopK(block=256), cpu, torch.float32, 600, 4) is None
    assert "differs" in probe(DropsLastBlock(block=256), cpu, torch.float32, 600, 4)


def test_teacher_capture_is_the_same_with_the_fused_kernel(tiny_teacher_dir):
    """HFTeacher with --capture-kernel triton (interpreted) scores like the torch path, self-check included."""
    from test_generate_capture import _teacher

    from potstill.teacher_gen.jobs import ScoreJob

    # few scored positions: the interpreter runs one program per position (plus the 11 of the self-check)
    jobs = [ScoreJob("a", None, np.array([5, 17, 200, 33, 9, 250], dtype=np.int32), score_start=2, hidden_start=0)]
    fused = _teacher(tiny_teacher_dir, top_k=4, capture_kernel="triton")
    plain = _teacher(tiny_teacher_dir, top_k=4, capture_kernel="torch")
    assert isinstance(fused.fused, FusedTopK) and plain.fused is None
    for a, b in zip(fused.score(jobs)(), plain.score(jobs)(), strict=True):
        np.testing.assert_array_equal(a.targets.ids, b.targets.ids)  # random weights: no ties
        np.testing.assert_allclose(a.targets.logprobs, b.targets.logprobs, rtol=1e-3)  # float16 storage
        np.testing.assert_allclose(a.targets.tail_logprob, b.targets.tail_logprob, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a.targets.token_logprob, b.targets.token_logprob, rtol=1e-5, atol=1e-6)



def test_teacher_refuses_triton_where_it_cannot_run(tiny_teacher_dir, monkeypatch):
    from test_generate_capture import _teacher

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(GenerateError, match=r"--capture-kernel triton needs a CUDA device \(the teacher runs on cpu\)"):
        _teacher(tiny_teacher_dir, capture_kernel="triton")
    assert _teacher(tiny_teacher_dir, capture_kernel="auto").fused is None  # CPU: the torch path, as before
