"""Compiled shard checks, the compact codec's decoder and the record ids' keys (numba): one pass over
a shard's bytes per check, where the numpy versions make a dozen or more passes over every entry.
Each check returns exactly the mask of the numpy check it replaces, the decoder the numpy
reference's targets and the keys hashlib's (tests/test_kernels.py compares them); the first record
at fault is still named by the per-record decoders, so the messages are theirs.

The kernels take flat numpy arrays and plain numbers only. `cache=True` keeps their machine code in
__pycache__, so a process compiles each signature once per installation, not once per run.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

MASS_BOUND = 1 + 1e-4  # store.columns: 1 + MASS_SLACK
LOGPROB_SLACK32 = np.float32(1e-3)  # store.columns.LOGPROB_SLACK, compared in float32 as numpy does

# top-k row flags (`topk_plain_flags`, `topk_half_flags`)
UNSOUND, REPEATED, RISING, TOO_MUCH = 1, 2, 4, 8

_jit = numba.njit(cache=True, nogil=True)
_u = np.uint64  # an index known to be ≥ 0: numba adds no wrap-around of negative ones (3 instructions)
_inline = numba.njit(cache=True, nogil=True, inline="always")  # (numba inlines no jitted function it is not told to)


# -- bit reading ------------------------------------------------------------------------------------
# Fixed-width values (packed top-k) are read through a bit buffer (acc: its next nb bits, least
# significant first; pos: the next byte to load), topped up to more than 48 bits, so the buffer never
# reaches the sign bit of an int64 and a value of up to 32 bits is there after one top-up. A top-up
# is one unaligned 8-byte load (`_word`) away from the stream's end, byte by byte near it. The reads
# are written out where they are used, or inlined (`_inline`): numba calls a jitted helper, counting
# every array passed to it, which per value costs more than the value. Variable-width codes (the
# compact codec) are read at a bit position each, their unary parts a byte at a time (`_unary`).
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


def _unary_table() -> np.ndarray:
    """Per byte value: the unary values its ones end (0..7: the zeros before each one, the first's
    counted from the byte's start), [8] how many, [9] the zeros after the last one (8 for no one),
    [10] −1 for no one (the zeros before carry on) else 0, [11..18] the bits of the ones."""
    table = np.zeros((256, 19), dtype=np.int64)
    for b in range(256):
        ones = [k for k in range(8) if b >> k & 1]
        before = -1
        for i, one in enumerate(ones):
            table[b, i], before = one - before - 1, one
            table[b, 11 + i] = one
        table[b, 8], table[b, 9], table[b, 10] = len(ones), 7 - before, -1 if not ones else 0
    return table


_UNARY = _unary_table()


@_inline
def _unary(data: np.ndarray, start: int, end: int, count: int, out: np.ndarray) -> tuple[int, int]:
    """Up to `count` unary values (zeros, then a one) of data[start:end] into out, which has room for
    7 more: (how many there were, the stream bit after the last one read). A byte at a time, by
    `_UNARY`: its values written whole (those past its ones are written over by the next byte's),
    the zeros after its last one carried to the next."""
    if count <= 0:
        return 0, 0
    n = 0
    zeros = np.int64(0)  # since the last one
    table = _UNARY
    for pos in range(start, end):
        row = table[_u(data[pos])]
        out[_u(n)] = zeros + row[0]
        for k in range(1, 8):
            out[_u(n + k)] = row[k]
        zeros = (zeros & row[10]) + row[9]
        n += row[8]
        if n >= count:
            return count, ((pos - start) << 3) + row[11 + count - (n - row[8]) - 1] + 1
    return n, ((end - start) << 3) - zeros


@_jit
def _gamma(data: np.ndarray, start: int, end: int, count: int, out: np.ndarray, sums: np.ndarray) -> int:
    """`count` Elias-gamma values of a counts stream at byte `start` into out[:count]: the lengths in
    unary, byte-padded, then the low bits. The byte after them, or -1 where the stream cannot be
    one (too short, a length above 16). The lengths a byte at a time (`_unary`), the low bits at a
    bit position, as the ids' Rice codes are read (`_compact_record`). sums (empty for none): sums[i]
    the values before out[i]."""
    n, after = _unary(data, start, end, count, out)
    if n < count:
        return -1
    low = start + ((after + 7) >> 3)  # the byte after the last length's one
    stop = low + ((after - count + 7) >> 3)  # (the lengths' sum: the bits before the last one's end, less the ones)
    if stop > end:
        return -1
    bit = low * 8
    loads = stop + 8 <= len(data)  # (every 8-byte load within the array: a loop without the end's test)
    running = len(sums) > 0
    total = 0
    for i in range(count):
        length = out[_u(i)]
        if length > 16:
            return -1
        if loads or (bit >> 3) + 8 <= end:
            value = (_word(data, bit >> 3) >> (bit & 7)) & ((np.int64(1) << length) - 1)
        else:
            value = _bits_at(data, bit, length, end)
        out[_u(i)] = (np.int64(1) << length) + value
        bit += length
        if running:
            sums[_u(i)] = total
            total += out[_u(i)]
    return stop


@_jit
def _id_at(place: int, listed: np.ndarray, below: np.ndarray) -> int:
    """`IdOrder.ids` of one place: the listed ids first, then every other id in ascending order."""
    m = len(listed)
    if place < m:
        return listed[place]
    n = place - m
    return n + np.searchsorted(below, n, side="right")


# -- compact sampled streams (format §4.3.2) ----------------------------------------------------------
# What `_compact_record` finds wrong with a record's streams (0: nothing); `store.codec` words each.
(COUNTS_SHORT, HEAD_TOO_BIG, NO_SPLIT, NO_BUCKETS, PARAMS_SHORT, PARAM_TOO_BIG, IDS_SHORT, OUTSIDE,
 TWICE) = range(1, 10)


@_jit
def _compact_record(ids_values: np.ndarray, i0: int, i1: int, counts_values: np.ndarray, c0: int, c1: int,
                    entries: int, positions: int, samples: int, vocab: int, listed: np.ndarray,
                    below: np.ndarray, by_place: bool, tv: int, h: np.ndarray, tails: np.ndarray,
                    hc: np.ndarray, hp: np.ndarray, tp: np.ndarray, state: np.ndarray, widths: np.ndarray,
                    sums: np.ndarray, qs: np.ndarray, seen: np.ndarray) -> int:
    """What `decode_sampled_compact` finds wrong with one record's streams, OUTSIDE for an id ≥ tv too,
    or 0. Leaves the record decoded in the scratch (`_compact_scratch`): h, tails [positions] (head
    and tail sizes); hc, hp [entries] (head counts − 1, head places); tp [entries] (tail places).

    Both streams' unary parts are read first, a byte at a time (`_unary`); then a record is read
    position by position (`_compact_positions`), and where that walk has any doubt, entry by entry in
    stream order (`_compact_walk`), which names the first thing wrong in that order."""
    # counts stream: head sizes h + 1, then the head counts − 1, both gamma-coded
    at = _gamma(counts_values, c0, c1, positions, h, h[:0])
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
    drawn = qs  # drawn[e]: the draws of the head entries before e, less e (qs is free until the quotients are read)
    if _gamma(counts_values, at, c1, heads, hc, drawn) < 0:
        return COUNTS_SHORT
    drawn[heads] = drawn[heads - 1] + hc[heads - 1] if heads else 0
    e = 0
    total = heads
    for i in range(positions):
        tails[i] = samples - h[i] - (drawn[_u(e + h[i])] - drawn[_u(e)])
        e += h[i]
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
    for d in range(len(sums)):  # (the sizes the record has: a short record has few)
        sums[d, 0] = sums[d, 1] = -1
    rows = 0  # the widths written (a row per head / tail size the record has: at most its entries)
    head_bits = tail_bits = 0  # the bits of the heads' and of the tails' low parts
    for i in range(positions):
        for part in range(2):
            d = h[i] if part == 0 else tails[i]
            if sums[d, part] < 0:
                # entry j of d is in bucket b = B·j // d, i.e. while B·j < (b + 1)·d: no division
                bits, j, limit = np.int64(0), np.int64(0), np.int64(0)
                for b in range(buckets):
                    k = np.int64(ids_values[ks + part * buckets + b])
                    limit += d
                    while j * buckets < limit:
                        widths[rows + j] = k
                        bits += k
                        j += 1
                sums[d, part], sums[d, 2 + part] = bits, rows
                rows += d
        head_bits += sums[_u(h[i]), 0]
        tail_bits += sums[_u(tails[i]), 1]
    low0 = ks + 2 * buckets
    q0 = low0 + ((head_bits + tail_bits + 7) >> 3)
    if q0 > i1:
        return IDS_SHORT
    bound = min(vocab, tv) if by_place else vocab  # (places from here on: below it, or the record is bad)
    quotients = _unary(ids_values, q0, i1, entries, qs)[0]
    # Position by position where every quotient is there and their sum is below 2^30 (no sum of gaps
    # reaches 2^62: places rise) and places alone judge ids.
    if quotients == entries and i1 - q0 < 1 << 27 and by_place and q0 + 8 <= len(ids_values) and _compact_positions(
            ids_values, positions, h, tails, hp, tp, qs, heads, low0 * 8, head_bits, bound, widths, sums, seen,
            state):
        return 0
    return _compact_walk(ids_values, i1, positions, h, tails, hp, tp, qs, quotients, low0 * 8, widths, sums, bound,
                         by_place, listed, below, tv)


@_jit
def _compact_positions(ids_values: np.ndarray, positions: int, h: np.ndarray, tails: np.ndarray, hp: np.ndarray,
                       tp: np.ndarray, qs: np.ndarray, heads: int, lbit: int, head_bits: int, bound: int,
                       widths: np.ndarray, sums: np.ndarray, seen: np.ndarray, state: np.ndarray) -> bool:
    """Whether a record's places (quotients in qs, low bits from stream bit `lbit`, widths in
    `_compact_record`'s rows) are sound, read position by position: a position's head entries, then
    its tail entries (each part with its own cursors into the streams). Places rise within a part,
    so its last place alone is compared with `bound`; a head stamps its places' slots in `seen`
    (place mod its size) with the position's stamp, so a tail place in a slot without it is in no
    head (one in a slot with it is looked for among the head's places, by bisection: they rise).
    False: some place may be wrong (`_compact_walk` says which)."""
    mask = len(seen) - 1
    stamp = state[0]  # (the last position's stamp: unique to every position read with this scratch)
    hbit, tbit = lbit, lbit + head_bits
    e = t = 0  # the head and tail entries before the position
    sound = True
    for i in range(positions):
        stamp += 1
        row, place = sums[_u(h[i]), 2], np.int64(-1)
        for j in range(h[i]):
            w = np.int64(widths[_u(row + j)])
            low = (_word(ids_values, hbit >> 3) >> (hbit & 7)) & ((np.int64(1) << w) - 1)
            hbit += w
            place += ((qs[_u(e + j)] << w) | low) + 1
            hp[_u(e + j)] = place
            seen[_u(place & mask)] = stamp
        if place >= bound:
            sound = False
            break
        row, place = sums[_u(tails[i]), 3], np.int64(-1)
        for j in range(tails[i]):
            w = np.int64(widths[_u(row + j)])
            low = (_word(ids_values, tbit >> 3) >> (tbit & 7)) & ((np.int64(1) << w) - 1)
            tbit += w
            place += ((qs[_u(heads + t + j)] << w) | low) + 1
            tp[_u(t + j)] = place
            if seen[_u(place & mask)] == stamp:  # (mostly another head place in the slot: the head's rise)
                lo, hi = e, e + h[i]
                while lo < hi:
                    mid = (lo + hi) >> 1
                    if hp[_u(mid)] < place:
                        lo = mid + 1
                    else:
                        hi = mid
                sound &= lo == e + h[i] or hp[_u(lo)] != place
        e += h[i]
        t += tails[i]
        if place >= bound or not sound:
            sound = False
            break
    state[0] = stamp
    return sound


@_jit
def _compact_walk(ids_values: np.ndarray, i1: int, positions: int, h: np.ndarray, tails: np.ndarray, hp: np.ndarray,
                  tp: np.ndarray, qs: np.ndarray, quotients: int, lbit: int, widths: np.ndarray, sums: np.ndarray, bound: int,
                  by_place: bool, listed: np.ndarray, below: np.ndarray, tv: int) -> int:
    """What is first wrong with a record's places, read entry by entry in stream order (every
    position's head entries, then every position's tail entries; qs[:quotients] the quotients there
    are), or 0: IDS_SHORT (a quotient missing), OUTSIDE (a place ≥ bound, or its id ≥ tv where places
    do not say it), TWICE (a place in both a position's head and its tail)."""
    e = 0  # the entries read
    tail_at = 0
    for part in range(2):  # the head entries of every position, then the tail entries
        head_end = 0
        for i in range(positions):
            d = h[i] if part == 0 else tails[i]
            head_at = head_end  # this position's head places: hp[head_at:head_end]
            head_end += h[i]
            place = np.int64(-1)
            row = sums[d, 2 + part]
            for j in range(d):
                if e == quotients:
                    return IDS_SHORT
                w = np.int64(widths[row + j])
                if (lbit >> 3) + 8 <= i1:
                    low = (_word(ids_values, lbit >> 3) >> (lbit & 7)) & ((np.int64(1) << w) - 1)
                else:
                    low = _bits_at(ids_values, lbit, w, i1)
                lbit += w
                place += ((qs[e] << w) | low) + 1
                e += 1
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
    h, tails, hc, hp, tp, state, widths, sums, qs, seen = _compact_scratch(most, most_entries, samples)
    bad = np.zeros(records, dtype=np.bool_)
    for r in range(records):
        bad[r] = _compact_record(ids_values, ids_offsets[r], ids_offsets[r + 1], counts_values,
                                 counts_offsets[r], counts_offsets[r + 1], entries[r], positions[r], samples,
                                 vocab, listed, below, by_place, tv, h, tails, hc, hp, tp, state, widths, sums,
                                 qs, seen) != 0
    return bad


@_jit
def _compact_scratch(positions: int, entries: int, samples: int) -> tuple:
    """The scratch `_compact_record` needs for records of up to these positions and entries (a
    position's entries, head or tail, are at most N and at most the record's), in all a few dozen
    bytes per entry and position (a per-record decoder builds it per call): h, tails, hc, hp, tp
    (`_compact_record`); state[0]: the last position stamp in `seen`; sums [min(N, entries) + 1, 4]:
    the low bits of d head / tail entries, and where in `widths` their widths are (rows of the sizes
    a record has, so that an entry's width costs one load, not its bucket's arithmetic); qs
    [entries + 8]: the quotients; seen: a power of two ≥ 16 slots per head place a position may have,
    at most 2,048 (`_compact_positions`)."""
    entries = max(entries, 0)
    span = min(samples, entries)
    heads = min(positions * (samples // 2), entries) + 8  # (`_unary` writes up to 7 values past the last)
    slots = 64
    while slots < 2048 and slots < 16 * (min(samples // 2, entries) + 1):
        slots *= 2
    return (np.empty(positions + 7, dtype=np.int64), np.empty(positions, dtype=np.int64),
            np.empty(heads, dtype=np.int64), np.empty(heads, dtype=np.int64), np.empty(entries + 1, dtype=np.int64),
            np.zeros(1, dtype=np.int64), np.empty(entries + 1, dtype=np.uint8),
            np.empty((span + 1, 4), dtype=np.int64), np.empty(entries + 8, dtype=np.int64),
            np.zeros(slots, dtype=np.int64))


@_jit
def _sort(keys: np.ndarray, a: int, b: int) -> None:
    """keys[a:b] ascending (the keys are distinct: any sort gives the same order): by insertion, for a
    position's head or tail is mostly a few dozen entries; by heap where it is longer (N up to 65,535
    draws may leave thousands, where insertion's quadratic time took 0.1 s a record). Plain loops:
    numpy's sort here slows every short sort by a tenth."""
    n = b - a
    if n > 64:
        for root in range(n // 2 - 1, -1, -1):
            _sift(keys, a, root, n)
        for end in range(n - 1, 0, -1):
            keys[a], keys[a + end] = keys[a + end], keys[a]
            _sift(keys, a, 0, end)
        return
    for x in range(a + 1, b):
        v = keys[x]
        y = x
        while y > a and keys[y - 1] > v:
            keys[y] = keys[y - 1]
            y -= 1
        keys[y] = v


@_jit
def _sift(keys: np.ndarray, a: int, root: int, n: int) -> None:
    """keys[a + root] moved down the max-heap keys[a:a + n] to its place."""
    v = keys[a + root]
    while True:
        child = 2 * root + 1
        if child >= n:
            break
        if child + 1 < n and keys[a + child + 1] > keys[a + child]:
            child += 1
        if keys[a + child] <= v:
            break
        keys[a + root] = keys[a + child]
        root = child
    keys[a + root] = v


@_jit
def _compact_place(ids: np.ndarray, counts: np.ndarray, stride: int, positions: int, samples: int,
                   h: np.ndarray, tails: np.ndarray, hc: np.ndarray, hp: np.ndarray, tp: np.ndarray,
                   listed: np.ndarray, below: np.ndarray, id_at: np.ndarray) -> None:
    """A decoded record (`_compact_record`'s scratch) into ids, counts (any dtypes that hold them):
    position i's entries from i · stride (stride 0: right after position i − 1's), in the order of
    format §4.2 (descending count, then ascending id), places mapped to ids by the id order (`id_at`:
    its table, or empty to search `listed` / `below`). A head is sorted as one key per entry,
    (N − count) · 2^32 + id; a tail (count 1) as its ids."""
    keys = np.empty(len(tp), dtype=np.int64)  # (a position has at most all the entries)
    at = e = t = 0
    for i in range(positions):
        at = i * stride if stride else at
        for x in range(h[i]):
            p = hp[e + x]
            if len(id_at):  # (written out: a call per entry costs more than the entry, arrays passed are counted)
                p = id_at[p]
            elif len(listed):
                p = _id_at(p, listed, below)
            keys[x] = ((samples - hc[e + x] - 1) << 32) | p
        _sort(keys, 0, h[i])
        for x in range(h[i]):
            ids[at + x] = keys[x] & 0xFFFFFFFF
            counts[at + x] = samples - (keys[x] >> 32)
        at += h[i]
        e += h[i]
        for x in range(tails[i]):
            p = tp[t + x]
            if len(id_at):
                p = id_at[p]
            elif len(listed):
                p = _id_at(p, listed, below)
            keys[x] = p
        if len(listed):  # places map back to ids out of order
            _sort(keys, 0, tails[i])
        for x in range(tails[i]):
            ids[at + x] = keys[x]
            counts[at + x] = 1
        at += tails[i]
        t += tails[i]


@_jit
def compact_sampled(ids_data: np.ndarray, counts_data: np.ndarray, entries: int, positions: int, samples: int,
                    vocab: int, listed: np.ndarray, below: np.ndarray, id_at: np.ndarray
                    ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """One record's compact streams decoded: (0, offsets [positions + 1], ids int32, counts uint16) as
    `SampledTargets` holds them, or (what is wrong, empty arrays)."""
    h, tails, hc, hp, tp, state, widths, sums, qs, seen = _compact_scratch(positions, entries, samples)
    offsets = np.zeros(positions + 1, dtype=np.int64)
    wrong = _compact_record(ids_data, 0, len(ids_data), counts_data, 0, len(counts_data), entries, positions,
                            samples, vocab, listed, below, True, vocab, h, tails, hc, hp, tp, state, widths,
                            sums, qs, seen)
    if wrong:
        return wrong, offsets, np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.uint16)
    ids = np.empty(entries, dtype=np.int32)
    counts = np.empty(entries, dtype=np.uint16)
    _compact_place(ids, counts, 0, positions, samples, h, tails, hc, hp, tp, listed, below, id_at)
    for i in range(positions):
        offsets[i + 1] = offsets[i] + h[i] + tails[i]
    return 0, offsets, ids, counts


@_jit
def compact_weighted(ids_data: np.ndarray, counts_data: np.ndarray, entries: int, positions: int, samples: int,
                     vocab: int, listed: np.ndarray, below: np.ndarray, id_at: np.ndarray
                     ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """One record's compact streams decoded into the loader's rows: (0, ids [positions, U] int64
    padded with −1, weights [positions, U] float32 = count / N padded with 0, entries per position),
    U the most entries a position has; or (what is wrong, empty arrays)."""
    h, tails, hc, hp, tp, state, widths, sums, qs, seen = _compact_scratch(positions, entries, samples)
    lengths = np.zeros(positions, dtype=np.int64)
    wrong = _compact_record(ids_data, 0, len(ids_data), counts_data, 0, len(counts_data), entries, positions,
                            samples, vocab, listed, below, True, vocab, h, tails, hc, hp, tp, state, widths,
                            sums, qs, seen)
    if wrong:
        return wrong, np.zeros((0, 0), dtype=np.int64), np.zeros((0, 0), dtype=np.float32), lengths
    width = 0
    for i in range(positions):
        lengths[i] = h[i] + tails[i]
        width = max(width, lengths[i])
    ids = np.full(positions * width, -1, dtype=np.int64)
    weights = np.zeros(positions * width, dtype=np.float32)  # the counts first (exact in float32: ≤ 2^16)
    _compact_place(ids, weights, width, positions, samples, h, tails, hc, hp, tp, listed, below, id_at)
    for x in range(positions * width):
        weights[x] = np.float32(np.float64(weights[x]) / samples)  # (as numpy's count / N, then float32)
    return 0, ids.reshape((positions, width)), weights.reshape((positions, width)), lengths


# -- top-k rows (format §4.1, `store.columns.unsound_topk` / `impossible_topk`) ------------------------
@_jit
def _block_sum(a: np.ndarray, start: int, n: int) -> float:
    """numpy's sum of at most 128 values: eight running sums, added pairwise, then the rest."""
    a = a[start : start + n]
    if n < 8:
        res = -0.0
        for i in range(n):
            res += a[i]
        return res
    r0, r1, r2, r3, r4, r5, r6, r7 = a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]
    i = 8
    while i < n - n % 8:
        r0, r1, r2, r3 = r0 + a[i], r1 + a[i + 1], r2 + a[i + 2], r3 + a[i + 3]
        r4, r5, r6, r7 = r4 + a[i + 4], r5 + a[i + 5], r6 + a[i + 6], r7 + a[i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[i]
        i += 1
    return res


@_jit
def _pairwise(a: np.ndarray, start: int, n: int) -> float:
    """Σ a[start:start + n] in numpy's order (pairwise: halves, cut at a multiple of 8, down to blocks
    of ≤ 128), so a mass at the bound is judged as the numpy check judges it. The recursion runs on
    an explicit stack: numba's cache cannot reload a recursive function."""
    if n <= 128:
        return _block_sum(a, start, n)
    starts = np.empty(64, dtype=np.int64)
    sizes = np.empty(64, dtype=np.int64)
    left = np.empty(64, dtype=np.float64)
    done_left = np.zeros(64, dtype=np.bool_)
    depth = 0
    starts[0], sizes[0], done_left[0] = start, n, False
    while True:
        s, m = starts[depth], sizes[depth]
        if m > 128:  # descend into the left half
            half = m // 2 - (m // 2) % 8
            depth += 1
            starts[depth], sizes[depth], done_left[depth] = s, half, False
            continue
        v = _block_sum(a, s, m)
        depth -= 1
        while depth >= 0 and done_left[depth]:  # right halves done: add them to their left halves
            v = left[depth] + v
            depth -= 1
        if depth < 0:
            return v
        left[depth], done_left[depth] = v, True  # a left half done: now its right half
        half = sizes[depth] // 2 - (sizes[depth] // 2) % 8
        depth += 1
        starts[depth], sizes[depth], done_left[depth] = starts[depth - 1] + half, sizes[depth - 1] - half, False


@_jit
def _repeated(ids: np.ndarray, row: int, seen: np.ndarray) -> bool:
    """Whether an id ≥ 0 is in two slots of `ids` (one row): `seen[id]` holds the last row that had
    id, so a row costs one look-up per slot (ids beyond `seen` are compared with the row's others)."""
    for j in range(len(ids)):
        v = ids[j]
        if v < 0:
            continue
        if v < len(seen):
            if seen[v] == row:
                return True
            seen[v] = row
        else:
            for i in range(j):
                if ids[i] == v:
                    return True
    return False


@_jit
def _too_much(mass: np.ndarray, tail: float) -> bool:
    """Σ mass (each slot's exp(lp − its error)) + the tail's, lowered by float32's rounding, above
    1 + MASS_SLACK (NaN: no)."""
    t = np.float64(tail)
    return 0.0 + _pairwise(mass, 0, len(mass)) + np.exp(t - abs(t) * 2.0**-24) > MASS_BOUND


@_jit
def _plain_row(ids: np.ndarray, lp: np.ndarray, mass: np.ndarray, tail: float, vocab: int, seen: np.ndarray,
               row: int) -> int:
    """The flags of one plain top-k row (float32 log-probs, `mass`: exp(lp − its rounding) of each)."""
    f = 0
    for j in range(len(ids)):
        v, x = ids[j], lp[j]
        if v < -1 or v >= vocab or (x != -np.inf if v == -1 else not np.isfinite(x) or x > LOGPROB_SLACK32):
            f |= UNSOUND
        if j and x > lp[j - 1]:
            f |= RISING
    if _repeated(ids, row, seen):
        f |= REPEATED
    if _too_much(mass, tail):
        f |= TOO_MUCH
    return f


@_jit
def topk_plain_flags(ids: np.ndarray, lp: np.ndarray, tail: np.ndarray, vocab: int) -> np.ndarray:
    """[S] flags of plain top-k rows [S, K] with float32 log-probs: UNSOUND as `unsound_topk` (ids
    outside [-1, vocab), log-probs NaN, infinite or above the slack, an empty slot not −inf), then
    REPEATED, RISING and TOO_MUCH as `impossible_topk` with `float_rounding`'s errors."""
    rows, k = ids.shape
    seen = np.full(vocab, -1, dtype=np.int64)
    mass = np.empty(k, dtype=np.float64)
    flags = np.zeros(rows, dtype=np.uint8)
    for r in range(rows):
        for j in range(k):
            x = np.float64(lp[r, j])
            mass[j] = np.exp(x - abs(x) * 2.0**-24)
        flags[r] = _plain_row(ids[r], lp[r], mass, tail[r], vocab, seen, r)
    return flags


def half_table() -> np.ndarray:
    """Every float16 as float32, by its bits: `topk_half_flags` reads float16 log-probs through it."""
    return np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


@_jit
def topk_half_flags(ids: np.ndarray, lp_bits: np.ndarray, tail: np.ndarray, vocab: int, half: np.ndarray) -> np.ndarray:
    """`topk_plain_flags` of float16 log-probs, given as their bits (`lp.view(np.uint16)`) and read
    through `half_table()`, each one's mass too: no float32 copy of the column, no exp per slot. One
    pass over a row's slots makes every flag but TOO_MUCH (its sum stays numpy's, `_too_much`): 1.3×
    faster than copying the row out and passing over it once per flag."""
    rows, k = ids.shape
    mass_of = np.empty(len(half), dtype=np.float64)
    for b in range(len(half)):
        x = np.float64(half[b])
        mass_of[b] = np.exp(x - abs(x) * 2.0**-11)
    seen = np.full(vocab, -1, dtype=np.int32)  # (`_repeated`'s, half its size: more of it stays in cache)
    mass = np.empty(k, dtype=np.float64)
    flags = np.zeros(rows, dtype=np.uint8)
    for r in range(rows):
        f, repeated, before = 0, False, np.float32(np.inf)
        for j in range(k):
            v, x = ids[r, j], half[lp_bits[r, j]]
            mass[j] = mass_of[lp_bits[r, j]]
            if v < -1 or v >= vocab or (x != -np.inf if v == -1 else not np.isfinite(x) or x > LOGPROB_SLACK32):
                f |= UNSOUND
            if x > before:
                f |= RISING
            before = x
            if v >= 0 and not repeated:
                if v < vocab:
                    repeated = seen[v] == r
                    seen[v] = r
                else:
                    for i in range(j):
                        repeated = repeated or ids[r, i] == v
        if repeated:
            f |= REPEATED
        if _too_much(mass, tail[r]):
            f |= TOO_MUCH
        flags[r] = f
    return flags


@_jit
def topk_packed_bad(id_values: np.ndarray, id_offsets: np.ndarray, lp_values: np.ndarray, lp_offsets: np.ndarray,
                    tgt_offsets: np.ndarray, tail: np.ndarray, k: int, id_bits: int, lp_bits: int, lo: float,
                    step: float, max_error: float, tv: int) -> np.ndarray:
    """[R] records of packed top-k streams with an id ≥ tv or a row `impossible_topk` flags, the
    quantiser's codes decoded as `LogprobQuantizer.decode` does (code 0: an empty slot, id −1,
    log-prob −inf) and their error its step / 2 plus float32's rounding; slots at the floor add
    nothing to the mass (they may hold any smaller log-prob)."""
    records = len(tgt_offsets) - 1
    # each code's log-prob and mass, once (code 0: −inf; at the floor: no mass, it may be any smaller)
    clipped = lo + step / 2
    lp_of = np.empty(1 << lp_bits, dtype=np.float64)
    mass_of = np.zeros(1 << lp_bits, dtype=np.float64)
    lp_of[0] = -np.inf
    for code in range(1, 1 << lp_bits):
        v = np.float64(np.float32(lo + (np.float64(code) - 1.0) * step))
        lp_of[code] = v
        if v > clipped:
            mass_of[code] = np.exp(v - (max_error + abs(v) * 2.0**-24))
    seen = np.full(tv, -1, dtype=np.int64)
    ids = np.empty(k, dtype=np.int64)
    lp = np.empty(k, dtype=np.float64)
    mass = np.empty(k, dtype=np.float64)
    bad = np.zeros(records, dtype=np.bool_)
    for r in range(records):
        i1, l1 = id_offsets[r + 1], lp_offsets[r + 1]
        ipos, iacc, inb = id_offsets[r], 0, 0
        lpos, lacc, lnb = lp_offsets[r], 0, 0
        for p in range(tgt_offsets[r + 1] - tgt_offsets[r]):
            row = tgt_offsets[r] + p
            for j in range(k):
                if lnb < lp_bits:
                    lpos, lacc, lnb = _fill(lp_values, lpos, l1, lacc, lnb)
                code = lacc & ((np.int64(1) << lp_bits) - 1)
                lacc >>= lp_bits
                lnb -= lp_bits
                if inb < id_bits:
                    ipos, iacc, inb = _fill(id_values, ipos, i1, iacc, inb)
                ids[j] = iacc & ((np.int64(1) << id_bits) - 1) if code else -1
                iacc >>= id_bits
                inb -= id_bits
                lp[j], mass[j] = lp_of[code], mass_of[code]
            rising = False
            for j in range(1, k):
                rising |= lp[j] > lp[j - 1]
            if rising or ids.max() >= tv or _repeated(ids, row, seen) or _too_much(mass, tail[row]):
                bad[r] = True
                break
    return bad


# -- record ids' keys (format §3: the first 8 bytes of sha256(id UTF-8), big-endian) ------------------
# The checks compare a shard's stored keys with its ids. hashlib's sha256 keeps the GIL for inputs
# this short, so hashing a shard's ids one call at a time held it for most of a short-record shard's
# check, and threads checking shards at once waited for each other; this hashes them all in one call
# that releases it. `store.ids.id_key` (hashlib) is the definition: tests/test_kernels.py compares the two.
_SHA_K = np.array([
    0x428A2F98, 0x71374491, 0xB5C0FBCF, 0xE9B5DBA5, 0x3956C25B, 0x59F111F1, 0x923F82A4, 0xAB1C5ED5,
    0xD807AA98, 0x12835B01, 0x243185BE, 0x550C7DC3, 0x72BE5D74, 0x80DEB1FE, 0x9BDC06A7, 0xC19BF174,
    0xE49B69C1, 0xEFBE4786, 0x0FC19DC6, 0x240CA1CC, 0x2DE92C6F, 0x4A7484AA, 0x5CB0A9DC, 0x76F988DA,
    0x983E5152, 0xA831C66D, 0xB00327C8, 0xBF597FC7, 0xC6E00BF3, 0xD5A79147, 0x06CA6351, 0x14292967,
    0x27B70A85, 0x2E1B2138, 0x4D2C6DFC, 0x53380D13, 0x650A7354, 0x766A0ABB, 0x81C2C92E, 0x92722C85,
    0xA2BFE8A1, 0xA81A664B, 0xC24B8B70, 0xC76C51A3, 0xD192E819, 0xD6990624, 0xF40E3585, 0x106AA070,
    0x19A4C116, 0x1E376C08, 0x2748774C, 0x34B0BCB5, 0x391C0CB3, 0x4ED8AA4A, 0x5B9CCA4F, 0x682E6FF3,
    0x748F82EE, 0x78A5636F, 0x84C87814, 0x8CC70208, 0x90BEFFFA, 0xA4506CEB, 0xBEF9A3F7, 0xC67178F2,
], dtype=np.uint32)  # FIPS 180-4 §4.2.2
_SHA_H0 = np.array([0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB,
                    0x5BE0CD19], dtype=np.uint32)  # FIPS 180-4 §5.3.3
_u32 = np.uint32


@_inline
def _rotr(x: int, n: int) -> int:
    return _u32((x >> n) | (x << (32 - n)))


@_inline
def _sha_round(a: int, b: int, c: int, d: int, e: int, f: int, g: int, h: int, kw: int) -> tuple[int, int]:
    """One round of FIPS 180-4 §6.2.2 step 3: the new e and the new a, which the caller writes into
    d and h (the other six only move a place, which the caller's naming does instead)."""
    t1 = _u32(h + _u32(_rotr(e, 6) ^ _rotr(e, 11) ^ _rotr(e, 25)) + _u32((e & f) ^ (~e & g)) + kw)
    t2 = _u32(_u32(_rotr(a, 2) ^ _rotr(a, 13) ^ _rotr(a, 22)) + _u32((a & b) ^ (a & c) ^ (b & c)))
    return _u32(d + t1), _u32(t1 + t2)


@_jit
def _sha_block(state: np.ndarray, w: np.ndarray) -> None:
    """The state after one 64-byte block, whose 16 big-endian words are in w[:16] (w has 64)."""
    for t in range(16, 64):
        x, y = w[t - 15], w[t - 2]
        s0 = _u32(_rotr(x, 7) ^ _rotr(x, 18) ^ (x >> 3))
        s1 = _u32(_rotr(y, 17) ^ _rotr(y, 19) ^ (y >> 10))
        w[t] = _u32(w[t - 16] + s0 + w[t - 7] + s1)
    k = _SHA_K  # (a global: numba compiles it in as a constant; as an argument it costs a call's dispatch)
    a, b, c, d, e, f, g, h = state[0], state[1], state[2], state[3], state[4], state[5], state[6], state[7]
    for t in range(0, 64, 8):  # eight rounds at a time: the eight variables are back under their names
        d, h = _sha_round(a, b, c, d, e, f, g, h, k[t] + w[t])
        c, g = _sha_round(h, a, b, c, d, e, f, g, k[t + 1] + w[t + 1])
        b, f = _sha_round(g, h, a, b, c, d, e, f, k[t + 2] + w[t + 2])
        a, e = _sha_round(f, g, h, a, b, c, d, e, k[t + 3] + w[t + 3])
        h, d = _sha_round(e, f, g, h, a, b, c, d, k[t + 4] + w[t + 4])
        g, c = _sha_round(d, e, f, g, h, a, b, c, k[t + 5] + w[t + 5])
        f, b = _sha_round(c, d, e, f, g, h, a, b, k[t + 6] + w[t + 6])
        e, a = _sha_round(b, c, d, e, f, g, h, a, k[t + 7] + w[t + 7])
    for i, v in enumerate((a, b, c, d, e, f, g, h)):
        state[i] = _u32(state[i] + v)


@_jit
def string_keys(data: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """[n] uint64: the key (`store.ids.id_key`) of each of n ids, id i being the UTF-8 bytes
    data[offsets[i]:offsets[i + 1]] (an Arrow string array's buffers): the first 8 bytes of its
    sha256, read big-endian."""
    out = np.empty(len(offsets) - 1, dtype=np.uint64)
    w = np.empty(64, dtype=np.uint32)
    tail = np.zeros(128, dtype=np.uint8)  # the last one or two blocks: the id's rest, 0x80, zeros, its length
    state = np.empty(8, dtype=np.uint32)
    for i in range(len(out)):
        start, size = np.int64(offsets[i]), np.int64(offsets[i + 1]) - np.int64(offsets[i])
        whole = size // 64
        blocks = (size + 9 + 63) // 64  # (padding is a 0x80 byte and the 8-byte bit length at least)
        state[:] = _SHA_H0
        tail[:] = 0
        rest = size - whole * 64
        for x in range(rest):
            tail[x] = data[start + whole * 64 + x]
        tail[rest] = 0x80
        end = (blocks - whole) * 64
        for x in range(8):
            tail[end - 1 - x] = ((size * 8) >> (8 * x)) & 0xFF
        for b in range(blocks):
            src, at = (data, start + b * 64) if b < whole else (tail, (b - whole) * 64)
            for t in range(16):
                p = at + 4 * t
                w[t] = (_u32(src[p]) << 24) | (_u32(src[p + 1]) << 16) | (_u32(src[p + 2]) << 8) | _u32(src[p + 3])
            _sha_block(state, w)
        out[i] = (np.uint64(state[0]) << np.uint64(32)) | np.uint64(state[1])
    return out
