"""Builders for stores with random but fully specified content (no model needed)."""

from __future__ import annotations

import copy

import numpy as np
from common import TOKENIZER_FILES, make_manifest, random_record

from potstill.store import (
    TargetSpec,
    create_store,
    open_store,
)
from potstill.store.codec import bits_for, sampled_from_draws

KIND_VOCAB = 300
KIND_SAMPLES = 40


def kind_spec(kind: str, codec: str, tail_logprob: str | None) -> TargetSpec:
    packed = codec in ("packed", "compact")  # compact codes top-K ids and log-probs as packed does
    return TargetSpec(
        kind=kind, k=8 if kind != "sampled" else 0, samples=KIND_SAMPLES if kind != "topk" else 0, seed=7,
        sampling="test draws" if kind != "topk" else None, codec=codec, tail_logprob=tail_logprob if kind != "sampled" else None,
        id_bits=bits_for(KIND_VOCAB - 1) if packed else None, count_bits=bits_for(KIND_SAMPLES) if packed and kind != "topk" else None,
        logprob_bits=12 if packed else None, logprob_min=-24.0 if packed else None,
    )


def build_store(path: str, kind: str = "topk", codec: str = "none", *, tail_logprob: str | None = "direct",
                layers: tuple = ((2, 16, "bfloat16"), (4, 24, "float16")), records: int = 14,
                meta_answer: bool = True) -> str:
    """A store of any target kind and codec (tails made as `tail_logprob` says) with rationale
    records: `answer` i (none when i % 7 == 3) and, with `meta_answer`, a reference answer in
    `meta["answer"]` ("work #### i", or "wrong" when i % 4 == 0)."""
    base = make_manifest(k=8, layers=layers, vocab=KIND_VOCAB)  # its teacher and tokenizer
    manifest = type(base)(teacher=base.teacher, tokenizer=base.tokenizer, targets=kind_spec(kind, codec, tail_logprob),
                          hidden=base.hidden, rationales=True, generation={"mode": "test"})
    store = create_store(path, manifest, TOKENIZER_FILES)
    rng = np.random.default_rng(3)
    with store.writer("w0", shard_records=5) as w:
        for i in range(records):
            rec = random_record(rng, f"r{i:03d}", manifest)
            if not manifest.targets.has_topk:
                rec.topk_ids = rec.topk_logprobs = rec.tail_logprob = None
            if manifest.targets.has_sampled:
                rec.sampled = sampled_from_draws(rng.integers(0, KIND_VOCAB, size=(rec.num_scored, KIND_SAMPLES)) // rng.integers(1, 30))
            rec.rationale = f"step one for {i}.\nstep two <b>&</b>."
            rec.answer = None if i % 7 == 3 else str(i)
            # the prompt file's reference answer, which generation keeps in meta
            rec.meta = {"answer": f"work #### {i}" if i % 4 else "wrong"} if meta_answer else {"source": "unit"}
            w.write(copy.deepcopy(rec))
    return path


def committed_ids(url: str) -> list[str]:
    """Every committed id of the store at `url`, in commit order (repeats included)."""
    return open_store(url).id_index().ids().to_pylist()
