"""Compiled encoders (numba) of the packed and compact codecs (docs/reference/store-format.md §4.3): one
pass over a shard's entries writing each record's bit streams straight into their bytes, where whole-
array numpy makes a dozen passes with a temporary array each. `store.codec` imports this module
lazily (numba takes ~0.2 s to import, which only writing such a store needs); the bytes are those
format §4.3 defines (tests/test_writer_bytes.py compares them with a one-record reference coder).

Streams are written least significant bit first through a bit buffer (acc: its `nb` pending bits, an
int64), flushed a byte at a time, so a value of up to 32 bits never pushes it past 40 bits. `cache=True`
keeps the machine code in __pycache__: a process compiles each signature once per installation.
"""

from __future__ import annotations

import numba
import numpy as np
from numba.cpython.unsafe.numbers import leading_zeros  # (llvm.ctlz; in numba since 0.47)

_jit = numba.njit(cache=True, nogil=True)
# The bit writers run per field: inlined by numba itself, no call (and no reference counting of the
# output array) is left in the loops.
_inline = numba.njit(cache=True, nogil=True, inline="always")


# -- bit writing ------------------------------------------------------------------------------------------
@_inline
def _put(out: np.ndarray, pos: int, acc: int, nb: int, v: int, w: int) -> tuple[int, int, int]:
    """v (< 2**w, w ≤ 32) after the buffer's nb (< 8) bits; whole bytes go out."""
    acc |= v << nb
    nb += w
    while nb >= 8:
        out[pos] = acc & 0xFF
        pos += 1
        acc >>= 8
        nb -= 8
    return pos, acc, nb


@_inline
def _unary(out: np.ndarray, pos: int, acc: int, nb: int, q: int) -> tuple[int, int, int]:
    """q zero bits, then a one."""
    while q >= 32:
        pos, acc, nb = _put(out, pos, acc, nb, 0, 32)
        q -= 32
    return _put(out, pos, acc, nb, 1 << q, q + 1)


@_inline
def _flush(out: np.ndarray, pos: int, acc: int, nb: int) -> None:
    """The last, partial byte of a region (zero-padded)."""
    if nb > 0:
        out[pos] = acc & 0xFF


# -- fixed-width packing (packed codec) -------------------------------------------------------------------
# What is packed (`mode`): the values as they are; top-k ids (an empty slot's −1 stored as 0); or float32
# log-probs quantised (`LogprobQuantizer.encode`: the same float64 arithmetic per value, clipped to
# [lo, 0], minus lo, over step, rounded half to even, plus 1; −inf and NaN give code 0), or float16
# log-probs' bits looked up in a table of their codes.
VALUES, IDS, LOGPROBS, HALF_CODES = 0, 1, 2, 3


@_inline
def _value(x: float, mode: int, lo: float, step: float, table: np.ndarray) -> int:
    if mode == IDS:
        return 0 if x < 0 else np.int64(x)
    if mode == LOGPROBS:
        lp = np.float64(x)
        if np.isnan(lp) or lp == -np.inf:
            return 0
        return np.int64(1.0 + np.rint((min(max(lp, lo), 0.0) - lo) / step))
    if mode == HALF_CODES:
        return table[np.int64(x)]
    return np.int64(x)  # (a uint64 above 2**63 turns negative: refused as not fitting)


@_jit
def pack_fixed(values: np.ndarray, counts: np.ndarray, bits: int, mode: int, lo: float, step: float,
               table: np.ndarray, out: np.ndarray, offsets: np.ndarray) -> int:
    """Record r's `counts[r]` values (`mode`, above) into out[offsets[r]:offsets[r + 1]] in `bits` bits each,
    least significant bit first, each record's stream padded to a whole byte. Returns the index of a
    value that is negative or does not fit, or -1."""
    at = 0
    for r in range(len(counts)):
        pos, acc, nb = offsets[r], 0, 0
        for i in range(at, at + counts[r]):
            v = _value(values[i], mode, lo, step, table)
            if v < 0 or v >> bits:
                return i
            pos, acc, nb = _put(out, pos, acc, nb, v, bits)
        _flush(out, pos, acc, nb)
        at += counts[r]
    return -1


