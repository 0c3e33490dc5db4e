"""Per-record data (docs/store-format.md §4): the `Record` type, the Arrow schema, and the
conversion between a batch of records and one Arrow record batch."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from potstill.store.codec import (
    SampledTargets,
    check_sampled,
    decode_sampled,
    decode_sampled_compact,
    decode_sampled_compact2,
    decode_topk,
    encode_sampled,
    encode_sampled_compact,
    encode_sampled_compact2,
    encode_topk,
    pack_bits,
    recomputed_tail_mass,
    unpack_bits,
)
from potstill.store.errors import StoreError
from potstill.store.manifest import StoreManifest, TargetSpec

TEXT_FIELDS = ("prompt", "completion", "generated", "rationale", "answer")
TARGET_COLUMNS = ("topk_ids", "topk_logprobs", "token_logprob", "tail_mass", "tail_logprob")
SAMPLED_COLUMNS = ("sampled_ids", "sampled_counts")
PACKED_COLUMNS = ("topk_ids_packed", "topk_logprobs_packed", "token_logprob_packed", "sampled_entries",
                  "sampled_ids_packed", "sampled_counts_packed")


@dataclass
class Record:
    """One sequence and the teacher's targets for its scored tokens.

    `topk_*`, `token_logprob`, `tail_logprob` and `sampled` have one row per scored token: row j is
    the teacher's distribution over `input_ids[score_start + j]` given the tokens before it. The
    top-k fields are None in a store without top-k targets, `sampled` in one without sampled
    targets. `tail_logprob` is the log of the teacher's mass outside the top-K (−inf when the top-K
    covers the vocabulary); read from a format 1.0 / 2.0 store it is the log of that store's
    approximate tail mass (format §4.4). `hidden` maps a stored layer index to its
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


def mass_of_log(tail_logprob: np.ndarray) -> np.ndarray:
    """exp of a log tail, in float64 rounded once to float32 (how the `tail_mass` column is derived)."""
    return np.exp(np.asarray(tail_logprob, dtype=np.float64)).astype(np.float32)


def log_of_mass(tail_mass: np.ndarray) -> np.ndarray:
    """log of a stored tail mass, in float64 rounded once to float32; −inf where the mass is 0."""
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(tail_mass, dtype=np.float64)).astype(np.float32)


def _target_fields(t: TargetSpec) -> list[pa.Field]:
    """The target columns a store's `targets` spec calls for (format §4), in column order."""
    nested_u8 = pa.list_(pa.uint8())
    log_tail = [pa.field("tail_logprob", pa.list_(pa.float32()), nullable=False)] if t.tail_logprob else []
    if t.packed:
        fields = []
        if t.has_topk:
            fields += [pa.field("topk_ids_packed", nested_u8, nullable=False),
                       pa.field("topk_logprobs_packed", nested_u8, nullable=False)]
        fields.append(pa.field("token_logprob_packed", nested_u8, nullable=False))
        fields += log_tail
        if t.has_sampled:
            fields += [pa.field("sampled_entries", pa.int32(), nullable=False),
                       pa.field("sampled_ids_packed", nested_u8, nullable=False),
                       pa.field("sampled_counts_packed", nested_u8, nullable=False)]
        return fields
    lp = pa.float16() if t.logprob_dtype == "float16" else pa.float32()
    fields = []
    if t.has_topk:
        fields += [pa.field("topk_ids", pa.list_(pa.list_(pa.int32(), t.k)), nullable=False),
                   pa.field("topk_logprobs", pa.list_(pa.list_(lp, t.k)), nullable=False)]
    fields.append(pa.field("token_logprob", pa.list_(pa.float32()), nullable=False))
    if t.has_topk:
        fields.append(pa.field("tail_mass", pa.list_(pa.float32()), nullable=False))
        fields += log_tail
    if t.has_sampled:
        fields += [pa.field("sampled_ids", pa.list_(pa.list_(pa.int32())), nullable=False),
                   pa.field("sampled_counts", pa.list_(pa.list_(pa.uint16())), nullable=False)]
    return fields


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
            *_target_fields(manifest.targets),
        ]
    )


