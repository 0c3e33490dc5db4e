"""Builders for stores with random but fully specified content (no model needed)."""

from __future__ import annotations

import numpy as np

from store import HiddenLayer, HiddenSpec, Record, StoreManifest, TargetSpec, TeacherInfo, TokenizerInfo

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
