"""Compiled shard checks (numba): one pass over a shard's bytes per check, where the numpy versions
make a dozen or more passes over every entry. Each kernel returns exactly the mask of the numpy
check it replaces (tests/test_kernels.py compares them); the first record at fault is still named
by the per-record decoders, so the messages are theirs.

The kernels take flat numpy arrays and plain numbers only. `cache=True` keeps their machine code in
__pycache__, so a process compiles each signature once per installation, not once per run.
"""

from __future__ import annotations

import numba
import numpy as np

MASS_BOUND = 1 + 1e-4  # store.columns: 1 + MASS_SLACK
LOGPROB_SLACK32 = np.float32(1e-3)  # store.columns.LOGPROB_SLACK, compared in float32 as numpy does

# top-k row flags (`topk_plain_flags`, `topk_packed_flags`)
UNSOUND, REPEATED, RISING, TOO_MUCH = 1, 2, 4, 8

_jit = numba.njit(cache=True, nogil=True)


# -- bit reading ------------------------------------------------------------------------------------
@_jit
def _bits(data: np.ndarray, start: int, end: int, bit: int, width: int) -> int:
    """`width` (≤ 32) bits at bit `bit` of the bytes data[start:end], least significant first; bytes
    past `end` read as 0 (the callers check lengths themselves, as the numpy decoders do)."""
    at = start + (bit >> 3)
    shift = bit & 7
    out = np.int64(0)
    for i in range((shift + width + 7) >> 3):
        if at + i < end:
            out |= np.int64(data[at + i]) << (8 * i)
    return (out >> shift) & ((np.int64(1) << width) - 1)


@_jit
def _unary(data: np.ndarray, start: int, end: int, bit: int) -> tuple[int, int]:
    """The unary value at bit `bit` of data[start:end] (zeros before a one): (value, the bit after its
    one), or (-1, bit) when the bytes end before a one."""
    at = start + (bit >> 3)
    if at >= end:
        return -1, bit
    v = np.int64(data[at]) >> (bit & 7)
    q = 0
    if v == 0:  # skip whole zero bytes
        q = 8 - (bit & 7)
        at += 1
        while at < end and data[at] == 0:
            q += 8
            at += 1
        if at >= end:
            return -1, bit
        v = np.int64(data[at])
    while (v & 1) == 0:
        v >>= 1
        q += 1
    return q, bit + q + 1


@_jit
def _gamma(data: np.ndarray, start: int, end: int, count: int, out: np.ndarray) -> int:
    """`count` Elias-gamma values of a `_gamma_stream` at byte `start` (< `end`) into out[:count]: the
    lengths in unary, byte-padded, then the low bits. The byte after them, or -1 where
    `store.codec._decode_gamma` refuses the stream (too short, a length above 16)."""
    bit = 0
    total = 0
    for i in range(count):
        q, bit = _unary(data, start, end, bit)
        if q < 0 or q > 16:
            return -1
        out[i] = q
        total += q
    low = start + ((bit + 7) >> 3)  # (0 bytes for no values)
    need = (total + 7) >> 3
    if low + need > end:
        return -1
    bit = 0
    for i in range(count):
        length = out[i]
        out[i] = (np.int64(1) << length) + _bits(data, low, end, bit, length)
        bit += length
    return low + need


@_jit
def _id_at(place: int, listed: np.ndarray, below: np.ndarray) -> int:
    """`IdOrder.ids` of one place: the listed ids first, then every other id in ascending order."""
    m = len(listed)
    if place < m:
        return listed[place]
    n = place - m
    return n + np.searchsorted(below, n, side="right")


