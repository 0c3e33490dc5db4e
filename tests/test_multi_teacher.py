"""Several teachers in one student (student_train/teachers.py): the mixtures against float64
references from their definitions, stores joined by id, `potstill train --store A --store B` end to
end from the CLI, the refusals (one line each), an exact resume, `potstill eval` with several stores."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from common import build_llama, build_student, build_tokenizer, write_jsonl
from storehelpers import committed_ids
from teacher_mix import exact_on_buckets, full_kl, measure, topk_rows
from trainhelpers import arithmetic_items, crash_at

from potstill.store import open_store
from potstill.store.codec import sampled_from_draws
from potstill.store.targets import TopKRows, WeightedRows
from potstill.student_train import TrainConfig, evaluate, train
from potstill.student_train.data import plan_split
from potstill.student_train.losses import sparse_kd, student_buckets, teacher_buckets
from potstill.student_train.teachers import (
    MixedDataset,
    Teachers,
    merge_rows,
    merge_rows_numpy,
    mix_topk,
    mix_weighted,
)
from potstill.teacher_gen.runner import generate

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
TEMPERATURES = (0.5, 1.0, 2.0, 4.0)


# -- the mixtures, against float64 references ------------------------------------------------------------
def _full_distributions(teachers: int, vocab: int, rows: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(teachers):
        z = 2.5 * rng.standard_normal((rows, vocab))
        out.append(np.exp(z - np.logaddexp.reduce(z, axis=-1, keepdims=True)))
    return out


def _reference(p: np.ndarray, z: np.ndarray, loss: str, t: float, beta: float = 0.5) -> np.ndarray:
    """The divergence between p_T ∝ p^{1/T} and softmax(z / T), T² scaled, float64, from its definition."""
    lp = np.log(p) / t
    lp -= np.logaddexp.reduce(lp, axis=-1, keepdims=True)
    lq = z / t - np.logaddexp.reduce(z / t, axis=-1, keepdims=True)
    pp, qq = np.exp(lp), np.exp(lq)
    if loss == "forward_kl":
        return t**2 * (pp * (lp - lq)).sum(-1)
    if loss == "reverse_kl":
        return t**2 * (qq * (lq - lp)).sum(-1)
    m = beta * pp + (1 - beta) * qq
    return t**2 * (beta * (pp * (lp - np.log(m))).sum(-1) + (1 - beta) * (qq * (lq - np.log(m))).sum(-1))


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd"])
def test_top_k_teachers_holding_their_whole_distributions_mix_exactly(loss: str) -> None:
    """K = V: the rule is exact; the float32 training loss of the mixed buckets is the float64 loss of
    p = Σ w_t p_t within 1e-4, at every temperature, and so is its gradient (forward KL)."""
    vocab, rows = 24, 16
    ps = _full_distributions(3, vocab, rows, seed=1)
    weights = np.array([0.5, 0.3, 0.2])
    mixed = mix_topk([(topk_rows(p, vocab), np.full(rows, w)) for p, w in zip(ps, weights, strict=True)], 3 * vocab)
    assert mixed.ids.shape == (rows, 3 * vocab) and np.all((mixed.ids >= 0).sum(-1) == vocab)  # the union: V ids once
    p = sum(w * q for w, q in zip(weights, ps, strict=True))
    z = np.random.default_rng(2).standard_normal((rows, vocab)) * 2
    for t in TEMPERATURES:
        logits = torch.tensor(z, dtype=torch.float32, requires_grad=True)
        got = sparse_kd(logits, torch.from_numpy(mixed.ids.astype(np.int64)), torch.from_numpy(mixed.logprobs),
                        torch.from_numpy(mixed.tail_logprob), loss=loss, temperature=t)
        want = _reference(p, z, loss, t)
        np.testing.assert_allclose(got.detach().double().numpy(), want, rtol=1e-4, atol=1e-7)
        if loss == "forward_kl":  # d/dz of T² KL(p_T ‖ q_T) = T (q_T − p_T)
            got.sum().backward()
            lp = np.log(p) / t
            p_t = np.exp(lp - np.logaddexp.reduce(lp, axis=-1, keepdims=True))
            q_t = np.exp(z / t - np.logaddexp.reduce(z / t, axis=-1, keepdims=True))
            np.testing.assert_allclose(logits.grad.double().numpy(), t * (q_t - p_t), rtol=1e-4, atol=1e-6)


def test_top_k_teachers_with_the_same_top_k_ids_mix_exactly_on_the_buckets() -> None:
    """Equal top-k sets: each teacher's tail holds none of another's named ids, so the mixed buckets are
    exactly the full mixture's on those buckets (K ids + tail), at every temperature."""
    vocab, k, rows = 40, 6, 12
    rng = np.random.default_rng(3)
    base = rng.standard_normal((rows, vocab))
    base[:, :k] += 8.0  # the same k ids lead in both teachers, in different orders
    ps = []
    for _ in range(2):
        z = base + 0.7 * rng.standard_normal((rows, vocab))
        ps.append(np.exp(z - np.logaddexp.reduce(z, axis=-1, keepdims=True)))
    mixed = mix_topk([(topk_rows(p, k), np.full(rows, w)) for p, w in zip(ps, (0.6, 0.4), strict=True)], 2 * k)
    p = 0.6 * ps[0] + 0.4 * ps[1]
    exact = exact_on_buckets(mixed, p)
    np.testing.assert_allclose(np.exp(mixed.logprobs.astype(np.float64)), np.exp(exact.logprobs.astype(np.float64)),
                               rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(mixed.tail_logprob, exact.tail_logprob, rtol=1e-5)
    z = rng.standard_normal((rows, vocab))
    for t in TEMPERATURES:  # the bucket loss of the exact mixture, from its definition in float64
        ids = torch.from_numpy(mixed.ids.astype(np.int64))
        s = student_buckets(torch.from_numpy(z), ids)
        tb = teacher_buckets(torch.from_numpy(exact.logprobs.astype(np.float64)),
                             torch.from_numpy(exact.tail_logprob.astype(np.float64)), ids)
        valid = torch.cat([ids >= 0, torch.ones(rows, 1, dtype=torch.bool)], -1)
        pt = torch.log_softmax(tb.masked_fill(~valid, -torch.inf) / t, -1)
        qt = torch.log_softmax(s.masked_fill(~valid, -torch.inf) / t, -1)
        want = t**2 * torch.where(valid, pt.exp() * (pt - qt), 0.0).sum(-1)
        got = sparse_kd(torch.from_numpy(z).float(), ids, torch.from_numpy(mixed.logprobs),
                        torch.from_numpy(mixed.tail_logprob), temperature=t)
        np.testing.assert_allclose(got.double().numpy(), want.numpy(), rtol=1e-4, atol=1e-7)


def test_where_tails_hide_ids_another_teacher_names_the_moved_mass_stays_within_its_stated_bound() -> None:
    """K < V with different top-k sets: the rule moves mass from the union's ids into the tail, at most
    Σ_t w_t · min(m_t, |U \\ topk_t| · min p_t(topk_t)) per position; the measured error (bench/teacher_mix.py)."""
    vocab, k, rows = 200, 8, 64
    ps = _full_distributions(2, vocab, rows, seed=5)
    weights = (0.7, 0.3)
    parts = [(topk_rows(p, k), np.full(rows, w)) for p, w in zip(ps, weights, strict=True)]
    mixed = mix_topk(parts, 2 * k)
    p = sum(w * q for w, q in zip(weights, ps, strict=True))
    exact = exact_on_buckets(mixed, p)
    moved = np.exp(mixed.tail_logprob.astype(np.float64)) - np.exp(exact.tail_logprob.astype(np.float64))
    bound = np.zeros(rows)
    for rows_t, w in parts:
        hidden = np.array([len(set(u[u >= 0]) - set(mine)) for u, mine in zip(mixed.ids, rows_t.ids, strict=True)])
        bound += w * np.minimum(np.exp(rows_t.tail_logprob.astype(np.float64)), hidden * np.exp(rows_t.logprobs[:, -1].astype(np.float64)))
        assert np.all(np.exp(mixed.logprobs[mixed.ids >= 0]) > 0)
    assert np.all(moved >= -1e-6) and np.all(moved <= bound + 1e-6) and moved.max() > 1e-4  # the test can fail
    assert np.isclose(np.exp(mixed.logprobs.astype(np.float64)).sum(-1) + np.exp(mixed.tail_logprob.astype(np.float64)),
                      1.0, atol=1e-5).all()  # still a distribution
    figures = measure(512, 16, 2, 1.0, rows=64)
    assert 0 < figures["bucket_err"] < 0.2 and figures["moved_max"] < 0.2
    assert full_kl(p, np.zeros((rows, vocab)), 1.0).shape == (rows,)


def test_sampled_teachers_mix_as_the_weighted_union_of_their_draws_unbiased() -> None:
    """The mixed weights are Σ_t w_t · count_t / N_t exactly; averaged over many draws they approach
    Σ_t w_t p_t (unbiased), while a top-k mixture would not."""
    vocab, rows = 16, 4000
    ps = [p[0] for p in _full_distributions(2, vocab, 1, seed=7)]
    weights = (0.25, 0.75)
    rng = np.random.default_rng(8)
    parts, dense = [], np.zeros((rows, vocab))
    for p, w, n in zip(ps, weights, (12, 20), strict=True):
        ids, counts = sampled_from_draws(rng.choice(vocab, size=(rows, n), p=p)).padded()
        parts.append((WeightedRows(ids.astype(np.int64), (counts / n).astype(np.float32), (ids >= 0).sum(-1)), np.full(rows, w)))
        np.add.at(dense, (np.repeat(np.arange(rows), ids.shape[1]), ids.reshape(-1).clip(min=0)),
                  (w * counts / n * (ids >= 0)).reshape(-1))
    mixed = mix_weighted(parts)
    got = np.zeros((rows, vocab))
    np.add.at(got, (np.repeat(np.arange(rows), mixed.ids.shape[1]), mixed.ids.reshape(-1).clip(min=0)),
              (mixed.weights * (mixed.ids >= 0)).reshape(-1))
    np.testing.assert_allclose(got, dense, atol=1e-6)
    assert np.all(mixed.lengths == (mixed.ids >= 0).sum(-1)) and np.all(np.diff(mixed.weights, axis=1) <= 1e-7)
    p = weights[0] * ps[0] + weights[1] * ps[1]
    se = np.sqrt(p * (1 - p) / (rows * 12))  # at least as wide as the mean's standard error
    assert np.abs((got.mean(0) - p) / se).max() < 5.0


def test_merge_rows_sums_each_id_once_per_row_compiled_as_in_numpy() -> None:
    ids = np.array([[3, 1, 3, -1], [2, 2, 2, 0], [5, 4, -1, -1]])
    w = np.array([[0.1, 0.2, 0.3, 0.9], [0.1, 0.1, 0.1, 0.5], [0.25, 0.25, 0.0, 0.0]])
    for merge in (merge_rows, merge_rows_numpy):
        out_ids, out_w, lengths = merge(ids, w)
        assert out_ids.tolist() == [[3, 1], [0, 2], [4, 5]] and lengths.tolist() == [2, 2, 2]
        assert np.allclose(out_w, [[0.4, 0.2], [0.5, 0.3], [0.25, 0.25]])
    rng = np.random.default_rng(0)
    ids = np.where(rng.random((64, 40)) < 0.2, -1, rng.integers(0, 30, (64, 40)))
    w = np.round(rng.random((64, 40)), 2)  # ties in weight too
    (ids_a, w_a, len_a), (ids_b, w_b, len_b) = merge_rows(ids, w, 40), merge_rows_numpy(ids, w, 40)
    assert np.array_equal(len_a, len_b) and np.all(np.diff(w_a, axis=1) <= 1e-12)
    for row in range(len(ids)):  # (sums may differ in the last bit, and so the order of equal weights)
        got = dict(zip(ids_a[row].tolist(), w_a[row].tolist(), strict=True))
        want = dict(zip(ids_b[row].tolist(), w_b[row].tolist(), strict=True))
        assert got.keys() == want.keys() and all(abs(got[i] - want[i]) < 1e-12 for i in got)


# -- stores from real tiny teachers ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_teacher_dir, tiny_tokenizer_dir) -> dict:
    """Two different teachers over the same prompts: top-k stores of each, a sampled store of the second,
    a store over other prompts (same ids), one over a subset, and one made with another tokenizer."""
    from genhelpers import config
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("teachers")
    vocab = len(AutoTokenizer.from_pretrained(tiny_tokenizer_dir))
    second = str(root / "teacher2")
    build_llama(second, vocab, hidden=32, layers=2, seed=5, tokenizer_dir=tiny_tokenizer_dir)
    items = arithmetic_items(36, seed=1)
    rows = [{"id": it["id"], "prompt": it["prompt"], "completion": it["completion"]} for it in items]
    prompts = write_jsonl(str(root / "p.jsonl"), rows)
    other = write_jsonl(str(root / "other.jsonl"), [{**r, "prompt": r["prompt"].replace("what", "so what")} for r in rows])
    subset = write_jsonl(str(root / "subset.jsonl"), rows[::2])
    # every other record's completion ends otherwise: the teachers scored other tokens from there on
    diverged = write_jsonl(str(root / "diverged.jsonl"), [
        {**r, "completion": r["completion"].rsplit(" ", 1)[0] + " 99"} if i % 2 else r for i, r in enumerate(rows)])
    stores = {name: str(root / f"{name}.store") for name in ("a", "b", "a_sampled", "b_sampled", "other", "subset", "diverged", "tokenizer")}
    generate(config(tiny_teacher_dir, prompts, stores["a"], top_k=8, seed=3))
    generate(config(second, prompts, stores["b"], top_k=6, seed=3, hidden_layers="1"))
    generate(config(tiny_teacher_dir, prompts, stores["a_sampled"], targets="sampled", samples=16, seed=3))
    generate(config(second, prompts, stores["b_sampled"], targets="sampled", samples=16, seed=4))
    generate(config(second, other, stores["other"], top_k=6, seed=3))
    generate(config(second, subset, stores["subset"], top_k=6, seed=3))
    generate(config(second, diverged, stores["diverged"], top_k=6, seed=3))
    tok2 = str(root / "tok2")
    build_tokenizer(tok2, vocab_size=320)
    third = str(root / "teacher3")
    build_llama(third, len(AutoTokenizer.from_pretrained(tok2)), hidden=32, layers=2, seed=6, tokenizer_dir=tok2)
    generate(config(third, prompts, stores["tokenizer"], top_k=6, seed=3))
    student = build_student(str(root / "student"), tiny_tokenizer_dir, hidden=16)
    return {"root": root, "student": student, **stores}


def _config(setup: dict, out: str, stores: list[str], **overrides) -> TrainConfig:
    base = dict(store=[setup[s] for s in stores], student=setup["student"], out=str(setup["root"] / out), lr=1e-2,
                batch_size=4, max_steps=6, logging_steps=1, report_to="none", eval_fraction=0.2, num_workers=0,
                eval_max_new_tokens=4, eval_max_records=4, save_steps=100)
    base.update(overrides)
    return TrainConfig(**base).validate()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "potstill.cli.main", *args], capture_output=True, text=True, env=ENV,
                          timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _joined(setup: dict, names: list[str], weights: list[float], targets: str = "topk") -> MixedDataset:
    stores = [open_store(setup[n], verify_reads=True) for n in names]
    plan = plan_split(stores[0], 0.2, 1, 0)
    teachers, plan = Teachers.open(stores[0], plan, stores[1:], weights[1:])
    return MixedDataset(stores[0], plan, teachers, batch_size=4, targets=targets, student_vocab=10_000)


