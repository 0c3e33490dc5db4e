"""Compiled encoders (numba) of the packed and compact codecs (docs/reference/store-format.md §4.3): one
pass over a shard's entries writing each record's bit streams straight into their bytes, where whole-
array numpy makes a dozen passes with a temporary array each. `store.codec` imports this module
lazily (numba takes ~0.2 s to import, which only writing such a store needs); the bytes are those
format §4.3 defines (tests/test_writer_bytes.py compares them with a one-record reference coder).

Streams are written least significant bit first through a bit buffer (acc: its `nb` pending bits),
flushed a byte at a time, so a value of up to 32 bits never pushes it past 40 bits. `cache=True`
keeps the machine code in __pycache__: a process compiles each signature once per installation.
"""

from __future__ import annotations

import numba
import numpy as np

_jit = numba.njit(cache=True, nogil=True)


# -- fixed-width packing (packed codec) -------------------------------------------------------------------
@_jit
def pack_fixed(values: np.ndarray, counts: np.ndarray, bits: int, out: np.ndarray, offsets: np.ndarray) -> int:
    """Record r's `counts[r]` values (unsigned, < 2**bits) into out[offsets[r]:offsets[r + 1]], each record's
    stream padded to a whole byte. Returns the index of a value that does not fit, or -1."""
    limit = np.uint64(1) << np.uint64(bits)
    at = 0
    for r in range(len(counts)):
        pos = offsets[r]
        acc = np.uint64(0)
        nb = np.uint64(0)
        for i in range(at, at + counts[r]):
            v = np.uint64(values[i])
            if v >= limit:
                return i
            acc |= v << nb
            nb += np.uint64(bits)
            while nb >= 8:
                out[pos] = np.uint8(acc & np.uint64(0xFF))
                pos += 1
                acc >>= np.uint64(8)
                nb -= np.uint64(8)
        if nb > 0:
            out[pos] = np.uint8(acc & np.uint64(0xFF))
        at += counts[r]
    return -1


@_jit
def quantize(logprobs: np.ndarray, lo: float, step: float, out: np.ndarray) -> None:
    """`LogprobQuantizer.encode` in place of its float64 temporaries: the same float64 arithmetic per value
    (clip to [lo, 0], minus lo, over step, rounded half to even, plus 1; −inf and NaN give code 0)."""
    for i in range(len(logprobs)):
        lp = np.float64(logprobs[i])
        if np.isnan(lp) or lp == -np.inf:
            out[i] = 0
        else:
            out[i] = np.uint32(1.0 + np.rint((min(max(lp, lo), 0.0) - lo) / step))


@_jit
def clamp_ids(ids: np.ndarray, out: np.ndarray) -> None:
    """Top-k ids with an empty slot's −1 stored as 0 (its log-prob code 0 marks it)."""
    for i in range(len(ids)):
        out[i] = 0 if ids[i] < 0 else ids[i]


# -- compact coding of sampled draws (§4.3.2) -------------------------------------------------------------
@_jit
def _bit_length(v: int) -> int:
    n = 0
    while v > 0:
        v >>= 1
        n += 1
    return n


@_jit
def _sort_record(pos_off: np.ndarray, p0: int, p1: int, places: np.ndarray, counts: np.ndarray,
                 sp: np.ndarray, sc: np.ndarray, heads: np.ndarray) -> None:
    """A record's entries, position by position, in (part, place) order into sp (places) and sc (counts),
    each position at its own entries' slice; heads[p - p0]: how many have a count ≥ 2 (the head)."""
    base = pos_off[p0]
    for p in range(p0, p1):
        a, b = pos_off[p] - base, pos_off[p + 1] - base
        h = 0
        for i in range(a, b):  # insertion sort on (tail?, place): positions hold a few dozen entries
            pl, c = places[base + i], counts[base + i]
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


