"""Builders for stores with random but fully specified content (no model needed)."""

from __future__ import annotations

import copy

import numpy as np

from potstill.store import (
    HiddenLayer,
    HiddenSpec,
    Record,
    StoreManifest,
    TargetSpec,
    TeacherInfo,
    TokenizerInfo,
    create_store,
)
from potstill.store.codec import bits_for, sampled_from_draws

TOKENIZER_FILES = {"tokenizer.json": b'{"version": "1.0", "model": {"type": "WordLevel"}}', "tokenizer_config.json": b"{}"}


def make_manifest(
    k: int = 8,
    layers: tuple[tuple[int, int, str], ...] = ((2, 16, "bfloat16"),),
    logprob_dtype: str = "float16",
    vocab: int = 100,
    chunk_tokens: int = 32,
    tail_logprob: str | None = "direct",
) -> StoreManifest:
    """A manifest for random test records; `tail_logprob=None` makes a format 1.0 store (no log tail)."""
    return StoreManifest(
        teacher=TeacherInfo(name_or_path="test-teacher", config_hash="sha256:abc", dtype="float32", vocab_size=vocab),
        tokenizer=TokenizerInfo(fingerprint="sha256:tok", vocab_size=vocab, special_tokens={"eos_token_id": 1}),
        targets=TargetSpec(k=k, logprob_dtype=logprob_dtype, tail_logprob=tail_logprob),
        hidden=HiddenSpec(layers=[HiddenLayer(i, w, d) for i, w, d in layers], chunk_tokens=chunk_tokens),
        rationales=True,
        generation={"mode": "test"},
    )


def random_record(rng: np.random.Generator, rid: str, manifest: StoreManifest, n: int | None = None) -> Record:
    n = int(rng.integers(2, 40)) if n is None else n
    s = int(rng.integers(1, n + 1))
    h = int(rng.integers(0, n + 1))
    k = manifest.targets.k
    vocab = manifest.tokenizer.vocab_size
    logits = rng.normal(size=(n - s, vocab)).astype(np.float32)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    top = np.argsort(-logp, axis=-1)[:, :k].astype(np.int32)
    top_lp = np.take_along_axis(logp, top, -1)
    rest = logp.astype(np.float64)
    np.put_along_axis(rest, top, -np.inf, axis=-1)
    with np.errstate(divide="ignore"):
        tail = np.log(np.exp(rest).sum(-1)).astype(np.float32)  # the log tail, formed directly
    ids = rng.integers(0, vocab, size=n).astype(np.int32)
    hidden = {}
    for layer in manifest.hidden.layers:
        x = rng.normal(size=(n - h, layer.width)).astype(np.float32)
        if layer.dtype == "float16":
            hidden[layer.index] = x.astype(np.float16)
        else:
            hidden[layer.index] = (x.view(np.uint32) >> 16).astype(np.uint16)
    return Record(
        id=rid,
        input_ids=ids,
        score_start=s,
        topk_ids=top,
        topk_logprobs=top_lp.astype(np.float16 if manifest.targets.logprob_dtype == "float16" else np.float32),
        token_logprob=logp[np.arange(n - s), ids[s:]] if n > s else np.zeros(0, np.float32),
        tail_logprob=np.minimum(tail, 0.0),
        prompt=f"prompt {rid} — ünïcode",
        messages=[{"role": "user", "content": f"hi {rid}"}] if rng.random() < 0.5 else None,
        completion=None if rng.random() < 0.3 else f"completion {rid}",
        generated="gen",
        rationale="because",
        answer=str(rng.integers(100)),
        meta={"source": "unit", "n": n},
        sample_index=int(rng.integers(0, 3)),
        hidden_start=h,
        hidden=hidden,
    )


KIND_VOCAB = 300
KIND_SAMPLES = 40


def kind_spec(kind: str, codec: str, tail_logprob: str | None) -> TargetSpec:
    packed = codec == "packed"
    return TargetSpec(
        kind=kind, k=8 if kind != "sampled" else 0, samples=KIND_SAMPLES if kind != "topk" else 0, seed=7,
        sampling="test draws" if kind != "topk" else None, codec=codec, tail_logprob=tail_logprob if kind != "sampled" else None,
        id_bits=bits_for(KIND_VOCAB - 1) if packed else None, count_bits=bits_for(KIND_SAMPLES) if packed and kind != "topk" else None,
        logprob_bits=12 if packed else None, logprob_min=-24.0 if packed else None,
    )


def build_store(path: str, kind: str = "topk", codec: str = "none", *, tail_logprob: str | None = "direct",
                layers: tuple = ((2, 16, "bfloat16"), (4, 24, "float16")), records: int = 14,
                meta_answer: bool = True) -> str:
    """A store of any target kind and codec (`tail_logprob=None`: format 1.0 / 2.0) with rationale
    records: `answer` i (none when i % 7 == 3) and, with `meta_answer`, a reference answer in
    `meta["answer"]` ("work #### i", or "wrong" when i % 4 == 0)."""
    base = make_manifest(k=8, layers=layers, vocab=KIND_VOCAB, tail_logprob=tail_logprob)
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