def _stored(store_url: str, record_id: str, targets: str) -> tuple[np.ndarray, int, TopKRows | WeightedRows]:
    from potstill.student_train.data import record_sequence

    store = open_store(store_url)
    index = store.id_index()
    position = int(np.flatnonzero(index.ids().to_numpy(zero_copy_only=False) == record_id)[0])
    seq = record_sequence(store.shard(index.shards[index.shard[position]]), int(index.row[position]), targets)
    return seq.ids, seq.score_start, seq.targets


def test_a_batch_of_two_top_k_stores_holds_the_mixture_of_the_stored_targets(setup: dict) -> None:
    """Each trained position's buckets against a float64 mixture made from the two stores' own rows by
    the rule's definition (dictionaries, position by position), and the loss on them against float64."""
    dataset = _joined(setup, ["a", "b"], [0.75, 0.25])
    batch = next(dataset.batches(0))
    assert batch["topk_ids"].shape[1] == 8 + 6 and float(batch["teachers_partial"]) == 0.0
    logits = torch.randn(len(batch["hard_ids"]), batch["topk_ids"].max().item() + 5, dtype=torch.float64)
    position = 0
    for b, record_id in enumerate(batch["record_ids"]):
        ids_a, s, rows_a = _stored(setup["a"], record_id, "topk")
        ids_b, s_b, rows_b = _stored(setup["b"], record_id, "topk")
        assert np.array_equal(ids_a, ids_b) and s == s_b
        for j in range(len(ids_a) - s):
            mix: dict[int, float] = {}
            for rows, w in ((rows_a, 0.75), (rows_b, 0.25)):
                for i, lp in zip(rows.ids[j].tolist(), rows.logprobs[j].astype(np.float64).tolist(), strict=True):
                    if i >= 0:
                        mix[i] = mix.get(i, 0.0) + w * np.exp(lp)
            tail = 0.75 * np.exp(float(rows_a.tail_logprob[j])) + 0.25 * np.exp(float(rows_b.tail_logprob[j]))
            got_ids = batch["topk_ids"][position].numpy()
            got = {int(i): float(np.exp(lp)) for i, lp in zip(got_ids, batch["topk_logprobs"][position].numpy(), strict=True) if i >= 0}
            assert got.keys() == mix.keys() and int(batch["pos_batch"][position]) == b
            np.testing.assert_allclose([got[i] for i in mix], list(mix.values()), rtol=1e-6)
            assert np.isclose(np.exp(float(batch["tail_logprob"][position])), tail, rtol=1e-6)
            # forward KL on the buckets (normalised: stored float16 log-probs need not sum to 1), float64
            total = sum(mix.values()) + tail
            z = logits[position]
            q = torch.softmax(z, -1).numpy()
            keys = list(mix)
            q_tail = 1.0 - q[keys].sum()
            want = sum(v / total * np.log(v / total / q[i]) for i, v in mix.items()) + tail / total * np.log(tail / total / q_tail)
            got_loss = sparse_kd(z[None].float(), batch["topk_ids"][position : position + 1].long(),
                                 batch["topk_logprobs"][position : position + 1], batch["tail_logprob"][position : position + 1])
            assert float(got_loss) == pytest.approx(want, rel=1e-4)
            position += 1
    assert position == len(batch["hard_ids"])


