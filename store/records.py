"""Per-record data (docs/store-format.md §4): the `Record` type, the Arrow schema, and the
conversion between a batch of records and one Arrow record batch."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from store.errors import StoreError
from store.manifest import StoreManifest

TEXT_FIELDS = ("prompt", "completion", "generated", "rationale", "answer")
TARGET_COLUMNS = ("topk_ids", "topk_logprobs", "token_logprob", "tail_mass")


@dataclass
class Record:
    """One sequence and the teacher's targets for its scored tokens.

    `topk_*`, `token_logprob` and `tail_mass` have one row per scored token: row j is the teacher's
    distribution over `input_ids[score_start + j]` given the tokens before it. `hidden` maps a
    stored layer index to its [len(input_ids) - hidden_start, width] states (float16, or bfloat16
    bits as uint16); it is filled only when asked for.
    """

    id: str
    input_ids: np.ndarray
    score_start: int
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    token_logprob: np.ndarray
    tail_mass: np.ndarray
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

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_scored(self) -> int:
        return len(self.input_ids) - self.score_start

    @property
    def hidden_rows(self) -> int:
        return len(self.input_ids) - self.hidden_start


def arrow_schema(manifest: StoreManifest) -> pa.Schema:
    k = manifest.targets.k
    lp = pa.float16() if manifest.targets.logprob_dtype == "float16" else pa.float32()
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
            pa.field("topk_ids", pa.list_(pa.list_(pa.int32(), k)), nullable=False),
            pa.field("topk_logprobs", pa.list_(pa.list_(lp, k)), nullable=False),
            pa.field("token_logprob", pa.list_(pa.float32()), nullable=False),
            pa.field("tail_mass", pa.list_(pa.float32()), nullable=False),
        ]
    )


def np_logprob_dtype(manifest: StoreManifest) -> np.dtype:
    return np.dtype(np.float16 if manifest.targets.logprob_dtype == "float16" else np.float32)


def validate_record(rec: Record, manifest: StoreManifest) -> Record:
    """Check a record against the manifest and return it with arrays in the stored dtypes."""
    where = f"record {rec.id!r}"
    if not isinstance(rec.id, str) or not rec.id:
        raise StoreError(f"record id must be a non-empty string, got {rec.id!r}")
    ids = np.ascontiguousarray(rec.input_ids, dtype=np.int32)
    if ids.ndim != 1:
        raise StoreError(f"{where}: input_ids must be 1-D, got shape {ids.shape}")
    n = len(ids)
    if not 1 <= rec.score_start <= n:
        raise StoreError(f"{where}: score_start {rec.score_start} outside [1, {n}]")
    if not 0 <= rec.hidden_start <= n:
        raise StoreError(f"{where}: hidden_start {rec.hidden_start} outside [0, {n}]")
    s, k = n - rec.score_start, manifest.targets.k
    topk_ids = np.ascontiguousarray(rec.topk_ids, dtype=np.int32)
    topk_lp = np.ascontiguousarray(rec.topk_logprobs, dtype=np_logprob_dtype(manifest))
    token_lp = np.ascontiguousarray(rec.token_logprob, dtype=np.float32)
    tail = np.ascontiguousarray(rec.tail_mass, dtype=np.float32)
    for name, arr, shape in (
        ("topk_ids", topk_ids, (s, k)),
        ("topk_logprobs", topk_lp, (s, k)),
        ("token_logprob", token_lp, (s,)),
        ("tail_mass", tail, (s,)),
    ):
        if arr.shape != shape:
            raise StoreError(f"{where}: {name} has shape {arr.shape}, expected {shape} ({s} scored tokens, K={k})")
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
        hidden[index] = np.ascontiguousarray(arr)
    rec.input_ids, rec.topk_ids, rec.topk_logprobs = ids, topk_ids, topk_lp
    rec.token_logprob, rec.tail_mass, rec.hidden = token_lp, tail, hidden
    return rec


def _list_array(values: np.ndarray, lengths: list[int], inner: int | None = None) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = pa.array(values.reshape(-1))
    if inner is not None:
        flat = pa.FixedSizeListArray.from_arrays(flat, inner)
    return pa.ListArray.from_arrays(pa.array(offsets), flat)


def _concat(arrays: list[np.ndarray], dtype: np.dtype, tail_shape: tuple[int, ...] = ()) -> np.ndarray:
    if not arrays:
        return np.zeros((0, *tail_shape), dtype=dtype)
    return np.concatenate(arrays)


def records_to_batch(records: list[Record], offsets: list[int], manifest: StoreManifest) -> pa.RecordBatch:
    """Build one Arrow record batch from validated records; `offsets` are their token_offsets."""
    schema = arrow_schema(manifest)
    k = manifest.targets.k
    lp_dtype = np_logprob_dtype(manifest)
    n_tok = [len(r.input_ids) for r in records]
    n_scored = [r.num_scored for r in records]
    columns = {
        "id": pa.array([r.id for r in records], pa.string()),
        "messages": pa.array(
            [None if r.messages is None else json.dumps(r.messages, ensure_ascii=False) for r in records], pa.string()
        ),
        "meta": pa.array([None if r.meta is None else json.dumps(r.meta, ensure_ascii=False) for r in records], pa.string()),
        "sample_index": pa.array([r.sample_index for r in records], pa.int32()),
        "input_ids": _list_array(_concat([r.input_ids for r in records], np.int32), n_tok),
        "score_start": pa.array([r.score_start for r in records], pa.int32()),
        "hidden_start": pa.array([r.hidden_start for r in records], pa.int32()),
        "token_offset": pa.array(offsets, pa.int64()),
        "topk_ids": _list_array(_concat([r.topk_ids for r in records], np.int32, (k,)), n_scored, k),
        "topk_logprobs": _list_array(_concat([r.topk_logprobs for r in records], lp_dtype, (k,)), n_scored, k),
        "token_logprob": _list_array(_concat([r.token_logprob for r in records], np.float32), n_scored),
        "tail_mass": _list_array(_concat([r.tail_mass for r in records], np.float32), n_scored),
    }
    for name in TEXT_FIELDS:
        columns[name] = pa.array([getattr(r, name) for r in records], pa.string())
    return pa.record_batch([columns[f.name].cast(f.type) for f in schema], schema=schema)


class ColumnViews:
    """Zero-copy numpy views of one record batch's columns, for fast per-record slicing.

    Built once per shard: record j's targets are then plain slices of flat arrays, with no
    per-row Arrow or Python object overhead on the loader's hot path.
    """

    def __init__(self, batch: pa.RecordBatch, k: int) -> None:
        self.batch = batch
        self.k = k
        self.num_rows = batch.num_rows

        def flat(name: str, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
            col = batch.column(name)
            if col.offset != 0 or col.null_count:
                raise StoreError(f"column {name} is sliced or has nulls")
            offsets = col.offsets.to_numpy(zero_copy_only=True)
            values = col.values
            if width is not None:
                values = values.values
            arr = values.to_numpy(zero_copy_only=True)
            if width is not None:
                arr = arr.reshape(-1, width)
            return offsets, arr

        self.tok_off, self.input_ids = flat("input_ids")
        self.tgt_off, self.topk_ids = flat("topk_ids", k)
        _, self.topk_logprobs = flat("topk_logprobs", k)
        _, self.token_logprob = flat("token_logprob")
        _, self.tail_mass = flat("tail_mass")
        self.score_start = batch.column("score_start").to_numpy(zero_copy_only=True)
        self.hidden_start = batch.column("hidden_start").to_numpy(zero_copy_only=True)
        self.token_offset = batch.column("token_offset").to_numpy(zero_copy_only=True)
        self.sample_index = batch.column("sample_index").to_numpy(zero_copy_only=True)
        # The offsets again as Python ints: slicing with them costs half of slicing with numpy
        # scalars, which is most of the per-record overhead of a loader (bench/store_io.py).
        self._tok_bounds: list[int] = self.tok_off.tolist()
        self._tgt_bounds: list[int] = self.tgt_off.tolist()

    def input_ids_of(self, j: int) -> np.ndarray:
        return self.input_ids[self._tok_bounds[j] : self._tok_bounds[j + 1]]

    def targets_of(self, j: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        a, b = self._tgt_bounds[j], self._tgt_bounds[j + 1]
        return self.topk_ids[a:b], self.topk_logprobs[a:b], self.token_logprob[a:b], self.tail_mass[a:b]

    def text_of(self, name: str, j: int) -> str | None:
        return self.batch.column(name)[j].as_py()

    def record(self, j: int) -> Record:
        topk_ids, topk_lp, token_lp, tail = self.targets_of(j)
        messages = self.text_of("messages", j)
        meta = self.text_of("meta", j)
        return Record(
            id=self.text_of("id", j),
            input_ids=self.input_ids_of(j),
            score_start=int(self.score_start[j]),
            topk_ids=topk_ids,
            topk_logprobs=topk_lp,
            token_logprob=token_lp,
            tail_mass=tail,
            prompt=self.text_of("prompt", j),
            messages=None if messages is None else json.loads(messages),
            completion=self.text_of("completion", j),
            generated=self.text_of("generated", j),
            rationale=self.text_of("rationale", j),
            answer=self.text_of("answer", j),
            meta=None if meta is None else json.loads(meta),
            sample_index=int(self.sample_index[j]),
            hidden_start=int(self.hidden_start[j]),
        )
