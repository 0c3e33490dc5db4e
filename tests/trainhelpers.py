"""Test stores made by a real (tiny, random) teacher: full softmax over real token sequences, then
top-K, log tail, the actual token's log-prob and hidden states, written through the store API."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
from common import build_student

from potstill.store import (
    HiddenLayer,
    HiddenSpec,
    Record,
    Store,
    StoreManifest,
    TargetSpec,
    TeacherInfo,
    config_hash,
    create_store,
    tokenizer_fingerprint,
)


def arithmetic_items(count: int, seed: int = 0) -> list[dict]:
    """Prompt / rationale / answer triples in the words of the tiny tokenizer's corpus."""
    rng = random.Random(seed)
    items = []
    for i in range(count):
        a, b = rng.randrange(10, 50), rng.randrange(10, 50)
        rationale = f"let us think step by step . first add the ones , then the tens . {a} plus {b} is {a + b} ."
        items.append({
            "id": f"q{i:03d}",
            "prompt": f"what is {a} plus {b} ?",
            "rationale": rationale,
            "answer": str(a + b),
            "completion": f" {rationale} the answer is {a + b}",
        })
    return items


def teacher_records(teacher_dir: str, items: list[dict], k: int, layers: list[HiddenLayer]) -> list[Record]:
    """Score prompt + completion with the teacher's full softmax (float32) and keep what the store keeps."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    records = []
    for item in items:
        prompt = tok(item["prompt"])["input_ids"]
        completion = tok(item["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = np.array(prompt + completion, dtype=np.int32)
        s = len(prompt)
        with torch.no_grad():
            out = teacher(input_ids=torch.from_numpy(ids).long()[None], output_hidden_states=True)
        logp = torch.log_softmax(out.logits[0].float(), dim=-1)[s - 1 : len(ids) - 1]  # predicts ids[s:]
        top_lp, top_ids = logp.topk(k, dim=-1)
        outside = torch.ones_like(logp, dtype=torch.bool).scatter(-1, top_ids, False)
        tail = torch.logsumexp(logp.double().masked_fill(~outside, float("-inf")), -1)  # the log tail, directly
        hidden = {}
        for layer in layers:
            h = out.hidden_states[layer.index][0]
            hidden[layer.index] = (h.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16) if layer.dtype == "bfloat16"
                                   else h.to(torch.float16).numpy())
        records.append(Record(
            id=item["id"],
            input_ids=ids,
            score_start=s,
            topk_ids=top_ids.int().numpy(),
            topk_logprobs=top_lp.numpy().astype(np.float16),
            token_logprob=logp[torch.arange(len(ids) - s), torch.from_numpy(ids[s:]).long()].numpy(),
            tail_logprob=tail.float().numpy(),
            prompt=item["prompt"],
            generated=item["completion"],
            rationale=item.get("rationale"),
            answer=item.get("answer"),
            hidden=hidden,
        ))
    return records


def build_teacher_store(
    url: str,
    teacher_dir: str,
    items: list[dict],
    *,
    k: int = 8,
    layer_indices: tuple[int, ...] = (1, 2),
    shard_records: int = 16,
    generation: dict | None = None,
    tail_logprob: str | None = "direct",
) -> Store:
    """A store as `potstill generate` would write it, from the tiny teacher in `teacher_dir`."""
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(teacher_dir)
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    layers = [HiddenLayer(i, config.hidden_size, "bfloat16", post_norm=i == config.num_hidden_layers) for i in layer_indices]
    manifest = StoreManifest(
        teacher=TeacherInfo(
            name_or_path=teacher_dir,
            config_hash=config_hash(config.to_dict()),
            dtype="float32",
            architecture="LlamaForCausalLM",
            num_hidden_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            vocab_size=config.vocab_size,
        ),
        tokenizer=tokenizer_fingerprint(tok),
        targets=TargetSpec(k=k, logprob_dtype="float16", tail_logprob=tail_logprob),
        hidden=HiddenSpec(layers=layers, chunk_tokens=64),
        rationales=True,
        generation=generation or {"mode": "test"},
    )
    with tempfile.TemporaryDirectory() as tok_dir:
        tok.save_pretrained(tok_dir)
        store = create_store(url, manifest, tokenizer_files=tok_dir)
    with store.writer("t0", shard_records=shard_records) as writer:
        writer.write_many(teacher_records(teacher_dir, items, k, layers))
    store.refresh()
    return store


def copy_teacher(src: str, dst: str) -> str:
    """A private copy of the session teacher, so a test may delete it."""
    import shutil

    shutil.copytree(src, dst)
    return os.path.abspath(dst)


def teacherless_setup(root: Path, teacher_dir: str, tokenizer_dir: str, *, seed: int) -> dict:
    """A store of 48 records made from a private teacher copy, which is then deleted (from there on only
    the store knows the teacher), and a student to train from it."""
    teacher = copy_teacher(teacher_dir, str(root / "teacher"))
    store = str(root / "store")
    build_teacher_store(store, teacher, arithmetic_items(48, seed=seed), shard_records=20)
    shutil.rmtree(teacher)
    student = build_student(str(root / "student"), tokenizer_dir, hidden=16)
    return {"root": root, "store": store, "student": student, "tokenizer": tokenizer_dir}


def crash_at(step: int):
    """A Trainer callback that dies right after optimizer step `step`, like a killed job (before that
    step is logged or saved)."""
    from transformers import TrainerCallback

    class CrashAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise RuntimeError("simulated crash")

    return CrashAt()