def test_sampled_stores_mix_their_draws_and_a_sampled_with_a_top_k_store_is_refused(setup: dict) -> None:
    from potstill.student_train import ConfigError

    dataset = _joined(setup, ["a_sampled", "b_sampled"], [0.5, 0.5], targets="sampled")
    batch = next(dataset.batches(0))
    position = 0
    for record_id in batch["record_ids"]:
        _, s, rows_a = _stored(setup["a_sampled"], record_id, "sampled")
        ids, _, rows_b = _stored(setup["b_sampled"], record_id, "sampled")
        for j in range(len(ids) - s):
            want: dict[int, float] = {}
            for rows in (rows_a, rows_b):
                for i, w in zip(rows.ids[j].tolist(), rows.weights[j].tolist(), strict=True):
                    if i >= 0:
                        want[i] = want.get(i, 0.0) + 0.5 * w
            got = {int(i): float(w) for i, w in zip(batch["sampled_ids"][position].numpy(),
                                                    batch["sampled_probs"][position].numpy(), strict=True) if i >= 0}
            assert got.keys() == want.keys() and np.allclose([got[i] for i in want], list(want.values()), rtol=1e-6)
            position += 1
    assert position == len(batch["hard_ids"])
    with pytest.raises(ConfigError, match="do not mix"):
        train(_config(setup, "mixed-kinds", ["a", "b_sampled"]))


