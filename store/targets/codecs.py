"""The codecs (docs/reference/store-format.md §4.3): how the built-in kinds' parts are laid out in Arrow
columns, one class per codec, registered by the name the manifest records.

- "none": plain Arrow lists (fixed-size lists for the top-k), log-probs in `logprob_dtype`.
- "packed": ids bit-packed to `id_bits`, counts to `count_bits`, log-probs quantised to
  `logprob_bits` over [`logprob_min`, 0] (`store.codec`), one byte string per record and field.
- "compact": "packed", with the sampled draws split into head and tail and coded by their place in
  the store's frequency order `id_order` (§4.3.2).

The bit-level coding itself is `store.codec`; the classes here choose and place it.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pyarrow as pa

from potstill.store.codec import (
    MAX_BITS,
    MAX_ID_ORDER,
    LogprobQuantizer,
    SampledTargets,
    bits_for,
    check_sampled,
    compact_order,
    compact_problem,
    decode_sampled,
    decode_sampled_compact,
    decode_topk,
    encode_logprobs_many,
    encode_sampled_compact_many,
    encode_topk_many,
    pack_bits_many,
    unpack_bits,
    unpack_bits_shard,
)
from potstill.store.columns import (
    bytes_column,
    concat,
    first_bad_row,
    flat,
    float_rounding,
    impossible_topk,
    input_vocab,
    list_array,
    mass_of_log,
    numpy_view,
    offsets_array,
    target_vocab,
    unsound_log_tail,
    unsound_logprobs,
    unsound_tail_mass,
)
from potstill.store.errors import StoreError
from potstill.store.targets.base import (
    Codec,
    ColumnViews,
    Record,
    StoreManifest,
    TargetColumns,
    TargetKind,
    TargetSpec,
    TopKRows,
    WeightedRows,
)
from potstill.store.targets.parts import np_logprob_dtype

NESTED_U8 = pa.list_(pa.uint8())


# -- "none" -----------------------------------------------------------------------------------------
class PlainCodec(Codec):
    name = "none"
    packed = False

    def fields(self, spec: TargetSpec, kind: TargetKind) -> list[pa.Field]:
        lp = pa.float16() if spec.logprob_dtype == "float16" else pa.float32()
        out = []
        if kind.holds_topk:
            out += [pa.field("topk_ids", pa.list_(pa.list_(pa.int32(), spec.k)), nullable=False),
                    pa.field("topk_logprobs", pa.list_(pa.list_(lp, spec.k)), nullable=False)]
        out.append(pa.field("token_logprob", pa.list_(pa.float32()), nullable=False))
        if kind.holds_topk:
            out += [pa.field("tail_mass", pa.list_(pa.float32()), nullable=False),
                    pa.field("tail_logprob", pa.list_(pa.float32()), nullable=False)]
        if kind.holds_sampled:
            out += [pa.field("sampled_ids", pa.list_(pa.list_(pa.int32())), nullable=False),
                    pa.field("sampled_counts", pa.list_(pa.list_(pa.uint16())), nullable=False)]
        return out

    def encode(self, records: list[Record], spec: TargetSpec, kind: TargetKind) -> dict[str, pa.Array]:

        n_scored = [r.num_scored for r in records]
        k = spec.k
        columns: dict[str, pa.Array] = {}
        if kind.holds_topk:
            columns["topk_ids"] = list_array(concat([r.topk_ids for r in records], np.dtype(np.int32), (k,)), n_scored, k)  # type: ignore[misc]
            columns["topk_logprobs"] = list_array(
                concat([r.topk_logprobs for r in records], np_logprob_dtype(spec), (k,)), n_scored, k  # type: ignore[misc]
            )
            tail = concat([r.tail_logprob for r in records], np.dtype(np.float32))  # type: ignore[misc]
            columns["tail_mass"] = list_array(mass_of_log(tail), n_scored)  # the mass, for readers of plain columns
            columns["tail_logprob"] = list_array(tail, n_scored)
        columns["token_logprob"] = list_array(concat([r.token_logprob for r in records], np.dtype(np.float32)), n_scored)  # type: ignore[misc]
        if kind.holds_sampled:
            columns.update(_sampled_lists(records))
        return columns

    def open(self, batch: pa.RecordBatch, spec: TargetSpec, kind: TargetKind, views: ColumnViews) -> TargetColumns:
        return PlainColumns(batch, spec, kind)


def _sampled_lists(records: list[Record]) -> dict[str, pa.Array]:
    """`sampled_ids` / `sampled_counts` as list<list<...>>: records → positions → entries."""
    sampled: list[SampledTargets] = [r.sampled for r in records]  # type: ignore[misc]
    per_position = np.concatenate([t.lengths() for t in sampled]) if records else np.zeros(0, np.int64)
    outer = offsets_array([t.num_positions for t in sampled])
    inner = offsets_array(per_position)
    ids = pa.ListArray.from_arrays(inner, pa.array(concat([t.ids for t in sampled], np.dtype(np.int32))))
    counts = pa.ListArray.from_arrays(inner, pa.array(concat([t.counts for t in sampled], np.dtype(np.uint16))))
    return {"sampled_ids": pa.ListArray.from_arrays(outer, ids), "sampled_counts": pa.ListArray.from_arrays(outer, counts)}


class PlainColumns(TargetColumns):
    """Zero-copy numpy views of an unpacked store's target columns: record j's targets are slices."""

    def __init__(self, batch: pa.RecordBatch, spec: TargetSpec, kind: TargetKind) -> None:

        self.spec, self.kind, self.batch = spec, kind, batch
        self.tgt_off, self.token_lp = flat(batch, "token_logprob")
        if kind.holds_topk:
            _, self.topk_ids = flat(batch, "topk_ids", spec.k)
            _, self.topk_logprobs = flat(batch, "topk_logprobs", spec.k)
            _, self.tail_mass = flat(batch, "tail_mass")
            _, self.tail_logprob = flat(batch, "tail_logprob")
        if kind.holds_sampled:
            # list<list<...>>: records -> positions -> entries, three levels of zero-copy views
            ids_col, counts_col = batch.column("sampled_ids"), batch.column("sampled_counts")
            for col, name in ((ids_col, "sampled_ids"), (counts_col, "sampled_counts")):
                if col.offset != 0 or col.null_count or col.values.null_count:
                    raise StoreError(f"column {name} is sliced or has nulls")
            self.sampled_rec_off = numpy_view(ids_col.offsets)
            self.sampled_pos_off = numpy_view(ids_col.values.offsets)
            self.sampled_ids = numpy_view(ids_col.values.values)
            self.sampled_counts = numpy_view(counts_col.values.values)
        # The offsets as Python ints: slicing with them costs half of slicing with numpy scalars,
        # which is most of the per-record overhead of a loader (bench/store_io.py).
        self.bounds: list[int] = self.tgt_off.tolist()

    def token_logprob(self, j: int) -> np.ndarray:
        return self.token_lp[self.bounds[j] : self.bounds[j + 1]]

    def topk(self, j: int) -> TopKRows:
        if not self.kind.holds_topk:
            raise StoreError(f"the store holds {self.kind.name} targets, no top-k targets")

        a, b = self.bounds[j], self.bounds[j + 1]
        return TopKRows(self.topk_ids[a:b], self.topk_logprobs[a:b], self.token_lp[a:b], self.tail_logprob[a:b])

    def sampled(self, j: int) -> SampledTargets:
        if not self.kind.holds_sampled:
            raise StoreError(f"the store holds {self.kind.name} targets, no sampled targets")
        a, b = int(self.sampled_rec_off[j]), int(self.sampled_rec_off[j + 1])
        pos = self.sampled_pos_off[a : b + 1]
        e0, e1 = int(pos[0]), int(pos[-1])
        return SampledTargets(pos - e0, self.sampled_ids[e0:e1], self.sampled_counts[e0:e1])

    def record_fields(self, j: int) -> dict[str, Any]:
        return _part_fields(self, j, self.kind)

    def shape_problems(self, views: ColumnViews, manifest: StoreManifest) -> list[str]:
        problems: list[str] = []
        for name in ("tail_mass", "tail_logprob", "topk_ids", "topk_logprobs") if self.kind.holds_topk else ():
            if not np.array_equal(numpy_view(self.batch.column(name).offsets), self.tgt_off):
                problems.append(f"column {name} has other row counts than token_logprob")
        problems += tail_problems(self, manifest) if not problems and self.kind.holds_topk else []
        if self.kind.holds_sampled:
            if not np.array_equal(self.sampled_rec_off, self.tgt_off):
                problems.append("column sampled_ids has other row counts than token_logprob")
            counts = self.batch.column("sampled_counts")
            if not (np.array_equal(numpy_view(counts.offsets), self.sampled_rec_off)
                    and np.array_equal(numpy_view(counts.values.offsets), self.sampled_pos_off)):
                problems.append("columns sampled_ids and sampled_counts have different shapes")
        return problems

    def value_problems(self, views: ColumnViews, manifest: StoreManifest) -> list[str]:
        problems: list[str] = []

        def report(what: str, offsets: np.ndarray, bad: np.ndarray) -> None:
            if bad.any():
                problems.append(f"record {views.text_of('id', first_bad_row(offsets, bad))!r}: {what} "
                                f"({int(bad.sum())} value(s) in the shard)")

        spec, vocab = self.spec, target_vocab(manifest)
        report("token_logprob is NaN or above 0", self.tgt_off, unsound_logprobs(self.token_lp))
        if self.kind.holds_topk:
            from potstill.store import kernels  # (here: numba takes 0.2 s to import, which only checks need)

            ids, lp, tail = self.topk_ids, self.topk_logprobs, self.tail_logprob
            if lp.dtype == np.float16:
                flags = kernels.topk_half_flags(ids, lp.view(np.uint16), tail, vocab, _half_table())
            else:
                flags = kernels.topk_plain_flags(ids, lp.astype(np.float32, copy=False), tail, vocab)
            report(f"top-k ids outside [0, {vocab}) or log-probs NaN, infinite or above 0",
                   self.tgt_off, (flags & kernels.UNSOUND) > 0)
            report("tail_mass is NaN or outside [0, 1]", self.tgt_off, unsound_tail_mass(self.tail_mass))
            report("tail_logprob is NaN or above 0", self.tgt_off, unsound_log_tail(self.tail_logprob))
            if not problems:  # sound values: now whether they can be one distribution
                rows = np.flatnonzero(flags & (kernels.REPEATED | kernels.RISING | kernels.TOO_MUCH))
                # the messages (the largest mass among them) from the flagged rows alone
                whats = impossible_topk(ids[rows], lp[rows], float_rounding(lp[rows]), tail[rows])
                for (what, _), flag in zip(whats, (kernels.REPEATED, kernels.RISING, kernels.TOO_MUCH), strict=True):
                    report(what, self.tgt_off, (flags & flag) > 0)
        if self.kind.holds_sampled:
            s_ids, counts = self.sampled_ids, self.sampled_counts
            entry_rows = self.sampled_pos_off  # entries per position; positions per record below
            bad_entry = (s_ids < 0) | (s_ids >= vocab) | (counts < 1)
            if bad_entry.any():
                position = int(np.searchsorted(entry_rows, int(np.flatnonzero(bad_entry)[0]), side="right") - 1)
                row = int(np.searchsorted(self.sampled_rec_off, position, side="right") - 1)
                problems.append(f"record {views.text_of('id', row)!r}: sampled ids outside the vocabulary or counts below 1")
            elif len(counts):
                sums = np.add.reduceat(counts.astype(np.int64), entry_rows[:-1]) if len(entry_rows) > 1 else np.zeros(0)
                report(f"sampled counts of a position do not sum to N={spec.samples}", self.sampled_rec_off,
                       sums != spec.samples)
        return problems


@functools.cache
def _half_table() -> np.ndarray:
    from potstill.store import kernels

    return kernels.half_table()


def _part_fields(columns: TargetColumns, j: int, kind: TargetKind) -> dict[str, Any]:
    """Record j's `Record` target fields from the parts a built-in kind holds."""
    if kind.holds_topk:
        rows = columns.topk(j)
        out: dict[str, Any] = {"topk_ids": rows.ids, "topk_logprobs": rows.logprobs,
                               "token_logprob": rows.token_logprob, "tail_logprob": rows.tail_logprob}
    else:
        out = {"token_logprob": columns.token_logprob(j)}
    if kind.holds_sampled:
        out["sampled"] = columns.sampled(j)
    return out


