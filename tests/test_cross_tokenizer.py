"""Distilling across tokenizers (`--cross-tokenizer`): the two losses against float64 references from
their definitions, the alignment checked against the decoded text (and a misaligned span caught), a
same-tokenizer student getting exactly the store's targets, the refusal naming the flag, and a student
with its own tokenizer trained end to end from the CLI, its run resumed exactly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from common import CORPUS, build_student, build_tokenizer
from trainhelpers import arithmetic_items, build_teacher_store, copy_teacher

from potstill.store import open_store
from potstill.student_train import TrainConfig, losses, train
from potstill.student_train.cross_tokenizer import (
    TokenTable,
    align,
    check_alignment,
    cross_sequence,
    project_rows,
    vocabulary_map,
)
from potstill.student_train.data import collate, record_sequence
from potstill.student_train.objective import Objective, cross_kd

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
# Other merges than the teacher's (reversed lines), and words the teacher splits made whole by repetition
STUDENT_CORPUS = [line[::-1] for line in CORPUS] + ["let us think step by step , the answer is first"] * 20


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_teacher_dir, tiny_tokenizer_dir) -> dict:
    """A store from a private teacher copy (then deleted); a student with a tokenizer of its own (other
    merges, another size), and one with the store's."""
    root = tmp_path_factory.mktemp("xtok")
    teacher = copy_teacher(tiny_teacher_dir, str(root / "teacher"))
    store = str(root / "store")
    build_teacher_store(store, teacher, arithmetic_items(40, seed=3), shard_records=20)
    shutil.rmtree(teacher)
    tok_dir = str(root / "student-tokenizer")
    build_tokenizer(tok_dir, vocab_size=320, corpus=STUDENT_CORPUS)
    return {"root": root, "store": store, "tokenizer": tok_dir, "teacher_tokenizer": tiny_tokenizer_dir,
            "student": build_student(str(root / "student"), tok_dir, hidden=16),
            "same": build_student(str(root / "same"), tiny_tokenizer_dir, hidden=16)}


def tokenizers(setup: dict) -> tuple:
    from transformers import AutoTokenizer

    t, s = AutoTokenizer.from_pretrained(setup["teacher_tokenizer"]), AutoTokenizer.from_pretrained(setup["tokenizer"])
    return t, TokenTable.of(t), s, TokenTable.of(s)


def stored(setup: dict, n: int = 6) -> list:
    store = open_store(setup["store"])
    reader = store.shard(store.shard_names[0])
    return [record_sequence(reader, row, "topk") for row in range(n)]


