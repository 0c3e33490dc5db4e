"""The compact codec's check walk as it was when it read the unary codes through a bit buffer, entry
by entry, in stream order (store/kernels.py then): `bench/codec_speed.py --walk` times it side by
side with the current `store.kernels.compact_bad` on the same shard, and tests/test_kernels.py checks
that the current walk names the same fault for the same damage. A copy, so that both run in one
process."""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.cpython.unsafe.numbers import trailing_zeros
from numba.extending import intrinsic

_jit = numba.njit(cache=True, nogil=True)
_inline = numba.njit(cache=True, nogil=True, inline="always")

@intrinsic
def _word(typingctx, data, at):  # type: ignore[no-untyped-def]
    """The little-endian int64 at byte `at` of a uint8 array: one unaligned load (the caller keeps
    at + 8 within the array)."""

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        array = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = builder.bitcast(builder.gep(array.data, [args[1]]), ir.IntType(64).as_pointer())
        return builder.load(ptr, align=1)

    return types.int64(data, types.intp), codegen


@_inline
def _fill(data: np.ndarray, pos: int, end: int, acc: int, nb: int) -> tuple[int, int, int]:
    """The buffer topped up from data[pos:end] (bytes past `end` read as 0)."""
    if pos + 8 <= end:
        word = _word(data, pos)
        n = (56 - nb) >> 3  # whole bytes that fit below bit 56
        return pos + n, acc | ((word & ((np.int64(1) << (n << 3)) - 1)) << nb), nb + (n << 3)
    while nb <= 48:
        if pos < end:
            acc |= np.int64(data[pos]) << nb
        pos += 1
        nb += 8
    return pos, acc, nb


@_jit
def _bits_at(data: np.ndarray, bit: int, width: int, end: int) -> int:
    """The `width` (≤ 32) bits from stream bit `bit` on (bytes from `end` on read as 0): near a
    stream's end, where an 8-byte load would pass it."""
    value = np.int64(0)
    for k in range(width):
        at = (bit + k) >> 3
        if at < end:
            value |= np.int64((data[at] >> ((bit + k) & 7)) & 1) << k
    return value


@_jit
def _gamma(data: np.ndarray, start: int, end: int, count: int, out: np.ndarray) -> int:
    """`count` Elias-gamma values of a counts stream at byte `start` into out[:count]: the lengths in
    unary, byte-padded, then the low bits. The byte after them, or -1 where the stream cannot be
    one (too short, a length above 16). The lengths through a bit buffer, the low bits at a bit
    position, as the ids' Rice codes are read (`_compact_record`)."""
    pos, acc, nb = start, 0, 0
    total = 0
    for i in range(count):
        q = 0
        while acc == 0:  # (unary: zeros, then a one)
            q += nb
            if pos >= end:
                return -1
            pos, acc, nb = _fill(data, pos, end, 0, 0)
        zeros = trailing_zeros(acc)
        acc >>= zeros + 1
        nb -= zeros + 1
        q += zeros
        if q > 16:
            return -1
        out[i] = q
        total += q
    low = start + (((pos - start) * 8 - nb + 7) >> 3)  # the byte after the last length's one
    if low + ((total + 7) >> 3) > end:
        return -1
    bit = low * 8
    for i in range(count):
        length = out[i]
        if (bit >> 3) + 8 <= end:
            value = (_word(data, bit >> 3) >> (bit & 7)) & ((np.int64(1) << length) - 1)
        else:
            value = _bits_at(data, bit, length, end)
        out[i] = (np.int64(1) << length) + value
        bit += length
    return low + ((total + 7) >> 3)


@_jit
def _id_at(place: int, listed: np.ndarray, below: np.ndarray) -> int:
    """`IdOrder.ids` of one place: the listed ids first, then every other id in ascending order."""
    m = len(listed)
    if place < m:
        return listed[place]
    n = place - m
    return n + np.searchsorted(below, n, side="right")


@_jit
def _bucket_starts(buckets: int, table: np.ndarray) -> None:
    """table[d, b]: the first of d entries in rank bucket b, ceil(b·d / B) (entry j's bucket is
    min(B·j // d, B − 1)); table[d, B] = d. Looked up so that no entry costs a division."""
    for d in range(table.shape[0]):
        for b in range(buckets + 1):
            table[d, b] = (b * d + buckets - 1) // buckets


