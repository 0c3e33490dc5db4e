"""Training on sampled targets: the loss's gradient is an unbiased estimate of full KD's (float64,
many draws), collation of sampled (and packed) stores, `potstill train --targets`, `potstill eval`
on every kind of store."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from common import build_student, write_jsonl
from trainhelpers import arithmetic_items

from potstill.store import open_store
from potstill.store.targets import kind_named
from potstill.student_train import ConfigError, TrainConfig, evaluate, train
from potstill.student_train.data import StoreDataset, collate, record_sequence
from potstill.student_train.errors import TrainError
from potstill.student_train.losses import sampled_kd, sparse_kd
from potstill.teacher_gen.runner import generate

V, N, DRAWS = 24, 12, 20_000


def _teacher_and_student(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(2.0 * torch.randn(V, generator=g, dtype=torch.float64), -1)
    z = torch.randn(V, generator=g, dtype=torch.float64)
    return p, z


def _draw_targets(p: torch.Tensor, rows: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`rows` independent sets of n draws from p, as (ids [rows, U], probs [rows, U]) like the collator's."""
    from potstill.store.codec import sampled_from_draws

    draws = np.random.default_rng(seed).choice(V, size=(rows, n), p=p.numpy())
    ids, counts = sampled_from_draws(draws).padded()
    return torch.from_numpy(ids), torch.from_numpy(counts / n)


def _grad(loss_fn, z: torch.Tensor, rows: int) -> torch.Tensor:
    """Per-row gradients of loss_fn(logits [rows, V]) -> [rows] with respect to each row's logits."""
    logits = z.expand(rows, V).clone().requires_grad_(True)
    loss_fn(logits).sum().backward()
    return logits.grad


def test_the_sampled_gradient_is_an_unbiased_estimate_of_full_kd() -> None:
    p, z = _teacher_and_student()
    ids, probs = _draw_targets(p, DRAWS, N, seed=1)
    grads = _grad(lambda x: sampled_kd(x, ids, probs), z, DRAWS)
    full = _grad(lambda x: (p * (p.log() - torch.log_softmax(x, -1))).sum(-1), z, 1)[0]
    assert torch.allclose(full, torch.softmax(z, -1) - p)  # the reference: q - p
    # Each row's gradient is q - p̂ with p̂ a mean of N one-hot draws: per coordinate the standard error
    # of the mean over DRAWS rows is sqrt(p (1 - p) / (N · DRAWS)).
    se = (p * (1 - p) / (N * DRAWS)).sqrt()
    z_scores = (grads.mean(0) - full) / se
    assert z_scores.abs().max() < 5.0, z_scores
    # Power: a top-k target with the rest renormalised away is biased far beyond that tolerance.
    k = 4
    top_lp, top_ids = p.log().topk(k)
    topk = _grad(lambda x: sparse_kd(x, top_ids.expand(DRAWS, k), top_lp.expand(DRAWS, k),
                                     torch.zeros(DRAWS, dtype=torch.float64), tail=False), z, DRAWS)
    assert ((topk.mean(0) - full) / se).abs().max() > 50.0


def test_the_sampled_loss_is_the_kl_of_the_estimate_and_full_kl_plus_a_constant_in_expectation() -> None:
    p, z = _teacher_and_student(seed=3)
    ids, probs = _draw_targets(p, 4000, N, seed=4)
    q_log = torch.log_softmax(z, -1)
    loss = sampled_kd(z.expand(len(ids), V), ids, probs)
    dense = torch.zeros(len(ids), V, dtype=torch.float64).scatter_add_(1, ids.clamp(min=0), probs * (ids >= 0))
    reference = torch.where(dense > 0, dense * (dense.clamp(min=1e-300).log() - q_log), torch.zeros_like(dense)).sum(-1)
    assert torch.allclose(loss, reference) and bool((loss >= 0).all())
    # E[loss] = KL(p || q) + H(p) - E[H(p̂)]: compare with the estimate of the right-hand side.
    entropy_hat = -torch.where(dense > 0, dense * dense.clamp(min=1e-300).log(), torch.zeros_like(dense)).sum(-1)
    expected = (p * (p.log() - q_log)).sum() - (p * p.log()).sum() - entropy_hat.mean()
    assert abs(loss.mean().item() - expected.item()) < 0.02
    assert sampled_kd(q_log.expand(1, V), ids[:1], probs[:1]).item() > 0  # q != p̂ in general
    student_equal_to_the_estimate = torch.where(dense[:1] > 0, dense[:1].clamp(min=1e-300).log(), torch.full_like(dense[:1], -1e4))
    assert abs(sampled_kd(student_equal_to_the_estimate, ids[:1], probs[:1]).item()) < 1e-9  # 0 exactly when q = p̂


# -- stores from a real tiny teacher -------------------------------------------------------------------
@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_teacher_dir, tiny_tokenizer_dir) -> dict:
    from genhelpers import config

    root = tmp_path_factory.mktemp("sampled-train")
    rows = [{"id": it["id"], "prompt": it["prompt"], "completion": it["completion"]} for it in arithmetic_items(40, seed=2)]
    prompts = write_jsonl(str(root / "p.jsonl"), rows)
    both = str(root / "both.store")
    generate(config(tiny_teacher_dir, prompts, both, targets="both", samples=50, top_k=8, codec="packed", seed=3))
    sampled = str(root / "sampled.store")
    generate(config(tiny_teacher_dir, prompts, sampled, targets="sampled", samples=12, seed=3))
    compact = str(root / "compact.store")
    generate(config(tiny_teacher_dir, prompts, compact, targets="sampled", samples=12, codec="compact", seed=3))
    student = build_student(str(root / "student"), tiny_tokenizer_dir, hidden=16)
    return {"root": root, "both": both, "sampled": sampled, "compact": compact, "student": student}