def tail_problems(columns: Any, manifest: StoreManifest) -> list[str]:
    """The log tail against format §4.4: a log-probability (≤ 0, never NaN); −inf, an empty tail, only
    where the top-K covers the teacher's vocabulary, unless the store says the tails are complements
    of the top-K (which round to −inf when the top-K holds all the mass to the backend's precision);
    and in an unpacked store, `tail_mass` = exp(`tail_logprob`) to one float32 rounding."""
    spec = manifest.targets
    tail = columns.tail_logprob
    problems = []
    if not np.all(tail <= 0.0):
        bad = int(np.flatnonzero(~(tail <= 0.0))[0])
        problems.append(f"tail_logprob holds {tail[bad]} (scored position {bad} of the shard), not a log-probability")
    covers = spec.k >= max(manifest.teacher.vocab_size or 0, manifest.tokenizer.vocab_size)
    if spec.tail_logprob == "direct" and not covers and np.isneginf(tail).any():
        bad = int(np.flatnonzero(np.isneginf(tail))[0])
        problems.append(f"tail_logprob is -inf at scored position {bad} of the shard, but K={spec.k} does not cover "
                        "the vocabulary: a direct tail is empty only when it does")
    mass = getattr(columns, "tail_mass", None)
    if mass is not None:
        want = np.exp(tail.astype(np.float64)).astype(np.float32)
        off = np.abs(mass.astype(np.float64) - want) > np.spacing(want)
        if off.any():
            bad = int(np.flatnonzero(off)[0])
            problems.append(f"tail_mass {mass[bad]} differs from exp(tail_logprob) {want[bad]} at scored position {bad} of the shard")
    return problems