# -- compact sampled streams (format §4.3.2) ----------------------------------------------------------
# What `_compact_record` finds wrong with a record's streams (0: nothing); `store.codec` words each.
(COUNTS_SHORT, HEAD_TOO_BIG, NO_SPLIT, NO_BUCKETS, PARAMS_SHORT, PARAM_TOO_BIG, IDS_SHORT, OUTSIDE,
 TWICE) = range(1, 10)


@_jit
def _compact_record(ids_values: np.ndarray, i0: int, i1: int, counts_values: np.ndarray, c0: int, c1: int,
                    entries: int, positions: int, samples: int, vocab: int, listed: np.ndarray,
                    below: np.ndarray, by_place: bool, tv: int, h: np.ndarray, tails: np.ndarray,
                    hc: np.ndarray, hp: np.ndarray, tp: np.ndarray, table: np.ndarray, table_of: np.ndarray,
                    recip: np.ndarray, sums: np.ndarray) -> int:
    """What `decode_sampled_compact` finds wrong with one record's streams, OUTSIDE for an id ≥ tv too,
    or 0. Leaves the record decoded in the scratch: h, tails [positions] (head and tail sizes); hc,
    hp [entries] (head counts − 1, head places); tp [entries] (tail places); table
    [min(N, entries) + 1, 65]: `_bucket_starts` of the B in table_of[0]; recip [min(N, entries) + 1]:
    ceil(2^40 / d), so that entry j of d is in bucket min(B·j · recip[d] >> 40, B − 1) = min(B·j // d,
    B − 1) without a division (exact for B·j < 2^22, d < 2^17) nor a branch per bucket; sums
    [min(N, entries) + 1, 2]: the low bits of d head / tail entries."""
    # counts stream: head sizes h + 1, then the head counts − 1, both gamma-coded
    at = _gamma(counts_values, c0, c1, positions, h)
    if at < 0:
        return COUNTS_SHORT
    heads = 0
    for i in range(positions):
        h[i] -= 1
        if h[i] > samples // 2:  # every head count is ≥ 2
            return HEAD_TOO_BIG
        heads += h[i]
    if heads > entries:  # (before the scratch of `entries` head counts overflows)
        return NO_SPLIT
    if _gamma(counts_values, at, c1, heads, hc) < 0:
        return COUNTS_SHORT
    e = 0
    total = heads
    for i in range(positions):
        drawn = 0
        for _ in range(h[i]):
            drawn += hc[e] + 1
            e += 1
        tails[i] = samples - drawn
        if tails[i] < 0:
            return NO_SPLIT
        total += tails[i]
    if total != entries:
        return NO_SPLIT
    # ids stream: B, the 2B Rice parameters (head buckets, tail buckets), the gaps' low bits, their
    # quotients in unary; a gap's width is its rank bucket's parameter
    if i1 - i0 < 1:
        return NO_BUCKETS
    buckets = np.int64(ids_values[i0])
    if buckets < 1 or buckets > 64:
        return NO_BUCKETS
    if i1 - i0 < 1 + 2 * buckets:
        return PARAMS_SHORT
    ks = i0 + 1
    for b in range(2 * buckets):
        if ids_values[ks + b] > 31:
            return PARAM_TOO_BIG
    if table_of[0] != buckets:
        _bucket_starts(buckets, table)
        table_of[0] = buckets
    for part in range(2):  # the bits of d entries' low parts, for every d this record has
        for d in range(len(sums)):
            sums[d, part] = 0
            for b in range(buckets):
                sums[d, part] += np.int64(ids_values[ks + part * buckets + b]) * (table[d, b + 1] - table[d, b])
    width_sum = 0
    for i in range(positions):
        width_sum += sums[h[i], 0] + sums[tails[i], 1]
    low0 = ks + 2 * buckets
    q0 = low0 + ((width_sum + 7) >> 3)
    if q0 > i1:
        return IDS_SHORT
    bound = min(vocab, tv) if by_place else vocab  # (places from here on: below it, or the record is bad)
    # The low bits are read at a bit position, one 8-byte load each (its bits are in the load's first
    # 39: w ≤ 31 after a shift ≤ 7): no buffer to refill at unforeseeable times, and the loads wait
    # for nothing but the widths. The quotients (a few bits each) through a bit buffer: a load at a
    # position would put its latency between one quotient and the next.
    lbit = low0 * 8  # the next low bits
    qpos, qacc, qnb = q0, 0, 0  # the quotients
    tail_at = 0
    for part in range(2):  # the head entries of every position, then the tail entries
        head_end = 0
        kw = ks + part * buckets  # this part's Rice parameters
        for i in range(positions):
            d = h[i] if part == 0 else tails[i]
            head_at = head_end  # this position's head places: hp[head_at:head_end]
            head_end += h[i]
            place = np.int64(-1)
            c = recip[d]
            x = 0  # B·j
            for j in range(d):
                w = np.int64(ids_values[kw + min((x * c) >> 40, buckets - 1)])
                x += buckets
                if (lbit >> 3) + 8 <= i1:
                    low = (_word(ids_values, lbit >> 3) >> (lbit & 7)) & ((np.int64(1) << w) - 1)
                else:
                    low = _bits_at(ids_values, lbit, w, i1)
                lbit += w
                q = 0
                while qacc == 0:
                    q += qnb
                    if qpos >= i1:
                        return IDS_SHORT  # fewer quotients than entries
                    qpos, qacc, qnb = _fill(ids_values, qpos, i1, 0, 0)
                zeros = trailing_zeros(qacc)
                qacc >>= zeros + 1
                qnb -= zeros + 1
                place += (((q + zeros) << w) | low) + 1
                if place >= bound or (not by_place and _id_at(place, listed, below) >= tv):
                    return OUTSIDE
                if part == 0:
                    hp[head_at + j] = place
                else:  # both parts rise within a position: a merge finds a place in both
                    tp[tail_at] = place
                    tail_at += 1
                    while head_at < head_end and hp[head_at] < place:
                        head_at += 1
                    if head_at < head_end and hp[head_at] == place:
                        return TWICE
    return 0