def np_logprob_dtype(manifest: StoreManifest) -> np.dtype:
    """Top-k log-probs as a writer keeps them: the stored dtype, or float32 until a packed store quantises them."""
    t = manifest.targets
    return np.dtype(np.float16 if t.logprob_dtype == "float16" and not t.packed else np.float32)


def target_vocab(manifest: StoreManifest) -> int:
    """Ids a target may hold: below 2**id_bits in a packed store, else below the larger of the
    teacher's and the tokenizer's vocabulary (a teacher may pad its embedding matrix)."""
    if manifest.targets.packed:
        return 1 << int(manifest.targets.id_bits or 0)
    return max(manifest.teacher.vocab_size or 0, manifest.tokenizer.vocab_size, 1)


# Log-probs are ≤ 0; the rounding of a log-softmax may leave a value a hair above 0.
LOGPROB_SLACK = 1e-3


def unsound_logprobs(lp: np.ndarray) -> np.ndarray:
    """Mask of log-probs that no distribution has: NaN, +inf, or above 0 (−inf is a probability of 0)."""
    lp = np.asarray(lp, dtype=np.float32)
    return np.isnan(lp) | (lp > LOGPROB_SLACK)


def unsound_topk(ids: np.ndarray, lp: np.ndarray, vocab: int) -> np.ndarray:
    """[S] mask of top-k rows with an id outside [0, vocab) (−1 marks an empty slot) or a log-prob
    that is not a finite value ≤ 0 where the slot holds an id, and not −inf where it is empty."""
    lp = np.asarray(lp, dtype=np.float32)
    empty = ids == -1
    bad_ids = (ids < -1) | (ids >= vocab)
    bad_lp = np.where(empty, ~np.isneginf(lp), ~np.isfinite(lp) | (lp > LOGPROB_SLACK))
    return (bad_ids | bad_lp).any(-1)


def unsound_tail_mass(tail: np.ndarray) -> np.ndarray:
    return ~((tail >= 0) & (tail <= 1))  # NaN too


def unsound_log_tail(tail_logprob: np.ndarray) -> np.ndarray:
    return ~(np.asarray(tail_logprob) <= 0)  # NaN too; −inf (an empty tail) is a log-probability


def input_vocab(manifest: StoreManifest) -> int:
    """Token ids a sequence may hold: the teacher may generate ids of a padded embedding matrix."""
    return max(manifest.teacher.vocab_size or 0, manifest.tokenizer.vocab_size, 1)


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
    n = len(ids)
    if not 1 <= rec.score_start <= n:
        raise StoreError(f"{where}: score_start {rec.score_start} outside [1, {n}]")
    if not 0 <= rec.hidden_start <= n:
        raise StoreError(f"{where}: hidden_start {rec.hidden_start} outside [0, {n}]")
    spec = manifest.targets
    s, k = n - rec.score_start, spec.k
    if rec.token_logprob is None:
        raise StoreError(f"{where}: token_logprob is missing")
    token_lp = np.ascontiguousarray(rec.token_logprob, dtype=np.float32)
    checks = [("token_logprob", token_lp, (s,))]
    if spec.has_topk:
        if rec.topk_ids is None or rec.topk_logprobs is None or rec.tail_logprob is None:
            raise StoreError(f"{where}: the store holds top-k targets but the record has none")
        topk_ids = np.ascontiguousarray(rec.topk_ids, dtype=np.int32)
        topk_lp = np.ascontiguousarray(rec.topk_logprobs, dtype=np_logprob_dtype(manifest))
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
    vocab = input_vocab(manifest)
    if n and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise StoreError(f"{where}: input_ids hold ids outside [0, {vocab})")
    unsound = unsound_logprobs(token_lp)
    if spec.has_topk:
        unsound = unsound | unsound_topk(rec.topk_ids, rec.topk_logprobs, vocab) | unsound_log_tail(rec.tail_logprob)
    if unsound.any():
        raise StoreError(f"{where}: the targets of scored position {int(np.flatnonzero(unsound)[0])} are not a "
                         "distribution (NaN or infinite log-probs, ids outside the vocabulary, or a log tail above 0)")
    if spec.has_sampled:
        if rec.sampled is None:
            raise StoreError(f"{where}: the store holds sampled targets but the record has none")
        t = rec.sampled
        t = SampledTargets(np.asarray(t.offsets, dtype=np.int64), np.ascontiguousarray(t.ids, dtype=np.int32),
                           np.ascontiguousarray(t.counts, dtype=np.uint16))
        check_sampled(t, s, spec.samples, target_vocab(manifest), where)
        rec.sampled = t
    elif rec.sampled is not None:
        raise StoreError(f"{where}: has sampled targets but the store holds only {spec.kind} targets")
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
    rec.input_ids, rec.token_logprob, rec.hidden = ids, token_lp, hidden
    return rec