# -- "packed" ---------------------------------------------------------------------------------------
def _packed_fields(kind: TargetKind) -> list[pa.Field]:
    """The packed codecs' columns of a store of this kind (they follow from the kind alone)."""
    out = []
    if kind.holds_topk:
        out += [pa.field("topk_ids_packed", NESTED_U8, nullable=False),
                pa.field("topk_logprobs_packed", NESTED_U8, nullable=False)]
    out.append(pa.field("token_logprob_packed", NESTED_U8, nullable=False))
    if kind.holds_tail:
        out.append(pa.field("tail_logprob", pa.list_(pa.float32()), nullable=False))
    if kind.holds_sampled:
        out += [pa.field("sampled_entries", pa.int32(), nullable=False),
                pa.field("sampled_ids_packed", NESTED_U8, nullable=False),
                pa.field("sampled_counts_packed", NESTED_U8, nullable=False)]
    return out


class PackedCodec(Codec):
    name = "packed"

    def check_spec(self, spec: TargetSpec, kind: TargetKind) -> None:
        super().check_spec(spec, kind)
        if not isinstance(spec.id_bits, int) or not 1 <= spec.id_bits <= MAX_BITS:
            raise StoreError(f"targets.id_bits must be an integer in [1, {MAX_BITS}], got {spec.id_bits!r}")
        self.check_counts(spec, kind)
        if not isinstance(spec.logprob_bits, int) or not isinstance(spec.logprob_min, int | float):
            raise StoreError("targets.logprob_bits and targets.logprob_min are required by the packed codec")
        LogprobQuantizer(spec.logprob_bits, float(spec.logprob_min))  # raises on a bad range

    def count_bits(self, samples: int) -> int | None:
        return bits_for(samples)

    def check_counts(self, spec: TargetSpec, kind: TargetKind) -> None:
        if kind.holds_sampled and spec.count_bits != bits_for(spec.samples):
            raise StoreError(f"targets.count_bits must be {bits_for(spec.samples)} for N={spec.samples}, got {spec.count_bits!r}")

    def manifest_keys(self, spec: TargetSpec, kind: TargetKind) -> dict[str, Any]:
        q = spec.quantizer()
        out = dict(id_bits=spec.id_bits, logprob_bits=spec.logprob_bits, logprob_min=spec.logprob_min,
                   logprob_step=q.step, logprob_max_error=q.max_error)
        if kind.holds_sampled:
            out.update(self.count_keys(spec))
        return out

    def count_keys(self, spec: TargetSpec) -> dict[str, Any]:
        return {"count_bits": spec.count_bits}

    def stream_names(self, kind: TargetKind) -> list[str]:
        """The byte-stream columns (list<uint8>, one stream per record) of a store of this kind."""
        return [f.name for f in _packed_fields(kind) if f.type == NESTED_U8]

    def fields(self, spec: TargetSpec, kind: TargetKind) -> list[pa.Field]:
        return _packed_fields(kind)

    def encode(self, records: list[Record], spec: TargetSpec, kind: TargetKind) -> dict[str, pa.Array]:

        q = spec.quantizer()
        id_bits = int(spec.id_bits or 0)
        columns: dict[str, pa.Array] = {}
        scored = np.array([r.num_scored for r in records], dtype=np.int64)
        if kind.holds_topk:
            k = spec.k
            ids_data, ids_off, lp_data, lp_off = encode_topk_many(
                concat([r.topk_ids for r in records], np.dtype(np.int32), (k,)),  # type: ignore[misc]
                concat([r.topk_logprobs for r in records], np.dtype(np.float32), (k,)), scored, id_bits, q)  # type: ignore[misc]
            columns["topk_ids_packed"] = bytes_column(ids_data, ids_off)
            columns["topk_logprobs_packed"] = bytes_column(lp_data, lp_off)
        token_lp = concat([r.token_logprob for r in records], np.dtype(np.float32))  # type: ignore[misc]
        columns["token_logprob_packed"] = bytes_column(*encode_logprobs_many(token_lp, scored, q))
        if kind.holds_tail:
            columns["tail_logprob"] = list_array(concat([r.tail_logprob for r in records], np.dtype(np.float32)),  # type: ignore[misc]
                                                 [r.num_scored for r in records])
        if kind.holds_sampled:
            sampled: list[SampledTargets] = [r.sampled for r in records]  # type: ignore[misc]
            columns["sampled_entries"] = pa.array(np.array([len(t.ids) for t in sampled], dtype=np.int32))
            columns["sampled_ids_packed"], columns["sampled_counts_packed"] = self.sampled_columns(sampled, spec)
        return columns

    def sampled_columns(self, sampled: list[SampledTargets], spec: TargetSpec) -> tuple[pa.Array, pa.Array]:
        """The `sampled_ids_packed` and `sampled_counts_packed` columns of validated records' draws."""
        entries = np.array([len(t.ids) for t in sampled], dtype=np.int64)
        ids = concat([t.ids for t in sampled], np.dtype(np.int32))
        counts = concat([t.counts for t in sampled], np.dtype(np.uint16))
        return (bytes_column(*pack_bits_many(ids, entries, int(spec.id_bits or 0))),
                bytes_column(*pack_bits_many(counts, entries, int(spec.count_bits or 0))))

    def decode_sampled(self, ids_data: np.ndarray, counts_data: np.ndarray, entries: int, positions: int,
                       spec: TargetSpec) -> SampledTargets:
        return decode_sampled(ids_data, counts_data, entries, positions, spec.samples, int(spec.id_bits or 0),
                              int(spec.count_bits or 0))

    def sampled_rows(self, columns: PackedColumns, j: int) -> WeightedRows:
        """`PackedColumns.sampled_rows`: the decoded targets (`sampled`) padded into rows."""
        return TargetColumns.sampled_rows(columns, j)

    def sampled_bits(self, entries: np.ndarray, spec: TargetSpec) -> dict[str, np.ndarray]:
        """verify: the bits each record's sampled streams take (none where they have no fixed length)."""
        return {"sampled_ids_packed": entries * int(spec.id_bits or 0),
                "sampled_counts_packed": entries * int(spec.count_bits or 0)}

    def open(self, batch: pa.RecordBatch, spec: TargetSpec, kind: TargetKind, views: ColumnViews) -> TargetColumns:
        return PackedColumns(batch, spec, kind, self, views)

    def sampled_bad(self, columns: PackedColumns, tv: int) -> np.ndarray:
        """[records] mask of the records whose sampled streams do not decode to sound targets with ids
        below `tv`, over the whole shard at once: counts ≥ 1 whose running sum within a record meets
        N, 2N, ... exactly at the ends of its scored positions."""
        spec, entries = columns.spec, columns.sampled_entries.astype(np.int64)
        records, n = len(entries), spec.samples
        ids_off, ids_values = columns.streams["sampled_ids_packed"]
        counts_off, counts_values = columns.streams["sampled_counts_packed"]
        ids = unpack_bits_shard(ids_values, ids_off, entries, int(spec.id_bits or 0))
        counts = unpack_bits_shard(counts_values, counts_off, entries, int(spec.count_bits or 0))
        rec = np.repeat(np.arange(records), entries)
        running = np.cumsum(counts)
        before = np.zeros(records, dtype=np.int64)
        before[1:] = np.cumsum(np.bincount(rec, weights=counts, minlength=records).astype(np.int64))[:-1]
        running -= before[rec]
        total = np.bincount(rec, weights=counts, minlength=records).astype(np.int64)
        ends = np.bincount(rec, weights=(running % n == 0), minlength=records).astype(np.int64)
        positions = np.diff(columns.tgt_off)
        bad = (ends != positions) | (total != positions * n)
        return bad | np.bincount(rec[(counts < 1) | (ids >= tv)], minlength=records).astype(bool)