def test_where_a_teacher_scored_other_tokens_the_others_alone_are_mixed_and_it_is_counted(setup: dict) -> None:
    """Past the first token where the second store's sequence differs, the first teacher's target alone
    (its weight renormalised to 1); before it, the union of both; the share of such positions logged."""
    dataset = _joined(setup, ["a", "diverged"], [0.5, 0.5])
    batches = dataset.batches(0)
    diverged_records = 0
    while diverged_records < 2:
        batch = next(batches)
        position = alone = 0
        for record_id in batch["record_ids"]:
            ids_a, s, rows_a = _stored(setup["a"], record_id, "topk")
            ids_d, _, rows_d = _stored(setup["diverged"], record_id, "topk")
            shared = min(len(ids_a), len(ids_d))
            differ = np.flatnonzero(ids_a[:shared] != ids_d[:shared])
            cp = int(differ[0]) if len(differ) else shared
            for j in range(len(ids_a) - s):
                got_ids = batch["topk_ids"][position].numpy()
                got = set(got_ids[got_ids >= 0].tolist())
                if s + j > cp:  # the first teacher alone, weight 1
                    assert got == set(rows_a.ids[j].tolist())
                    lp = batch["topk_logprobs"][position].numpy()[got_ids >= 0]
                    assert np.allclose(np.sort(lp), np.sort(rows_a.logprobs[j].astype(np.float32)), atol=1e-6)
                    alone += 1
                else:
                    assert got == set(rows_a.ids[j].tolist()) | set(rows_d.ids[j].tolist())
                position += 1
            diverged_records += int(cp < len(ids_a))
        assert float(batch["teachers_partial"]) == pytest.approx(alone / position)


