"""Sampled targets from `potstill generate` on a real tiny teacher: reproducible, counts sum to N,
frequencies match the teacher's distribution, independent of batching and resumes; the packed
codec through the CLI; vLLM refusing in one line."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from common import prompt_rows, write_jsonl
from genhelpers import chi_square, config, reference_logprobs, run_cli, run_main

from potstill.store import open_store, verify_store
from potstill.teacher_gen.capture import sample_chunk
from potstill.teacher_gen.errors import GenerateError
from potstill.teacher_gen.runner import generate


@pytest.fixture(scope="module")
def teacher_model(tiny_teacher_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("prompts")
    return write_jsonl(str(tmp / "p.jsonl"), prompt_rows(10, seed=3))


def _sampled(store) -> dict[str, tuple]:
    out = {}
    for rec in store.iter_records():
        out[rec.id] = (rec.sampled.offsets.copy(), rec.sampled.ids.copy(), rec.sampled.counts.copy())
    return out


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(all(np.array_equal(x, y) for x, y in zip(a[k], b[k], strict=True)) for k in a)


def test_draws_are_reproducible_sum_to_n_and_do_not_depend_on_batching(tmp_path, tiny_teacher_dir, prompts):
    big = str(tmp_path / "big.store")
    generate(config(tiny_teacher_dir, prompts, big, targets="sampled", samples=50, seed=11, batch_tokens=4096))
    again = str(tmp_path / "again.store")
    generate(config(tiny_teacher_dir, prompts, again, targets="sampled", samples=50, seed=11, batch_tokens=4096))
    one_by_one = str(tmp_path / "small.store")
    generate(config(tiny_teacher_dir, prompts, one_by_one, targets="sampled", samples=50, seed=11,
                    batch_tokens=8, chunk_positions=3))
    other_seed = str(tmp_path / "seed.store")
    generate(config(tiny_teacher_dir, prompts, other_seed, targets="sampled", samples=50, seed=12))

    store = open_store(big)
    t = store.manifest.targets
    assert (t.kind, t.k, t.samples, t.seed, t.codec) == ("sampled", 0, 50, 11, "none")
    assert store.manifest.format_version == "1.0" and "inverse CDF" in t.sampling
    for rec in store.iter_records():
        sums = np.add.reduceat(rec.sampled.counts.astype(int), rec.sampled.offsets[:-1])
        assert rec.sampled.num_positions == rec.num_scored and np.all(sums == 50)
        assert rec.topk_ids is None and rec.token_logprob.shape == (rec.num_scored,)
    assert verify_store(big).ok
    reference = _sampled(store)
    assert _same(reference, _sampled(open_store(again)))
    assert _same(reference, _sampled(open_store(one_by_one)))  # batch and chunk sizes change nothing
    assert not _same(reference, _sampled(open_store(other_seed)))


def test_a_resumed_run_draws_what_an_uninterrupted_run_draws(tmp_path, tiny_teacher_dir, prompts):
    whole = str(tmp_path / "whole.store")
    generate(config(tiny_teacher_dir, prompts, whole, targets="sampled", samples=12))
    first_half = write_jsonl(str(tmp_path / "half.jsonl"), prompt_rows(10, seed=3)[:4])
    resumed = str(tmp_path / "resumed.store")
    generate(config(tiny_teacher_dir, first_half, resumed, targets="sampled", samples=12))
    summary = generate(config(tiny_teacher_dir, prompts, resumed, targets="sampled", samples=12))
    assert summary.already_done == 4 and summary.records == 6
    assert _same(_sampled(open_store(whole)), _sampled(open_store(resumed)))


def _wilson_hilferty(stat: float, dof: int) -> float:
    """z-score of a chi-square statistic (normal approximation of its cube root)."""
    return ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))


def test_draw_frequencies_match_the_teachers_distribution(tmp_path, tiny_teacher_dir, teacher_model):
    n = 20_000
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), [{"id": "a", "prompt": "the teacher writes what it knows"}])
    url = str(tmp_path / "s.store")
    generate(config(tiny_teacher_dir, prompts, url, targets="sampled", samples=n, seed=5, score_prompt=True,
                    chunk_positions=2))
    rec = open_store(url).record(0)
    probs = np.exp(reference_logprobs(teacher_model, rec.input_ids).astype(np.float64))  # row p: token p + 1
    stat = stat_wrong = 0.0
    dof = 0
    for j in range(rec.num_scored):
        ids, counts = rec.sampled.position(j)
        observed = np.zeros(probs.shape[1])
        observed[ids] = counts
        p = probs[rec.score_start - 1 + j]
        p /= p.sum()
        s, d = chi_square(observed, p)
        wrong = p**0.8 / (p**0.8).sum()  # the same distribution at temperature 1.25: must be told apart
        stat, dof, stat_wrong = stat + s, dof + d, stat_wrong + chi_square(observed, wrong)[0]
    assert rec.num_scored >= 4 and dof > 20
    assert _wilson_hilferty(stat, dof) < 4.0, (stat, dof)  # p > 3e-5 under the teacher's distribution
    assert _wilson_hilferty(stat_wrong, dof) > 10.0  # and the test has the power to reject a wrong one


def test_sampling_never_draws_a_token_of_probability_zero():
    logits = torch.tensor([[0.0, float("-inf"), 1.0, float("-inf")], [float("-inf"), 2.0, float("-inf"), float("-inf")]])
    uniforms = torch.tensor([[0.0, 0.2689, 0.27, 1 - 1e-12], [0.0, 0.5, 1 - 1e-16, 0.999]], dtype=torch.float64)
    draws = sample_chunk(logits, uniforms)
    assert draws[0].tolist() == [0, 0, 2, 2] and draws[1].tolist() == [1, 1, 1, 1]


@pytest.mark.slow
def test_both_kinds_in_one_packed_store_through_the_cli(tmp_path, tiny_teacher_dir, prompts):
    plain = str(tmp_path / "plain.store")
    generate(config(tiny_teacher_dir, prompts, plain, targets="both", samples=50, top_k=16, logprob_dtype="float32"))
    packed = str(tmp_path / "packed.store")
    proc = run_cli(["generate", "--teacher", tiny_teacher_dir, "--prompts", prompts, "--out", packed,
                    "--targets", "both", "--samples", "50", "--sampler", "iid", "--top-k", "16", "--codec", "packed",
                    "--logprob-bits", "12", "--device", "cpu", "--no-progress"])
    assert proc.returncode == 0, proc.stderr
    a, b = open_store(plain), open_store(packed)
    t = b.manifest.targets
    assert (t.kind, t.codec, t.id_bits, t.count_bits, t.logprob_bits) == ("both", "packed", 9, 6, 12)
    q = t.quantizer()
    for x, y in zip(a.iter_records(), b.iter_records(), strict=True):
        assert np.array_equal(x.sampled.ids, y.sampled.ids) and np.array_equal(x.sampled.counts, y.sampled.counts)
        assert np.array_equal(x.topk_ids, y.topk_ids)
        inside = x.topk_logprobs >= -24
        assert np.abs(x.topk_logprobs[inside] - y.topk_logprobs[inside]).max() <= q.max_error + 1e-5
        assert np.abs(x.tail_mass - y.tail_mass).max() <= np.expm1(q.max_error) + 16 * math.exp(-24) + 1e-5
    proc = run_main(["store", "verify", packed])
    assert proc.returncode == 0 and "OK" in proc.stdout
    info = run_main(["store", "info", packed]).stdout
    assert "top-K=16" in info and "sampled N=50" in info and "topk_ids_packed" in info


def test_sampled_settings_are_checked_in_one_line_and_vllm_takes_them(tmp_path, tiny_teacher_dir, prompts):
    assert config(tiny_teacher_dir, prompts, str(tmp_path / "s"), backend="vllm", targets="sampled").targets == "sampled"
    with pytest.raises(GenerateError, match="--samples must be between 1 and 65535"):
        config(tiny_teacher_dir, prompts, str(tmp_path / "s"), targets="sampled", samples=0)
