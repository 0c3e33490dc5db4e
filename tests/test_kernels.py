"""The compiled shard checks (store/kernels.py) flag exactly the records and rows the numpy checks
flag: on sound shards, and on damaged ones (bits flipped, streams cut short or with trailing bytes,
ids out of range, top-K rows no distribution has)."""

from __future__ import annotations

import itertools

import compact_walk_before
import numpy as np
import pytest
from compact_reference import pack_unary, pack_varbits, reference_decode_compact
from test_shard_checks import _damaged, _flat

from potstill.store import StoreError, kernels
from potstill.store.codec import (
    IdOrder,
    LogprobQuantizer,
    compact_order,
    decode_sampled_compact,
    encode_sampled_compact,
    pack_bits,
    sampled_from_draws,
    unpack_bits,
)
from potstill.store.columns import float_rounding, impossible_topk, unsound_topk


def _compact_shard(rng: np.random.Generator, n: int, vocab: int, order: IdOrder | None) -> tuple:
    records = []
    for _ in range(int(rng.integers(1, 12))):
        s = int(rng.integers(0, 12))
        spread = rng.random() < 0.5
        draws = rng.integers(0, vocab, size=(s, n)) if spread else np.minimum(rng.geometric(0.2, size=(s, n)) - 1, vocab - 1)
        t = sampled_from_draws(draws)
        a, b = encode_sampled_compact(t, order)
        entries = t.num_entries
        if rng.random() < 0.4:
            a, b = _damaged(rng, a, b)
        if rng.random() < 0.05:
            entries += int(rng.integers(-2, 3))
        records.append((a, b, entries, s))
    ids_values, ids_off = _flat([r[0] for r in records])
    counts_values, counts_off = _flat([r[1] for r in records])
    return (ids_values, ids_off, counts_values, counts_off, np.array([r[2] for r in records]),
            np.array([r[3] for r in records]))


def compact_kernel_bad(ids_values, ids_off, counts_values, counts_off, entries, positions, n, vocab, order, tv):
    """The kernel, called as store/targets/codecs.py calls it."""
    listed = order.listed if order is not None else np.zeros(0, np.int64)
    below = order.below if order is not None else np.zeros(0, np.int64)
    by_place = order is None or not len(listed) or int(listed.max()) < tv
    return kernels.compact_bad(ids_values, ids_off.astype(np.int64), counts_values, counts_off.astype(np.int64),
                               entries.astype(np.int64), positions.astype(np.int64), n, vocab, listed, below,
                               by_place, tv)


def _record_by_record(ids_values, ids_off, counts_values, counts_off, entries, positions, n, vocab, order, tv):
    """The definition: the per-record decoder refuses the record's streams, or an id is >= tv."""
    bad = np.zeros(len(entries), dtype=bool)
    for r in range(len(entries)):
        try:
            t = reference_decode_compact(ids_values[ids_off[r]:ids_off[r + 1]], counts_values[counts_off[r]:counts_off[r + 1]],
                                         int(entries[r]), int(positions[r]), n, vocab, id_order=order)
            bad[r] = bool(len(t.ids)) and int(t.ids.max()) >= tv
        except StoreError:
            bad[r] = True
    return bad