# -- compact coding of sampled draws (§4.3.2) -------------------------------------------------------------
@_inline
def _sort_record(pos_off: np.ndarray, p0: int, p1: int, ids: np.ndarray, table: np.ndarray, counts: np.ndarray,
                 sp: np.ndarray, sc: np.ndarray, heads: np.ndarray) -> None:
    """A record's entries, position by position, in (part, place) order into sp (places) and sc (counts),
    each position at its own entries' slice; heads[p - p0]: how many have a count ≥ 2 (the head).
    An id's place is table[id] (ids as they are where the table is empty)."""
    base = pos_off[p0]
    for p in range(p0, p1):
        a, b = pos_off[p] - base, pos_off[p + 1] - base
        h = 0
        for i in range(a, b):  # insertion sort on (tail?, place): positions hold a few dozen entries
            pl = table[ids[base + i]] if len(table) else np.int64(ids[base + i])
            c = np.int64(counts[base + i])
            tail = 1 if c == 1 else 0
            j = i
            while j > a:
                t = 1 if sc[j - 1] == 1 else 0
                if t < tail or (t == tail and sp[j - 1] <= pl):
                    break
                sp[j], sc[j] = sp[j - 1], sc[j - 1]
                j -= 1
            sp[j], sc[j] = pl, c
            h += 1 - tail
        heads[p - p0] = h


@_inline
def _bit_length(v: int) -> int:
    return 64 - leading_zeros(np.uint64(v)) if v else 0


@_jit
def _grown(out: np.ndarray, need: int) -> np.ndarray:
    if need <= len(out):
        return out
    bigger = np.zeros(max(need, 2 * len(out)), dtype=np.uint8)
    bigger[: len(out)] = out
    return bigger