def target_nbytes(rec: Record) -> int:
    """Approximate bytes a validated record's targets take (for closing shards by size)."""
    total = rec.token_logprob.nbytes if rec.token_logprob is not None else 0
    for arr in (rec.topk_ids, rec.topk_logprobs, rec.tail_logprob):
        total += arr.nbytes if arr is not None else 0
    if rec.sampled is not None:
        total += rec.sampled.ids.nbytes + rec.sampled.counts.nbytes + 4 * rec.sampled.num_positions
    return total


def _list_array(values: np.ndarray, lengths: list[int], inner: int | None = None) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = pa.array(values.reshape(-1))
    if inner is not None:
        flat = pa.FixedSizeListArray.from_arrays(flat, inner)
    return pa.ListArray.from_arrays(pa.array(offsets), flat)


def _offsets(lengths: list[int] | np.ndarray) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.array(offsets)


def _concat(arrays: list[np.ndarray], dtype: np.dtype, tail_shape: tuple[int, ...] = ()) -> np.ndarray:
    if not arrays:
        return np.zeros((0, *tail_shape), dtype=dtype)
    return np.concatenate(arrays)


def _bytes_list(parts: list[np.ndarray]) -> pa.Array:
    """One list<uint8> row per record from each record's byte stream."""
    return _list_array(_concat(parts, np.dtype(np.uint8)), [len(p) for p in parts])


def _sampled_columns(records: list[Record]) -> dict[str, pa.Array]:
    """`sampled_ids` / `sampled_counts` as list<list<...>>: records → positions → entries."""
    per_record = [r.sampled.num_positions for r in records]  # type: ignore[union-attr]
    per_position = np.concatenate([r.sampled.lengths() for r in records]) if records else np.zeros(0, np.int64)  # type: ignore[union-attr]
    outer = _offsets(per_record)
    inner = _offsets(per_position)
    ids = pa.ListArray.from_arrays(inner, pa.array(_concat([r.sampled.ids for r in records], np.dtype(np.int32))))  # type: ignore[union-attr]
    counts = pa.ListArray.from_arrays(inner, pa.array(_concat([r.sampled.counts for r in records], np.dtype(np.uint16))))  # type: ignore[union-attr]
    return {"sampled_ids": pa.ListArray.from_arrays(outer, ids), "sampled_counts": pa.ListArray.from_arrays(outer, counts)}