@pytest.mark.parametrize("seed", range(6))
def test_the_compact_kernel_flags_the_records_the_numpy_check_flags(seed: int) -> None:
    rng = np.random.default_rng(seed)
    flagged = total = 0
    for _ in range(80):
        n = int(rng.choice([1, 2, 12, 64, 1000]))
        vocab = int(rng.choice([2, 50, 4096, 1 << 17]))
        order = IdOrder(rng.permutation(vocab)[:40].tolist(), vocab=vocab) if vocab >= 50 and rng.random() < 0.5 else None
        shard = _compact_shard(rng, n, vocab, order)
        tv = int(rng.choice([vocab, max(vocab // 2, 1), vocab * 2]))  # ids beyond an input vocabulary too
        want = _record_by_record(*shard, n, vocab, order, tv)
        got = compact_kernel_bad(*shard, n, vocab, order, tv)
        np.testing.assert_array_equal(got, want)
        flagged, total = flagged + int(want.sum()), total + len(want)
    assert 0 < flagged < total  # both kinds of record were there


@pytest.mark.parametrize("seed", range(4))
def test_the_compiled_compact_decoders_read_what_the_numpy_reference_reads(seed: int) -> None:
    """Record by record, sound and damaged: `decode_sampled_compact` (CSR) and `compact_weighted` (the
    loader's padded rows) give the reference's targets exactly, and refuse what it refuses."""
    rng = np.random.default_rng(100 + seed)
    decoded = refused = 0
    for _ in range(60):
        n = int(rng.choice([1, 2, 12, 64, 1000]))
        vocab = int(rng.choice([2, 50, 4096, 1 << 17]))
        order = IdOrder(rng.permutation(vocab)[:40].tolist(), vocab=vocab if rng.random() < 0.5 else None) \
            if vocab >= 50 and rng.random() < 0.6 else None
        ids_values, ids_off, counts_values, counts_off, entries, positions = _compact_shard(rng, n, vocab, order)
        for r in range(len(entries)):
            args = (ids_values[ids_off[r]:ids_off[r + 1]], counts_values[counts_off[r]:counts_off[r + 1]],
                    int(entries[r]), int(positions[r]), n, vocab)
            try:
                want = reference_decode_compact(*args, id_order=order)
            except StoreError:
                with pytest.raises(StoreError):
                    decode_sampled_compact(*args, id_order=order)
                assert kernels.compact_weighted(*args, *compact_order(order, vocab))[0] != 0
                refused += 1
                continue
            got = decode_sampled_compact(*args, id_order=order)
            for a, b in ((got.offsets, want.offsets), (got.ids, want.ids), (got.counts, want.counts)):
                assert a.dtype == b.dtype and np.array_equal(a, b)
            wrong, ids, weights, lengths = kernels.compact_weighted(*args, *compact_order(order, vocab))
            padded_ids, counts = want.padded()
            assert wrong == 0 and np.array_equal(lengths, want.lengths()) and np.array_equal(ids, padded_ids)
            assert weights.dtype == np.float32 and np.array_equal(weights, (counts / n).astype(np.float32))
            decoded += 1
    assert decoded and refused


def test_a_record_of_the_largest_n_is_decoded_with_scratch_of_its_own_size() -> None:
    """N = 65,535, the most a store holds: the per-record decoders build their scratch on every call,
    so it must take a few dozen bytes per entry and position whatever N is (a row per head / tail
    size up to N is megabytes a record), and they still read what the reference reads."""
    rng = np.random.default_rng(7)
    n, vocab = 65535, 1 << 17
    few = np.minimum(rng.geometric(0.3, size=(3, n)) - 1, 40)  # a few ids per position, counts in the thousands
    spread = rng.integers(0, vocab, size=(1, n))  # most draws distinct: entries near N
    for draws in (few, spread):
        t = sampled_from_draws(draws)
        a, b = encode_sampled_compact(t)
        entries, positions = t.num_entries, t.num_positions
        scratch = kernels._compact_scratch(positions, entries, n)
        assert sum(x.nbytes for x in scratch) <= 80 * (entries + positions) + 20_000
        args = (a, b, entries, positions, n, vocab)
        want = reference_decode_compact(*args)
        got = decode_sampled_compact(*args)
        for x, y in ((got.offsets, want.offsets), (got.ids, want.ids), (got.counts, want.counts)):
            assert x.dtype == y.dtype and np.array_equal(x, y)
        wrong, ids, weights, lengths = kernels.compact_weighted(*args, *compact_order(None, vocab))
        padded_ids, counts = want.padded()
        assert wrong == 0 and np.array_equal(lengths, want.lengths()) and np.array_equal(ids, padded_ids)
        assert np.array_equal(weights, (counts / n).astype(np.float32))


def _codes(a: np.ndarray, b: np.ndarray, entries: int, positions: int, n: int, vocab: int, pad: int) -> tuple[int, int]:
    """(the walk's code, the code of the walk before) for one record's streams (0: sound), read from
    arrays with `pad` bytes past them (a shard's columns hold the next records there)."""
    none = np.zeros(0, np.int64)
    ids, counts = (np.concatenate([x, np.full(pad, 0xA5, np.uint8)]) for x in (a, b))
    args = (ids, 0, len(a), counts, 0, len(b), entries, positions, n, vocab, none, none, True, vocab)
    now = kernels._compact_record(*args, *kernels._compact_scratch(positions, entries, n))
    return now, compact_walk_before._compact_record(*args, *compact_walk_before._compact_scratch(positions, entries, n))


def _parts(t) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each position's head places (count ≥ 2) and tail places, ascending (no id order: places are ids)."""
    heads, tails = [], []
    for i in range(t.num_positions):
        ids, counts = t.ids[t.offsets[i]:t.offsets[i + 1]], t.counts[t.offsets[i]:t.offsets[i + 1]]
        heads.append(np.sort(ids[counts >= 2]).astype(np.int64))
        tails.append(np.sort(ids[counts == 1]).astype(np.int64))
    return heads, tails


def _ids_stream(heads: list[np.ndarray], tails: list[np.ndarray], ks: np.ndarray) -> np.ndarray:
    """A compact ids stream (format §4.3.2) of these places with these Rice parameters (B = len(ks) / 2)
    rather than the encoder's: B, the parameters, the gaps' low bits, their quotients in unary."""
    buckets = len(ks) // 2
    gaps, widths = [], []
    for part, places in enumerate((heads, tails)):
        for p in places:
            gaps += (np.diff(p, prepend=-1) - 1).tolist()
            widths += [int(ks[part * buckets + min(buckets * j // len(p), buckets - 1)]) for j in range(len(p))]
    g, w = np.array(gaps, np.int64), np.array(widths, np.int64)
    return np.concatenate([np.array([buckets, *ks], np.uint8), pack_varbits(g & ((1 << w) - 1), w),
                           pack_unary(g >> w)]).astype(np.uint8)


@pytest.mark.parametrize("buckets", [1, 8, 64])
@pytest.mark.parametrize("widths", ["0", "31", "mixed"])
def test_the_compact_walk_reads_any_rice_parameters_and_names_a_cut_as_before(buckets: int, widths: str) -> None:
    """Hand-made streams: Rice parameters 0 (quotients of thousands of bits, across many words), 31
    (low bits only) or mixed, B = 1, 8, 64; tails with places in the same slot of the walk's stamp
    table as a head's (a multiple of 2,048 apart). Read as the reference reads them, from an array
    that ends with the record and from one with more bytes after it; each stream cut at every byte
    (those near its ends and some between) gets the code the walk before gave, which the reference
    refuses too."""
    rng = np.random.default_rng(buckets)
    n, vocab = 64, 1 << 31 if widths == "31" else 1 << 22
    for _ in range(2):
        s = int(rng.integers(1, 6))
        draws = np.minimum(rng.geometric(0.15, size=(s, n)) - 1, 40) * 7 + 2048 * rng.integers(0, 3, size=(s, 1))
        draws = np.where(rng.random((s, n)) < 0.2, (draws % 2048) + 2048 * rng.integers(1, 4, size=(s, n)), draws)
        if widths == "0":
            draws = draws * 3 + 3000
        t = sampled_from_draws(draws)
        counts = encode_sampled_compact(t)[1]
        ks = {"0": np.zeros(2 * buckets), "31": np.full(2 * buckets, 31),
              "mixed": rng.integers(0, 32, size=2 * buckets)}[widths].astype(np.uint8)
        ids = _ids_stream(*_parts(t), ks)
        args = (t.num_entries, t.num_positions, n, vocab)
        want = reference_decode_compact(ids, counts, *args)
        got = decode_sampled_compact(ids, counts, *args)
        for x, y in ((got.offsets, want.offsets), (got.ids, want.ids), (got.counts, want.counts)):
            assert np.array_equal(x, y)
        assert _codes(ids, counts, *args, pad=0) == _codes(ids, counts, *args, pad=16) == (0, 0)
        ends = range(len(ids) - 40, len(ids))  # (every cut near either end, some between)
        for cut in sorted({*range(min(len(ids), 40)), *rng.integers(0, len(ids), size=200), *ends}):
            for pad in (0, 16):
                now, before = _codes(ids[:cut], counts, *args, pad=pad)
                assert now == before != 0
        for cut in rng.integers(0, len(ids), size=8):
            with pytest.raises(StoreError):
                reference_decode_compact(ids[:cut], counts, *args)
        for cut in range(len(counts)):
            now, before = _codes(ids, counts[:cut], *args, pad=16)
            assert now == before != 0


def test_a_tail_place_in_a_head_of_thousands_is_found() -> None:
    """N = 65,535 spread draws: a head of thousands of places shares every slot of the walk's stamp
    table, so a tail place is looked for among them by bisection; one that is the head's first, a
    middle or its last place is named TWICE, as the walk before and the loader's decoder name it."""
    rng = np.random.default_rng(8)
    n, vocab = 65535, 1 << 17
    t = sampled_from_draws(rng.integers(0, vocab, size=(1, n)))
    ids, counts = encode_sampled_compact(t)
    heads, tails = _parts(t)
    assert len(heads[0]) > 10_000
    for k in (0, len(heads[0]) // 2 + 1, len(heads[0]) - 1):
        damaged = [np.unique(np.concatenate([tails[0][1:], heads[0][k:k + 1]]))]
        a = _ids_stream(heads, damaged, ids[1:1 + 2 * int(ids[0])])
        assert _codes(a, counts, t.num_entries, 1, n, vocab, pad=16) == (kernels.TWICE, kernels.TWICE)
        assert kernels.compact_weighted(a, counts, t.num_entries, 1, n, vocab, *compact_order(None, vocab))[0] \
            == kernels.TWICE


def test_the_compact_walk_names_each_fault_the_walk_before_named() -> None:
    """Damaged records (bits flipped, streams cut or lengthened, entries miscounted, a vocabulary too
    small, a tail place that is a head place too, a bad bucket count or Rice parameter, a head too
    big): the same code as the walk before, on records that reach every code."""
    rng = np.random.default_rng(7)
    seen = set()
    for _ in range(1500):
        n = int(rng.choice([2, 12, 64]))
        s = int(rng.integers(1, 12))
        t = sampled_from_draws(np.minimum(rng.geometric(0.2, size=(s, n)) - 1, 300) * 3)
        ids, counts = encode_sampled_compact(t)
        entries, vocab = t.num_entries, 1024
        how = int(rng.integers(0, 7))
        if how == 0:
            ids, counts = _damaged(rng, ids, counts)
        elif how == 1:
            entries += int(rng.choice([-2, -1, 1, 2]))
        elif how == 2:
            vocab = int(rng.integers(1, 1 + int(t.ids.max(initial=0)) + 1))
        elif how == 3:  # a tail place that is in its position's head too
            heads, tails = _parts(t)
            both = [i for i in range(s) if len(heads[i]) and len(tails[i])]
            if both:
                i = int(rng.choice(both))
                tails[i] = np.unique(np.concatenate([tails[i][1:], heads[i][rng.integers(len(heads[i])):][:1]]))
                ids = _ids_stream(heads, tails, ids[1:1 + 2 * int(ids[0])])
        elif how == 4:
            ids = ids.copy()
            ids[0] = rng.choice([0, 65, int(ids[0])])
            ids[1 + rng.integers(2 * 8)] = rng.choice([32, 200, ids[1]])
        elif how == 5:  # a head size above N/2: the first position's head size + 1, gamma-coded anew
            counts = counts.copy()
            counts[0] = 0
        for pad in (0, 16):
            now, before = _codes(ids, counts, entries, s, n, vocab, pad)
            assert now == before
            seen.add(before)
    assert seen == set(range(10))  # sound, and each code


# -- top-k rows --------------------------------------------------------------------------------------
def _topk_rows(rng: np.random.Generator, rows: int, k: int, vocab: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sound top-K rows with a tail, then damage in some: sums > 1, an id twice, ascending log-probs,
    NaN / ±inf, empty slots (sound ones and not), ids out of range, log-probs above 0."""
    ids = np.stack([rng.choice(vocab, size=k, replace=False) for _ in range(rows)]).astype(np.int32)
    lp = np.sort(np.log(rng.dirichlet(np.full(k + 1, 0.3), size=rows))[:, :k], axis=1)[:, ::-1].astype(np.float32)
    lp = np.maximum(lp, -80).astype(np.float32)
    tail = np.log1p(-np.minimum(np.exp(lp.astype(np.float64)).sum(-1), 1 - 1e-7)).astype(np.float32)
    for r in np.flatnonzero(rng.random(rows) < 0.5):
        j, i = rng.integers(k), rng.integers(k)
        how = rng.integers(9)
        if how == 0:
            tail[r] = np.float32(np.log(rng.uniform(0.01, 0.9)))  # too much mass (mostly)
        elif how == 1 and j != i:
            ids[r, j] = ids[r, i]
        elif how == 2 and j != i:
            lp[r, [min(i, j), max(i, j)]] = lp[r, [max(i, j), min(i, j)]]
        elif how == 3:
            lp[r, j] = rng.choice([np.nan, np.inf, -np.inf])
        elif how == 4:  # an empty slot at the end: sound
            ids[r, -1], lp[r, -1] = -1, -np.inf
        elif how == 5:
            ids[r, j] = -1  # an empty slot with a log-prob
        elif how == 6:
            ids[r, j] = rng.choice([-2, vocab, vocab + 5])
        elif how == 7:
            lp[r, 0] = rng.choice([np.float32(1e-3), np.float32(2e-3), np.float32(0.5)])
        elif how == 8:  # a mass just at the bound
            tail[r] = np.float32(np.log(max(1 + 1e-4 - np.exp(lp[r].astype(np.float64)).sum(), 1e-30)))
    return ids, lp, tail


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("k", [1, 5, 8, 64, 130])
def test_the_plain_top_k_kernel_flags_the_rows_the_numpy_checks_flag(dtype, k: int) -> None:
    rng = np.random.default_rng(k)
    vocab = 1000
    ids, lp, tail = _topk_rows(rng, 3000, k, vocab)
    lp = lp.astype(dtype)
    if dtype == np.float16:
        flags = kernels.topk_half_flags(ids, lp.view(np.uint16), tail, vocab, kernels.half_table())
    else:
        flags = kernels.topk_plain_flags(ids, lp, tail, vocab)
    np.testing.assert_array_equal((flags & kernels.UNSOUND) > 0, unsound_topk(ids, lp, vocab))
    masks = [mask for _, mask in impossible_topk(ids, lp, float_rounding(lp), tail)]
    for flag, mask in zip((kernels.REPEATED, kernels.RISING, kernels.TOO_MUCH), masks, strict=True):
        np.testing.assert_array_equal((flags & flag) > 0, mask)
        assert 0 < mask.sum() < len(mask) or k == 1


def _packed_reference(ids_streams, lp_streams, scored, tail, k, id_bits, q, tv) -> np.ndarray:
    """The numpy check the packed kernel replaces, record by record."""
    bad, row = np.zeros(len(scored), dtype=bool), 0
    for r, s in enumerate(scored):
        codes = unpack_bits(lp_streams[r], s * k, q.bits).reshape(-1, k)
        ids = unpack_bits(ids_streams[r], s * k, id_bits).astype(np.int64).reshape(-1, k)
        ids[codes == 0] = -1
        lp = q.decode(codes)
        err = q.max_error + np.abs(lp.astype(np.float64)) * 2.0**-24
        flagged = (ids >= tv).any(-1)
        for _, mask in impossible_topk(ids, lp, err, tail[row : row + s], clipped=q.lo + q.step / 2):
            flagged |= mask
        bad[r], row = flagged.any(), row + s
    return bad


@pytest.mark.parametrize("k", [1, 8, 64])
@pytest.mark.parametrize("id_bits,tv", [(10, 1000), (10, 1024), (17, 1000)])
def test_the_packed_top_k_kernel_flags_the_records_the_numpy_check_flags(k: int, id_bits: int, tv: int) -> None:
    rng = np.random.default_rng(k * id_bits)
    q = LogprobQuantizer(12, -24.0)
    scored = rng.integers(0, 9, size=300)
    ids, lp, tail = _topk_rows(rng, int(scored.sum()), k, 1000)
    ids = np.where((ids < 0) | (ids >= 1 << id_bits), 1000 + (ids % 24), ids)  # (what id_bits can hold)
    codes = q.encode(lp)
    cut = np.concatenate([[0], np.cumsum(scored)])
    ids_streams = [pack_bits(ids[a:b].reshape(-1), id_bits) for a, b in itertools.pairwise(cut)]
    lp_streams = [pack_bits(codes[a:b].reshape(-1), q.bits) for a, b in itertools.pairwise(cut)]
    want = _packed_reference(ids_streams, lp_streams, scored, tail, k, id_bits, q, tv)
    id_values, id_off = _flat(ids_streams)
    lp_values, lp_off = _flat(lp_streams)
    got = kernels.topk_packed_bad(id_values, id_off.astype(np.int64), lp_values, lp_off.astype(np.int64),
                                  cut.astype(np.int64), tail, k, id_bits, q.bits, q.lo, q.step, q.max_error, tv)
    np.testing.assert_array_equal(got, want)
    assert 0 < want.sum() < len(want)


@pytest.mark.parametrize("n", [0, 3, 8, 13, 64, 128, 129, 300, 1000, 4099])
def test_masses_are_summed_in_numpys_order(n: int) -> None:
    x = np.exp(np.random.default_rng(n).normal(size=(50, n)) * 5)
    want = x.sum(-1)
    got = np.array([0.0 + kernels._pairwise(row, 0, n) for row in x])
    np.testing.assert_array_equal(got, want)  # exactly: the same additions in the same order


def _key_cases() -> list[str]:
    """Ids of every length around sha256's block and padding edges (55/56, 63/64, 119/120 bytes), in
    one- to four-byte UTF-8, an empty id, long ones, and random text."""
    rng = np.random.default_rng(11)
    cases = [""] + [ch * n for ch in ("a", "é", "☃", "🙂") for n in range(0, 131)]
    cases += ["z" * 1000, "record-0000042", "a\x00b"]
    cases += ["".join(chr(int(c)) for c in rng.integers(32, 0xD7FF, size=int(n))) for n in rng.integers(0, 200, 300)]
    return cases


def test_the_compiled_id_keys_are_the_first_8_bytes_of_hashlibs_sha256() -> None:
    import pyarrow as pa

    from potstill.store.ids import array_keys, id_key

    ids = _key_cases()
    want = np.array([id_key(i) for i in ids], dtype=np.uint64)
    assert np.array_equal(array_keys(pa.array(ids, pa.string())), want)
    assert np.array_equal(array_keys(pa.array(ids, pa.large_string())), want)  # int64 offsets
    assert np.array_equal(array_keys(pa.array(ids, pa.string()).slice(7, 200)), want[7:207])  # an offset array
    assert array_keys(pa.array([], pa.string())).dtype == np.uint64 and len(array_keys(pa.array([], pa.string()))) == 0
