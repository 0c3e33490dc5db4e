"""Target encodings (docs/reference/store-format.md §4.2, §4.3): sampled targets, the packed codec and the
compact coding of sampled draws (§4.3.2).

- **Sampled targets**: per scored position, N draws with replacement from the teacher's
  distribution, kept as the distinct ids with their counts (`SampledTargets`, CSR layout).
- **Bit packing**: unsigned integers of `bits` bits each, concatenated least significant bit
  first into bytes (value i occupies stream bits [i·bits, (i+1)·bits); stream bit j is bit j mod 8
  of byte j // 8). `pack_bits` / `unpack_bits`, both vectorised numpy.
- **Log-prob quantisation** (`LogprobQuantizer`): uniform, `bits` bits, over [lo, 0]. Code 0 means
  −inf (an empty top-k slot); code c ≥ 1 means lo + (c − 1)·step with step = −lo / (2^bits − 2).
  A value in [lo, 0] reads back within step / 2 (plus float32 rounding); a value below lo reads
  back as lo, a value above 0 (rounding noise of a log-softmax) as 0.

- **Compact sampled coding** (`encode_sampled_compact` / `decode_sampled_compact`, §4.3.2): a
  position's entries split into head (count ≥ 2) and tail (count 1, no count stored), ids replaced
  by their place in the store's frequency order (`IdOrder`) and stored as Rice-coded gaps with a
  parameter per part and rank bucket, counts Elias-gamma-coded; each code split into a fixed-width
  stream and a unary stream so that decoding stays vectorised.

Nothing here knows about Arrow: `records.py` stores the byte strings these functions make.
"""

from __future__ import annotations

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
    `pack_bits` pads it) being data[offsets[r]:offsets[r + 1]].

    64 values of `bits` bits fill exactly `bits` 64-bit words, so each record's values are laid in
    rows of 64 (the last row padded with zeros) and every row is packed at once, one column of
    values at a time: three whole-array operations per column, over a cache-sized block of rows."""
    if not 1 <= bits <= MAX_BITS:
        raise StoreError(f"cannot pack {bits}-bit values (1..{MAX_BITS})")
    v = np.asarray(values).reshape(-1)
    if len(v) and int(v.max()) >> bits:
        raise StoreError(f"value {int(v.max())} does not fit in {bits} bits")
    counts = np.asarray(counts, dtype=np.int64)
    lengths = (counts * bits + 7) // 8
    offsets = _csr(lengths)
    rows = (counts + 63) // 64
    row_base = _csr(rows)
    exact = bool(np.all(counts % 64 == 0))
    if exact:
        grid = v.reshape(-1, 64)
    else:  # each record from a row of its own
        grid = np.zeros((int(row_base[-1]), 64), dtype=v.dtype)
        rec = np.repeat(np.arange(len(counts)), counts)
        grid.reshape(-1)[row_base[rec] * 64 + np.arange(len(v)) - _csr(counts)[rec]] = v
    packed = np.zeros((len(grid), bits), dtype="<u8")
    for lo in range(0, len(grid), PACK_BLOCK_ROWS):
        block = grid[lo : lo + PACK_BLOCK_ROWS].astype(np.uint64)
        out = packed[lo : lo + PACK_BLOCK_ROWS]
        for j in range(64):
            at = j * bits
            word, shift = at >> 6, at & 63
            out[:, word] |= block[:, j] << np.uint64(shift)
            if shift + bits > 64:
                out[:, word + 1] |= block[:, j] >> np.uint64(64 - shift)
    data = packed.view(np.uint8).reshape(-1)
    if exact and np.all(lengths == rows * 8 * bits):
        return data, offsets
    starts = row_base[:-1] * 8 * bits  # each record's first `lengths[r]` bytes of its rows
    owner = np.repeat(np.arange(len(counts)), lengths)
    return data[starts[owner] + np.arange(int(offsets[-1])) - offsets[:-1][owner]], offsets


PACK_BLOCK_ROWS = 1 << 11


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
def encode_sampled(t: SampledTargets, id_bits: int, count_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids stream, counts stream) of a record's sampled targets; positions are implicit (below)."""
    return pack_bits(t.ids, id_bits), pack_bits(t.counts, count_bits)


