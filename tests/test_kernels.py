"""The compiled shard checks (store/kernels.py) flag exactly the records and rows the numpy checks
flag: on sound shards, and on damaged ones (bits flipped, streams cut short or with trailing bytes,
ids out of range, top-K rows no distribution has)."""

from __future__ import annotations

import numpy as np
import pytest
from test_shard_checks import _damaged, _flat

from potstill.store import StoreError, kernels
from potstill.store.codec import (
    IdOrder,
    compact_shard_bad,
    decode_sampled_compact,
    encode_sampled_compact,
    sampled_from_draws,
)


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
    """The kernel called as store/targets/codecs.py calls it."""
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
            t = decode_sampled_compact(ids_values[ids_off[r]:ids_off[r + 1]], counts_values[counts_off[r]:counts_off[r + 1]],
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
        if order is None or int(order.listed.max()) < tv:  # (the numpy shard check maps places only then)
            np.testing.assert_array_equal(got, compact_shard_bad(*shard, n, vocab, order, tv))
        flagged, total = flagged + int(want.sum()), total + len(want)
    assert 0 < flagged < total  # both kinds of record were there