# -- compact sampled streams (format §4.3.2) ----------------------------------------------------------
@_jit
def _compact_record_bad(ids_values: np.ndarray, i0: int, i1: int, counts_values: np.ndarray, c0: int, c1: int,
                        entries: int, positions: int, samples: int, vocab: int, listed: np.ndarray,
                        below: np.ndarray, by_place: bool, tv: int, h: np.ndarray, tails: np.ndarray,
                        hc: np.ndarray, hp: np.ndarray) -> bool:
    """Whether `decode_sampled_compact` refuses one record's streams or it holds an id ≥ tv. Scratch:
    h, tails [positions]; hc, hp [positions · N/2] (head counts, then head places)."""
    # counts stream: head sizes h + 1, then the head counts − 1, both gamma-coded
    at = _gamma(counts_values, c0, c1, positions, h)
    if at < 0:
        return True
    heads = 0
    for i in range(positions):
        h[i] -= 1
        if h[i] > samples // 2:  # every head count is ≥ 2
            return True
        heads += h[i]
    if _gamma(counts_values, at, c1, heads, hc) < 0:
        return True
    e = 0
    total = heads
    for i in range(positions):
        drawn = 0
        for _ in range(h[i]):
            drawn += hc[e] + 1
            e += 1
        tails[i] = samples - drawn
        if tails[i] < 0:
            return True
        total += tails[i]
    if total != entries:
        return True
    # ids stream: B, the 2B Rice parameters (head buckets, tail buckets), the gaps' low bits, their
    # quotients in unary; a gap's width is its bucket's parameter, min(B·j // d, B − 1) for entry j of d
    if i1 - i0 < 1:
        return True
    buckets = np.int64(ids_values[i0])
    if buckets < 1 or buckets > 64 or i1 - i0 < 1 + 2 * buckets:
        return True
    ks = i0 + 1
    for b in range(2 * buckets):
        if ids_values[ks + b] > 31:
            return True
    width_sum = 0
    for i in range(positions):
        for j in range(h[i]):
            width_sum += ids_values[ks + min(buckets * j // h[i], buckets - 1)]
        for j in range(tails[i]):
            width_sum += ids_values[ks + buckets + min(buckets * j // tails[i], buckets - 1)]
    low0 = ks + 2 * buckets
    q0 = low0 + ((width_sum + 7) >> 3)
    if q0 > i1:
        return True
    lbit = 0
    qbit = 0
    for part in range(2):  # the head entries of every position, then the tail entries
        head_end = 0
        for i in range(positions):
            d = h[i] if part == 0 else tails[i]
            head_at = head_end  # this position's head places: hp[head_at:head_end]
            head_end += h[i]
            place = np.int64(-1)
            for j in range(d):
                w = np.int64(ids_values[ks + part * buckets + min(buckets * j // d, buckets - 1)])
                low = _bits(ids_values, low0, i1, lbit, w)
                lbit += w
                q, qbit = _unary(ids_values, q0, i1, qbit)
                if q < 0:
                    return True
                place += ((q << w) | low) + 1
                if place >= vocab:
                    return True
                if (place if by_place else _id_at(place, listed, below)) >= tv:
                    return True
                if part == 0:
                    hp[head_at + j] = place
                else:  # both parts rise within a position: a merge finds a place in both
                    while head_at < head_end and hp[head_at] < place:
                        head_at += 1
                    if head_at < head_end and hp[head_at] == place:
                        return True
    return False


@_jit
def compact_bad(ids_values: np.ndarray, ids_offsets: np.ndarray, counts_values: np.ndarray,
                counts_offsets: np.ndarray, entries: np.ndarray, positions: np.ndarray, samples: int, vocab: int,
                listed: np.ndarray, below: np.ndarray, by_place: bool, tv: int) -> np.ndarray:
    """`store.codec.compact_shard_bad` of a shard: [R] records whose streams the per-record decoder
    refuses or that hold an id ≥ tv (`listed` / `below`: the id order's arrays, empty for none;
    `by_place`: places below tv are the ids below tv, so the places alone say which are too large)."""
    records = len(positions)
    most = 0
    for r in range(records):
        most = max(most, positions[r])
    h = np.empty(most, dtype=np.int64)
    tails = np.empty(most, dtype=np.int64)
    hc = np.empty(most * (samples // 2) + 1, dtype=np.int64)
    hp = np.empty(most * (samples // 2) + 1, dtype=np.int64)
    bad = np.zeros(records, dtype=np.bool_)
    for r in range(records):
        bad[r] = _compact_record_bad(ids_values, ids_offsets[r], ids_offsets[r + 1], counts_values,
                                     counts_offsets[r], counts_offsets[r + 1], entries[r], positions[r], samples,
                                     vocab, listed, below, by_place, tv, h, tails, hc, hp)
    return bad