def test_records_some_stores_lack_are_left_out_and_counted(setup: dict) -> None:
    dataset = _joined(setup, ["a", "subset"], [0.5, 0.5])
    full = plan_split(open_store(setup["a"]), 0.2, 1, 0)
    teachers = dataset.describe()["teachers"]
    assert teachers[1]["missing_records"] == 18 and teachers[1]["extra_records"] == 0
    assert dataset.plan.num_train + dataset.plan.eval_records == 18 < full.num_train + full.eval_records


@pytest.mark.slow
def test_a_store_made_over_other_prompts_a_store_given_twice_and_another_tokenizer_are_each_one_line(setup: dict) -> None:
    out = str(setup["root"] / "refused")
    cases = {
        "other": ("made over different prompts", [setup["a"], setup["other"]]),
        "twice": ("given twice", [setup["a"], setup["a"] + "/"]),
        "tokenizer": ("--cross-tokenizer", [setup["a"], setup["tokenizer"]]),
    }
    from potstill.cli.main import app
    from potstill.store.errors import PotstillError

    for name, (why, stores) in cases.items():
        args = ["train", "--student", setup["student"], "--out", out, "--max-steps", "1", "--report-to", "none"]
        for store in stores:
            args += ["--store", store]
        if name == "other":  # one refusal as the command prints it; the others in this process, as raised
            result = _cli(*args)
            lines = [ln for ln in result.stderr.strip().splitlines() if " ... " not in ln]  # less the start-up phases
            assert result.returncode == 1 and len(lines) == 1 and why in lines[0] and lines[0].startswith("error: "), \
                result.stderr
            continue
        with pytest.raises(PotstillError, match=why) as refused:
            app(args, standalone_mode=False)
        assert "\n" not in str(refused.value)
    assert not os.path.exists(out)