def decode_sampled(
    ids_data: np.ndarray, counts_data: np.ndarray, entries: int, positions: int, samples: int, id_bits: int,
    count_bits: int, where: str = "packed sampled targets",
) -> SampledTargets:
    """Inverse of `encode_sampled`. Position boundaries need no storage: counts are ≥ 1 and each
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
    """`encode_topk` of many records at once: [P, K] ids and log-probs of the records' positions end to end
    (record r's: `positions[r]` rows) -> (ids data, ids offsets, log-prob data, log-prob offsets). A few
    records at a time, so that the quantiser's float64 temporaries stay small."""
    positions = np.asarray(positions, dtype=np.int64)
    k = ids.shape[1] if ids.ndim == 2 else 0
    row = _csr(positions)
    ids_parts, lp_parts = [], []
    r0 = 0
    while r0 < len(positions):
        r1 = min(max(int(np.searchsorted(row, row[r0] + PACK_BLOCK_ROWS, side="right")) - 1, r0 + 1), len(positions))
        block_ids, block_lp = ids[row[r0] : row[r1]], logprobs[row[r0] : row[r1]]
        ids_parts.append(pack_bits_many(np.where(block_ids < 0, 0, block_ids), positions[r0:r1] * k, id_bits)[0])
        lp_parts.append(pack_bits_many(q.encode(np.asarray(block_lp, dtype=np.float32)), positions[r0:r1] * k, q.bits)[0])
        r0 = r1
    empty = np.zeros(0, dtype=np.uint8)
    return (np.concatenate(ids_parts) if ids_parts else empty, _csr((positions * k * id_bits + 7) // 8),
            np.concatenate(lp_parts) if lp_parts else empty, _csr((positions * k * q.bits + 7) // 8))


def encode_topk(ids: np.ndarray, logprobs: np.ndarray, id_bits: int, q: LogprobQuantizer) -> tuple[np.ndarray, np.ndarray]:
    """(ids stream, log-prob codes stream) of [S, K] top-k targets; an empty slot (id −1) stores id 0
    and log-prob code 0 (−inf), which is how it is recognised on reading."""
    lp = np.asarray(logprobs, dtype=np.float32)
    ids = np.where(np.asarray(ids) < 0, 0, ids)
    return pack_bits(ids, id_bits), pack_bits(q.encode(lp), q.bits)


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


def pack_varbits(values: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Value i in `widths[i]` bits (0..MAX_BITS, 0 stores nothing), concatenated least significant
    bit first into bytes, as `pack_bits` does with one width."""
    v = np.asarray(values).reshape(-1).astype(np.uint64)
    w = np.asarray(widths).reshape(-1).astype(np.int64)
    if len(v) == 0 or int(w.max(initial=0)) == 0:
        return np.zeros(0, dtype=np.uint8)
    top = int(w.max())
    planes = ((v[:, None] >> np.arange(top, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8)
    return np.packbits(planes[np.arange(top)[None, :] < w[:, None]], bitorder="little")


def pack_unary(values: np.ndarray) -> np.ndarray:
    """Each value q as q zero bits and a one, concatenated least significant bit first."""
    q = np.asarray(values, dtype=np.int64).reshape(-1)
    bits = np.zeros(int(q.sum()) + len(q), dtype=np.uint8)
    bits[np.cumsum(q + 1) - 1] = 1
    return np.packbits(bits, bitorder="little")


def _rice_k(gaps: np.ndarray) -> int:
    """The Rice parameter that codes `gaps` in the fewest bits: Σ (k + 1 + gap >> k), smallest k on ties."""
    if len(gaps) == 0:
        return 0
    g = gaps.astype(np.uint64)
    costs = [len(g) * (k + 1) + int((g >> np.uint64(k)).sum()) for k in range(int(g.max()).bit_length() + 1)]
    return int(np.argmin(costs))


def _gamma_stream(counts: np.ndarray) -> np.ndarray:
    """The counts in Elias gamma, split in two: L = bit_length(count) − 1 for every count in unary
    (padded to a whole byte), then each count's low L bits (`pack_varbits`)."""
    lengths = np.floor(np.log2(counts)).astype(np.int64) if len(counts) else np.zeros(0, dtype=np.int64)
    return np.concatenate([pack_unary(lengths), pack_varbits(counts - (1 << lengths), lengths)])


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


def _within(offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, j) of every entry of a CSR layout: its position and its index within the position."""
    offsets = np.asarray(offsets, dtype=np.int64)
    d = np.diff(offsets)
    row = np.repeat(np.arange(len(d)), d)
    return row, np.arange(int(offsets[-1])) - offsets[:-1][row]


def _rank_bucket(offsets: np.ndarray, buckets: int, within: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Each entry's bucket by its rank among its position's entries: min(B·j // d, B − 1) for the
    j-th smallest of d (`within`: `_within(offsets)`, when known). Gaps are small among the first
    places of an id order (a tokenizer's low ids, or the listed frequent tokens) and large above
    them, so each bucket gets its own Rice parameter."""
    row, j = within if within is not None else _within(offsets)
    return np.minimum(buckets * j // np.maximum(np.diff(offsets)[row], 1), buckets - 1)


def _gaps(offsets: np.ndarray, places: np.ndarray) -> np.ndarray:
    """Gaps of places that rise within each position: place − previous − 1 (the first: its place)."""
    first = np.zeros(len(places), dtype=bool)
    first[offsets[:-1][np.diff(offsets) > 0]] = True
    return places - np.where(first, -1, np.roll(places, 1)) - 1


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
    as gaps, with a Rice parameter per part and rank bucket (`_rank_bucket`).
    - counts stream: every position's head size h + 1, then the head counts − 1, each in Elias
      gamma (`_gamma_stream`). A position's tail size is N − the sum of its head counts.
    - ids stream: one byte B, B bytes (the head's parameters), B bytes (the tail's), the low bits
      of the head's gaps then the tail's (`pack_varbits`, padded to a whole byte), then their
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
    offsets), record r's streams being data[offsets[r]:offsets[r + 1]]. The same bytes, coded a few
    records at a time (`COMPACT2_BLOCK_ENTRIES` entries): whole-array numpy passes over a block that
    stays in the CPU's cache, ~2x faster than over a whole shard and than record by record."""
    ids_parts, counts_parts, ids_lens, counts_lens = [], [], [], []
    start = 0
    while start < len(targets):
        end, size = start, 0
        while end < len(targets) and (end == start or size + len(targets[end].ids) <= COMPACT2_BLOCK_ENTRIES):
            size += len(targets[end].ids)
            end += 1
        block = targets[start:end]
        ids = np.concatenate([t.ids for t in block])
        places = id_order.rank(ids) if id_order is not None else ids.astype(np.int64)
        ids_data, ids_off, counts_data, counts_off = encode_compact_many(block, places, buckets)
        ids_parts.append(ids_data)
        counts_parts.append(counts_data)
        ids_lens.append(np.diff(ids_off))
        counts_lens.append(np.diff(counts_off))
        start = end
    if not targets:
        return np.zeros(0, np.uint8), np.zeros(1, np.int64), np.zeros(0, np.uint8), np.zeros(1, np.int64)
    return (np.concatenate(ids_parts), _csr(np.concatenate(ids_lens)),
            np.concatenate(counts_parts), _csr(np.concatenate(counts_lens)))


COMPACT2_BLOCK_ENTRIES = 1 << 14


def encode_compact_many(targets: list[SampledTargets], places: np.ndarray, buckets: int = RANK_BUCKETS
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The compact streams (format §4.3.2, `encode_sampled_compact`) of many records, each entry's place
    given (`places`: the records' entries concatenated).

    Every record's entries are sorted at once by (record, part, position, place); each (record, part,
    rank bucket) gets its Rice parameter (`_rice_ks`); then every field's bit position in the output
    follows from running sums, and the fields are OR-ed into 64-bit words (`_scatter_bits`)."""
    n_rec = len(targets)
    positions = np.array([t.num_positions for t in targets], dtype=np.int64)
    pos_base = _csr(positions)
    n_pos = int(pos_base[-1])
    # entries per position: the records' offsets laid end to end, less the steps from one record to the next
    steps = np.diff(np.concatenate([np.asarray(t.offsets, dtype=np.int64) for t in targets]))
    per_pos = np.delete(steps, pos_base[1:-1] + np.arange(n_rec - 1))
    ent_base = _csr(np.array([len(t.ids) for t in targets], dtype=np.int64))
    n_ent = int(ent_base[-1])
    pos = np.repeat(np.arange(n_pos, dtype=np.int64), per_pos)
    rec_of_pos = np.repeat(np.arange(n_rec, dtype=np.int64), positions)
    counts = np.concatenate([t.counts for t in targets]).astype(np.int64)
    places = np.asarray(places, dtype=np.int64)
    part = (counts == 1).astype(np.int64)  # 0: head (count >= 2), 1: tail (count 1)

    # Sorted by (record, part, position, place) (positions are global, so the record is the position's):
    # one sort of the key with each entry's index in its low bits, faster than an argsort.
    rec = rec_of_pos[pos]
    span = int(places.max()) + 1 if n_ent else 1
    index_bits = max(n_ent - 1, 1).bit_length()
    if (2 * n_rec * max(n_pos, 1) * span) << index_bits < 1 << 63:
        key = (((rec * 2 + part) * n_pos + pos) * span + places) << index_bits
        key |= np.arange(n_ent, dtype=np.int64)
        order = np.sort(key) & ((1 << index_bits) - 1)
    else:
        order = np.lexsort((places, pos, part, rec))
    pos, part, places, counts, rec = pos[order], part[order], places[order], counts[order], rec[order]

    # gaps within each (part, position) group, and each entry's rank bucket in its group
    new = np.ones(n_ent, dtype=bool)
    np.not_equal(pos[1:], pos[:-1], out=new[1:])
    new[1:] |= part[1:] != part[:-1]
    starts = np.flatnonzero(new)
    prev = np.empty(n_ent, dtype=np.int64)
    prev[1:] = places[:-1]
    prev[starts] = -1
    gaps = places - prev - 1
    group = np.cumsum(new) - 1
    j = np.arange(n_ent, dtype=np.int64) - starts[group]
    size = np.diff(np.append(starts, n_ent))[group]
    rice_group = (rec * 2 + part) * buckets + np.minimum(buckets * j // size, buckets - 1)
    ks = _rice_ks(gaps, rice_group, n_rec * 2 * buckets)
    width = ks[rice_group]
    quotient = gaps >> width

    # ids stream of record r: 1 + 2B header bytes, the low bits (padded to a byte), the quotients in unary
    head_len = 1 + 2 * buckets
    var_bits, var_before = _runs(width, ent_base, rec)
    una_bits, una_before = _runs(quotient + 1, ent_base, rec)
    var_bytes = (var_bits + 7) // 8
    ids_off = _csr(head_len + var_bytes + (una_bits + 7) // 8)
    words = np.zeros(int(ids_off[-1]) // 8 + 2, dtype=np.uint64)
    var_at = 8 * (ids_off[:-1] + head_len)
    low = (gaps & ((np.int64(1) << width) - 1)).astype(np.uint64)
    _scatter_bits(words, var_at[rec] + var_before, low, width)
    una_at = 8 * (ids_off[:-1] + head_len + var_bytes)
    _scatter_bits(words, una_at[rec] + una_before + quotient, None, None)
    ids_data = _bytes_of(words, int(ids_off[-1]))
    header = np.empty((n_rec, head_len), dtype=np.uint8)
    header[:, 0] = buckets
    header[:, 1:] = ks.reshape(n_rec, 2 * buckets)  # (record, part, bucket): the head's B, then the tail's
    ids_data[(ids_off[:-1, None] + np.arange(head_len)).reshape(-1)] = header.reshape(-1)

    # counts stream of record r: gamma(h + 1) of each position, then gamma(count − 1) of each head entry
    head = part == 0
    values = [np.bincount(pos[head], minlength=n_pos) + 1, counts[head] - 1]
    owners = [rec_of_pos, rec[head]]
    bases = [pos_base, _csr(np.bincount(owners[1], minlength=n_rec))]
    fields = []
    for v, owner, base in zip(values, owners, bases, strict=True):
        length = np.floor(np.log2(v)).astype(np.int64) if len(v) else np.zeros(0, np.int64)
        fields.append((v, owner, length, *_runs(length + 1, base, owner), *_runs(length, base, owner)))
    region_bytes = [(bits + 7) // 8 for f in fields for bits in (f[3], f[5])]
    counts_off = _csr(sum(region_bytes))
    words = np.zeros(int(counts_off[-1]) // 8 + 2, dtype=np.uint64)
    at = 8 * counts_off[:-1]
    for i, (v, owner, length, _, una_before, _, var_before) in enumerate(fields):
        _scatter_bits(words, at[owner] + una_before + length, None, None)
        at = at + 8 * region_bytes[2 * i]
        _scatter_bits(words, at[owner] + var_before, (v - (np.int64(1) << length)).astype(np.uint64), length)
        at = at + 8 * region_bytes[2 * i + 1]
    return ids_data, ids_off, _bytes_of(words, int(counts_off[-1])), counts_off


def _rice_ks(gaps: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """`_rice_k` of every group of gaps at once: the k minimising C(k) = n·(k + 1) + Σ gap >> k, the
    smallest on ties. C is convex in k (C(k + 1) − C(k) = n − Σ ceil((gap >> k) / 2) never falls), so
    starting from log2 of the mean gap and stepping while a neighbour is no worse (left) or better
    (right) reaches it in a few whole-array passes."""
    n = np.bincount(group, minlength=n_groups).astype(np.float64)
    if len(gaps) and float(gaps.max()) * len(gaps) >= 2.0**53:  # float64 sums would round: one group at a time
        return np.array([_rice_k(gaps[group == g]) for g in range(n_groups)], dtype=np.int64)
    total = np.bincount(group, weights=gaps, minlength=n_groups)
    k = np.floor(np.log2(np.maximum(total / np.maximum(n, 1), 1))).astype(np.int64)  # the optimum ~95% of the time

    def cost(kk: np.ndarray, group: np.ndarray, gaps: np.ndarray) -> np.ndarray:
        return n * (kk + 1) + np.bincount(group, weights=gaps >> kk[group], minlength=n_groups)

    here = cost(k, group, gaps)
    active = np.ones(n_groups, dtype=bool)
    while True:  # each round over the entries of the groups that moved in the last one
        left = cost(np.maximum(k - 1, 0), group, gaps)
        go_left = active & (k > 0) & (left <= here)
        right = cost(k + 1, group, gaps)
        go_right = active & ~go_left & (right < here)
        active = go_left | go_right
        if not active.any():
            return k
        k = k - go_left + go_right
        here = np.where(go_left, left, np.where(go_right, right, here))
        keep = active[group]
        group, gaps = group[keep], gaps[keep]


def _runs(values: np.ndarray, base: np.ndarray, owner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Σ of `values` over each record's slice base[r]:base[r + 1], the running sum of `values` before
    each element within its record), `owner` being each element's record."""
    c = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum(values, out=c[1:])
    return c[base[1:]] - c[base[:-1]], c[:-1] - c[base[:-1]][owner]


def _scatter_bits(words: np.ndarray, at: np.ndarray, values: np.ndarray | None, widths: np.ndarray | None) -> None:
    """OR each value (< 2**width, width ≤ 32) into the little-endian bit stream `words` at bit `at`
    (values None: a single 1 bit, the end of a unary code). Fields do not overlap and `at` does not
    fall, so the values landing in one word are OR-reduced in one pass; a value crossing into the
    next word is the only one to spill into it."""
    if len(at) == 0:
        return
    word = at >> 6
    shift = (at & 63).astype(np.uint64)
    first = np.empty(len(word), dtype=bool)
    first[0] = True
    np.not_equal(word[1:], word[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    shifted = np.left_shift(np.uint64(1), shift) if values is None else values << shift
    words[word[starts]] |= np.bitwise_or.reduceat(shifted, starts)
    if values is None:
        return
    spill = (at & 63) + widths > 64
    if spill.any():
        words[word[spill] + 1] |= values[spill] >> (np.uint64(64) - shift[spill])


def _bytes_of(words: np.ndarray, size: int) -> np.ndarray:
    return words.astype("<u8", copy=False).view(np.uint8)[:size].copy()


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
