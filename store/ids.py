"""Record ids and their keys (docs/reference/store-format.md §3).

Each shard keeps its ids in `shards/<shard>/ids.arrow`, an uncompressed Arrow IPC file of two
columns: `id` (string, in the order of records.arrow's rows) and `key` (uint64, the first 8 bytes of
sha256(id UTF-8) read big-endian). Commit records stay small and fixed-size whatever a shard holds,
and everything that looks ids up (the split, resume, duplicates) works on arrays of keys. Keys are
only a fast first pass: ids whose keys are equal are compared as strings before anything is decided,
so two ids that collide on 64 bits are never taken for one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from potstill.store.columns import numpy_view
from potstill.store.errors import StoreError

IDS_FILE = "ids.arrow"
IDS_SCHEMA = pa.schema([pa.field("id", pa.string(), nullable=False), pa.field("key", pa.uint64(), nullable=False)])
_TO_FRACTION = 2.0**-64


def id_key(record_id: str) -> int:
    """The first 8 bytes of sha256(id UTF-8), big-endian: the same on every machine, for every order."""
    return int.from_bytes(hashlib.sha256(record_id.encode("utf-8")).digest()[:8], "big")


def id_keys(ids: Iterable[str]) -> np.ndarray:
    """`id_key` of every id, as uint64."""
    sha = hashlib.sha256
    digests = np.frombuffer(b"".join([sha(e).digest() for e in map(str.encode, ids)]), dtype=">u8")
    return digests[::4].astype(np.uint64)  # each digest is 4 big-endian words: its first


def array_keys(ids: pa.Array) -> np.ndarray:
    """`id_keys` of a string array read by `read_ids_file` (its offsets validated), in one compiled call
    that releases the GIL (`store.kernels.string_keys`): a shard's check hashes its ids while other threads
    check theirs."""
    from potstill.store import kernels  # (here: numba takes 0.2 s to import, which only checks need)

    if not len(ids):  # (an empty array may have no offsets buffer)
        return np.empty(0, dtype=np.uint64)
    offsets = np.frombuffer(ids.buffers()[1], dtype=np.int64 if pa.types.is_large_string(ids.type) else np.int32)
    data = ids.buffers()[2]
    return kernels.string_keys(np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8),
                           offsets[ids.offset:ids.offset + len(ids) + 1])


def key_fractions(keys: np.ndarray) -> np.ndarray:
    """Keys as numbers in [0, 1) (float64): exactly `id_key(id) / 2.0**64` of each id, rounding included
    (numpy's uint64 -> float64 conversion rounds to nearest like Python's int -> float; the scale is exact)."""
    return np.asarray(keys, dtype=np.uint64).astype(np.float64) * _TO_FRACTION


def ids_file_bytes(ids: list[str], keys: np.ndarray | None = None) -> pa.Buffer:
    """The bytes of a shard's ids file (keys computed here unless the writer has them)."""
    keys = id_keys(ids) if keys is None else keys
    batch = pa.record_batch([pa.array(ids, pa.string()), pa.array(keys, pa.uint64())], schema=IDS_SCHEMA)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, IDS_SCHEMA) as writer:
        writer.write_batch(batch)
    return sink.getvalue()


def read_ids_file(buffer: Any, where: str, records: int) -> pa.RecordBatch:
    """Parse an ids file (bytes or a memory-mapped buffer, zero-copy), refusing in one line naming it
    one that is not two full columns `id` string, `key` uint64 of `records` rows."""
    try:
        reader = pa.ipc.open_file(buffer)
        schema = reader.schema
        if schema.names != IDS_SCHEMA.names or not all(
            schema.field(f.name).type.equals(f.type) for f in IDS_SCHEMA
        ):
            got = ", ".join(f"{f.name} {f.type}" for f in schema)
            raise StoreError(f"{where}: ids file has columns {got}, expected id string, key uint64")
        batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        if len(batches) == 1:
            batch = batches[0]
        else:  # another tool may write several batches (or none)
            table = pa.Table.from_batches(batches, schema=schema)
            batch = pa.record_batch([table.column(0).combine_chunks(), table.column(1).combine_chunks()],
                                    schema=IDS_SCHEMA)
        batch.validate(full=True)  # offsets in bounds: an unchecked damaged file must not crash a reader
    except (pa.ArrowInvalid, OSError) as e:
        raise StoreError(f"{where}: unreadable ids file ({e})") from None
    if batch.num_rows != records:
        raise StoreError(f"{where}: holds {batch.num_rows} ids, its commit record says {records} records")
    if batch.column(0).null_count or batch.column(1).null_count:
        raise StoreError(f"{where}: ids file holds nulls")
    return batch


def ids_problem(ids_batch: pa.RecordBatch, record_ids: pa.Array) -> str | None:
    """What is wrong with a shard's ids file against its records' `id` column, in words, or None: the
    ids must be those of the records, row by row, and each key its id's key."""
    ids = ids_batch.column(0)
    if len(ids) != len(record_ids):
        return f"ids file holds {len(ids)} ids, records.arrow {len(record_ids)} records"
    if not ids.equals(record_ids if record_ids.type == pa.string() else record_ids.cast(pa.string())):
        row = int(np.flatnonzero(~np.asarray(ids.to_numpy(zero_copy_only=False) == record_ids.to_numpy(
            zero_copy_only=False)))[0])
        return f"ids file differs from the records' ids at row {row} ({ids[row].as_py()!r}, record {record_ids[row].as_py()!r})"
    keys = numpy_view(ids_batch.column(1))  # (pyarrow's to_numpy imports pandas: 0.2 s)
    bad = np.flatnonzero(keys != array_keys(ids))
    if len(bad):
        return f"ids file's key of id {ids[int(bad[0])].as_py()!r} (row {int(bad[0])}) is not its id's key"
    return None