@pytest.mark.slow
def test_two_stores_train_one_student_from_the_cli_and_eval_takes_both(setup: dict) -> None:
    out = str(setup["root"] / "cli")
    config_file = setup["root"] / "two.yaml"
    config_file.write_text("teacher_weights: [3, 1]\nmax_steps: 6\nlr: 0.01\n"
                           "batch_size: 4\neval_fraction: 0.2\nhidden_map: '1:1'\nlogging_steps: 1\n")
    # --store given twice on the command line: both teachers train the student (not the last one alone)
    result = _cli("train", "--config", str(config_file), "--store", setup["a"], "--store", setup["b"],
                  "--student", setup["student"], "--out", out, "--report-to", "none",
                  "--num-workers", "0", "--eval-max-new-tokens", "4", "--eval-max-records", "4", "--hidden-from", setup["b"])
    assert result.returncode == 0, result.stderr  # only b holds hidden states: they come from it, and its sequences
    assert f"teacher {setup['a']} (weight 0.75): 0 record(s)" in result.stderr
    with open(os.path.join(out, "training_report.json")) as f:
        report = json.load(f)
    assert report["settings"]["store"] == [setup["a"], setup["b"]] and report["teachers"][0]["weight"] == 0.75
    assert report["store"]["url"] == setup["b"] and report["store"]["hidden_layers"] == [1]
    assert report["loader"]["teachers"][0]["weight"] == 0.25 and report["final_eval"]["teachers"][1]["store"] == setup["a"]
    assert all("teachers_partial" in entry and "hidden" in entry for entry in report["loss_curve"])
    # eval from the CLI against both stores: the final evaluation's numbers, on the same held-out records
    result = _cli("eval", "--store", setup["b"], "--store", setup["a"], "--teacher-weights", "1,3", "--model", out,
                  "--no-answers", "--max-records", "4", "--json")
    assert result.returncode == 0, result.stderr
    again = json.loads(result.stdout)
    assert again["kd_loss"] == pytest.approx(report["final_eval"]["kd_loss"], rel=1e-5)
    alone = evaluate(setup["b"], out, answers=False, max_records=4)
    assert alone["kd_loss"] != pytest.approx(again["kd_loss"], rel=1e-3)  # against one teacher: another number
    # and against each teacher alone, with its weight: what evaluating against its store alone gives
    assert [(t["store"], t["weight"]) for t in again["teachers"]] == [(setup["b"], 0.25), (setup["a"], 0.75)]
    for teacher in again["teachers"]:
        single = evaluate(teacher["store"], out, answers=False, max_records=4)
        assert single["records"] == again["records"] == 4
        for metric in ("kd_loss", "top1_agreement", "perplexity"):
            assert teacher[metric] == pytest.approx(single[metric], rel=1e-5), metric
    assert again["teachers"][0]["kd_loss"] != pytest.approx(again["teachers"][1]["kd_loss"], rel=1e-3)
    result = _cli("eval", "--store", setup["a"], "--store", setup["b"], "--model", out, "--no-answers")
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0 and "(vs the mixture of 2 teachers)" in lines[0], result.stdout + result.stderr
    assert lines[1].startswith(f"  vs {setup['a']} alone (weight 0.5): kd_loss ") and setup["b"] in lines[2]


