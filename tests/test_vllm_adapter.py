"""The vLLM adapter (`topk_from_vllm`) against fakes shaped exactly like vLLM's prompt log-probs.

vLLM (vllm/logprobs.py) gives, per position j, the distribution of token j given tokens < j:
position 0 is None; every other position holds the actual token first, with its true rank, then
the top-K tokens with ranks 1..K. The dict form (`list[dict[int, Logprob] | None]`) merges a
duplicate key (actual token inside the top-K); `FlatLogprobs` keeps both copies in flat columns
(start_indices, end_indices, token_ids, logprobs, ranks, decoded_tokens).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import pytest
from common import prompt_rows, write_jsonl
from genhelpers import assert_topk_close, config

from potstill.store import StoreManifest
from potstill.store.records import validate_record
from potstill.teacher_gen.capture import reference_topk
from potstill.teacher_gen.errors import GenerateError
from potstill.teacher_gen.vllm_backend import topk_from_vllm


@dataclass
class Logprob:  # the fields of vllm.logprobs.Logprob
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class FlatLogprobs:  # the public columns of vllm.logprobs.FlatLogprobs
    start_indices: list[int] = field(default_factory=list)
    end_indices: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    ranks: list[int | None] = field(default_factory=list)
    decoded_tokens: list[str | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.start_indices)

    def append_position(self, token_ids: list[int], logprobs: list[float], ranks: list[int]) -> None:
        self.start_indices.append(len(self.token_ids))
        self.token_ids += token_ids
        self.logprobs += logprobs
        self.ranks += ranks
        self.decoded_tokens += [None] * len(token_ids)
        self.end_indices.append(len(self.token_ids))


def vllm_prompt_logprobs(full: np.ndarray, input_ids: np.ndarray, k: int, flat: bool):
    """What vLLM returns for `prompt_logprobs=k`, from full log-probs [n - 1, V] (row p: token p + 1).

    As in vLLM: entry 0 is empty; entry j lists the actual token input_ids[j] with its rank
    (1 + number of tokens more likely), then the top-k tokens with ranks 1..k.
    """
    out = FlatLogprobs() if flat else []
    if flat:
        out.append_position([], [], [])
    else:
        out.append(None)
    for j in range(1, len(input_ids)):
        row = full[j - 1]
        top = np.argsort(-row, kind="stable")[:k]
        actual = int(input_ids[j])
        rank = int((row > row[actual]).sum()) + 1
        token_ids = [actual, *map(int, top)]
        lps = [float(row[actual]), *map(float, row[top])]
        ranks = [rank, *range(1, len(top) + 1)]
        if flat:
            out.append_position(token_ids, lps, ranks)
        else:  # a dict comprehension, like vLLM's: a duplicate key keeps its first place
            out.append({t: Logprob(lp, r) for t, lp, r in zip(token_ids, lps, ranks, strict=True)})
    return out


def _distribution(v: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n - 1, v)).astype(np.float32) * 3
    full = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return full.astype(np.float32), rng.integers(0, v, size=n)


@pytest.mark.parametrize("flat", [False, True])
def test_adapter_matches_the_full_distribution(flat):
    full, ids = _distribution(50, 30, seed=0)
    k = 8
    got = topk_from_vllm(vllm_prompt_logprobs(full, ids, k, flat), ids, score_start=1, k=k)
    want = reference_topk(full, ids[1:], k)
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got.token_logprob, want.token_logprob, rtol=0, atol=0)
    # vLLM's complement of the top-K against the direct float64 sum over the other tokens
    np.testing.assert_allclose(np.exp(got.tail_logprob), np.exp(want.tail_logprob), rtol=0, atol=1e-6)  # fp32 inputs


@pytest.mark.parametrize("flat", [False, True])
def test_actual_token_outside_the_top_k_is_not_counted(flat):
    # position 1: token 3 is the least likely of 5; top-2 are tokens 0 and 1
    full = np.log(np.array([[0.5, 0.3, 0.1, 0.06, 0.04]], dtype=np.float32))
    ids = np.array([4, 4])
    pl = vllm_prompt_logprobs(full, ids, 2, flat)
    entries = pl[1] if not flat else pl.token_ids[pl.start_indices[1]: pl.end_indices[1]]
    assert len(entries) == 3  # the extra entry for the actual token is really there
    got = topk_from_vllm(pl, ids, score_start=1, k=2)
    assert got.ids.tolist() == [[0, 1]]
    np.testing.assert_allclose(got.token_logprob, [np.log(0.04)], rtol=1e-6)
    np.testing.assert_allclose(np.exp(got.tail_logprob), [0.2], atol=1e-6)  # 1 - 0.5 - 0.3: token 4 not subtracted


@pytest.mark.parametrize("flat", [False, True])
def test_actual_token_tied_with_the_kth_keeps_vllms_top_k(flat):
    # token 3 (actual) ties with token 2, which vLLM's top-3 holds: the extra entry must go, not token 2
    full = np.log(np.array([[0.4, 0.3, 0.15, 0.15]], dtype=np.float32))
    ids = np.array([0, 3])
    pl = vllm_prompt_logprobs(full, ids, 3, flat)
    got = topk_from_vllm(pl, ids, score_start=1, k=3)
    assert got.ids.tolist() == [[0, 1, 2]]
    np.testing.assert_allclose(got.token_logprob, [np.log(0.15)], rtol=1e-6)
    np.testing.assert_allclose(np.exp(got.tail_logprob), [0.15], atol=1e-6)


def test_duplicate_in_flat_form_is_not_double_counted():
    full = np.log(np.array([[0.5, 0.3, 0.2]], dtype=np.float32))
    ids = np.array([0, 1])  # the actual token (1) is in the top-2
    pl = vllm_prompt_logprobs(full, ids, 2, flat=True)
    assert pl.token_ids[pl.start_indices[1]: pl.end_indices[1]] == [1, 0, 1]  # the duplicate
    got = topk_from_vllm(pl, ids, score_start=1, k=2)
    assert got.ids.tolist() == [[0, 1]]
    np.testing.assert_allclose(np.exp(got.tail_logprob), [0.2], atol=1e-6)
    np.testing.assert_allclose(got.token_logprob, [np.log(0.3)], rtol=1e-6)
    dict_form = vllm_prompt_logprobs(full, ids, 2, flat=False)
    assert list(dict_form[1]) == [1, 0]  # merged, actual first
    assert topk_from_vllm(dict_form, ids, 1, 2).ids.tolist() == [[0, 1]]


@pytest.mark.parametrize("flat", [False, True])
def test_fewer_than_k_entries_are_padded(flat):
    full, ids = _distribution(3, 6, seed=1)  # a vocabulary of 3 and K = 5
    got = topk_from_vllm(vllm_prompt_logprobs(full, ids, 3, flat), ids, score_start=2, k=5)
    assert got.ids.shape == (4, 5)
    assert np.all(got.ids[:, 3:] == -1) and np.all(np.isneginf(got.logprobs[:, 3:]))
    assert np.all(np.sort(got.ids[:, :3], axis=1) == [0, 1, 2])
    assert np.isneginf(got.tail_logprob).all()  # the whole vocabulary came back: no tail
    np.testing.assert_allclose(got.token_logprob, full[np.arange(1, 5), ids[2:]], rtol=1e-6)


def test_leading_none_and_alignment():
    full, ids = _distribution(20, 10, seed=2)
    pl = vllm_prompt_logprobs(full, ids, 4, flat=False)
    assert pl[0] is None
    got = topk_from_vllm(pl, ids, score_start=4, k=4)
    assert len(got) == 6  # tokens 4..9
    np.testing.assert_allclose(got.token_logprob, full[np.arange(3, 9), ids[4:]], rtol=1e-6)
    with pytest.raises(GenerateError, match="no log-probs for position 0"):
        topk_from_vllm(pl, ids, score_start=0, k=4)
    broken = list(pl)
    broken[5] = {int(ids[5]) ^ 1: Logprob(-1.0, 1)}
    with pytest.raises(GenerateError, match="no log-prob for the actual token"):
        topk_from_vllm(broken, ids, score_start=4, k=4)


def test_differential_hf_vs_vllm_shaped_records_are_identical(tmp_path, tiny_teacher_dir):
    """Records from the HF backend equal records from vLLM-shaped outputs built from the HF
    backend's own full distribution (top_k = vocabulary), in both forms."""
    from transformers import AutoTokenizer

    from potstill.teacher_gen.capture import resolve_layers
    from potstill.teacher_gen.encode import encode_item
    from potstill.teacher_gen.hf_backend import HFTeacher
    from potstill.teacher_gen.model_info import describe_teacher
    from potstill.teacher_gen.prompts import FieldMap, load_prompts
    from potstill.teacher_gen.runner import RecordBuilder, build_manifest, make_job

    k = 16
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(6, seed=30))
    cfg = config(tiny_teacher_dir, prompts, str(tmp_path / "s"), top_k=k)
    full_cfg = config(tiny_teacher_dir, prompts, str(tmp_path / "s"), top_k=384, logprob_dtype="float32")
    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    spec = describe_teacher(cfg)
    manifest: StoreManifest = build_manifest(cfg, spec, tok, [])
    items = load_prompts(prompts, FieldMap()).items
    jobs = [make_job(cfg, encode_item(item, tok, cfg, 256), item.id, 0) for item in items]

    hf = HFTeacher(cfg, spec, tok, resolve_layers([], spec.num_layers))
    full_run = HFTeacher(full_cfg, spec, tok, [])
    build = RecordBuilder(cfg, tok)
    hf_caps = hf.score(jobs)()
    full_caps = full_run.score([make_job(full_cfg, j.encoded, j.record_id, 0) for j in jobs])()
    for job, hf_cap, full_cap in zip(jobs, hf_caps, full_caps, strict=True):
        # the whole distribution at every scored position, as the HF backend computed it
        s, n = job.score_start, len(job)
        full = np.full((n - 1, 384), -np.inf, dtype=np.float32)
        rows = np.arange(s - 1, n - 1)
        full[rows[:, None], full_cap.targets.ids] = full_cap.targets.logprobs
        hf_rec = validate_record(build(job, hf_cap), manifest)
        for flat in (False, True):
            from potstill.teacher_gen.jobs import Capture

            adapted = topk_from_vllm(vllm_prompt_logprobs(full, job.input_ids, k, flat), job.input_ids, s, k)
            v_rec = validate_record(build(job, Capture(adapted)), manifest)
            assert v_rec.id == hf_rec.id and v_rec.input_ids.tolist() == hf_rec.input_ids.tolist()
            assert v_rec.score_start == hf_rec.score_start
            assert_topk_close(v_rec.topk_ids, v_rec.topk_logprobs, hf_rec.topk_ids, hf_rec.topk_logprobs, atol=0)
            np.testing.assert_array_equal(v_rec.topk_logprobs, hf_rec.topk_logprobs)  # fp16, bit for bit
            np.testing.assert_allclose(v_rec.token_logprob, hf_rec.token_logprob, rtol=0, atol=1e-6)
            np.testing.assert_allclose(v_rec.tail_mass, hf_rec.tail_mass, rtol=0, atol=1e-6)


