"""Target encodings (docs/reference/store-format.md §4.2, §4.3): sampled targets, the packed codec and the
compact coding of sampled draws (§4.3.2).

- **Sampled targets**: per scored position, N draws with replacement from the teacher's
  distribution, kept as the distinct ids with their counts (`SampledTargets`, CSR layout).
- **Bit packing**: unsigned integers of `bits` bits each, concatenated least significant bit
  first into bytes (value i occupies stream bits [i·bits, (i+1)·bits); stream bit j is bit j mod 8
  of byte j // 8). `pack_bits` / `unpack_bits`, vectorised numpy; a shard's records are packed at
  once by the compiled packer (`pack_bits_many`, `encode_topk_many`: `store.encode_kernels`).
- **Log-prob quantisation** (`LogprobQuantizer`): uniform, `bits` bits, over [lo, 0]. Code 0 means
  −inf (an empty top-k slot); code c ≥ 1 means lo + (c − 1)·step with step = −lo / (2^bits − 2).
  A value in [lo, 0] reads back within step / 2 (plus float32 rounding); a value below lo reads
  back as lo, a value above 0 (rounding noise of a log-softmax) as 0.

- **Compact sampled coding** (`encode_sampled_compact` / `decode_sampled_compact`, §4.3.2): a
  position's entries split into head (count ≥ 2) and tail (count 1, no count stored), ids replaced
  by their place in the store's frequency order (`IdOrder`) and stored as Rice-coded gaps with a
  parameter per part and rank bucket, counts Elias-gamma-coded; each code split into a fixed-width
  stream and a unary stream so that decoding stays vectorised. The writer codes a shard's records
  with the compiled coder (`encode_sampled_compact_many`, `store.encode_kernels`); the tests check
  it and the decoders against numpy one-record coders of their own (the reference).

Nothing here knows about Arrow: `records.py` stores the byte strings these functions make.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from potstill.store.errors import StoreError

MAX_BITS = 32  # a value plus its bit offset must fit the 64-bit window `unpack_bits` reads


def bits_for(max_value: int) -> int:
    """Bits that hold every integer in [0, max_value]: ceil(log2(max_value + 1)), at least 1."""
    return max(1, int(max_value).bit_length())


def packed_size(count: int, bits: int) -> int:
    """Bytes of `count` values of `bits` bits: ceil(count · bits / 8)."""
    return (count * bits + 7) // 8


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Non-negative integers < 2**bits as a little-endian bit stream (uint8 array)."""
    if not 1 <= bits <= MAX_BITS:
        raise StoreError(f"cannot pack {bits}-bit values (1..{MAX_BITS})")
    v = np.asarray(values).reshape(-1).astype(np.uint64)
    if len(v) and int(v.max()) >> bits:
        raise StoreError(f"value {int(v.max())} does not fit in {bits} bits")
    planes = ((v[:, None] >> np.arange(bits, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8)
    return np.packbits(planes.reshape(-1), bitorder="little")


def pack_bits_many(values: np.ndarray, counts: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """`pack_bits` of many records at once: `values` holds the records' values end to end, record r's
    `counts[r]` of them; returns (data, offsets), record r's stream (padded to a whole byte, as
    `pack_bits` pads it) being data[offsets[r]:offsets[r + 1]]."""
    return _pack_many(np.asarray(values).reshape(-1), counts, bits, 0)


def _pack_many(values: np.ndarray, counts: np.ndarray, bits: int, mode: int, q: LogprobQuantizer | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """`pack_bits_many` by the compiled packer (`store.encode_kernels.pack_fixed`) of values that it first
    maps (`mode`: as they are, top-k ids, or log-probs quantised by `q`)."""
    # (imported here: numba takes 0.2 s to import, which only writing needs)
    from potstill.store import encode_kernels as ek

    if not 1 <= bits <= MAX_BITS:
        raise StoreError(f"cannot pack {bits}-bit values (1..{MAX_BITS})")
    counts = np.asarray(counts, dtype=np.int64)
    offsets = _csr((counts * bits + 7) // 8)
    out = np.empty(int(offsets[-1]), dtype=np.uint8)
    table = np.zeros(0, np.int64)
    if mode == ek.LOGPROBS and values.dtype == np.float16:  # a float16's code from a table of all 65,536
        mode, values, table = ek.HALF_CODES, values.view(np.uint16), _half_codes(q)
    elif mode == ek.LOGPROBS:
        values = values.astype(np.float32, copy=False)
    lo, step = (float(q.lo), q.step) if q is not None else (0.0, 1.0)
    bad = ek.pack_fixed(np.ascontiguousarray(values), counts, bits, mode, lo, step, table, out, offsets)
    if bad >= 0:
        raise StoreError(f"value {values[bad]} does not fit in {bits} bits")
    return out, offsets


@functools.cache
def _half_codes(q: LogprobQuantizer) -> np.ndarray:
    with np.errstate(invalid="ignore"):  # (the NaN halves: code 0, as any NaN)
        return q.encode(np.arange(1 << 16, dtype=np.uint16).view(np.float16)).astype(np.int64)


def unpack_bits(data: np.ndarray, count: int, bits: int) -> np.ndarray:
    """The first `count` values of a bit stream made by `pack_bits`, as uint64.

    Each value is read with one unaligned 64-bit load at its byte offset, then shifted and masked:
    two gathers and three element-wise operations per value, no per-bit expansion.
    """
    if not 1 <= bits <= MAX_BITS:
        raise StoreError(f"cannot unpack {bits}-bit values (1..{MAX_BITS})")
    need = packed_size(count, bits)
    if len(data) < need:
        raise StoreError(f"packed field holds {len(data)} bytes, {count} values of {bits} bits need {need}")
    if count == 0:
        return np.zeros(0, dtype=np.uint64)
    padded = np.zeros(need + 8, dtype=np.uint8)  # room for the last value's 8-byte window
    padded[:need] = data[:need]
    words = np.ndarray(shape=(need + 1,), dtype="<u8", buffer=padded, strides=(1,))  # a word at every byte
    start = np.arange(count, dtype=np.int64) * bits
    out = words[start >> 3]
    out >>= (start & 7).astype(np.uint64)
    out &= np.uint64((1 << bits) - 1)
    return out


# The quantiser's step must be one float32 log-probs hold: finer than a float32 log-prob's own rounding
# (its spacing is 9.5e-7 at −8) every code decodes to the floor, and a floor beyond −1e6 nats is
# no probability float32 can tell from 0 anyway.
LOGPROB_STEP_MIN = 1e-6
LOGPROB_MIN_FLOOR = -1e6


def logprob_min_problem(bits: int, lo: float) -> str | None:
    """Why `lo` cannot be the floor of a `bits`-bit quantiser, in words naming the valid range, or None."""
    if not 2 <= bits <= 16:
        return None  # (the bits are checked on their own)
    high = -LOGPROB_STEP_MIN * ((1 << bits) - 2)
    if math.isfinite(lo) and LOGPROB_MIN_FLOOR <= lo <= high:
        return None
    return (f"log-prob minimum {lo:g} with {bits} bits gives a quantiser step of {-lo / ((1 << bits) - 2):.3g} nats, "
            f"which float32 log-probs cannot hold: it must lie in [{LOGPROB_MIN_FLOOR:g}, {high:.4g}]")


@dataclass(frozen=True)
class LogprobQuantizer:
    """Uniform `bits`-bit quantisation of log-probs over [lo, 0]; code 0 is −inf (module doc)."""

    bits: int
    lo: float

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 16:
            raise StoreError(f"log-prob bits must be between 2 and 16, got {self.bits!r}")
        if not (isinstance(self.lo, int | float) and math.isfinite(self.lo) and self.lo < 0):
            raise StoreError(f"log-prob clamp minimum must be a finite negative number, got {self.lo!r}")

    @property
    def step(self) -> float:
        return -self.lo / ((1 << self.bits) - 2)

    @property
    def max_error(self) -> float:
        """Largest |decoded − original| for an original in [lo, 0] (before float32 rounding)."""
        return self.step / 2

    def encode(self, logprobs: np.ndarray) -> np.ndarray:
        lp = np.asarray(logprobs, dtype=np.float64)
        codes = 1 + np.rint((np.clip(lp, self.lo, 0.0) - self.lo) / self.step)
        codes = np.where(np.isneginf(lp) | np.isnan(lp), 0, codes)
        return codes.astype(np.uint32)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        c = np.asarray(codes)
        values = (self.lo + (c.astype(np.float64) - 1) * self.step).astype(np.float32)
        values[c == 0] = -np.inf
        return values


# -- sampled targets ---------------------------------------------------------------------------------
@dataclass
class SampledTargets:
    """N teacher draws per scored position, as distinct ids with counts, in CSR layout.

    Position j's entries are `ids[offsets[j]:offsets[j + 1]]` with `counts[...]` (each ≥ 1, summing
    to N), ordered by descending count, then ascending id. `counts / N` is an unbiased estimate of
    the teacher's distribution at that position.
    """

    offsets: np.ndarray  # [S + 1] int64
    ids: np.ndarray  # [E] int32
    counts: np.ndarray  # [E] uint16

    @property
    def num_positions(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_entries(self) -> int:
        return int(self.offsets[-1] - self.offsets[0]) if len(self.offsets) else 0

    def position(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = int(self.offsets[j]), int(self.offsets[j + 1])
        return self.ids[a:b], self.counts[a:b]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def padded(self, rows: np.ndarray | None = None, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """([R, U] int64 ids padded with −1, [R, U] int64 counts padded with 0) for positions `rows`
        (default: all), U = `width` or the most entries any of them has."""
        rows = np.arange(self.num_positions) if rows is None else np.asarray(rows, dtype=np.int64)
        starts = self.offsets[rows] - self.offsets[0]
        lengths = self.offsets[rows + 1] - self.offsets[rows]
        u = int(lengths.max(initial=0)) if width is None else width
        ids = np.full((len(rows), u), -1, dtype=np.int64)
        counts = np.zeros((len(rows), u), dtype=np.int64)
        col = np.arange(u)
        take = col[None, :] < lengths[:, None]
        src = (starts[:, None] + col[None, :])[take]
        ids[take] = self.ids[src]
        counts[take] = self.counts[src]
        return ids, counts


def sampled_from_draws(draws: np.ndarray) -> SampledTargets:
    """[S, N] draws (token ids) → distinct ids with counts per row, ordered as `SampledTargets` says."""
    draws = np.asarray(draws)
    s, n = draws.shape
    if s == 0 or n == 0:
        return SampledTargets(np.zeros(s + 1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.uint16))
    srt = np.sort(draws, axis=1)
    first = np.ones((s, n), dtype=bool)
    first[:, 1:] = srt[:, 1:] != srt[:, :-1]
    starts = np.flatnonzero(first.reshape(-1))
    ids = srt.reshape(-1)[starts]
    counts = np.diff(np.append(starts, s * n))
    per_row = first.sum(axis=1)
    row = np.repeat(np.arange(s), per_row)
    order = np.lexsort((ids, -counts, row))
    offsets = np.concatenate([[0], np.cumsum(per_row)]).astype(np.int64)
    return SampledTargets(offsets, ids[order].astype(np.int32), counts[order].astype(np.uint16))


def check_sampled(t: SampledTargets, positions: int, samples: int, vocab: int, where: str) -> None:
    """Refuse sampled targets that break the format's rules (counts ≥ 1 summing to N, ids in range)."""
    if len(t.offsets) != positions + 1 or (positions and (t.offsets[0] != 0 or np.any(np.diff(t.offsets) < 1))):
        raise StoreError(f"{where}: sampled targets must have 1 or more entries for each of {positions} scored positions")
    e = int(t.offsets[-1]) if len(t.offsets) else 0
    if len(t.ids) != e or len(t.counts) != e:
        raise StoreError(f"{where}: sampled offsets say {e} entries but there are {len(t.ids)} ids and {len(t.counts)} counts")
    if e and (int(t.counts.min()) < 1 or int(t.ids.min()) < 0 or int(t.ids.max()) >= vocab):
        raise StoreError(f"{where}: sampled counts must be ≥ 1 and ids in [0, {vocab})")
    sums = np.add.reduceat(t.counts.astype(np.int64), t.offsets[:-1]) if positions else np.zeros(0)
    if np.any(sums != samples):
        bad = int(np.flatnonzero(sums != samples)[0])
        raise StoreError(f"{where}: sampled counts of scored position {bad} sum to {int(sums[bad])}, not N={samples}")


# -- packed layouts ----------------------------------------------------------------------------------
def decode_sampled(
    ids_data: np.ndarray, counts_data: np.ndarray, entries: int, positions: int, samples: int, id_bits: int,
    count_bits: int, where: str = "packed sampled targets",
) -> SampledTargets:
    """Inverse of the packing (`pack_bits`) of ids and counts. Position boundaries need no storage: counts are ≥ 1 and each
    position's sum to N, so the running sum of counts equals a multiple of N exactly at the last
    entry of every position."""
    ids = unpack_bits(ids_data, entries, id_bits).astype(np.int32)
    counts = unpack_bits(counts_data, entries, count_bits)
    if entries and int(counts.min()) < 1:
        raise StoreError(f"{where}: a count is 0 (every stored count is at least 1)")
    return SampledTargets(_split_positions(counts, entries, positions, samples, where), ids, counts.astype(np.uint16))


def _split_positions(counts: np.ndarray, entries: int, positions: int, samples: int, where: str) -> np.ndarray:
    """The offsets of the positions of entries whose counts (≥ 1) are given in order: the running sum
    of counts is a multiple of N exactly at each position's last entry. Refuses counts that do not
    split into `positions` positions of N draws."""
    running = np.cumsum(counts.astype(np.uint64))
    ends = np.flatnonzero(running % np.uint64(samples) == 0) + 1
    if (len(ends) != positions or (entries and (not len(ends) or ends[-1] != entries))
            or not np.array_equal(running[ends - 1], np.arange(1, positions + 1, dtype=np.uint64) * np.uint64(samples))):
        raise StoreError(f"{where}: counts do not split into {positions} positions of N={samples} draws")
    offsets = np.zeros(positions + 1, dtype=np.int64)
    offsets[1:] = ends
    return offsets


def encode_topk_many(ids: np.ndarray, logprobs: np.ndarray, positions: np.ndarray, id_bits: int, q: LogprobQuantizer
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The packed top-k streams of many records at once: [P, K] ids and log-probs (float16 or float32)
    of the records' positions end to end (record r's: `positions[r]` rows) -> (ids data, ids offsets, log-prob data,
    log-prob offsets)."""
    from potstill.store import encode_kernels as ek

    k = ids.shape[1] if ids.ndim == 2 else 0
    values = np.asarray(positions, dtype=np.int64) * k
    return (*_pack_many(ids.reshape(-1), values, id_bits, ek.IDS),
            *_pack_many(np.asarray(logprobs).reshape(-1), values, q.bits, ek.LOGPROBS, q))


def encode_logprobs_many(logprobs: np.ndarray, counts: np.ndarray, q: LogprobQuantizer) -> tuple[np.ndarray, np.ndarray]:
    """`pack_bits_many` of log-probs' codes (`LogprobQuantizer.encode`), quantised as they are packed."""
    from potstill.store import encode_kernels as ek

    return _pack_many(np.asarray(logprobs).reshape(-1), counts, q.bits, ek.LOGPROBS, q)


def decode_topk(
    ids_data: np.ndarray, lp_data: np.ndarray, positions: int, k: int, id_bits: int, q: LogprobQuantizer
) -> tuple[np.ndarray, np.ndarray]:
    """([S, K] int32 ids, [S, K] float32 log-probs) from the packed streams; empty slots read as id −1."""
    n = positions * k
    codes = unpack_bits(lp_data, n, q.bits).reshape(positions, k)
    ids = unpack_bits(ids_data, n, id_bits).astype(np.int32).reshape(positions, k)
    ids[codes == 0] = -1
    return ids, q.decode(codes)


# -- compact sampled coding (§4.3.2) ------------------------------------------------------------------
# Sampled ids are few and scattered over a large vocabulary: sorted within a position, the gaps
# between them are small numbers, and most counts are 1. The compact codec stores the gaps Rice-coded
# and the counts Elias-gamma-coded, each split into a fixed-width stream and a unary stream so that
# encoding stays vectorised (no per-entry bit loop); the decoder is compiled (`store.kernels`).
MAX_RICE_K = 31


RANK_BUCKETS = 8  # compact: Rice parameters per record, one for each eighth of a position's ids
MAX_RANK_BUCKETS = 64
MAX_ID_ORDER = 4096  # compact: at most this many ids are listed in a store's id order


class IdOrder:
    """A store's id order (compact codec, format §4.3.2): the listed ids first, in the order given (the
    writer lists the teacher's most frequent tokens first), then every other id in ascending order.
    `rank` maps ids to their place in that order and `ids` maps places back, both vectorised: by
    binary search over the listed ids, or, given a `vocab` of at most `TABLE_VOCAB` ids, by two
    lookup tables (~8 bytes per id, several times faster)."""

    TABLE_VOCAB = 1 << 22

    def __init__(self, listed: list[int] | np.ndarray, vocab: int | None = None) -> None:
        self.listed = np.asarray(listed, dtype=np.int64).reshape(-1)
        by_id = np.argsort(self.listed, kind="stable")
        self.sorted = self.listed[by_id]
        self.place_of_sorted = by_id  # place in the order of the listed id self.sorted[i]
        # unlisted ids below self.sorted[i]: the n-th unlisted id is n + #{i : below[i] <= n}
        self.below = self.sorted - np.arange(len(self.sorted))
        self.id_at = self.place_of = None
        if vocab is not None and vocab <= self.TABLE_VOCAB and (len(self.listed) == 0 or self.sorted[-1] < vocab):
            self.id_at = self._ids_by_search(np.arange(vocab))
            self.place_of = np.empty(vocab, dtype=np.int64)
            self.place_of[self.id_at] = np.arange(vocab)

    @staticmethod
    def from_tokens(token_arrays: list[np.ndarray], limit: int = MAX_ID_ORDER) -> list[int]:
        """The ids to list for text like `token_arrays`: the `limit` most frequent of the tokens that
        occur, most frequent first (ties: lower id first). A teacher's draws follow its text's token
        frequencies, so these are the ids its draws hold most often."""
        tokens = np.concatenate([np.asarray(a, dtype=np.int64).reshape(-1) for a in token_arrays] or [np.zeros(0, np.int64)])
        if len(tokens) == 0:
            return []
        freq = np.bincount(tokens)
        seen = np.flatnonzero(freq)
        return seen[np.argsort(-freq[seen], kind="stable")][:limit].tolist()

    def rank(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if self.place_of is not None:
            return self.place_of[ids]
        m = len(self.sorted)
        if m == 0:
            return ids
        pos = np.searchsorted(self.sorted, ids)
        hit = self.sorted[np.minimum(pos, m - 1)] == ids
        return np.where(hit, self.place_of_sorted[np.minimum(pos, m - 1)], m + ids - pos)

    def ids(self, ranks: np.ndarray) -> np.ndarray:
        ranks = np.asarray(ranks, dtype=np.int64)
        if self.id_at is not None:
            return self.id_at[ranks]
        return self._ids_by_search(ranks)

    def _ids_by_search(self, ranks: np.ndarray) -> np.ndarray:
        m = len(self.sorted)
        if m == 0:
            return ranks
        n = np.maximum(ranks - m, 0)
        return np.where(ranks < m, self.listed[np.minimum(ranks, m - 1)], n + np.searchsorted(self.below, n, side="right"))


def _csr(lengths: np.ndarray) -> np.ndarray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def encode_sampled_compact(t: SampledTargets, id_order: IdOrder | None = None,
                            buckets: int = RANK_BUCKETS) -> tuple[np.ndarray, np.ndarray]:
    """(ids stream, counts stream) of a record's sampled targets in the compact coding (format §4.3.2).

    Each position's entries are split into its **head** (count ≥ 2) and its **tail** (count 1:
    most entries, whose counts then cost nothing), and ids are replaced by their place in the
    store's `id_order` (identity without one). Each part is kept in ascending place order and coded
    as gaps, with a Rice parameter per part and rank bucket (min(B·j // d, B − 1) for the j-th smallest of a part's d).
    - counts stream: every position's head size h + 1, then the head counts − 1, each in Elias
      gamma (each split into lengths in unary, byte-padded, then low bits). A position's tail size is N − the sum of its head counts.
    - ids stream: one byte B, B bytes (the head's parameters), B bytes (the tail's), the low bits
      of the head's gaps then the tail's (least significant bit first, padded to a whole byte), then their
      quotients in unary, in the same order.
    """
    places = id_order.rank(t.ids) if id_order is not None else t.ids.astype(np.int64)
    return encode_compact_places(t, places, buckets)


def encode_compact_places(t: SampledTargets, places: np.ndarray, buckets: int = RANK_BUCKETS
                           ) -> tuple[np.ndarray, np.ndarray]:
    """`encode_sampled_compact`'s streams with each entry's place given (distinct within a position):
    the coding proper, apart from the id order (benches measure other orders with it)."""
    ids_data, _, counts_data, _ = encode_compact_many([t], np.asarray(places, dtype=np.int64), buckets)
    return ids_data, counts_data


def encode_sampled_compact_many(targets: list[SampledTargets], id_order: IdOrder | None = None,
                                 buckets: int = RANK_BUCKETS) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`encode_sampled_compact` of many records at once: (ids data, ids offsets, counts data, counts
    offsets), record r's streams being data[offsets[r]:offsets[r + 1]]."""
    ids = np.concatenate([t.ids for t in targets]) if targets else np.zeros(0, np.int64)
    if id_order is not None and id_order.place_of is not None:  # the coder looks the places up itself
        return _compact_many(targets, ids, id_order.place_of, buckets)
    return encode_compact_many(targets, id_order.rank(ids) if id_order is not None else ids, buckets)


def encode_compact_many(targets: list[SampledTargets], places: np.ndarray, buckets: int = RANK_BUCKETS
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The compact streams (format §4.3.2, `encode_sampled_compact`) of many records, each entry's place
    given (`places`: the records' entries concatenated)."""
    return _compact_many(targets, np.asarray(places), np.zeros(0, np.int64), buckets)


def _compact_many(targets: list[SampledTargets], ids: np.ndarray, table: np.ndarray, buckets: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The compiled compact coder (`store.encode_kernels.compact_encode`) of records whose entries' places
    are table[ids] (ids themselves where the table is empty)."""
    from potstill.store import encode_kernels  # (here: numba takes 0.2 s to import, which only writing needs)

    rec_pos = _csr(np.array([t.num_positions for t in targets], dtype=np.int64))
    pos_off = _csr(np.concatenate([np.diff(t.offsets) for t in targets]) if targets else np.zeros(0, np.int64))
    counts = np.concatenate([t.counts for t in targets]) if targets else np.zeros(0, np.uint16)
    ids_off = np.zeros(len(targets) + 1, dtype=np.int64)
    counts_off = np.zeros(len(targets) + 1, dtype=np.int64)
    ids_data, counts_data = encode_kernels.compact_encode(
        pos_off, rec_pos, np.ascontiguousarray(ids), table, counts, buckets, ids_off, counts_off)
    return ids_data, ids_off, counts_data, counts_off


def decode_sampled_compact(
    ids_data: np.ndarray, counts_data: np.ndarray, entries: int, positions: int, samples: int, vocab: int,
    where: str = "compact sampled targets", id_order: IdOrder | None = None,
) -> SampledTargets:
    """Inverse of `encode_sampled_compact` (given the same `id_order`), in the order `SampledTargets`
    promises. Refuses streams that do not decode to valid targets: counts of each position summing
    to N, `entries` entries, places in [0, vocab), distinct within a position."""
    from potstill.store import kernels  # (here: numba takes 0.2 s to import)

    wrong, offsets, ids, counts = kernels.compact_sampled(_bytes(ids_data), _bytes(counts_data), entries, positions,
                                                          samples, vocab, *compact_order(id_order, vocab))
    if wrong:
        raise StoreError(f"{where}: {compact_problem(wrong, entries, positions, samples, vocab)}")
    return SampledTargets(offsets, ids, counts)


def _bytes(data: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(data, dtype=np.uint8)


def compact_order(id_order: IdOrder | None, vocab: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The id order as the compiled compact decoders take it: (listed, below, id_at), id_at its table of
    every place below `vocab` or empty (search listed / below); all empty without an order."""
    if id_order is None:
        return _NONE, _NONE, _NONE
    table = id_order.id_at if id_order.id_at is not None and len(id_order.id_at) >= vocab else _NONE
    return id_order.listed, id_order.below, table


_NONE = np.zeros(0, dtype=np.int64)


def compact_problem(wrong: int, entries: int, positions: int, samples: int, vocab: int) -> str:
    """What a compiled compact decoder's code `wrong` (`store.kernels`) says is wrong with a record."""
    from potstill.store import kernels

    return {
        kernels.COUNTS_SHORT: "the counts stream ends early or holds a count longer than 16 bits",
        kernels.HEAD_TOO_BIG: f"a position's head holds more than N/2 = {samples // 2} ids",
        kernels.NO_SPLIT: f"counts do not split into {positions} positions of N={samples} draws in {entries} entries",
        kernels.NO_BUCKETS: f"the ids stream does not start with a bucket count in [1, {MAX_RANK_BUCKETS}]",
        kernels.PARAMS_SHORT: "the ids stream ends inside its Rice parameters",
        kernels.PARAM_TOO_BIG: f"a Rice parameter is above {MAX_RICE_K}",
        kernels.IDS_SHORT: f"the ids stream ends before its {entries} ids",
        kernels.OUTSIDE: f"an id is outside the vocabulary of {vocab} tokens",
        kernels.TWICE: "an id is both in a position's head and in its tail",
    }[wrong]


# -- whole shards at once (verify, checked reads) -----------------------------------------------------
# A shard's records keep one byte string per record and field, each byte-aligned, so value i of record
# r sits at a bit offset computable from the column's offsets: one gather decodes every record.
def _windows(values: np.ndarray) -> np.ndarray:
    """A little-endian 64-bit word at every byte of `values` (zero past its end)."""
    padded = np.zeros(len(values) + 8, dtype=np.uint8)
    padded[: len(values)] = values
    return np.ndarray(shape=(len(values) + 1,), dtype="<u8", buffer=padded, strides=(1,))


def _segments(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(segment, index within it) of every item of segments holding `counts` items each."""
    counts = np.asarray(counts, dtype=np.int64)
    seg = np.repeat(np.arange(len(counts)), counts)
    return seg, np.arange(len(seg)) - (np.cumsum(counts) - counts)[seg]


def _read_bits(words: np.ndarray, bit: np.ndarray, width: np.ndarray | int) -> np.ndarray:
    """Values of `width` bits (≤ 32) starting at stream bit `bit` of `_windows`' bytes, as int64."""
    out = words[np.minimum(bit >> 3, len(words) - 1)]
    out >>= (bit & 7).astype(np.uint64)
    out &= (np.uint64(1) << np.asarray(width, dtype=np.uint64)) - np.uint64(1)
    return out.view(np.int64)  # (values of at most 32 bits: the same numbers)


def unpack_bits_shard(values: np.ndarray, offsets: np.ndarray, counts: np.ndarray, bits: int) -> np.ndarray:
    """`unpack_bits` of every record at once: record r's first `counts[r]` values of `bits` bits from
    its bytes `values[offsets[r]:offsets[r + 1]]` (which the caller has checked are long enough), flat."""
    if not 1 <= bits <= MAX_BITS:
        raise StoreError(f"cannot unpack {bits}-bit values (1..{MAX_BITS})")
    counts = np.asarray(counts, dtype=np.int64)
    offsets = np.asarray(offsets, dtype=np.int64)
    values, offsets = values[offsets[0] : offsets[-1]], offsets - offsets[0]  # (the records' bytes alone)
    if np.array_equal(offsets, _csr(counts * bits // 8)) and not np.any(counts * bits % 8):
        # no record's stream ends inside a byte (top-K rows of K = 8m values, say): one stream
        return _read_bits(_windows(values), np.arange(int(counts.sum()), dtype=np.int64) * bits, bits)
    seg, i = _segments(counts)
    return _read_bits(_windows(values), offsets[seg] * 8 + i * bits, bits)