@pytest.mark.slow
def test_store_report_of_two_teachers_compares_them_on_the_records_both_hold(setup: dict) -> None:
    """The Teachers section's figures against a direct count over the stored records: top-1 agreement
    where both teachers scored after the same tokens, each one's top-1 = the stored token; records one
    store lacks and positions after the sequences part are left out; the page from the CLI."""
    from potstill.share.report import _choose_rows
    from potstill.share.report_teachers import compare_teachers

    def direct(first: str, other: str) -> tuple[int, int, int, int, int]:
        agree = compared = hit_a = hit_b = records = 0
        held = set(committed_ids(other))
        for rec in open_store(first).iter_records():
            if rec.id not in held:
                continue
            records += 1
            ids_o, s_o, rows_o = _stored(other, rec.id, "topk")
            cp = next((i for i, (x, y) in enumerate(zip(rec.input_ids, ids_o, strict=False)) if x != y), min(len(ids_o), len(rec.input_ids)))
            for p in range(max(rec.score_start, s_o), min(len(rec.input_ids), len(ids_o), cp + 1)):
                top_a, top_o = int(rec.topk_ids[p - rec.score_start][0]), int(rows_o.ids[p - s_o][0])
                agree += top_a == top_o
                hit_a += top_a == int(rec.input_ids[p])
                hit_b += top_o == int(ids_o[p])
                compared += 1
        return records, compared, agree, hit_a, hit_b

    agreement = {}
    for other, shared in (("b", 36), ("subset", 18), ("diverged", 36)):
        stores = [open_store(setup["a"], verify_reads=True), open_store(setup[other], verify_reads=True)]
        got = compare_teachers(stores, _choose_rows(stores[0], 1000, 0))
        records, compared, agree, hit_a, hit_b = direct(setup["a"], setup[other])
        assert got.records == records == shared and got.teachers[1].shared == shared and got.teachers[0].shared == 36
        assert got.compared[0, 1] == compared > 0 and got.agree[0, 1] == got.agree[1, 0] == agree
        assert got.teachers[0].stored_token == hit_a and got.teachers[1].stored_token == hit_b
        assert got.agree[0, 0] == compared and agree < compared  # two teachers at random: they differ
        agreement[other] = f"{agree / compared:.1%}"
        if other == "diverged":  # past the first differing token nothing is compared
            assert got.common_positions == compared < got.prefix_positions
    page = str(setup["root"] / "teachers.html")
    result = _cli("store", "report", setup["a"], setup["b"], "--out", page)
    assert result.returncode == 0, result.stderr
    text = Path(page).read_text()
    assert "<h2>Teachers</h2>" in text and setup["b"] in text and f"<td class='num'>{agreement['b']}</td>" in text
    alone = str(setup["root"] / "alone.html")
    assert _cli("store", "report", setup["a"], "--out", alone).returncode == 0
    assert "<h2>Teachers</h2>" not in Path(alone).read_text()