def test_vllm_tails_are_complements_in_float64_and_the_manifest_says_so(tmp_path, tiny_teacher_dir):
    """vLLM returns only the top-K, so its tail is log(1 − Σ exp(top-K)) in float64 (manifest
    `tail_logprob` "complement"), −inf where that rounds to 0 although K < V."""
    from potstill.teacher_gen.runner import target_spec
    from potstill.teacher_gen.vllm_backend import complement_tail

    assert target_spec(config(tiny_teacher_dir, "p.jsonl", str(tmp_path / "s"), backend="vllm"), 384).tail_logprob == "complement"
    assert target_spec(config(tiny_teacher_dir, "p.jsonl", str(tmp_path / "s")), 384).tail_logprob == "direct"
    lp = np.array([[np.log(0.7), np.log(0.2), np.log(0.1 - 1e-9)], [0.0, -30.0, -30.0], [np.log(0.5), np.log(0.5), -np.inf],
                   [np.log(0.9), np.log(0.1 - 3e-6), np.log(1e-6)]], dtype=np.float32)
    got = complement_tail(lp)
    want = np.log1p(-np.exp(lp[[0, 3]].astype(np.float64)).sum(-1))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got[[0, 3]], want, rtol=1e-6)
    assert np.isneginf(got[1])  # the top-K holds all the mass, to the rounding of the returned log-probs
    assert np.isneginf(got[2])  # fewer than K entries came back: they are the whole vocabulary


