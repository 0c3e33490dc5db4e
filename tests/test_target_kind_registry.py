"""A target kind defined in this file alone goes through generate → verify → train → eval.

The toy kind "top1" keeps, per scored position, the teacher's most likely token, its log-prob and
the log of the mass outside it, in columns of its own, with a capture of its own (a function of
each chunk of the teacher's logits). Nothing in potstill names it: it is registered here, and the
registries (store/targets) find it by the name the manifest records.
"""

from __future__ import annotations

import shutil
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from common import build_student, write_jsonl
from genhelpers import reference_log_tail, reference_logprobs
from trainhelpers import arithmetic_items
from typer.testing import CliRunner

from potstill.cli.main import app
from potstill.store import open_store
from potstill.store.columns import first_bad_row, flat, input_vocab, list_array
from potstill.store.errors import StoreError
from potstill.store.targets import (
    TargetColumns,
    TargetKind,
    TargetSpec,
    TopKRows,
    kind_named,
    register_kind,
    unregister_kind,
)
from potstill.store.verify import verify_store
from potstill.student_train import TrainConfig, evaluate, train
from potstill.teacher_gen.config import GenerateConfig
from potstill.teacher_gen.runner import generate

COLUMNS = ("top1_id", "top1_logprob", "token_logprob", "tail_logprob")


class Top1Columns(TargetColumns):
    def __init__(self, batch: pa.RecordBatch) -> None:
        self.batch = batch
        self.tgt_off, self.token_lp = flat(batch, "token_logprob")
        _, self.ids = flat(batch, "top1_id")
        _, self.lp = flat(batch, "top1_logprob")
        _, self.tail = flat(batch, "tail_logprob")
        self.bounds = self.tgt_off.tolist()

    def token_logprob(self, j: int) -> np.ndarray:
        return self.token_lp[self.bounds[j] : self.bounds[j + 1]]

    def topk(self, j: int) -> TopKRows:
        a, b = self.bounds[j], self.bounds[j + 1]
        return TopKRows(self.ids[a:b, None], self.lp[a:b, None], self.token_lp[a:b], self.tail[a:b])

    def record_fields(self, j: int) -> dict[str, Any]:
        rows = self.topk(j)
        return {"topk_ids": rows.ids, "topk_logprobs": rows.logprobs, "token_logprob": rows.token_logprob,
                "tail_logprob": rows.tail_logprob}

    def shape_problems(self, views: Any, manifest: Any) -> list[str]:
        return [f"column {name} has other row counts than token_logprob" for name in COLUMNS
                if not np.array_equal(self.batch.column(name).offsets.to_numpy(), self.tgt_off)]

    def value_problems(self, views: Any, manifest: Any) -> list[str]:
        bad = ((self.ids < 0) | (self.ids >= input_vocab(manifest)) | ~(self.lp <= 0) | ~(self.tail <= 0)
               | ~(self.token_lp <= 1e-3))
        if not bad.any():
            return []
        return [f"record {views.text_of('id', first_bad_row(self.tgt_off, bad))!r}: top-1 targets are not a distribution"]


class Top1(TargetKind):
    """The teacher's argmax id, its log-prob and the log tail; trained as top-k targets with K = 1."""

    name = "top1"
    holds_topk = True  # a record's topk_* fields hold [S, 1] rows
    codecs = ("none",)
    train_targets = ("topk",)

    def check_spec(self, spec: TargetSpec) -> None:
        if spec.k != 1:
            raise StoreError(f"targets.k must be 1 for top1 targets, got {spec.k!r}")

    def arrow_fields(self, spec: TargetSpec) -> list[pa.Field]:
        return [pa.field("top1_id", pa.list_(pa.int32()), nullable=False)] + [
            pa.field(name, pa.list_(pa.float32()), nullable=False) for name in COLUMNS[1:]]

    def encode(self, records: list[Any], spec: TargetSpec) -> dict[str, pa.Array]:
        lengths = [r.num_scored for r in records]
        arrays = {"top1_id": [r.topk_ids[:, 0] for r in records], "top1_logprob": [r.topk_logprobs[:, 0] for r in records],
                  "token_logprob": [r.token_logprob for r in records], "tail_logprob": [r.tail_logprob for r in records]}
        return {name: list_array(np.concatenate(parts), lengths) for name, parts in arrays.items()}

    def open(self, batch: pa.RecordBatch, spec: TargetSpec, views: Any) -> TargetColumns:
        return Top1Columns(batch)

    def validate(self, rec: Any, manifest: Any, where: str) -> None:
        s = rec.num_scored
        rec.topk_ids = np.ascontiguousarray(rec.topk_ids, dtype=np.int32).reshape(s, 1)
        rec.topk_logprobs = np.ascontiguousarray(rec.topk_logprobs, dtype=np.float32).reshape(s, 1)
        rec.token_logprob = np.ascontiguousarray(rec.token_logprob, dtype=np.float32).reshape(s)
        rec.tail_logprob = np.ascontiguousarray(rec.tail_logprob, dtype=np.float32).reshape(s)
        if not (np.all(rec.topk_logprobs <= 0) and np.all(rec.tail_logprob <= 0)):
            raise StoreError(f"{where}: top-1 log-probs must be ≤ 0")

    def capture_chunk(self, logits: Any, token_ids: Any) -> dict[str, Any]:
        import torch

        logp = torch.log_softmax(logits, dim=-1)
        top_lp, top_id = logp.max(dim=-1)
        rest = logits.scatter(-1, top_id[:, None], float("-inf"))
        return {"top1_id": top_id.to(torch.int32), "top1_logprob": top_lp,
                "token_logprob": logp.gather(-1, token_ids[:, None]).squeeze(-1),
                "tail_logprob": torch.logsumexp(rest, dim=-1) - torch.logsumexp(logits, dim=-1)}

    def record_targets(self, captured: Any, draws: np.ndarray | None) -> dict[str, Any]:
        return {"topk_ids": captured.top1_id[:, None], "topk_logprobs": captured.top1_logprob[:, None],
                "token_logprob": captured.token_logprob, "tail_logprob": captured.tail_logprob}


