"""The numpy reference coders the compiled ones are tested against: the decoder of the compact codec
(format §4.3.2; the compiled one is `store.kernels.compact_sampled`, behind
`store.codec.decode_sampled_compact`), a different way to the same targets, vectorised over whole
streams, with the inverses of the packers; and the one-record encoders of the packed and compact
layouts (the writer codes a shard's records at once with `store.encode_kernels`)."""

from __future__ import annotations

import numpy as np

from potstill.store.codec import (
    MAX_RANK_BUCKETS,
    MAX_RICE_K,
    IdOrder,
    LogprobQuantizer,
    SampledTargets,
    _csr,
    pack_bits,
)
from potstill.store.errors import StoreError


def unpack_varbits(data: np.ndarray, widths: np.ndarray, where: str) -> np.ndarray:
    """Inverse of `pack_varbits` for the given widths, as uint64 (one unaligned 64-bit load per value)."""
    w = np.asarray(widths).reshape(-1).astype(np.int64)
    total = int(w.sum())
    need = (total + 7) // 8
    if len(data) < need:
        raise StoreError(f"{where}: a packed field holds {len(data)} bytes, its values need {need}")
    if len(w) == 0:
        return np.zeros(0, dtype=np.uint64)
    padded = np.zeros(need + 8, dtype=np.uint8)
    padded[:need] = data[:need]
    words = np.ndarray(shape=(need + 1,), dtype="<u8", buffer=padded, strides=(1,))
    start = np.zeros(len(w), dtype=np.int64)
    np.cumsum(w[:-1], out=start[1:])
    out = words[start >> 3]
    out >>= (start & 7).astype(np.uint64)
    out &= (np.uint64(1) << w.astype(np.uint64)) - np.uint64(1)
    return out


def unpack_unary(data: np.ndarray, count: int, where: str) -> tuple[np.ndarray, int]:
    """The first `count` unary values of `data`, and the bytes they take."""
    ones = np.flatnonzero(np.unpackbits(np.asarray(data, dtype=np.uint8), bitorder="little"))
    if len(ones) < count:
        raise StoreError(f"{where}: a unary stream ends after {len(ones)} of its {count} values")
    ends = ones[:count]
    q = np.diff(ends, prepend=-1) - 1
    return q, (int(ends[-1]) + 8) // 8 if count else 0


def _decode_gamma(data: np.ndarray, count: int, where: str) -> tuple[np.ndarray, int]:
    """`count` values ≥ 1 of a `_gamma_stream`, and the bytes it takes."""
    lengths, used = unpack_unary(data, count, where)
    if count and int(lengths.max()) > 16:
        raise StoreError(f"{where}: a count longer than 16 bits")
    values = (np.uint64(1) << lengths.astype(np.uint64)) + unpack_varbits(data[used:], lengths, where)
    return values.astype(np.int64), used + (int(lengths.sum()) + 7) // 8


def _ids_from_gaps(gaps: np.ndarray, offsets: np.ndarray, vocab: int, where: str, row: np.ndarray) -> np.ndarray:
    """The ids of entries whose gaps (id − previous − 1 within a position) are given in order, `row`
    their positions (positions may be empty)."""
    positions = len(offsets) - 1
    total = np.cumsum(gaps.astype(np.int64) + 1)
    starts = offsets[:-1]  # the running total before each position's first entry
    before = np.where(starts > 0, total[np.maximum(starts - 1, 0)], 0) if len(total) else np.zeros(positions, np.int64)
    ids = total - before[row] - 1
    if len(ids) and int(ids.max()) >= vocab:  # (every step is ≥ 1: ids rise within a position by construction)
        raise StoreError(f"{where}: an id is outside the vocabulary of {vocab} tokens")
    return ids