@_jit
def compact_bad(ids_values: np.ndarray, ids_offsets: np.ndarray, counts_values: np.ndarray,
                counts_offsets: np.ndarray, entries: np.ndarray, positions: np.ndarray, samples: int, vocab: int,
                listed: np.ndarray, below: np.ndarray, by_place: bool, tv: int) -> np.ndarray:
    """[R] records of a shard whose compact streams `decode_sampled_compact` refuses or that hold an
    id ≥ tv (`listed` / `below`: the id order's arrays, empty for none; `by_place`: places below tv
    are the ids below tv, so the places alone say which are too large)."""
    records = len(positions)
    most = most_entries = 0
    for r in range(records):
        most = max(most, positions[r])
        most_entries = max(most_entries, entries[r])
    h, tails, hc, hp, tp, table, table_of, recip, sums = _compact_scratch(most, most_entries, samples)
    bad = np.zeros(records, dtype=np.bool_)
    for r in range(records):
        bad[r] = _compact_record(ids_values, ids_offsets[r], ids_offsets[r + 1], counts_values,
                                 counts_offsets[r], counts_offsets[r + 1], entries[r], positions[r], samples,
                                 vocab, listed, below, by_place, tv, h, tails, hc, hp, tp, table, table_of, recip, sums) != 0
    return bad


@_jit
def _compact_scratch(positions: int, entries: int, samples: int) -> tuple:
    """The scratch `_compact_record` needs for records of up to these positions and entries (a
    position's entries, head or tail, are at most N and at most the record's)."""
    entries = max(entries, 0)
    recip = np.zeros(min(samples, entries) + 1, dtype=np.int64)
    for d in range(1, len(recip)):
        recip[d] = ((np.int64(1) << 40) + d - 1) // d
    heads = min(positions * (samples // 2), entries) + 1
    return (np.empty(positions, dtype=np.int64), np.empty(positions, dtype=np.int64),
            np.empty(heads, dtype=np.int64), np.empty(heads, dtype=np.int64), np.empty(entries + 1, dtype=np.int64),
            np.empty((min(samples, entries) + 1, 65), dtype=np.int64), np.zeros(1, dtype=np.int64), recip,
            np.empty((len(recip), 2), dtype=np.int64))
