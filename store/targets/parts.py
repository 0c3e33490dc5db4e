"""The built-in kinds' parts (docs/reference/store-format.md §4): the log-prob of the token that follows,
the top-k ids and log-probs with the log tail (§4.1, §4.4), the sampled draws (§4.2). `PartsKind`
is a kind made of them: the manifest's codec lays them out in columns (store/targets/codecs.py),
the standard capture makes them (teacher_gen/capture.py), and the checks here refuse a record
whose parts no teacher writes."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from potstill.store.codec import SampledTargets, check_sampled, sampled_from_draws
from potstill.store.columns import (
    input_vocab,
    surely_sound_topk,
    target_vocab,
    unsound_log_tail,
    unsound_logprobs,
    unsound_topk,
)
from potstill.store.errors import StoreError
from potstill.store.targets.base import (
    CaptureNeeds,
    ColumnViews,
    Record,
    StoreManifest,
    TargetColumns,
    TargetKind,
    TargetSpec,
)


class PartsKind(TargetKind):
    """A kind made of the built-in parts: `holds_topk` and / or `holds_sampled` say which."""

    def check_spec(self, spec: TargetSpec) -> None:
        if self.holds_topk and (not isinstance(spec.k, int) or spec.k < 1):
            raise StoreError(f"targets.k must be a positive integer, got {spec.k!r}")
        if not self.holds_topk and spec.k != 0:
            raise StoreError(f"targets.k must be 0 when targets.kind is {self.name!r}, got {spec.k!r}")
        if self.holds_sampled and (not isinstance(spec.samples, int) or not 1 <= spec.samples <= 65535):
            raise StoreError(f"targets.samples must be an integer in [1, 65535], got {spec.samples!r}")

    def manifest_keys(self, spec: TargetSpec) -> dict[str, Any]:
        if not self.holds_sampled:
            return {}
        return {"samples": spec.samples, "seed": spec.seed, "sampling": spec.sampling, "sampler": spec.sampler}

    def arrow_fields(self, spec: TargetSpec) -> list[pa.Field]:
        return spec.codec_impl.fields(spec, self)

    def encode(self, records: list[Record], spec: TargetSpec) -> dict[str, pa.Array]:
        return spec.codec_impl.encode(records, spec, self)

    def open(self, batch: pa.RecordBatch, spec: TargetSpec, views: ColumnViews) -> TargetColumns:
        return spec.codec_impl.open(batch, spec, self, views)

    def validate(self, rec: Record, manifest: StoreManifest, where: str) -> None:
        validate_parts(rec, manifest, self, where)

    def capture_needs(self, top_k: int, samples: int) -> CaptureNeeds:
        return CaptureNeeds(top_k=top_k if self.holds_topk else 0, samples=samples if self.holds_sampled else 0,
                            draw_from_rest=self.draws_from_rest)

    def record_targets(self, captured: Any, draws: np.ndarray | None) -> dict[str, Any]:
        out: dict[str, Any] = {"token_logprob": captured.token_logprob}
        if self.holds_topk:
            out.update(topk_ids=captured.ids, topk_logprobs=captured.logprobs, tail_logprob=captured.tail_logprob)
        if self.holds_sampled:
            out["sampled"] = sampled_from_draws(draws)
        return out


def np_logprob_dtype(t: TargetSpec) -> np.dtype:
    """Top-k log-probs as a writer keeps them: the stored dtype, or float32 until a packed store quantises them."""
    return np.dtype(np.float16 if t.logprob_dtype == "float16" and not t.packed else np.float32)


def validate_parts(rec: Record, manifest: StoreManifest, kind: TargetKind, where: str) -> None:
    """`TargetKind.validate` of the built-in kinds: the token's log-prob, then the parts the kind
    holds (top-k with the log tail, sampled draws), checked and put in the stored dtypes."""
    spec = manifest.targets
    s, k = rec.num_scored, spec.k
    if rec.token_logprob is None:
        raise StoreError(f"{where}: token_logprob is missing")
    token_lp = np.ascontiguousarray(rec.token_logprob, dtype=np.float32)
    checks = [("token_logprob", token_lp, (s,))]
    if kind.holds_topk:
        if rec.topk_ids is None or rec.topk_logprobs is None or rec.tail_logprob is None:
            raise StoreError(f"{where}: the store holds top-k targets but the record has none")
        topk_ids = np.ascontiguousarray(rec.topk_ids, dtype=np.int32)
        topk_lp = np.ascontiguousarray(rec.topk_logprobs, dtype=np_logprob_dtype(spec))
        tail = np.ascontiguousarray(rec.tail_logprob, dtype=np.float32)
        checks += [("topk_ids", topk_ids, (s, k)), ("topk_logprobs", topk_lp, (s, k)), ("tail_logprob", tail, (s,))]
        if spec.packed and topk_ids.size and int(topk_ids.max()) >= target_vocab(manifest):
            raise StoreError(f"{where}: top-k id {int(topk_ids.max())} does not fit in {spec.id_bits} bits")
        rec.topk_ids, rec.topk_logprobs, rec.tail_logprob = topk_ids, topk_lp, tail
    elif rec.topk_ids is not None:
        raise StoreError(f"{where}: has top-k targets but the store holds only {spec.kind} targets")
    for name, arr, shape in checks:
        if arr.shape != shape:
            raise StoreError(f"{where}: {name} has shape {arr.shape}, expected {shape} ({s} scored tokens, K={k})")
    # Values no teacher writes: refused before anything is encoded (a packed store would turn a NaN
    # log-prob into an empty slot), so a store never holds them.
    unsound = unsound_logprobs(token_lp)
    if kind.holds_topk:
        unsound = unsound | unsound_log_tail(rec.tail_logprob)
        if not surely_sound_topk(rec.topk_ids, rec.topk_logprobs, input_vocab(manifest)):
            unsound = unsound | unsound_topk(rec.topk_ids, rec.topk_logprobs, input_vocab(manifest))
    if unsound.any():
        raise StoreError(f"{where}: the targets of scored position {int(np.flatnonzero(unsound)[0])} are not a "
                         "distribution (NaN or infinite log-probs, ids outside the vocabulary, or a log tail above 0)")
    if kind.holds_sampled:
        if rec.sampled is None:
            raise StoreError(f"{where}: the store holds sampled targets but the record has none")
        t = rec.sampled
        t = SampledTargets(np.asarray(t.offsets, dtype=np.int64), np.ascontiguousarray(t.ids, dtype=np.int32),
                           np.ascontiguousarray(t.counts, dtype=np.uint16))
        check_sampled(t, s, spec.samples, target_vocab(manifest), where)
        rec.sampled = t
    elif rec.sampled is not None:
        raise StoreError(f"{where}: has sampled targets but the store holds only {spec.kind} targets")
    rec.token_logprob = token_lp
