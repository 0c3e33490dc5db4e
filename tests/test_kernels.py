"""The compiled shard checks (store/kernels.py) flag exactly the records and rows the numpy checks
flag: on sound shards, and on damaged ones (bits flipped, streams cut short or with trailing bytes,
ids out of range, top-K rows no distribution has)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from compact_reference import reference_decode_compact
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