def reference_decode_compact(
    ids_data: np.ndarray, counts_data: np.ndarray, entries: int, positions: int, samples: int, vocab: int,
    where: str = "compact sampled targets", id_order: IdOrder | None = None,
) -> SampledTargets:
    """Inverse of `encode_sampled_compact` (given the same `id_order`), in the order `SampledTargets`
    promises. Refuses streams that do not decode to valid targets: counts of each position summing
    to N, `entries` entries, places in [0, vocab), distinct within a position."""
    h, used = _decode_gamma(counts_data, positions, where)
    h -= 1
    if positions and int(h.max()) > samples // 2:  # every head count is ≥ 2
        raise StoreError(f"{where}: a position's head holds more than N/2 = {samples // 2} ids")
    h_off = _csr(h)
    head_counts = _decode_gamma(counts_data[used:], int(h_off[-1]), where)[0] + 1
    h_row, h_j = _within(h_off)
    tails = samples - np.bincount(h_row, weights=head_counts, minlength=positions).astype(np.int64)
    if np.any(tails < 0) or int(h_off[-1] + tails.sum()) != entries:
        raise StoreError(f"{where}: counts do not split into {positions} positions of N={samples} draws "
                         f"in {entries} entries")
    t_off = _csr(tails)
    t_row, t_j = _within(t_off)
    if len(ids_data) < 1 or not 1 <= int(ids_data[0]) <= MAX_RANK_BUCKETS:
        raise StoreError(f"{where}: the ids stream does not start with a bucket count in [1, {MAX_RANK_BUCKETS}]")
    buckets = int(ids_data[0])
    if len(ids_data) < 1 + 2 * buckets:
        raise StoreError(f"{where}: the ids stream ends inside its {2 * buckets} Rice parameters")
    ks = ids_data[1 : 1 + 2 * buckets].astype(np.int64)
    if int(ks.max()) > MAX_RICE_K:
        raise StoreError(f"{where}: Rice parameter {int(ks.max())} is out of range")
    width = np.concatenate([ks[:buckets][_rank_bucket(h_off, buckets, (h_row, h_j))],
                            ks[buckets:][_rank_bucket(t_off, buckets, (t_row, t_j))]])
    low = unpack_varbits(ids_data[1 + 2 * buckets:], width, where)
    quotients, _ = unpack_unary(ids_data[1 + 2 * buckets + (int(width.sum()) + 7) // 8:], entries, where)
    gaps = (quotients.astype(np.uint64) << width.astype(np.uint64)) | low
    nh = int(h_off[-1])
    h_places = _ids_from_gaps(gaps[:nh], h_off, vocab, where, h_row)
    t_places = _ids_from_gaps(gaps[nh:], t_off, vocab, where, t_row)
    # Each part rises within a position; a place in both would be one id twice.
    t_keys = t_row * vocab + t_places
    h_keys = h_row * vocab + h_places
    at = np.minimum(np.searchsorted(t_keys, h_keys), max(len(t_keys) - 1, 0))
    if len(t_keys) and np.any(t_keys[at] == h_keys):
        raise StoreError(f"{where}: an id is both in a position's head and in its tail")
    h_ids = id_order.ids(h_places) if id_order is not None else h_places
    t_ids = id_order.ids(t_places) if id_order is not None else t_places
    if id_order is not None:  # places back to ids: ascending id order within each position again
        t_ids = t_ids[np.argsort(t_row * vocab + t_ids)]
    if positions * (samples + 1) * vocab < 1 << 62:  # one sort on a unique int64 key: (row, descending count, id)
        head_order = np.argsort(h_row * ((samples + 1) * vocab) + (samples - head_counts) * vocab + h_ids)
    else:
        head_order = np.lexsort((h_ids, samples - head_counts, h_row))
    # The order of §4.2 within each position: the head (descending count, then id), then the tail
    # (count 1, by id). `head_order` keeps the rows in place, so h_row still gives each one's position.
    offsets = _csr(h + tails)
    head_at = offsets[:-1][h_row] + h_j
    tail_at = offsets[:-1][t_row] + h[t_row] + t_j
    ids = np.empty(entries, dtype=np.int32)
    ids[head_at], ids[tail_at] = h_ids[head_order], t_ids
    counts = np.ones(entries, dtype=np.uint16)
    counts[head_at] = head_counts[head_order]
    return SampledTargets(offsets, ids, counts)


# -- the numpy one-record coders (the compiled coders of store.encode_kernels are checked against them)
def encode_sampled(t: SampledTargets, id_bits: int, count_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids stream, counts stream) of a record's sampled targets; positions are implicit (below)."""
    return pack_bits(t.ids, id_bits), pack_bits(t.counts, count_bits)


def encode_topk(ids: np.ndarray, logprobs: np.ndarray, id_bits: int, q: LogprobQuantizer) -> tuple[np.ndarray, np.ndarray]:
    """(ids stream, log-prob codes stream) of [S, K] top-k targets; an empty slot (id −1) stores id 0
    and log-prob code 0 (−inf), which is how it is recognised on reading."""
    lp = np.asarray(logprobs, dtype=np.float32)
    ids = np.where(np.asarray(ids) < 0, 0, ids)
    return pack_bits(ids, id_bits), pack_bits(q.encode(lp), q.bits)


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
