"""Per-record data (docs/reference/store-format.md §4): the `Record` type, the Arrow schema, and the
conversion between a batch of records and one Arrow record batch. The columns every store has are
here; the target columns, their checks and their reading are the store's kind's (store/targets)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from potstill.store.codec import SampledTargets
from potstill.store.columns import concat, flat, input_vocab, list_array, mass_of_log, numpy_view
from potstill.store.errors import StoreError
from potstill.store.manifest import StoreManifest, TargetSpec
from potstill.store.targets import TopKRows

TEXT_FIELDS = ("prompt", "completion", "generated", "rationale", "answer")


@dataclass
class Record:
    """One sequence and the teacher's targets for its scored tokens.

    `topk_*`, `token_logprob`, `tail_logprob` and `sampled` have one row per scored token: row j is
    the teacher's distribution over `input_ids[score_start + j]` given the tokens before it. The
    top-k fields are None in a store without top-k targets, `sampled` in one without sampled
    targets (the store's kind fills the fields it holds: `TargetKind.holds_topk`, `holds_sampled`). `tail_logprob` is the log of the teacher's mass outside the top-K (−inf when the top-K
    covers the vocabulary, format §4.4). `hidden` maps a stored layer index to its
    [len(input_ids) - hidden_start, width] states (float16, or bfloat16 bits as uint16); it is
    filled only when asked for.
    """

    id: str
    input_ids: np.ndarray
    score_start: int
    topk_ids: np.ndarray | None = None
    topk_logprobs: np.ndarray | None = None
    token_logprob: np.ndarray | None = None
    tail_logprob: np.ndarray | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    completion: str | None = None
    generated: str | None = None
    rationale: str | None = None
    answer: str | None = None
    meta: dict[str, Any] | None = None
    sample_index: int = 0
    hidden_start: int = 0
    hidden: dict[int, np.ndarray] = field(default_factory=dict)
    sampled: SampledTargets | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def tail_mass(self) -> np.ndarray | None:
        """The mass outside the top-K, exp(tail_logprob) in float32 (what the `tail_mass` column holds)."""
        return None if self.tail_logprob is None else mass_of_log(self.tail_logprob)

    @property
    def num_scored(self) -> int:
        return len(self.input_ids) - self.score_start

    @property
    def hidden_rows(self) -> int:
        return len(self.input_ids) - self.hidden_start


def arrow_schema(manifest: StoreManifest) -> pa.Schema:
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("prompt", pa.string()),
            pa.field("messages", pa.string()),
            pa.field("completion", pa.string()),
            pa.field("generated", pa.string()),
            pa.field("rationale", pa.string()),
            pa.field("answer", pa.string()),
            pa.field("meta", pa.string()),
            pa.field("sample_index", pa.int32(), nullable=False),
            pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
            pa.field("score_start", pa.int32(), nullable=False),
            pa.field("hidden_start", pa.int32(), nullable=False),
            pa.field("token_offset", pa.int64(), nullable=False),
            *manifest.targets.target_kind.arrow_fields(manifest.targets),
        ]
    )


def hidden_problem(data: bytes | memoryview | np.ndarray, dtype: str) -> str | None:
    """Non-finite values in a hidden-state chunk file's bytes (float16, or bfloat16 bits as uint16):
    an all-ones exponent is inf or NaN, i.e. the bits without the sign are at least the infinity's."""
    raw = np.frombuffer(data, dtype="<u2") if not isinstance(data, np.ndarray) else data.view("<u2")
    infinity = 0x7C00 if dtype == "float16" else 0x7F80
    if raw.size == 0 or int(np.bitwise_and(raw, 0x7FFF).max()) < infinity:
        return None
    return f"{int((np.bitwise_and(raw, 0x7FFF) >= infinity).sum())} non-finite value(s) (inf or NaN)"


def validate_record(rec: Record, manifest: StoreManifest) -> Record:
    """Check a record against the manifest and return it with arrays in the stored dtypes."""
    where = f"record {rec.id!r}"
    if not isinstance(rec.id, str) or not rec.id:
        raise StoreError(f"record id must be a non-empty string, got {rec.id!r}")
    ids = np.ascontiguousarray(rec.input_ids, dtype=np.int32)
    if ids.ndim != 1:
        raise StoreError(f"{where}: input_ids must be 1-D, got shape {ids.shape}")
    rec.input_ids = ids
    n = len(ids)
    if not 1 <= rec.score_start <= n:
        raise StoreError(f"{where}: score_start {rec.score_start} outside [1, {n}]")
    if not 0 <= rec.hidden_start <= n:
        raise StoreError(f"{where}: hidden_start {rec.hidden_start} outside [0, {n}]")
    vocab = input_vocab(manifest)
    if n and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise StoreError(f"{where}: input_ids hold ids outside [0, {vocab})")
    manifest.targets.target_kind.validate(rec, manifest, where)
    hidden = {}
    wanted = {layer.index: layer for layer in manifest.hidden.layers}
    if set(rec.hidden) != set(wanted):
        raise StoreError(f"{where}: hidden layers {sorted(rec.hidden)} but the store holds {sorted(wanted)}")
    for index, layer in wanted.items():
        arr = np.asarray(rec.hidden[index])
        rows = n - rec.hidden_start
        if arr.shape != (rows, layer.width):
            raise StoreError(f"{where}: hidden layer {index} has shape {arr.shape}, expected {(rows, layer.width)}")
        want = np.float16 if layer.dtype == "float16" else np.uint16
        if arr.dtype != want:
            raise StoreError(
                f"{where}: hidden layer {index} has dtype {arr.dtype}, expected {np.dtype(want)}"
                + (" (bfloat16 bits)" if layer.dtype == "bfloat16" else "")
            )
        problem = hidden_problem(np.ascontiguousarray(arr), layer.dtype)
        if problem is not None:
            raise StoreError(f"{where}: hidden layer {index} holds {problem}")
        hidden[index] = np.ascontiguousarray(arr)
    rec.hidden = hidden
    return rec


def target_nbytes(rec: Record, manifest: StoreManifest) -> int:
    """Approximate bytes a validated record's targets take (for closing shards by size)."""
    return manifest.targets.target_kind.nbytes(rec)


def records_to_batch(records: list[Record], offsets: list[int], manifest: StoreManifest) -> pa.RecordBatch:
    """Build one Arrow record batch from validated records; `offsets` are their token_offsets."""
    schema = arrow_schema(manifest)
    n_tok = [len(r.input_ids) for r in records]
    columns = {
        "id": pa.array([r.id for r in records], pa.string()),
        "messages": pa.array(
            [None if r.messages is None else json.dumps(r.messages, ensure_ascii=False) for r in records], pa.string()
        ),
        "meta": pa.array([None if r.meta is None else json.dumps(r.meta, ensure_ascii=False) for r in records], pa.string()),
        "sample_index": pa.array([r.sample_index for r in records], pa.int32()),
        "input_ids": list_array(concat([r.input_ids for r in records], np.dtype(np.int32)), n_tok),
        "score_start": pa.array([r.score_start for r in records], pa.int32()),
        "hidden_start": pa.array([r.hidden_start for r in records], pa.int32()),
        "token_offset": pa.array(offsets, pa.int64()),
        **manifest.targets.target_kind.encode(records, manifest.targets),
    }
    for name in TEXT_FIELDS:
        columns[name] = pa.array([getattr(r, name) for r in records], pa.string())
    return pa.record_batch([columns[f.name].cast(f.type) for f in schema], schema=schema)


class ColumnViews:
    """Zero-copy numpy views of one record batch's columns, for fast per-record slicing.

    Built once per shard: record j's tokens are then plain slices of flat arrays, with no per-row
    Arrow or Python object overhead on the loader's hot path. The target columns are opened by the
    store's kind (`columns`, a `store.targets.TargetColumns`): plain slices, or a packed store's
    streams decoded per record on the fly.
    """

    def __init__(self, batch: pa.RecordBatch, targets: TargetSpec | int) -> None:
        spec = targets if isinstance(targets, TargetSpec) else TargetSpec(k=targets)
        self.batch = batch
        self.spec = spec
        self.kind = spec.target_kind
        self.k = spec.k
        self.num_rows = batch.num_rows

        self.tok_off, self.input_ids = flat(batch, "input_ids")
        self.score_start = numpy_view(batch.column("score_start"))
        self.hidden_start = numpy_view(batch.column("hidden_start"))
        self.token_offset = numpy_view(batch.column("token_offset"))
        self.sample_index = numpy_view(batch.column("sample_index"))
        self.columns = self.kind.open(batch, spec, self)
        self.tgt_off = self.columns.tgt_off
        # The offsets again as Python ints: slicing with them costs half of slicing with numpy
        # scalars, which is most of the per-record overhead of a loader (bench/store_io.py).
        self._tok_bounds: list[int] = self.tok_off.tolist()
        self._tgt_bounds: list[int] = self.tgt_off.tolist()

    def input_ids_of(self, j: int) -> np.ndarray:
        return self.input_ids[self._tok_bounds[j] : self._tok_bounds[j + 1]]

    def num_scored_of(self, j: int) -> int:
        return self._tgt_bounds[j + 1] - self._tgt_bounds[j]

    def token_logprob_of(self, j: int) -> np.ndarray:
        return self.columns.token_logprob(j)

    def targets_of(self, j: int) -> TopKRows:
        """Record j's top-k targets: ids [S, K], log-probs [S, K], token_logprob [S], tail_logprob [S]."""
        return self.columns.topk(j)

    def sampled_of(self, j: int) -> SampledTargets:
        """Record j's sampled targets (ids with counts per scored position)."""
        return self.columns.sampled(j)

    def text_of(self, name: str, j: int) -> str | None:
        return self.batch.column(name)[j].as_py()

    def record(self, j: int) -> Record:
        messages = self.text_of("messages", j)
        meta = self.text_of("meta", j)
        return Record(
            id=self.text_of("id", j),  # type: ignore[arg-type]
            input_ids=self.input_ids_of(j),
            score_start=int(self.score_start[j]),
            prompt=self.text_of("prompt", j),
            messages=None if messages is None else json.loads(messages),
            completion=self.text_of("completion", j),
            generated=self.text_of("generated", j),
            rationale=self.text_of("rationale", j),
            answer=self.text_of("answer", j),
            meta=None if meta is None else json.loads(meta),
            sample_index=int(self.sample_index[j]),
            hidden_start=int(self.hidden_start[j]),
            **self.columns.record_fields(j),
        )