def _target_columns(records: list[Record], manifest: StoreManifest) -> dict[str, pa.Array]:
    spec = manifest.targets
    n_scored = [r.num_scored for r in records]
    columns: dict[str, pa.Array] = {}
    if spec.packed:
        q = spec.quantizer()
        id_bits = int(spec.id_bits or 0)
        if spec.has_topk:
            streams = [encode_topk(r.topk_ids, r.topk_logprobs, id_bits, q) for r in records]  # type: ignore[arg-type]
            columns["topk_ids_packed"] = _bytes_list([a for a, _ in streams])
            columns["topk_logprobs_packed"] = _bytes_list([b for _, b in streams])
        columns["token_logprob_packed"] = _bytes_list([pack_bits(q.encode(r.token_logprob), q.bits) for r in records])  # type: ignore[arg-type]
        if spec.tail_logprob:
            columns["tail_logprob"] = _list_array(_concat([r.tail_logprob for r in records], np.dtype(np.float32)), n_scored)  # type: ignore[misc]
        if spec.has_sampled:
            if spec.codec == "compact2":
                streams = [encode_sampled_compact2(r.sampled, spec.id_order_map) for r in records]  # type: ignore[arg-type]
            elif spec.codec == "compact":
                streams = [encode_sampled_compact(r.sampled) for r in records]  # type: ignore[arg-type]
            else:
                streams = [encode_sampled(r.sampled, id_bits, int(spec.count_bits or 0)) for r in records]  # type: ignore[arg-type]
            columns["sampled_entries"] = pa.array([r.sampled.num_entries for r in records], pa.int32())  # type: ignore[union-attr]
            columns["sampled_ids_packed"] = _bytes_list([a for a, _ in streams])
            columns["sampled_counts_packed"] = _bytes_list([b for _, b in streams])
        return columns
    k = spec.k
    if spec.has_topk:
        columns["topk_ids"] = _list_array(_concat([r.topk_ids for r in records], np.dtype(np.int32), (k,)), n_scored, k)  # type: ignore[misc]
        columns["topk_logprobs"] = _list_array(
            _concat([r.topk_logprobs for r in records], np_logprob_dtype(manifest), (k,)), n_scored, k  # type: ignore[misc]
        )
        tail = _concat([r.tail_logprob for r in records], np.dtype(np.float32))  # type: ignore[misc]
        columns["tail_mass"] = _list_array(mass_of_log(tail), n_scored)  # what 1.0 / 2.0 readers read
        if spec.tail_logprob:
            columns["tail_logprob"] = _list_array(tail, n_scored)
    columns["token_logprob"] = _list_array(_concat([r.token_logprob for r in records], np.dtype(np.float32)), n_scored)  # type: ignore[misc]
    if spec.has_sampled:
        columns.update(_sampled_columns(records))
    return columns


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
        "input_ids": _list_array(_concat([r.input_ids for r in records], np.dtype(np.int32)), n_tok),
        "score_start": pa.array([r.score_start for r in records], pa.int32()),
        "hidden_start": pa.array([r.hidden_start for r in records], pa.int32()),
        "token_offset": pa.array(offsets, pa.int64()),
        **_target_columns(records, manifest),
    }
    for name in TEXT_FIELDS:
        columns[name] = pa.array([getattr(r, name) for r in records], pa.string())
    return pa.record_batch([columns[f.name].cast(f.type) for f in schema], schema=schema)


