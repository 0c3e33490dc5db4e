"""Generate mode reports generated tokens as they come, within one batch, and its summary counts
generated tokens apart from the stored (prompt + completion) ones; tiny real model."""

from __future__ import annotations

import itertools

from common import prompt_rows, write_jsonl
from genhelpers import config

from potstill.store import open_store
from potstill.teacher_gen.jobs import GenRequest, derive_seed
from potstill.teacher_gen.runner import Run, generate, load_teacher, record_id


def test_the_hf_backend_counts_tokens_at_every_decoding_step_of_one_batch(tmp_path, tiny_teacher_dir):
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(12, seed=21, completion=False))
    cfg = config(tiny_teacher_dir, prompts, str(tmp_path / "s"), mode="generate", max_new_tokens=24,
                 sampling_temperature=1.0, batch_tokens=1 << 16)
    run = Run(cfg, None, None)
    tokenizer, spec, layers, max_length, encoded = run.prepare()
    teacher = load_teacher(cfg, spec, tokenizer, layers, max_length)
    requests = [GenRequest(record_id(enc.item.id, 0, 1), enc, 0, derive_seed(cfg.seed, enc.item.id, 0))
                for enc, _ in encoded]
    batches = list(teacher.generate_batches(requests))
    assert len(batches) == 1 and len(batches[0]) == 12  # every prompt in one generation batch
    counts: list[int] = []
    completions = teacher.generate(batches[0], on_tokens=counts.append)
    lengths = [len(c.ids) for c in completions]
    assert len(counts) == max(lengths) > 1  # one report per decoding step, long before the batch ends
    assert counts[0] == 12 and sum(counts) == sum(lengths)  # every real token once; padding after EOS not
    assert all(a >= b for a, b in itertools.pairwise(counts))  # rows only ever finish
    for step, count in enumerate(counts):
        assert count == sum(n > step for n in lengths)
    teacher.close()
    if run.claim is not None:
        run.claim.release()


def test_the_summary_reports_generated_tokens_apart_from_stored_ones(tmp_path, tiny_teacher_dir):
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(6, seed=22, completion=False))
    store = str(tmp_path / "s")
    seen = []
    summary = generate(config(tiny_teacher_dir, prompts, store, mode="generate", max_new_tokens=10, sampling_temperature=1.0),
                       on_progress=seen.append)
    records = list(open_store(store).iter_records())
    generated = sum(len(r.input_ids) - r.score_start for r in records)
    assert summary.generated_tokens == generated == seen[-1].generated_tokens
    assert summary.tokens == sum(len(r.input_ids) for r in records) > generated
    text = summary.format()
    assert f"generated {generated} tokens" in text and "generated tokens/s" in text
    assert "stored tokens/s (prompt + completion)" in text
    d = summary.to_dict()
    assert d["generated_tokens"] == generated and d["generated_tokens_per_second"] > 0
    scored = generate(config(tiny_teacher_dir, write_jsonl(str(tmp_path / "q.jsonl"), prompt_rows(3, seed=23)),
                             str(tmp_path / "score")))
    assert scored.generated_tokens == 0 and "generated" not in scored.format()  # score mode decodes nothing