class PackedColumns(TargetColumns):
    """A packed store's target columns: each record's byte streams, decoded on demand (vectorised
    numpy). Scored positions are not stored: they follow from the tokens."""

    def __init__(self, batch: pa.RecordBatch, spec: TargetSpec, kind: TargetKind, codec: PackedCodec,
                 views: ColumnViews) -> None:

        self.spec, self.kind, self.codec, self.batch, self.views = spec, kind, codec, batch, views
        self.quantizer = spec.quantizer()
        self.tgt_off = np.concatenate([[0], np.cumsum(np.diff(views.tok_off) - views.score_start)]).astype(np.int64)
        self.streams = {name: flat(batch, name) for name in codec.stream_names(kind)}
        if kind.holds_sampled:
            self.sampled_entries = numpy_view(batch.column("sampled_entries"))
        if kind.holds_tail:
            _, self.tail_logprob = flat(batch, "tail_logprob")
        self.bounds: list[int] = self.tgt_off.tolist()

    def _bytes(self, name: str, j: int) -> np.ndarray:
        offsets, values = self.streams[name]
        return values[offsets[j] : offsets[j + 1]]

    def token_logprob(self, j: int) -> np.ndarray:
        q = self.quantizer
        return q.decode(unpack_bits(self._bytes("token_logprob_packed", j), self.bounds[j + 1] - self.bounds[j], q.bits))

    def topk(self, j: int) -> TopKRows:
        if not self.kind.holds_topk:
            raise StoreError(f"the store holds {self.kind.name} targets, no top-k targets")

        a, b = self.bounds[j], self.bounds[j + 1]
        ids, lp = decode_topk(self._bytes("topk_ids_packed", j), self._bytes("topk_logprobs_packed", j),
                              b - a, self.spec.k, int(self.spec.id_bits or 0), self.quantizer)
        return TopKRows(ids, lp, self.token_logprob(j), self.tail_logprob[a:b])

    def sampled(self, j: int) -> SampledTargets:
        if not self.kind.holds_sampled:
            raise StoreError(f"the store holds {self.kind.name} targets, no sampled targets")
        # The record's name is looked up only when its streams fail to decode, not for every record.
        try:
            return self.codec.decode_sampled(self._bytes("sampled_ids_packed", j), self._bytes("sampled_counts_packed", j),
                                             int(self.sampled_entries[j]), self.bounds[j + 1] - self.bounds[j], self.spec)
        except StoreError as e:
            raise StoreError(f"record {self.views.text_of('id', j)!r}: {e}") from None

    def sampled_rows(self, j: int) -> WeightedRows:
        if not self.kind.holds_sampled:
            raise StoreError(f"the store holds {self.kind.name} targets, no sampled targets")
        return self.codec.sampled_rows(self, j)

    def record_fields(self, j: int) -> dict[str, Any]:
        return _part_fields(self, j, self.kind)

    def shape_problems(self, views: ColumnViews, manifest: StoreManifest) -> list[str]:
        spec = self.spec
        scored = np.diff(self.tgt_off)
        expect: dict[str, np.ndarray] = {"token_logprob_packed": scored * int(spec.logprob_bits or 0)}
        if self.kind.holds_topk:
            expect["topk_ids_packed"] = scored * spec.k * int(spec.id_bits or 0)
            expect["topk_logprobs_packed"] = scored * spec.k * int(spec.logprob_bits or 0)
        if self.kind.holds_sampled:
            expect.update(self.codec.sampled_bits(self.sampled_entries.astype(np.int64), spec))
        problems = []
        for name, bits in expect.items():
            offsets, _ = self.streams[name]
            if not np.array_equal(np.diff(offsets), (bits + 7) // 8):
                problems.append(f"column {name}: a record's byte length differs from what its counts need")
        if self.kind.holds_tail and not np.array_equal(numpy_view(self.batch.column("tail_logprob").offsets), self.tgt_off):
            problems.append("column tail_logprob has other row counts than the records' scored tokens")
        return problems or (tail_problems(self, manifest) if self.kind.holds_tail else [])

    def value_problems(self, views: ColumnViews, manifest: StoreManifest) -> list[str]:
        """Quantised log-probs are finite by construction, so what can be wrong is an id beyond the
        vocabulary (id_bits may hold more), a top-K no distribution has, or a sampled layout. Checked
        over the whole shard at once; the first record at fault is then named by `record_problem`."""
        tv = input_vocab(manifest)
        bad = np.zeros(views.num_rows, dtype=bool)
        if self.kind.holds_topk:
            bad |= self._topk_bad(tv)
        if self.kind.holds_sampled:
            bad |= self.codec.sampled_bad(self, tv)
        for j in np.flatnonzero(bad):
            problem = self.record_problem(int(j), tv)
            if problem is not None:
                return [problem]
        return []

    def _topk_bad(self, tv: int) -> np.ndarray:
        """[records] mask: top-k ids outside [0, tv) or a top-K that no distribution has."""
        from potstill.store import kernels  # (here: numba takes 0.2 s to import, which only checks need)

        spec, q = self.spec, self.quantizer
        id_off, id_values = self.streams["topk_ids_packed"]
        lp_off, lp_values = self.streams["topk_logprobs_packed"]
        return kernels.topk_packed_bad(id_values, id_off.astype(np.int64), lp_values, lp_off.astype(np.int64),
                                       self.tgt_off, self.tail_logprob, spec.k, int(spec.id_bits or 0), q.bits,
                                       float(q.lo), q.step, q.max_error, tv)

    def record_problem(self, j: int, tv: int) -> str | None:
        """What is wrong with record j's targets (the first thing), or None."""
        rid = self.views.text_of("id", j)
        try:
            if self.kind.holds_topk:
                rows = self.topk(j)
                ids = rows.ids
                if ids.size and (int(ids.max()) >= tv or int(ids.min()) < -1):
                    return f"record {rid!r}: top-k ids outside [0, {tv})"
                q = self.quantizer
                err = q.max_error + np.abs(rows.logprobs.astype(np.float64)) * 2.0**-24  # (+ float32's rounding)
                for what, bad in impossible_topk(ids, rows.logprobs, err, rows.tail_logprob, clipped=q.lo + q.step / 2):
                    if bad.any():
                        return f"record {rid!r}: {what} ({int(bad.sum())} position(s))"
            if self.kind.holds_sampled:
                check_sampled(self.sampled(j), self.bounds[j + 1] - self.bounds[j], self.spec.samples, tv,
                              f"record {rid!r}")
        except StoreError as e:
            return str(e)
        return None


# -- "compact" ------------------------------------------------------------------------------------------
class CompactCodec(PackedCodec):
    """"packed", with the sampled draws split into head (count ≥ 2) and tail (count 1), coded by their
    place in the store's id order with a Rice parameter per rank bucket (format §4.3.2)."""

    name = "compact"
    sampled_only = True
    uses_id_order = True

    def check_spec(self, spec: TargetSpec, kind: TargetKind) -> None:
        super().check_spec(spec, kind)
        order = spec.id_order
        if order is None:
            return
        if (not isinstance(order, list) or len(order) > MAX_ID_ORDER
                or not all(issubclass(t, int) and not issubclass(t, bool) for t in set(map(type, order)))):
            raise StoreError(f"targets.id_order must be a list of at most {MAX_ID_ORDER} token ids")
        if order and (min(order) < 0 or max(order) >= 1 << int(spec.id_bits or 0) or len(set(order)) != len(order)):
            raise StoreError(f"targets.id_order must list distinct token ids in [0, 2^{spec.id_bits})")

    def count_bits(self, samples: int) -> int | None:
        return None  # counts are gamma-coded: no fixed width

    def check_counts(self, spec: TargetSpec, kind: TargetKind) -> None:
        pass

    def count_keys(self, spec: TargetSpec) -> dict[str, Any]:
        return {}

    def manifest_keys(self, spec: TargetSpec, kind: TargetKind) -> dict[str, Any]:
        out = super().manifest_keys(spec, kind)
        if spec.id_order:
            out["id_order"] = list(spec.id_order)
        return out

    def sampled_columns(self, sampled: list[SampledTargets], spec: TargetSpec) -> tuple[pa.Array, pa.Array]:
        ids, ids_off, counts, counts_off = encode_sampled_compact_many(sampled, spec.id_order_map)
        return bytes_column(ids, ids_off), bytes_column(counts, counts_off)

    def decode_sampled(self, ids_data: np.ndarray, counts_data: np.ndarray, entries: int, positions: int,
                       spec: TargetSpec) -> SampledTargets:
        return decode_sampled_compact(ids_data, counts_data, entries, positions, spec.samples,
                                       1 << int(spec.id_bits or 0), id_order=spec.id_order_map)

    def sampled_rows(self, columns: PackedColumns, j: int) -> WeightedRows:
        """`PackedColumns.sampled_rows`: record j decoded straight into the loader's rows (compiled)."""
        from potstill.store import kernels  # (here: numba takes 0.2 s to import)

        spec = columns.spec
        vocab = 1 << int(spec.id_bits or 0)
        entries, positions = int(columns.sampled_entries[j]), columns.bounds[j + 1] - columns.bounds[j]
        wrong, ids, weights, lengths = kernels.compact_weighted(
            columns._bytes("sampled_ids_packed", j), columns._bytes("sampled_counts_packed", j), entries, positions,
            spec.samples, vocab, *compact_order(spec.id_order_map, vocab))
        if wrong:
            problem = compact_problem(wrong, entries, positions, spec.samples, vocab)
            raise StoreError(f"record {columns.views.text_of('id', j)!r}: compact sampled targets: {problem}")
        return WeightedRows(ids, weights, lengths)

    def sampled_bits(self, entries: np.ndarray, spec: TargetSpec) -> dict[str, np.ndarray]:
        return {}  # no fixed length: decoding checks the streams

    def sampled_bad(self, columns: PackedColumns, tv: int) -> np.ndarray:
        spec = columns.spec
        ids_off, ids_values = columns.streams["sampled_ids_packed"]
        counts_off, counts_values = columns.streams["sampled_counts_packed"]
        from potstill.store import kernels  # (here: numba takes 0.2 s to import, which only checks need)

        order = spec.id_order_map
        listed = order.listed if order is not None else np.zeros(0, np.int64)
        below = order.below if order is not None else np.zeros(0, np.int64)
        # The order maps the places below tv onto the ids below it when it lists only such ids (the
        # others keep their order after the listed ones): then places say which ids are too large.
        by_place = not len(listed) or int(listed.max()) < tv
        return kernels.compact_bad(ids_values, ids_off.astype(np.int64), counts_values, counts_off.astype(np.int64),
                                   columns.sampled_entries.astype(np.int64), np.diff(columns.tgt_off), spec.samples,
                                   1 << int(spec.id_bits or 0), listed, below, by_place, tv)