@_jit
def compact_encode(pos_off: np.ndarray, rec_pos: np.ndarray, ids: np.ndarray, table: np.ndarray,
                   counts: np.ndarray, buckets: int, ids_off: np.ndarray, counts_off: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The compact streams (format §4.3.2) of records whose positions are rec_pos[r]:rec_pos[r + 1] and a
    position's entries pos_off[p]:pos_off[p + 1] (ids, places table[id], counts). Returns (ids data,
    counts data), filling in the offsets of each record's streams.

    Per record: its entries sorted by (part, place) within each position (`_sort_record`), then one pass
    in stream order (the head's entries, position by position, then the tail's) takes each gap and
    Rice group (part, rank bucket) and each group's cost Σ gap >> k for every k; the parameter of a
    group is its cheapest k (the smallest on ties), which also gives the streams' lengths; a last pass
    writes them. ids: B, the 2B parameters, the gaps' low bits (byte-padded), then the quotients in
    unary (byte-padded). counts: each position's gamma(h + 1) (the lengths in unary, byte-padded,
    then the low bits, byte-padded), then each head entry's gamma(count − 1) the same way."""
    n_rec = len(rec_pos) - 1
    most = 0
    for r in range(n_rec):
        most = max(most, pos_off[rec_pos[r + 1]] - pos_off[rec_pos[r]])
    sp = np.empty(most, dtype=np.int64)
    sc = np.empty(most, dtype=np.int64)
    gap = np.empty(most, dtype=np.int64)
    group = np.empty(most, dtype=np.int64)
    heads = np.empty(len(pos_off), dtype=np.int64)
    groups = 2 * buckets
    cost = np.zeros((groups, 3), dtype=np.int64)
    size = np.zeros(groups, dtype=np.int64)
    total = np.zeros(groups, dtype=np.int64)
    ks = np.zeros(groups, dtype=np.int64)
    ids_out = np.zeros(len(ids) * 2 + n_rec * (1 + groups) + 64, dtype=np.uint8)
    counts_out = np.zeros(len(pos_off) + 64, dtype=np.uint8)
    ids_at = counts_at = 0
    for r in range(n_rec):
        p0, p1 = rec_pos[r], rec_pos[r + 1]
        base = pos_off[p0]
        _sort_record(pos_off, p0, p1, ids, table, counts, sp, sc, heads)
        size[:] = 0
        total[:] = 0
        e = 0
        c_bits = np.zeros(4, dtype=np.int64)  # the counts stream's four regions
        for part in range(2):
            for p in range(p0, p1):
                a, b = pos_off[p] - base, pos_off[p + 1] - base
                h = heads[p - p0]
                lo, hi = (a, a + h) if part == 0 else (a + h, b)
                if part == 0:
                    length = _bit_length(h + 1) - 1
                    c_bits[0] += length + 1
                    c_bits[1] += length
                prev = -1
                for i in range(lo, hi):
                    g = sp[i] - prev - 1
                    prev = sp[i]
                    row = part * buckets + min(buckets * (i - lo) // (hi - lo), buckets - 1)
                    gap[e], group[e] = g, row
                    e += 1
                    size[row] += 1
                    total[row] += g
                    if part == 0:
                        length = _bit_length(sc[i] - 1) - 1
                        c_bits[2] += length + 1
                        c_bits[3] += length
        _rice_ks(gap, group, e, size, total, cost, ks)
        var_bits = una_bits = 0
        for row in range(groups):
            var_bits += size[row] * ks[row]
            una_bits += cost[row, 1] + size[row]

        # the ids stream
        var_len = (var_bits + 7) // 8
        ids_out = _grown(ids_out, ids_at + 1 + groups + var_len + (una_bits + 7) // 8)
        ids_out[ids_at] = buckets
        for row in range(groups):
            ids_out[ids_at + 1 + row] = ks[row]
        pos = ids_at + 1 + groups
        upos = pos + var_len
        acc, nb, uacc, unb = 0, 0, 0, 0
        for i in range(e):
            k = ks[group[i]]
            g = gap[i]
            if k:
                pos, acc, nb = _put(ids_out, pos, acc, nb, g & ((1 << k) - 1), k)
            upos, uacc, unb = _unary(ids_out, upos, uacc, unb, g >> k)
        _flush(ids_out, pos, acc, nb)
        _flush(ids_out, upos, uacc, unb)
        ids_at += 1 + groups + var_len + (una_bits + 7) // 8
        ids_off[r + 1] = ids_at

        # the counts stream
        region = (c_bits + 7) // 8
        counts_out = _grown(counts_out, counts_at + region.sum())
        upos, pos = counts_at, counts_at + region[0]
        acc, nb, uacc, unb = 0, 0, 0, 0
        for p in range(p0, p1):
            upos, uacc, unb, pos, acc, nb = _gamma(counts_out, upos, uacc, unb, pos, acc, nb, heads[p - p0] + 1)
        _flush(counts_out, upos, uacc, unb)
        _flush(counts_out, pos, acc, nb)
        upos, pos = counts_at + region[0] + region[1], counts_at + region[0] + region[1] + region[2]
        acc, nb, uacc, unb = 0, 0, 0, 0
        for p in range(p0, p1):
            a = pos_off[p] - base
            for i in range(a, a + heads[p - p0]):
                upos, uacc, unb, pos, acc, nb = _gamma(counts_out, upos, uacc, unb, pos, acc, nb, sc[i] - 1)
        _flush(counts_out, upos, uacc, unb)
        _flush(counts_out, pos, acc, nb)
        counts_at += region.sum()
        counts_off[r + 1] = counts_at
    return ids_out[:ids_at], counts_out[:counts_at]


@_jit
def _rice_ks(gap: np.ndarray, group: np.ndarray, e: int, size: np.ndarray, total: np.ndarray, cost: np.ndarray,
             ks: np.ndarray) -> None:
    """Each group's Rice parameter: the k minimising C(k) = n·(k + 1) + Σ gap >> k over its gaps, the
    smallest on ties (0 for no gaps); on return cost[g, 1] = Σ gap >> k at that k. C is convex
    (C(k + 1) − C(k) = n − Σ ceil((gap >> k) / 2) never falls), so from log2 of the mean gap, a pass
    over the gaps costing k − 1, k and k + 1 for every group shows which way each must go, if any:
    most are there after one pass."""
    groups = len(size)
    for row in range(groups):
        ks[row] = max(_bit_length(total[row] // size[row]) - 1, 0) if size[row] else 0
    moving = True
    while moving:
        cost[:, :] = 0
        for i in range(e):
            row, g = group[i], gap[i]
            k = ks[row]
            if k:
                cost[row, 0] += g >> (k - 1)
            cost[row, 1] += g >> k
            cost[row, 2] += g >> (k + 1)
        moving = False
        for row in range(groups):
            n, k = size[row], ks[row]
            here = n * (k + 1) + cost[row, 1]
            if k and n * k + cost[row, 0] <= here:
                ks[row] = k - 1
                moving = True
            elif n * (k + 2) + cost[row, 2] < here:
                ks[row] = k + 1
                moving = True


@_inline
def _gamma(out: np.ndarray, upos: int, uacc: int, unb: int, pos: int, acc: int, nb: int, v: int
           ) -> tuple[int, int, int, int, int, int]:
    """Elias gamma of v ≥ 1, split: its length L = bit_length(v) − 1 in unary (the first writer), its low
    L bits (the second)."""
    length = _bit_length(v) - 1
    upos, uacc, unb = _unary(out, upos, uacc, unb, length)
    if length:
        pos, acc, nb = _put(out, pos, acc, nb, v - (1 << length), length)
    return upos, uacc, unb, pos, acc, nb
