"""Format 1.1 / 2.1, the stored log tail (docs/reference/store-format.md §4.4), and the stores before it: new
stores carry `tail_logprob`; 1.0 and 2.0 stores keep their layout, still read, train and verify, and
`store info` calls their tails approximate; a run resuming an older store keeps writing its format;
a run resuming a store of the old fp32 sampler refuses; verify checks the new column."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest
from common import TOKENIZER_FILES, make_manifest, prompt_rows, random_record, write_jsonl
from genhelpers import config, run_cli

import potstill.store.targets.codecs as codecs_module
import potstill.teacher_gen.jobs as jobs_module
import potstill.teacher_gen.runner as runner_module
from potstill.share import store_info
from potstill.store import StoreError, TargetSpec, create_store, open_store, verify_store
from potstill.store.records import log_of_mass
from potstill.teacher_gen.runner import generate

COLUMNS_1_0 = ["id", "prompt", "messages", "completion", "generated", "rationale", "answer", "meta", "sample_index",
               "input_ids", "score_start", "hidden_start", "token_offset", "topk_ids", "topk_logprobs", "token_logprob",
               "tail_mass"]
# What format 2.0's sampler wrote into `targets.sampling` (its draws came from an fp32 running sum).
SAMPLING_2_0 = ("N independent draws with replacement from softmax(fp32 logits) at temperature 1, by inverse CDF "
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


def test_a_new_store_is_1_1_with_both_tail_columns_and_says_its_tails_are_exact(tmp_path) -> None:
    url = str(tmp_path / "new")
    _write(url, make_manifest(k=8, layers=()))
    store = open_store(url)
    assert store.manifest.format_version == "1.1" and _schema_names(url, "w0-000000") == [*COLUMNS_1_0, "tail_logprob"]
    for rec in store.iter_records():
        np.testing.assert_array_equal(rec.tail_mass, np.exp(rec.tail_logprob.astype(np.float64)).astype(np.float32))
    assert verify_store(url).ok
    assert store_info(store)["tail"].startswith("exact")
    out = run_cli(["store", "info", url]).stdout
    assert "tail         exact" in out and "tail_logprob" in out and "+ log tail" in out


def test_a_1_0_store_keeps_its_layout_reads_its_tail_as_a_log_verifies_and_is_called_approximate(tmp_path) -> None:
    url = str(tmp_path / "old")
    written = _write(url, make_manifest(k=8, layers=(), tail_logprob=None), empty_tail=True)
    with open(os.path.join(url, "manifest.json")) as f:
        raw = json.load(f)
    assert raw["format_version"] == "1.0" and "tail_logprob" not in raw["targets"]
    assert _schema_names(url, "w0-000000") == COLUMNS_1_0  # byte for byte the 1.0 layout
    store = open_store(url)
    views = store.shard("w0-000000").views
    for i, want in enumerate(written):
        got = store.record(i)
        mass = views.columns.tail_mass[views._tgt_bounds[i] : views._tgt_bounds[i + 1]] if i < 4 else got.tail_mass
        np.testing.assert_array_equal(got.tail_logprob, log_of_mass(mass))  # the log of the stored mass
        np.testing.assert_allclose(got.tail_mass, want.tail_mass, rtol=2e-7)
    assert np.isneginf(store.record(0).tail_logprob).all()  # a mass of 0 reads as an empty tail
    assert verify_store(url).ok
    info = store_info(store)
    assert info["format_version"] == "1.0" and info["tail"].startswith("approximate (format 1.0 / 2.0)")
    proc = run_cli(["store", "info", url])
    assert proc.returncode == 0 and "tail         approximate" in proc.stdout


def test_a_2_0_packed_store_recomputes_its_tail_and_is_called_approximate(tmp_path) -> None:
    base = make_manifest(k=8, layers=(), vocab=300)
    targets = TargetSpec(k=8, codec="packed", id_bits=9, logprob_bits=12, logprob_min=-24.0, tail_logprob=None)
    manifest = type(base)(teacher=base.teacher, tokenizer=base.tokenizer, targets=targets, generation={"mode": "test"})
    url = str(tmp_path / "packed")
    _write(url, manifest, empty_tail=True)
    store = open_store(url)
    assert store.manifest.format_version == "2.0" and "tail_logprob" not in _schema_names(url, "w0-000000")
    q = targets.quantizer()
    for rec in store.iter_records():
        recomputed = np.clip(1 - np.exp(rec.topk_logprobs).sum(-1, dtype=np.float32), 0, 1)
        np.testing.assert_array_equal(rec.tail_logprob, log_of_mass(recomputed))
    assert verify_store(url).ok
    assert "recomputed" in store_info(store)["tail"] and f"{np.expm1(q.max_error):.2%}" in store_info(store)["tail"]
    new_url = str(tmp_path / "packed-new")
    _write(new_url, type(base)(teacher=base.teacher, tokenizer=base.tokenizer,
                               targets=TargetSpec(k=8, codec="packed", id_bits=9, logprob_bits=12, logprob_min=-24.0),
                               generation={"mode": "test"}))
    assert open_store(new_url).manifest.format_version == "2.1" and "tail_logprob" in _schema_names(new_url, "w0-000000")
    assert verify_store(new_url).ok


def test_a_1_0_store_trains_and_evaluates(tmp_path, tiny_teacher_dir, tiny_tokenizer_dir) -> None:
    from common import build_student
    from trainhelpers import arithmetic_items, build_teacher_store

    from potstill.student_train import TrainConfig, evaluate, train

    url = str(tmp_path / "old")
    store = build_teacher_store(url, tiny_teacher_dir, arithmetic_items(12, seed=3), tail_logprob=None)
    assert store.manifest.format_version == "1.0"
    student = build_student(str(tmp_path / "student"), tiny_tokenizer_dir)
    cfg = TrainConfig(store=url, student=student, out=str(tmp_path / "out"), max_steps=3, batch_size=4, lr=1e-2,
                      report_to="none", num_workers=0, eval_fraction=0.2, eval_max_records=2, eval_max_new_tokens=4)
    report = train(cfg.validate())
    assert report["global_step"] == 3 and all(np.isfinite(x["kd"]) for x in report["loss_curve"])
    metrics = evaluate(url, str(tmp_path / "out"), eval_fraction=0.2, answers=False)
    assert metrics["records"] > 0 and np.isfinite(metrics["kd_loss"]) and metrics["kd_loss"] > 0


@pytest.fixture
def prompts(tmp_path) -> tuple[str, str]:
    rows = prompt_rows(8, seed=4)
    return write_jsonl(str(tmp_path / "half.jsonl"), rows[:3]), write_jsonl(str(tmp_path / "all.jsonl"), rows)


def test_a_run_resuming_a_1_0_store_keeps_writing_format_1_0(tmp_path, tiny_teacher_dir, prompts, monkeypatch) -> None:
    half, whole = prompts
    url = str(tmp_path / "s")
    with monkeypatch.context() as m:  # an older potstill: its targets had no log tail
        spec = runner_module.target_spec
        m.setattr(runner_module, "target_spec", lambda *a: TargetSpec(**{**vars(spec(*a)), "tail_logprob": None}))
        generate(config(tiny_teacher_dir, half, url, logprob_dtype="float32"))
    assert open_store(url).manifest.format_version == "1.0"
    summary = generate(config(tiny_teacher_dir, whole, url, logprob_dtype="float32"))
    assert summary.already_done == 3 and summary.records == 5
    store = open_store(url)
    assert store.manifest.format_version == "1.0" and len(store) == 8
    for commit in store.commits:
        assert commit.format_version == "1.0" and _schema_names(url, commit.shard) == COLUMNS_1_0
    fresh = str(tmp_path / "fresh")
    generate(config(tiny_teacher_dir, whole, fresh, logprob_dtype="float32"))
    new = {r.id: r for r in open_store(fresh).iter_records()}
    for rec in store.iter_records():  # the resumed records' masses are the exact tails, rounded once
        np.testing.assert_array_equal(rec.tail_mass, new[rec.id].tail_mass)
    assert verify_store(url).ok


def test_a_run_resuming_a_store_of_the_fp32_sampler_refuses_in_one_line(tmp_path, tiny_teacher_dir, prompts, monkeypatch) -> None:
    half, whole = prompts
    url = str(tmp_path / "s")
    with monkeypatch.context() as m:
        m.setattr(jobs_module, "SAMPLING_METHOD", SAMPLING_2_0)  # what the run writes as targets.sampling
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