def test_engine_defaults_on_cpu_and_gpu(monkeypatch, tmp_path):
    """vLLM's CPU build gets eager mode, a 1 GiB KV cache and the engine in-process; a GPU gets vLLM's
    usual memory share; the user's flags and environment win."""
    from potstill.teacher_gen.vllm_backend import engine_defaults

    def cfg(**kw):
        return config("t", "p", "s", backend="vllm", **kw)

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    assert engine_defaults(cfg(), cpu=True) == {"enforce_eager": True, "kv_cache_memory_bytes": 1 << 30}
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert engine_defaults(cfg(), cpu=False) == {"enforce_eager": False, "gpu_memory_utilization": 0.9}
    assert engine_defaults(cfg(enforce_eager=False, gpu_memory_utilization=0.2), cpu=True) == {
        "enforce_eager": False, "gpu_memory_utilization": 0.2}
    assert engine_defaults(cfg(enforce_eager=True, gpu_memory_utilization=0.5), cpu=False) == {
        "enforce_eager": True, "gpu_memory_utilization": 0.5}
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")  # vLLM reads it itself
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    assert engine_defaults(cfg(), cpu=True) == {"enforce_eager": True}
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"


def test_enforce_eager_and_memory_flags_reach_the_config(tmp_path):
    from typer.testing import CliRunner

    from potstill.cli.main import app
    from potstill.teacher_gen.service.settings import LOAD_FIELDS, ServeConfig

    assert "enforce_eager" in LOAD_FIELDS
    assert ServeConfig.build(teacher="t", enforce_eager="true").enforce_eager is True
    with pytest.raises(GenerateError, match="--gpu-memory-utilization must be in"):
        config("t", "p", "s", gpu_memory_utilization=1.5)
    # the flags parse; the run then stops, in one line, at the missing teacher (or, where vLLM is not
    # installed, at that: the backend is checked first)
    result = CliRunner().invoke(app, ["generate", "--teacher", str(tmp_path / "none"), "--prompts", "p", "--out", "s",
                                      "--backend", "vllm", "--targets", "topk", "--no-enforce-eager",
                                      "--gpu-memory-utilization", "0.5"])
    message = str(result.exception)
    assert isinstance(result.exception, GenerateError)
    assert "cannot load its config" in message or "vLLM is not installed here" in message, message