def repeated(keys: np.ndarray, ids_at: Callable[[np.ndarray], pa.Array]) -> tuple[np.ndarray, np.ndarray]:
    """Positions of `keys` (listed in order of precedence) whose id an earlier position holds, ascending,
    and for each the first position holding it. Keys find the candidates; `ids_at(positions)` gives
    their ids, compared exactly, so a 64-bit key collision is never a repeat."""
    order = np.argsort(keys, kind="stable")  # equal keys keep their precedence
    ranked = keys[order]
    same = ranked[1:] == ranked[:-1]
    none = np.empty(0, dtype=np.int64)
    if not same.any():
        return none, none
    candidate = np.zeros(len(ranked), dtype=bool)
    candidate[1:] |= same
    candidate[:-1] |= same
    positions = np.sort(order[candidate])
    codes = ids_at(positions).dictionary_encode().indices.to_numpy()  # equal strings, equal codes
    by_id = np.lexsort((positions, codes))
    codes, positions = codes[by_id], positions[by_id]
    first = np.ones(len(codes), dtype=bool)
    first[1:] = codes[1:] != codes[:-1]
    first_at = np.maximum.accumulate(np.where(first, np.arange(len(codes)), 0))
    later = np.flatnonzero(~first)
    result = np.argsort(positions[later], kind="stable")
    return positions[later][result].astype(np.int64), positions[first_at[later]][result].astype(np.int64)


def contained(query_ids: list[str], query_keys: np.ndarray, index: IdIndex) -> np.ndarray:
    """Which of `query_ids` (whose keys are `query_keys`) the index holds: keys first (a sorted search),
    then each candidate's id compared exactly with the ids stored under its key."""
    order, ranked = index.by_key()
    asked_order = np.argsort(query_keys)  # sorted queries search far faster (memory order)
    lo, hi = np.empty(len(query_keys), dtype=np.int64), np.empty(len(query_keys), dtype=np.int64)
    lo[asked_order] = np.searchsorted(ranked, query_keys[asked_order], side="left")
    hi[asked_order] = np.searchsorted(ranked, query_keys[asked_order], side="right")
    mask = np.zeros(len(query_ids), dtype=bool)
    one = np.flatnonzero(hi - lo == 1)  # the usual case: one stored id under the key, compared in place
    if len(one):
        asked = pa.array([query_ids[i] for i in one.tolist()], pa.string())
        mask[one] = pc.equal(asked, index.ids_at(order[lo[one]])).to_numpy(zero_copy_only=False)
    many = np.flatnonzero(hi - lo > 1)  # a key stored more than once: repeated ids, or a collision
    if len(many):
        counts = (hi - lo)[many]
        starts = np.repeat(lo[many] - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
        behind = order[starts + np.arange(int(counts.sum()))]
        asked = pa.array([query_ids[i] for i in many.tolist()], pa.string())
        mask[many] = pc.is_in(asked, value_set=index.ids_at(behind)).to_numpy(zero_copy_only=False)
    return mask


@dataclass
class IdIndex:
    """Every record of a list of shards: its key, its shard (an index into `shards`) and its row, in
    the order of the shards, then rows. The ids themselves are read only when asked for (`ids`)."""

    shards: list[str]
    starts: np.ndarray  # int64 [len(shards) + 1]: where each shard's rows begin
    keys: np.ndarray  # uint64
    shard: np.ndarray  # int32
    row: np.ndarray  # int32
    read_ids: Callable[[str], pa.Array] = field(repr=False)
    _ids: pa.ChunkedArray | None = field(default=None, repr=False)
    _by_key: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    @classmethod
    def build(cls, shards: list[str], keys: list[np.ndarray], read_ids: Callable[[str], pa.Array]) -> IdIndex:
        counts = np.array([len(k) for k in keys], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        shard = np.repeat(np.arange(len(shards), dtype=np.int32), counts)
        row = (np.arange(starts[-1], dtype=np.int64) - starts[:-1][shard]).astype(np.int32)
        all_keys = np.concatenate(keys) if keys else np.empty(0, dtype=np.uint64)
        return cls(list(shards), starts, all_keys.astype(np.uint64, copy=False), shard, row, read_ids)

    def __len__(self) -> int:
        return len(self.keys)

    def by_key(self) -> tuple[np.ndarray, np.ndarray]:
        """(positions sorted by key, the keys in that order), computed once."""
        if self._by_key is None:
            order = np.argsort(self.keys, kind="stable")
            self._by_key = (order, self.keys[order])
        return self._by_key

    def ids(self) -> pa.ChunkedArray:
        """Every id, one chunk per shard (memory-mapped for a local store), read once."""
        if self._ids is None:
            self._ids = pa.chunked_array([self.read_ids(name) for name in self.shards], type=pa.string())
        return self._ids

    def ids_at(self, positions: np.ndarray) -> pa.Array:
        """The ids at these positions (reading only the shards they lie in, unless all ids are read)."""
        if not len(positions):
            return pa.array([], pa.string())
        if self._ids is not None:
            return self.ids().take(pa.array(positions, pa.int64())).combine_chunks()
        shards = self.shard[positions]
        order = np.argsort(shards, kind="stable")
        groups = np.split(order, np.flatnonzero(np.diff(shards[order])) + 1)
        pieces = [self.read_ids(self.shards[int(shards[g[0]])]).take(pa.array(self.row[positions[g]])) for g in groups]
        back = np.empty(len(positions), dtype=np.int64)
        back[order] = np.arange(len(positions))
        return pa.concat_arrays(pieces).take(pa.array(back))
