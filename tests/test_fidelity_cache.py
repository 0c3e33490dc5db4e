"""bench/fidelity.py's cached teacher: the reference (full KD) of the real-teacher student comparison
trains against log-probabilities computed once, so they must be the teacher's own, row for row."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import fidelity


@pytest.fixture(scope="module")
def teacher() -> object:
    # imported here, not at collection: the model module imports Triton, which must not happen before
    # test_fused_capture.py sets TRITON_INTERPRET
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def _blocks() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    # mostly one length (batched), one shorter block (the one-at-a-time path)
    return [rng.integers(0, 97, size=n) for n in (12, 12, 12, 7, 12, 12, 12, 12, 12, 12)]


def test_cached_log_probs_are_the_teachers_row_for_row(tmp_path, teacher):
    blocks = _blocks()
    cache = fidelity.CachedTeacher(str(tmp_path / "t.f16"), blocks, teacher)
    # a right-padded batch in another order, as the store loader makes them
    order = [3, 0, 9]
    x = torch.zeros(3, 12, dtype=torch.int64)
    mask = torch.zeros_like(x)
    for b, i in enumerate(order):
        x[b, : len(blocks[i])] = torch.from_numpy(blocks[i])
        mask[b, : len(blocks[i])] = 1
    got = cache(input_ids=x, attention_mask=mask).logits
    for b, i in enumerate(order):
        with torch.no_grad():
            want = torch.log_softmax(teacher(input_ids=torch.from_numpy(blocks[i])[None]).logits[0].double(), -1)
        n = len(blocks[i])
        assert torch.allclose(got[b, :n].double(), want, atol=1e-2, rtol=2e-3)  # float16 log-probs
        assert torch.all(got[b, n:] == 0)
    # full KD through the cache is full KD through the teacher, at float16 precision
    student = type(teacher)(teacher.config)
    s_log = torch.log_softmax(student(input_ids=x).logits.double(), -1)
    with torch.no_grad():
        t_log = torch.log_softmax(teacher(input_ids=x, attention_mask=mask).logits.double(), -1)
    c_log = torch.log_softmax(got.double(), -1)
    live = (t_log.exp() * (t_log - s_log)).sum(-1)[mask.bool()]
    cached = (c_log.exp() * (c_log - s_log)).sum(-1)[mask.bool()]
    assert torch.allclose(live, cached, atol=5e-3, rtol=5e-3)


def test_cache_is_reused_only_for_the_same_blocks(tmp_path, teacher):
    blocks = _blocks()
    path = str(tmp_path / "t.f16")
    first = fidelity.CachedTeacher(path, blocks, teacher)
    again = fidelity.CachedTeacher(path, blocks, None)  # no teacher needed: read from the work folder
    x = torch.from_numpy(np.stack([blocks[0], blocks[1]]))
    assert torch.equal(first(input_ids=x).logits, again(input_ids=x).logits)
    with pytest.raises(SystemExit, match="no cached teacher log-probabilities"):
        fidelity.CachedTeacher(path, blocks[:5], None)
    with pytest.raises(KeyError):  # a row the cache never saw is not silently zero
        first(input_ids=torch.full((1, 12), 5, dtype=torch.int64))