@_jit
def _bucket(j: int, size: int, buckets: int) -> int:
    return min(buckets * j // size, buckets - 1)


@_jit
def _record_ks(pos_off: np.ndarray, p0: int, p1: int, sp: np.ndarray, heads: np.ndarray, buckets: int,
               cost: np.ndarray, ks: np.ndarray) -> None:
    """The Rice parameter of each (part, rank bucket) of a sorted record: the k minimising
    n·(k + 1) + Σ gap >> k, the smallest on ties (0 for an empty group); cost: [2B, 64] scratch."""
    cost[:, :] = 0
    n = np.zeros(2 * buckets, dtype=np.int64)
    base = pos_off[p0]
    for p in range(p0, p1):
        a, b = pos_off[p] - base, pos_off[p + 1] - base
        h = heads[p - p0]
        for part in range(2):
            lo, hi = (a, a + h) if part == 0 else (a + h, b)
            prev = -1
            for i in range(lo, hi):
                g = sp[i] - prev - 1
                prev = sp[i]
                row = part * buckets + _bucket(i - lo, hi - lo, buckets)
                n[row] += 1
                k = 0
                while g >> k:  # (the terms past the gap's bit length are 0)
                    cost[row, k] += g >> k
                    k += 1
    for row in range(2 * buckets):
        best, best_cost = 0, cost[row, 0] + n[row]
        for k in range(1, 64):
            c = cost[row, k] + n[row] * (k + 1)
            if c < best_cost:
                best, best_cost = k, c
        ks[row] = best


@_jit
def _put(out: np.ndarray, pos: int, acc: np.uint64, nb: np.uint64, v: np.uint64, w: np.uint64
         ) -> tuple[int, np.uint64, np.uint64]:
    acc |= v << nb
    nb += w
    while nb >= 8:
        out[pos] = np.uint8(acc & np.uint64(0xFF))
        pos += 1
        acc >>= np.uint64(8)
        nb -= np.uint64(8)
    return pos, acc, nb


@_jit
def _unary(out: np.ndarray, pos: int, acc: np.uint64, nb: np.uint64, q: int) -> tuple[int, np.uint64, np.uint64]:
    """q zero bits, then a one."""
    while q >= 32:
        pos, acc, nb = _put(out, pos, acc, nb, np.uint64(0), np.uint64(32))
        q -= 32
    return _put(out, pos, acc, nb, np.uint64(1) << np.uint64(q), np.uint64(q + 1))


@_jit
def _flush(out: np.ndarray, pos: int, acc: np.uint64, nb: np.uint64) -> int:
    """Pad to a whole byte: the position after the last byte written."""
    if nb > 0:
        out[pos] = np.uint8(acc & np.uint64(0xFF))
        pos += 1
    return pos


@_jit
def compact_sizes(pos_off: np.ndarray, rec_pos: np.ndarray, places: np.ndarray, counts: np.ndarray, buckets: int,
                  ks: np.ndarray, ids_len: np.ndarray, counts_len: np.ndarray) -> None:
    """Pass 1 of the compact coder: each record's Rice parameters (ks: [records, 2B], the head's then the
    tail's) and the byte lengths of its ids and counts streams."""
    n = len(places)
    sp = np.empty(n, dtype=np.int64)
    sc = np.empty(n, dtype=np.int64)
    heads = np.empty(len(pos_off), dtype=np.int64)
    cost = np.empty((2 * buckets, 64), dtype=np.int64)
    for r in range(len(rec_pos) - 1):
        p0, p1 = rec_pos[r], rec_pos[r + 1]
        _sort_record(pos_off, p0, p1, places, counts, sp, sc, heads)
        _record_ks(pos_off, p0, p1, sp, heads, buckets, cost, ks[r])
        base = pos_off[p0]
        var_bits = una_bits = 0
        c_una = c_var = h_una = h_var = 0
        for p in range(p0, p1):
            a, b = pos_off[p] - base, pos_off[p + 1] - base
            h = heads[p - p0]
            length = _bit_length(h + 1) - 1
            c_una += length + 1
            c_var += length
            for part in range(2):
                lo, hi = (a, a + h) if part == 0 else (a + h, b)
                prev = -1
                for i in range(lo, hi):
                    g = sp[i] - prev - 1
                    prev = sp[i]
                    k = ks[r, part * buckets + _bucket(i - lo, hi - lo, buckets)]
                    var_bits += k
                    una_bits += (g >> k) + 1
                    if part == 0:
                        length = _bit_length(sc[i] - 1) - 1
                        h_una += length + 1
                        h_var += length
        ids_len[r] = 1 + 2 * buckets + (var_bits + 7) // 8 + (una_bits + 7) // 8
        counts_len[r] = (c_una + 7) // 8 + (c_var + 7) // 8 + (h_una + 7) // 8 + (h_var + 7) // 8


@_jit
def compact_write(pos_off: np.ndarray, rec_pos: np.ndarray, places: np.ndarray, counts: np.ndarray, buckets: int,
                  ks: np.ndarray, ids_out: np.ndarray, ids_off: np.ndarray, counts_out: np.ndarray,
                  counts_off: np.ndarray) -> None:
    """Pass 2: each record's streams into ids_out[ids_off[r]:...] and counts_out[counts_off[r]:...] (format
    §4.3.2). ids: B, the 2B parameters, the gaps' low bits (the head's entries, position by position,
    then the tail's; byte-padded), then their quotients in unary in the same order (byte-padded).
    counts: each position's gamma(h + 1) (the lengths in unary, byte-padded, then the low bits,
    byte-padded), then each head entry's gamma(count − 1) the same way."""
    n = len(places)
    sp = np.empty(n, dtype=np.int64)
    sc = np.empty(n, dtype=np.int64)
    heads = np.empty(len(pos_off), dtype=np.int64)
    for r in range(len(rec_pos) - 1):
        p0, p1 = rec_pos[r], rec_pos[r + 1]
        _sort_record(pos_off, p0, p1, places, counts, sp, sc, heads)
        base = pos_off[p0]
        pos = ids_off[r]
        ids_out[pos] = buckets
        for i in range(2 * buckets):
            ids_out[pos + 1 + i] = ks[r, i]
        pos += 1 + 2 * buckets
        for unary in range(2):  # the low bits, then the quotients
            acc, nb = np.uint64(0), np.uint64(0)
            for part in range(2):
                for p in range(p0, p1):
                    a, b = pos_off[p] - base, pos_off[p + 1] - base
                    h = heads[p - p0]
                    lo, hi = (a, a + h) if part == 0 else (a + h, b)
                    prev = -1
                    for i in range(lo, hi):
                        g = sp[i] - prev - 1
                        prev = sp[i]
                        k = ks[r, part * buckets + _bucket(i - lo, hi - lo, buckets)]
                        if unary:
                            pos, acc, nb = _unary(ids_out, pos, acc, nb, g >> k)
                        elif k:
                            mask = (np.uint64(1) << np.uint64(k)) - np.uint64(1)
                            pos, acc, nb = _put(ids_out, pos, acc, nb, np.uint64(g) & mask, np.uint64(k))
            pos = _flush(ids_out, pos, acc, nb)

        pos = counts_off[r]
        for unary in (1, 0):  # gamma(h + 1) of each position
            acc, nb = np.uint64(0), np.uint64(0)
            for p in range(p0, p1):
                pos, acc, nb = _gamma_part(counts_out, pos, acc, nb, heads[p - p0] + 1, unary)
            pos = _flush(counts_out, pos, acc, nb)
        for unary in (1, 0):  # then gamma(count − 1) of each head entry
            acc, nb = np.uint64(0), np.uint64(0)
            for p in range(p0, p1):
                a = pos_off[p] - base
                for i in range(a, a + heads[p - p0]):
                    pos, acc, nb = _gamma_part(counts_out, pos, acc, nb, sc[i] - 1, unary)
            pos = _flush(counts_out, pos, acc, nb)


@_jit
def _gamma_part(out: np.ndarray, pos: int, acc: np.uint64, nb: np.uint64, v: int, unary: int
                ) -> tuple[int, np.uint64, np.uint64]:
    """Elias gamma of v ≥ 1, split: its length L = bit_length(v) − 1 in unary, or its low L bits."""
    length = _bit_length(v) - 1
    if unary:
        return _unary(out, pos, acc, nb, length)
    if length:
        return _put(out, pos, acc, nb, np.uint64(v - (1 << length)), np.uint64(length))
    return pos, acc, nb