def _flat(batch: pa.RecordBatch, name: str, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, values) of a list column as zero-copy numpy views; `width`: values are
    fixed_size_list rows, returned as [rows, width]."""
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


class ColumnViews:
    """Zero-copy numpy views of one record batch's columns, for fast per-record slicing.

    Built once per shard: record j's targets are then plain slices of flat arrays, with no
    per-row Arrow or Python object overhead on the loader's hot path. A packed store's targets
    are decoded per record, on the fly (`store.codec`, vectorised numpy). The tail is always
    handed out as a log: the stored `tail_logprob` (format 1.1 / 2.1), else the log of a 1.0 / 2.0
    store's approximate tail mass (stored, or recomputed in a packed store).
    """

    def __init__(self, batch: pa.RecordBatch, targets: TargetSpec | int) -> None:
        spec = targets if isinstance(targets, TargetSpec) else TargetSpec(k=targets)
        self.batch = batch
        self.spec = spec
        self.k = spec.k
        self.num_rows = batch.num_rows

        self.tok_off, self.input_ids = _flat(batch, "input_ids")
        self.score_start = batch.column("score_start").to_numpy(zero_copy_only=True)
        self.hidden_start = batch.column("hidden_start").to_numpy(zero_copy_only=True)
        self.token_offset = batch.column("token_offset").to_numpy(zero_copy_only=True)
        self.sample_index = batch.column("sample_index").to_numpy(zero_copy_only=True)
        if spec.packed:
            self._quantizer = spec.quantizer()
            # Scored positions are not stored in a packed store: they follow from the tokens.
            self.tgt_off = np.concatenate([[0], np.cumsum(np.diff(self.tok_off) - self.score_start)]).astype(np.int64)
            self.packed = {name: _flat(batch, name) for name in PACKED_COLUMNS
                           if name != "sampled_entries" and name in batch.schema.names}
            if spec.has_sampled:
                self.sampled_entries = batch.column("sampled_entries").to_numpy(zero_copy_only=True)
            if spec.tail_logprob:
                _, self.tail_logprob = _flat(batch, "tail_logprob")
        else:
            self.tgt_off, self.token_logprob = _flat(batch, "token_logprob")
            if spec.has_topk:
                _, self.topk_ids = _flat(batch, "topk_ids", spec.k)
                _, self.topk_logprobs = _flat(batch, "topk_logprobs", spec.k)
                _, self.tail_mass = _flat(batch, "tail_mass")  # 1.0 / 2.0: the only tail, an approximate one
                if spec.tail_logprob:
                    _, self.tail_logprob = _flat(batch, "tail_logprob")
            if spec.has_sampled:
                # list<list<...>>: records -> positions -> entries, three levels of zero-copy views
                ids_col, counts_col = batch.column("sampled_ids"), batch.column("sampled_counts")
                for col, name in ((ids_col, "sampled_ids"), (counts_col, "sampled_counts")):
                    if col.offset != 0 or col.null_count or col.values.null_count:
                        raise StoreError(f"column {name} is sliced or has nulls")
                self.sampled_rec_off = ids_col.offsets.to_numpy(zero_copy_only=True)
                self.sampled_pos_off = ids_col.values.offsets.to_numpy(zero_copy_only=True)
                self.sampled_ids = ids_col.values.values.to_numpy(zero_copy_only=True)
                self.sampled_counts = counts_col.values.values.to_numpy(zero_copy_only=True)
        # The offsets again as Python ints: slicing with them costs half of slicing with numpy
        # scalars, which is most of the per-record overhead of a loader (bench/store_io.py).
        self._tok_bounds: list[int] = self.tok_off.tolist()
        self._tgt_bounds: list[int] = self.tgt_off.tolist()

    def input_ids_of(self, j: int) -> np.ndarray:
        return self.input_ids[self._tok_bounds[j] : self._tok_bounds[j + 1]]

    def num_scored_of(self, j: int) -> int:
        return self._tgt_bounds[j + 1] - self._tgt_bounds[j]

    def _packed_bytes(self, name: str, j: int) -> np.ndarray:
        offsets, values = self.packed[name]
        return values[offsets[j] : offsets[j + 1]]

    def token_logprob_of(self, j: int) -> np.ndarray:
        if self.spec.packed:
            s = self.num_scored_of(j)
            q = self._quantizer
            return q.decode(unpack_bits(self._packed_bytes("token_logprob_packed", j), s, q.bits))
        return self.token_logprob[self._tgt_bounds[j] : self._tgt_bounds[j + 1]]

    def targets_of(self, j: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Record j's (topk_ids [S, K], topk_logprobs [S, K], token_logprob [S], tail_logprob [S])."""
        spec = self.spec
        if not spec.has_topk:
            raise StoreError(f"the store holds {spec.kind} targets, no top-k targets")
        a, b = self._tgt_bounds[j], self._tgt_bounds[j + 1]
        if spec.packed:
            ids, lp = decode_topk(self._packed_bytes("topk_ids_packed", j), self._packed_bytes("topk_logprobs_packed", j),
                                  b - a, self.k, int(spec.id_bits or 0), self._quantizer)
            tail = self.tail_logprob[a:b] if spec.tail_logprob else log_of_mass(recomputed_tail_mass(lp))
            return ids, lp, self.token_logprob_of(j), tail
        tail = self.tail_logprob[a:b] if spec.tail_logprob else log_of_mass(self.tail_mass[a:b])
        return self.topk_ids[a:b], self.topk_logprobs[a:b], self.token_logprob[a:b], tail

    def sampled_of(self, j: int) -> SampledTargets:
        """Record j's sampled targets (ids with counts per scored position)."""
        if not self.spec.has_sampled:
            raise StoreError(f"the store holds {self.spec.kind} targets, no sampled targets")
        if self.spec.packed:
            # The record's name is looked up only when its streams fail to decode, not for every record.
            try:
                return self._decode_sampled(j)
            except StoreError as e:
                raise StoreError(f"record {self.text_of('id', j)!r}: {e}") from None
        a, b = int(self.sampled_rec_off[j]), int(self.sampled_rec_off[j + 1])
        pos = self.sampled_pos_off[a : b + 1]
        e0, e1 = int(pos[0]), int(pos[-1])
        return SampledTargets(pos - e0, self.sampled_ids[e0:e1], self.sampled_counts[e0:e1])

    def _decode_sampled(self, j: int) -> SampledTargets:
        """Record j's packed or compact sampled streams, decoded."""
        ids_data, counts_data = self._packed_bytes("sampled_ids_packed", j), self._packed_bytes("sampled_counts_packed", j)
        entries, positions, samples = int(self.sampled_entries[j]), self.num_scored_of(j), self.spec.samples
        if self.spec.codec == "compact2":
            return decode_sampled_compact2(ids_data, counts_data, entries, positions, samples,
                                           1 << int(self.spec.id_bits or 0), id_order=self.spec.id_order_map)
        if self.spec.codec == "compact":
            return decode_sampled_compact(ids_data, counts_data, entries, positions, samples, 1 << int(self.spec.id_bits or 0))
        return decode_sampled(ids_data, counts_data, entries, positions, samples, int(self.spec.id_bits or 0),
                              int(self.spec.count_bits or 0))

    def text_of(self, name: str, j: int) -> str | None:
        return self.batch.column(name)[j].as_py()

    def record(self, j: int) -> Record:
        spec = self.spec
        topk_ids = topk_lp = tail = None
        if spec.has_topk:
            topk_ids, topk_lp, token_lp, tail = self.targets_of(j)
        else:
            token_lp = self.token_logprob_of(j)
        messages = self.text_of("messages", j)
        meta = self.text_of("meta", j)
        return Record(
            id=self.text_of("id", j),  # type: ignore[arg-type]
            input_ids=self.input_ids_of(j),
            score_start=int(self.score_start[j]),
            topk_ids=topk_ids,
            topk_logprobs=topk_lp,
            token_logprob=token_lp,
            tail_logprob=tail,
            prompt=self.text_of("prompt", j),
            messages=None if messages is None else json.loads(messages),
            completion=self.text_of("completion", j),
            generated=self.text_of("generated", j),
            rationale=self.text_of("rationale", j),
            answer=self.text_of("answer", j),
            meta=None if meta is None else json.loads(meta),
            sample_index=int(self.sample_index[j]),
            hidden_start=int(self.hidden_start[j]),
            sampled=self.sampled_of(j) if spec.has_sampled else None,
        )


def packed_lengths_ok(views: ColumnViews) -> list[str]:
    """verify: problems with the byte lengths of a packed store's fields (format §4.3)."""
    spec = views.spec
    scored = np.diff(views.tgt_off)
    expect: dict[str, np.ndarray] = {"token_logprob_packed": scored * int(spec.logprob_bits or 0)}
    if spec.has_topk:
        expect["topk_ids_packed"] = scored * spec.k * int(spec.id_bits or 0)
        expect["topk_logprobs_packed"] = scored * spec.k * int(spec.logprob_bits or 0)
    if spec.has_sampled and spec.codec == "packed":  # (compact streams have no fixed length: decoding checks them)
        entries = views.sampled_entries.astype(np.int64)
        expect["sampled_ids_packed"] = entries * int(spec.id_bits or 0)
        expect["sampled_counts_packed"] = entries * int(spec.count_bits or 0)
    problems = []
    for name, bits in expect.items():
        offsets, _ = views.packed[name]
        if not np.array_equal(np.diff(offsets), (bits + 7) // 8):
            problems.append(f"column {name}: a record's byte length differs from what its counts need")
    return problems