@pytest.mark.parametrize("name", ["both", "sampled", "compact"])  # compact: decoded straight into the rows
def test_collation_aligns_sampled_targets_with_the_logits_that_predict_them(stores, name: str) -> None:
    store = open_store(stores[name])
    assert store.manifest.targets.codec == {"both": "packed", "sampled": "none", "compact": "compact"}[name]
    n = store.manifest.targets.samples
    reader = store.shard(store.shard_names[0])
    seqs = [record_sequence(reader, row, "sampled") for row in range(3)]
    batch = collate(seqs, k=0, pad_id=0, targets="sampled", student_vocab=200)
    assert "topk_ids" not in batch and batch["sampled_ids"].shape == batch["sampled_probs"].shape
    row = 0
    for b, seq in enumerate(seqs):
        sampled = reader.views.sampled_of(b)
        for j in range(sampled.num_positions):
            ids, counts = sampled.position(j)
            assert batch["pos_batch"][row] == b and batch["pos_index"][row] == seq.score_start + j - 1
            assert batch["hard_ids"][row] == seq.ids[seq.score_start + j]
            keep = ids < 200  # ids the student has no logit for are dropped (emptied in place)
            got, probs = batch["sampled_ids"][row].numpy(), batch["sampled_probs"][row].numpy()
            u = len(ids)
            assert np.array_equal(got[:u], np.where(keep, ids, -1)) and np.all(got[u:] == -1)
            assert np.array_equal(probs[:u], np.where(keep, (counts / n).astype(np.float32), 0.0)) and np.all(probs[u:] == 0)
            row += 1
    assert row == len(batch["hard_ids"])


def _config(stores: dict, store: str, out: str, **overrides) -> TrainConfig:
    base = dict(store=stores[store], student=stores["student"], out=str(stores["root"] / out), lr=1e-2, batch_size=4,
                max_steps=20, logging_steps=1, report_to="none", eval_fraction=0.2, num_workers=0, eval_max_records=8,
                save_steps=100, eval_max_new_tokens=4)
    base.update(overrides)
    return TrainConfig(**base).validate()


def test_training_on_sampled_targets_from_a_packed_store_lowers_the_held_out_kd_loss(stores) -> None:
    before = evaluate(stores["both"], stores["student"], eval_fraction=0.2, answers=False)
    report = train(_config(stores, "both", "sampled-run", targets="sampled"))
    assert report["targets"] == "sampled" and report["global_step"] == 20
    after = report["final_eval"]
    assert after["kd_target"] == "topk"  # the store has top-k targets: eval measures against them
    assert after["kd_loss"] < 0.8 * before["kd_loss"]
    curve = [entry["kd"] for entry in report["loss_curve"]]
    assert np.mean(curve[-5:]) < np.mean(curve[:5]) - 0.1  # KL(p̂ || q) keeps a floor: H(p) - E[H(p̂)] > 0


def test_auto_picks_sampled_targets_only_where_the_loss_can_use_them(stores) -> None:
    cfg = _config(stores, "both", "auto")
    both, topk = kind_named("both"), kind_named("topk")
    assert both.default_train_target(cfg.sampled_loss_ok()) == "sampled"
    assert topk.default_train_target(cfg.sampled_loss_ok()) == "topk"
    assert both.default_train_target(_config(stores, "both", "auto-jsd", loss="jsd").sampled_loss_ok()) == "topk"
    data = StoreDataset.open(stores["both"], batch_size=2, targets="topk", eval_fraction=0.2)
    assert "topk_ids" in next(data.batches(0)) and "sampled_ids" not in next(data.batches(0))


def test_wrong_target_requests_are_refused_in_one_line(stores) -> None:
    with pytest.raises(TrainError, match=r"--targets topk: store .* holds only sampled targets"):
        train(_config(stores, "sampled", "bad1", targets="topk"))
    with pytest.raises(ConfigError, match="--targets sampled trains forward KL at temperature 1 only"):
        _config(stores, "sampled", "bad2", targets="sampled", kd_temperature=2.0)
    with pytest.raises(ConfigError, match="holds only sampled targets, which train forward KL at temperature 1 only"):
        train(_config(stores, "sampled", "bad3", loss="jsd"))


def test_eval_on_a_sampled_only_store_says_what_it_measures(stores) -> None:
    from typer.testing import CliRunner

    from potstill.cli.main import app

    result = CliRunner().invoke(app, ["eval", "--store", stores["sampled"], "--model", stores["student"],
                                      "--eval-fraction", "0.2", "--no-answers", "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["kd_target"] == "sampled" and metrics["kd_loss"] > 0 and 0 <= metrics["top1_agreement"] <= 1
    text = CliRunner().invoke(app, ["eval", "--store", stores["sampled"], "--model", stores["student"],
                                    "--eval-fraction", "0.2", "--no-answers"]).output
    assert "(vs sampled targets)" in text
    assert os.path.isdir(stores["sampled"])