@pytest.fixture(scope="module")
def top1_store(tmp_path_factory, tiny_teacher_dir) -> dict:
    register_kind(Top1())
    root = tmp_path_factory.mktemp("top1")
    rows = [{"id": it["id"], "prompt": it["prompt"], "completion": it["completion"]} for it in arithmetic_items(40, seed=5)]
    prompts = write_jsonl(str(root / "p.jsonl"), rows)
    url = str(root / "top1.store")
    # The Python API: `potstill generate --targets` offers the kinds its settings list.
    config = GenerateConfig(teacher=tiny_teacher_dir, prompts=prompts, store=url, device="cpu", progress=False,
                            targets="top1", top_k=1)
    config.validate()
    generate(config)
    yield {"root": root, "url": url}
    unregister_kind("top1")


def test_the_toy_kind_is_found_by_name_and_its_columns_hold_the_teachers_top_token(top1_store, tiny_teacher_dir) -> None:
    from transformers import AutoModelForCausalLM

    store = open_store(top1_store["url"])
    assert store.manifest.targets.kind == "top1" and store.manifest.targets.target_kind is kind_named("top1")
    shard = store.shard(store.shard_names[0])
    assert set(COLUMNS) <= set(shard.views.batch.schema.names) and "topk_ids" not in shard.views.batch.schema.names
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    for j in range(3):
        rec = shard.record(j)
        s = rec.score_start
        logp = reference_logprobs(model, rec.input_ids)[s - 1 :]
        assert rec.topk_ids.shape == (rec.num_scored, 1)
        np.testing.assert_array_equal(rec.topk_ids[:, 0], logp.argmax(-1))
        np.testing.assert_allclose(rec.topk_logprobs[:, 0], logp.max(-1), atol=1e-5)
        np.testing.assert_allclose(rec.token_logprob, logp[np.arange(len(logp)), rec.input_ids[s:]], atol=1e-5)
        tail = reference_log_tail(model, rec.input_ids, rec.topk_ids, s)  # float64, summed directly
        np.testing.assert_allclose(rec.tail_logprob, tail, atol=1e-5)


def test_verify_reads_the_toy_columns(top1_store, tmp_path, monkeypatch) -> None:
    assert verify_store(top1_store["url"]).ok
    url = str(tmp_path / "copy.store")
    shutil.copytree(top1_store["url"], url)
    store = open_store(url)
    rec = store.shard(store.shard_names[0]).record(0)
    rec.id, rec.topk_logprobs = "bad-top1", np.full_like(rec.topk_logprobs, 0.5)  # no distribution has it
    with pytest.raises(StoreError, match="record 'bad-top1': top-1 log-probs must be ≤ 0"), store.writer("w-bad") as w:
        w.write(rec)
    monkeypatch.setattr(Top1, "validate", lambda self, rec, manifest, where: None)  # a writer that checks nothing
    with store.writer("w-bad") as w:
        w.write(rec)
    problems = [str(p) for p in verify_store(url).problems]
    assert len(problems) == 1 and "record 'bad-top1': top-1 targets are not a distribution" in problems[0], problems
    # `potstill store verify`, in this process (where the kind is registered): the same verdict
    cli = CliRunner()
    assert cli.invoke(app, ["store", "verify", top1_store["url"]]).exit_code == 0
    result = cli.invoke(app, ["store", "verify", url])
    assert result.exit_code == 1 and "top-1 targets are not a distribution" in result.output


def test_a_student_trains_and_evaluates_on_the_toy_targets(top1_store, tiny_tokenizer_dir) -> None:
    url = top1_store["url"]
    student = build_student(str(top1_store["root"] / "student"), tiny_tokenizer_dir, hidden=16)
    before = evaluate(url, student, eval_fraction=0.2, answers=False)
    assert before["kd_target"] == "topk" and before["kd_loss"] > 0
    config = TrainConfig(store=url, student=student, out=str(top1_store["root"] / "run"), lr=1e-2, batch_size=4,
                         max_steps=20, logging_steps=1, report_to="none", eval_fraction=0.2, num_workers=0,
                         eval_max_records=8, save_steps=100, eval_max_new_tokens=4).validate()
    report = train(config)
    assert report["targets"] == "topk" and report["global_step"] == 20  # "auto": what the kind offers
    assert report["final_eval"]["kd_loss"] < 0.8 * before["kd_loss"]


def test_the_registry_refuses_in_one_line(top1_store) -> None:
    class Other(Top1):
        pass

    with pytest.raises(StoreError, match="target kind 'top1' is already registered"):
        register_kind(Other())  # another kind of the same name: a store could not tell them apart
    register_kind(Top1())  # the same kind again: a module imported twice
    with pytest.raises(StoreError, match=r"targets.codec packed cannot store top1 targets \(they take: none\)"):
        TargetSpec(kind="top1", k=1, codec="packed", id_bits=9, logprob_bits=12, logprob_min=-24.0)
    with pytest.raises(StoreError, match="targets.k must be 1 for top1 targets, got 2"):
        TargetSpec(kind="top1", k=2)
    with pytest.raises(StoreError, match="unknown target kind 'top2'; expected one of"):
        TargetSpec(kind="top2")
    assert TargetSpec(kind="top1", k=1).to_dict()["tail_logprob"] == "direct"  # it holds a log tail
