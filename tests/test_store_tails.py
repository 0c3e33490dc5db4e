"""The stored log tail (docs/reference/store-format.md §4.4): every store with top-k targets carries
`tail_logprob` (an unpacked one also `tail_mass`, derived from it); `store info` says how it was made;
a run resuming a store of another sampler refuses; verify checks the column."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest
from common import TOKENIZER_FILES, make_manifest, prompt_rows, random_record, write_jsonl
from genhelpers import config, run_cli

import potstill.store.targets.codecs as codecs_module
import potstill.teacher_gen.jobs as jobs_module
from potstill.share import store_info
from potstill.store import StoreError, TargetSpec, create_store, open_store, verify_store
from potstill.teacher_gen.runner import generate

COLUMNS = ["id", "prompt", "messages", "completion", "generated", "rationale", "answer", "meta", "sample_index",
           "input_ids", "score_start", "hidden_start", "token_offset", "topk_ids", "topk_logprobs", "token_logprob",
           "tail_mass", "tail_logprob"]
# The `targets.sampling` of another sampler (draws from an fp32 running sum).
SAMPLING_FP32 = ("N independent draws with replacement from softmax(fp32 logits) at temperature 1, by inverse CDF "
                "over the fp32 cumulative sum; uniforms from numpy PCG64 seeded per record by target_seed(seed, record id)")


def _schema_names(url: str, shard: str) -> list[str]:
    with pa.memory_map(os.path.join(url, "shards", shard, "records.arrow")) as f:
        return pa.ipc.open_file(f).schema.names


def _write(url: str, manifest, count: int = 6, seed: int = 0, empty_tail: bool = False) -> list:
    """Random records into a new store; with `empty_tail`, record 0's tails are −inf (as a float32
    tail that rounded to 0 reads from a 1.0 store, or a complement that rounded to 0)."""
    store = create_store(url, manifest, TOKENIZER_FILES)
    rng = np.random.default_rng(seed)
    recs = [random_record(rng, f"r{i}", manifest, n=12) for i in range(count)]
    if empty_tail:
        recs[0].tail_logprob = np.full(recs[0].num_scored, -np.inf, np.float32)
    with store.writer("w0", shard_records=4) as w:
        for rec in recs:
            w.write(rec)
    return recs


def test_a_new_store_has_both_tail_columns_and_says_its_tails_are_exact(tmp_path) -> None:
    url = str(tmp_path / "new")
    _write(url, make_manifest(k=8, layers=()))
    store = open_store(url)
    assert store.manifest.format_version == "1.0" and _schema_names(url, "w0-000000") == COLUMNS
    for rec in store.iter_records():
        np.testing.assert_array_equal(rec.tail_mass, np.exp(rec.tail_logprob.astype(np.float64)).astype(np.float32))
    assert verify_store(url).ok
    assert store_info(store)["tail"].startswith("exact")
    out = run_cli(["store", "info", url]).stdout
    assert "tail         exact" in out and "tail_logprob" in out and "+ log tail" in out


def test_a_packed_store_holds_the_log_tail_and_says_how_a_complement_was_made(tmp_path) -> None:
    base = make_manifest(k=8, layers=(), vocab=300)
    targets = TargetSpec(k=8, codec="packed", id_bits=9, logprob_bits=12, logprob_min=-24.0)
    url = str(tmp_path / "packed")
    written = _write(url, type(base)(teacher=base.teacher, tokenizer=base.tokenizer, targets=targets,
                                     generation={"mode": "test"}))
    store = open_store(url)
    assert store.manifest.format_version == "1.0" and "tail_logprob" in _schema_names(url, "w0-000000")
    for want, got in zip(written, store.iter_records(), strict=True):
        np.testing.assert_array_equal(got.tail_logprob, want.tail_logprob)
    assert verify_store(url).ok and store_info(store)["tail"].startswith("exact")
    complement = str(tmp_path / "complement")
    _write(complement, make_manifest(k=8, layers=(), tail_logprob="complement"))
    assert store_info(open_store(complement))["tail"].startswith("log(1 − Σ top-K) in float64")


@pytest.fixture
def prompts(tmp_path) -> tuple[str, str]:
    rows = prompt_rows(8, seed=4)
    return write_jsonl(str(tmp_path / "half.jsonl"), rows[:3]), write_jsonl(str(tmp_path / "all.jsonl"), rows)


def test_a_run_resuming_a_store_of_another_sampler_refuses_in_one_line(tmp_path, tiny_teacher_dir, prompts, monkeypatch) -> None:
    half, whole = prompts
    url = str(tmp_path / "s")
    with monkeypatch.context() as m:
        m.setattr(jobs_module, "SAMPLING_METHOD", SAMPLING_FP32)  # what the run writes as targets.sampling
        generate(config(tiny_teacher_dir, half, url, targets="sampled", samples=8))
    with pytest.raises(StoreError) as info:
        generate(config(tiny_teacher_dir, whole, url, targets="sampled", samples=8))
    message = str(info.value)
    assert "\n" not in message and "another sampler" in message and "write to a new store" in message
    assert open_store(url).num_records == 3  # nothing was added


def test_a_store_refuses_records_made_another_way_and_writes_none(tmp_path) -> None:
    url = str(tmp_path / "s")
    create_store(url, make_manifest(k=8, layers=()), TOKENIZER_FILES)
    with pytest.raises(StoreError, match="targets.tail_logprob: the store's tails are 'direct', this run's would be 'complement'"):
        create_store(url, make_manifest(k=8, layers=(), tail_logprob="complement"), TOKENIZER_FILES, exist_ok=True)
    store = open_store(url)
    rng = np.random.default_rng(1)
    for bad in (0.25, np.nan):
        rec = random_record(rng, "bad", store.manifest, n=12)
        rec.tail_logprob[-1] = bad
        where = f"record 'bad': the targets of scored position {rec.num_scored - 1} are not a distribution.*log tail above 0"
        with store.writer("w1") as w, pytest.raises(StoreError, match=where):
            w.write(rec)
    assert open_store(url).num_records == 0


def test_verify_checks_the_log_tail(tmp_path, monkeypatch) -> None:
    url = str(tmp_path / "empty-tail")
    _write(url, make_manifest(k=8, layers=()), empty_tail=True)  # K = 8 of 100 ids, yet record 0's tail is −inf
    problems = [str(p) for p in verify_store(url).problems]
    assert len(problems) == 1 and "tail_logprob is -inf" in problems[0] and "does not cover the vocabulary" in problems[0]
    complement = str(tmp_path / "complement")  # a complement may round to −inf
    _write(complement, make_manifest(k=8, layers=(), tail_logprob="complement"), empty_tail=True)
    assert verify_store(complement).ok
    covered = str(tmp_path / "covered")  # K = V: every tail is empty
    manifest = make_manifest(k=100, layers=())
    store = create_store(covered, manifest, TOKENIZER_FILES)
    with store.writer("w0") as w:
        rec = random_record(np.random.default_rng(2), "all", manifest, n=9)
        assert np.isneginf(rec.tail_logprob).all()
        w.write(rec)
    assert verify_store(covered).ok
    mismatch = str(tmp_path / "mismatch")  # a writer whose tail_mass is not exp(tail_logprob)
    with monkeypatch.context() as m:
        m.setattr(codecs_module, "mass_of_log", lambda t: (np.exp(np.asarray(t, np.float64)) * 1.001).astype(np.float32))
        _write(mismatch, make_manifest(k=8, layers=()))
    problems = [str(p) for p in verify_store(mismatch).problems]
    assert any("tail_mass" in p and "differs from exp(tail_logprob)" in p for p in problems), problems