# -- the losses, against float64 references from their definitions ----------------------------------------
def uld_reference(logits: np.ndarray, teacher_lp: np.ndarray, teacher_tail: np.ndarray) -> np.ndarray:
    """Σ_{r≤K} |p_(r) − q_(r)| + |Σ_{r>K} p − Σ_{r>K} q| in float64, q from the full softmax sorted."""
    k = teacher_lp.shape[1]
    z = logits.astype(np.float64)
    q = np.exp(z - z.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    q = -np.sort(-q, axis=1)
    p = -np.sort(-np.exp(teacher_lp.astype(np.float64)), axis=1)
    return np.abs(p - q[:, :k]).sum(1) + np.abs(np.exp(teacher_tail.astype(np.float64)) - q[:, k:].sum(1))


def test_uld_matches_its_float64_definition_in_value_and_gradient() -> None:
    rng = np.random.default_rng(0)
    n, v, k = 12, 50, 6
    logits = rng.normal(0, 3, (n, v)).astype(np.float32)
    full = rng.normal(0, 3, (n, 70))
    full = full - np.log(np.exp(full).sum(1, keepdims=True))
    top = -np.sort(-full, axis=1)
    lp, tail = top[:, :k].copy(), np.log(np.exp(top[:, k:]).sum(1))
    lp[0, -2:] = -np.inf  # a row the store padded: probability 0
    tail[0] = np.log(np.exp(top[0, k - 2 :]).sum())
    ref = uld_reference(logits, lp, tail)
    z = torch.tensor(logits, requires_grad=True)
    got = losses.uld(z, torch.tensor(lp, dtype=torch.float32), torch.tensor(tail, dtype=torch.float32))
    np.testing.assert_allclose(got.detach().numpy(), ref, rtol=1e-4)
    got.sum().backward()
    z64 = torch.tensor(logits, dtype=torch.float64, requires_grad=True)  # the definition, differentiated in float64
    q = torch.softmax(z64, -1).sort(-1, descending=True).values
    p = torch.tensor(-np.sort(-np.exp(lp), axis=1))
    ref64 = (p - q[:, :k]).abs().sum(-1) + (torch.tensor(np.exp(tail)) - q[:, k:].sum(-1)).abs()
    ref64.sum().backward()
    np.testing.assert_allclose(z.grad.numpy(), z64.grad.numpy(), rtol=1e-4, atol=1e-6)
    same = losses.uld(z.detach(), torch.log_softmax(z.detach(), -1).topk(k).values, torch.full((n,), -1.0))
    assert same.min() > 0  # a tail that differs is a distance, even with the top-K equal


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl"])
def test_the_exact_target_matches_its_float64_definition(loss: str) -> None:
    """Matched position: teacher buckets carried through the vocabulary map, unmapped mass in the tail."""
    from potstill.store.targets import TopKRows

    rng = np.random.default_rng(1)
    n, tv, sv, k = 8, 40, 30, 5
    vmap = rng.permutation(np.concatenate([np.arange(sv), np.full(tv - sv, -1)]))  # 10 teacher ids without a twin
    full = rng.normal(0, 2, (n, tv))
    full = full - np.log(np.exp(full).sum(1, keepdims=True))
    order = np.argsort(-full, axis=1)[:, :k]
    lp = np.take_along_axis(full, order, 1)
    tail = np.log(1 - np.exp(lp).sum(1))
    rows = TopKRows(order.astype(np.int32), lp.astype(np.float32), lp[:, 0].astype(np.float32), tail.astype(np.float32))
    exact = project_rows(rows, np.arange(n), vmap)
    z = rng.normal(0, 2, (n, sv)).astype(np.float32)
    batch = {"topk_ids": torch.tensor(exact.ids), "topk_logprobs": torch.tensor(exact.logprobs),
             "tail_logprob": torch.tensor(exact.tail_logprob), "matched": torch.ones(n, dtype=torch.bool),
             "uld_logprobs": torch.full((n, k), -np.inf), "uld_tail": torch.full((n,), -np.inf),
             "chunk_logprob": torch.full((n,), -np.inf), "hard_ids": torch.zeros(n, dtype=torch.long)}
    logits = torch.tensor(z)
    got = cross_kd(logits, batch, Objective(loss=loss, targets="cross"), torch.logsumexp(logits, -1)).numpy()
    for r in range(n):  # the definition: buckets = the mapped student ids + everything else
        q = np.exp(z[r].astype(np.float64) - np.log(np.exp(z[r].astype(np.float64)).sum()))
        ids = [int(vmap[i]) for i in order[r] if vmap[i] >= 0]
        p_b = np.array([np.exp(full[r, i]) for i in order[r] if vmap[i] >= 0] + [0.0])
        p_b[-1] = 1 - p_b[:-1].sum()
        q_b = np.array([q[i] for i in ids] + [1 - q[ids].sum()])
        ref = (p_b * np.log(p_b / q_b)).sum() if loss == "forward_kl" else (q_b * np.log(q_b / p_b)).sum()
        assert got[r] == pytest.approx(ref, rel=1e-4)


def test_the_chunk_loss_matches_its_float64_definition_in_value_and_gradient() -> None:
    rng = np.random.default_rng(3)
    n, v = 10, 30
    logits = rng.normal(0, 3, (n, v)).astype(np.float32)
    hard = rng.integers(0, v, n)
    log_p = np.log(rng.uniform(0.01, 1.0, n))
    log_p[0], log_p[1] = 0.0, np.log(1 - 1e-6)  # a certain chunk (no second bucket), a nearly certain one
    z = torch.tensor(logits, requires_grad=True)
    got = losses.chunk_kl(z, torch.tensor(hard), torch.tensor(log_p, dtype=torch.float32))
    got.sum().backward()
    z64 = torch.tensor(logits, dtype=torch.float64, requires_grad=True)  # the definition, in float64
    q = torch.softmax(z64, -1)[torch.arange(n), torch.tensor(hard)]
    p = torch.tensor(np.exp(log_p))
    ref = p * (p.log() - q.log()) + torch.where(p < 1, (1 - p) * ((1 - p).log() - (1 - q).log()), torch.zeros_like(p))
    ref.sum().backward()
    np.testing.assert_allclose(got.detach().numpy(), ref.detach().numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(z.grad.numpy(), z64.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_each_position_takes_its_own_loss() -> None:
    rng = np.random.default_rng(2)
    n, v, k = 6, 20, 4
    logits = torch.tensor(rng.normal(0, 2, (n, v)), dtype=torch.float32)
    lp = torch.log_softmax(torch.tensor(rng.normal(0, 2, (n, v)), dtype=torch.float32), -1).topk(k)
    tail = torch.log1p(-lp.values.exp().sum(-1))
    matched = torch.tensor([True, False, True, False, False, True])
    chunk = torch.tensor([-np.inf, -0.5, -np.inf, -np.inf, -0.1, -np.inf], dtype=torch.float32)
    hard = torch.arange(n)
    batch = {"topk_ids": lp.indices, "topk_logprobs": lp.values, "tail_logprob": tail, "matched": matched,
             "uld_logprobs": lp.values, "uld_tail": tail, "chunk_logprob": chunk, "hard_ids": hard}
    got = cross_kd(logits, batch, Objective(targets="cross"), torch.logsumexp(logits, -1))
    kd = losses.sparse_kd(logits, lp.indices, lp.values, tail)
    other = torch.where(chunk > -1e30, losses.chunk_kl(logits, hard, chunk), losses.uld(logits, lp.values, tail))
    assert torch.equal(got, torch.where(matched, kd, other))


# -- alignment ---------------------------------------------------------------------------------------
def misaligned(setup: dict, al, teacher_ids: np.ndarray) -> list[int]:
    """The matched student positions whose pairing is wrong by the text itself (independent of `align`):
    the decoded contexts differ, or the next tokens are not the same string."""
    t, _, s, _ = tokenizers(setup)
    bad = []
    for i in np.flatnonzero(al.partner >= 0):
        j = int(al.partner[i])
        if j in t.all_special_ids:
            continue
        same_context = s.decode(al.ids[:i].tolist(), skip_special_tokens=True) == t.decode(teacher_ids[:j].tolist(),
                                                                                          skip_special_tokens=True)
        same_token = s.decode(al.ids[: i + 1].tolist(), skip_special_tokens=True) == t.decode(
            teacher_ids[: j + 1].tolist(), skip_special_tokens=True)
        if not (same_context and same_token):
            bad.append(int(i))
    return bad


def test_matched_tokens_share_their_context_and_token_and_a_misaligned_span_is_caught(setup: dict) -> None:
    t, tt, s, st = tokenizers(setup)
    chunks = 0
    for seq in stored(setup):
        al = align(t, tt, s, st, seq.ids, seq.score_start, seq.record_id)
        chunks += int((al.chunk_end >= 0).sum())
        assert s.decode(al.ids.tolist()) == t.decode(seq.ids.tolist())  # the same text, the student's tokens
        matched = np.flatnonzero(al.partner >= 0)
        assert 0 < len(matched) < len(al.ids)  # the tokenizers differ: some tokens match, some do not
        check_alignment(al, tt, st, seq.ids)
        assert misaligned(setup, al, seq.ids) == []
        scored = np.arange(len(al.ids)) >= al.score_start
        assert (al.row[scored] >= 0).all() and (al.row[~scored] == -1).all()
        for i in np.flatnonzero(al.chunk_end >= 0):  # a chunk: the student token's text is its teacher tokens' text
            first, last = seq.score_start + al.row[i], seq.score_start + al.chunk_end[i]
            assert last > first and al.partner[i] == -1
            assert s.decode(al.ids[i : i + 1].tolist()) == t.decode(seq.ids[first : last + 1].tolist())
            chain = seq.targets.token_logprob[al.row[i] : al.chunk_end[i] + 1].astype(np.float64).sum()
            row = cross_sequence(al, seq.targets, vocabulary_map(tt, st), "r").targets.chunk_logprob[i - al.score_start]
            assert row == pytest.approx(chain, rel=1e-6)
        assert s.decode(al.ids[: al.score_start].tolist()) == t.decode(seq.ids[: seq.score_start].tolist())
    assert chunks > 0  # the student's tokenizer merges some of the teacher's tokens
    # a span off by one: the pair's check fails, and so does the check by the text
    i = int(matched[len(matched) // 2])
    shifted = al.partner.copy()
    shifted[i] += 1
    bad = type(al)(**{**al.__dict__, "partner": shifted})
    with pytest.raises(AssertionError, match=f"student token {i}"):
        check_alignment(bad, tt, st, seq.ids)
    assert misaligned(setup, bad, seq.ids) == [i]


def test_a_student_with_the_stores_tokenizer_gets_exactly_the_stored_targets(setup: dict) -> None:
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(setup["teacher_tokenizer"])
    tt = TokenTable.of(t)
    vmap = vocabulary_map(tt, tt)
    assert (vmap[vmap >= 0] == np.flatnonzero(vmap >= 0)).all() and (vmap >= 0).sum() == len(t)
    seqs = stored(setup, 4)
    cross = [cross_sequence(align(t, tt, t, tt, s.ids, s.score_start), s.targets, vmap, s.record_id) for s in seqs]
    plain = collate(seqs, k=8, pad_id=0)
    batch = collate(cross, k=8, pad_id=0, targets="cross")
    assert batch["matched"].all() and torch.equal(batch["input_ids"], plain["input_ids"])
    for key in ("topk_ids", "topk_logprobs", "tail_logprob", "pos_index", "hard_ids"):
        assert torch.equal(batch[key], plain[key].to(batch[key].dtype)), key


# -- the CLI -----------------------------------------------------------------------------------------
def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "potstill.cli.main", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize(("overrides", "named"), [
    ({"hidden_map": "1:1"}, "--hidden-map"), ({"rationale_mode": "multitask"}, "--rationale-mode multitask"),
    ({"targets": "sampled"}, "--targets sampled"), ({"store": "twice"}, "several --store values")])
def test_what_cross_tokenizer_does_not_combine_with_is_refused_in_one_line(setup: dict, overrides: dict, named: str) -> None:
    from potstill.student_train.cross_tokenizer import check_cross_settings
    from potstill.student_train.errors import ConfigError

    stores = [open_store(setup["store"])] * (2 if overrides.pop("store", None) else 1)
    cfg = TrainConfig(store=[setup["store"]], student=setup["student"], out="x", cross_tokenizer=True, **overrides)
    with pytest.raises(ConfigError, match="^--cross-tokenizer does not combine with " + named):
        check_cross_settings(cfg, stores)


@pytest.mark.slow
def test_another_tokenizer_without_the_flag_is_refused_in_one_line_naming_it(setup: dict, tmp_path) -> None:
    proc = run_cli("train", "--store", setup["store"], "--student", setup["student"], "--out", str(tmp_path / "out"),
                   "--max-steps", "1", "--report-to", "none")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "does not match the store's tokenizer" in line and "--cross-tokenizer" in line


@pytest.mark.slow
def test_a_student_with_its_own_tokenizer_trains_from_the_cli_and_resumes_exactly(setup: dict, tmp_path) -> None:
    out = str(tmp_path / "cli")
    proc = run_cli("train", "--cross-tokenizer", "--store", setup["store"], "--student", setup["student"], "--out", out,
                   "--max-steps", "30", "--lr", "1e-2", "--batch-size", "4", "--logging-steps", "1", "--num-workers", "1",
                   "--eval-fraction", "0.2", "--eval-max-new-tokens", "4", "--report-to", "none", "--save-steps", "100")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out, "training_report.json")) as f:
        report = json.load(f)
    curve = report["loss_curve"]
    assert report["targets"] == "cross" and report["settings"]["cross_tokenizer"]
    assert 0 < curve[0]["cross_matched"] < 1
    assert np.mean([e["kd"] for e in curve[-5:]]) < 0.7 * np.mean([e["kd"] for e in curve[:5]])
    final = report["final_eval"]
    assert final["cross_tokenizer"] and final["records"] > 0 and final["kd_loss"] is not None
    assert final["answers_checked"] == final["records"]
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(out)) == len(AutoTokenizer.from_pretrained(setup["tokenizer"]))

    class CrashAt(__import__("transformers").TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise RuntimeError("simulated crash")

    settings = dict(store=[setup["store"]], student=setup["student"], cross_tokenizer=True, lr=1e-2, batch_size=3,
                    logging_steps=1, report_to="none", eval_fraction=0.2, num_workers=2, save_steps=3, max_steps=7,
                    shuffle_buffer=4, eval_max_records=2, eval_max_new_tokens=2)
    full = train(TrainConfig(out=str(tmp_path / "full"), **settings).validate())
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(TrainConfig(out=str(tmp_path / "crashed"), **settings).validate(), callbacks=[CrashAt()])
    resumed = train(TrainConfig(out=str(tmp_path / "crashed"), resume=True, **settings).validate())
    assert resumed["resumed_from"].endswith("checkpoint-3")

    def losses_of(r: dict) -> list:
        return [{k: v for k, v in e.items() if k != "grad_norm"} for e in r["loss_curve"]]

    assert losses_of(resumed) == losses_of(full) and len(losses_of(full)) == 7