@pytest.mark.slow
def test_an_interrupted_two_teacher_run_resumes_to_the_same_weights_bit_for_bit(setup: dict) -> None:
    from safetensors.numpy import load_file

    settings = dict(max_steps=7, save_steps=3, num_workers=2, shuffle_buffer=4, teacher_weights="2,1", batch_size=5)
    full = train(_config(setup, "full", ["a", "b"], **settings))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(_config(setup, "crashed", ["a", "b"], **settings), callbacks=[crash_at(5)])
    resumed = train(_config(setup, "crashed", ["a", "b"], resume=True, **settings))
    assert resumed["resumed_from"].endswith("checkpoint-3") and full["loader"]["batches_per_rank_per_epoch"] < 7
    assert [e["loss"] for e in resumed["loss_curve"]] == [e["loss"] for e in full["loss_curve"]]
    a = load_file(os.path.join(setup["root"] / "full", "model.safetensors"))
    b = load_file(os.path.join(setup["root"] / "crashed", "model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(Exception, match="teacher_weights"):  # another mixture cannot resume this run
        train(_config(setup, "crashed", ["a", "b"], resume=True, **{**settings, "teacher_weights": "1,1"}))
    with pytest.raises(Exception, match="several teachers"):  # nor one teacher alone
        train(_config(setup, "crashed", ["a"], resume=True, **{**settings, "teacher_weights": ""}))
    shutil.rmtree(setup["root"] / "crashed")


def test_a_config_file_lists_the_stores_with_their_weights(tmp_path) -> None:
    from potstill.student_train import ConfigError, build_config

    path = tmp_path / "train.yaml"
    path.write_text("store: [a.store, b.store]\nteacher_weights: [2, 1]\nhidden_from: b.store\n")
    cfg = build_config(str(path), {"student": "m", "out": "o"})
    assert cfg.stores == ["a.store", "b.store"] and cfg.weights() == pytest.approx([2 / 3, 1 / 3])
    assert build_config(None, {"store": "a.store", "student": "m", "out": "o"}).weights() == [1.0]
    for bad, why in (({"teacher_weights": "1"}, "1 weight"), ({"teacher_weights": "1,0"}, "positive"),
                     ({"teacher_weights": "1,x"}, "numbers"), ({"hidden_from": "c.store"}, "not one of")):
        with pytest.raises(ConfigError, match=why):
            build_config(str(path), {"student": "m", "out": "o", **bad})


@pytest.mark.slow
def test_the_guides_several_teachers_example_runs_as_written(tmp_path) -> None:
    """The bash block of docs/guides/train.md's runnable several-teachers example, run as it stands."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    guide = Path(root, "docs", "guides", "train.md").read_text()
    after = guide[guide.index("**A runnable example**"):]
    block = after[after.index("```bash\n") + len("```bash\n"): after.index("\n```\n")]
    assert "--store t1.store --store t2.store" in block and "store report t1.store t2.store" in block
    env = {**ENV, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", block], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [ln for ln in result.stdout.splitlines() if "kd_loss" in ln]
    assert "(vs the mixture of 2 teachers)" in lines[0] and lines[1].startswith("  vs t1.store alone (weight 0.75): kd_loss")
    assert lines[2].startswith("  vs t2.store alone (weight 0.25): kd_loss")
    page = (tmp_path / "teachers.html").read_text()
    assert "<h2>Teachers</h2>" in page and "t2.store" in page


def test_the_two_teacher_benchs_worked_solutions_are_right_and_its_held_out_problems_unseen() -> None:
    """bench/two_teachers.py: every written digit of a worked solution, read back, is the true result,
    and its held-out problems are none of the stored ones."""
    from two_teachers import TASKS, problems, result, worked_solution

    from potstill.cli.demo import arithmetic

    stored = [p for task in TASKS for p in problems(task, 1, 300)]
    for task, a, b in stored:
        text = worked_solution(task, a, b)
        digits = [line.split("write ")[1][0] for line in text.splitlines()[:-1]]
        carry = text.splitlines()[-2].rsplit(" ", 1)[1].rstrip(".")
        written = int("".join(reversed(digits))) + (int(carry) * 10 ** len(digits) if task == "add" else 0)
        assert written == result(task, a, b) == arithmetic.parse_answer(text) >= 0, text
    held = [p for task in TASKS for p in problems(task, 2, 100, exclude=set(stored))]
    assert not set(held) & set(stored) and len(set(held)) == 200
