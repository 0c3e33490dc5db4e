"""How many bytes would a per-context id order save on a sampled store's draws?

The compact codec (docs/reference/store-format.md §4.3.2) codes each drawn id by its place in one order for the whole
store: the text's most frequent tokens first. A teacher's draws depend on the context, so an order per
context could put the ids it draws at smaller places. This bench measures the simplest such order,
before building it into the format: for each current token c (the token before the predicted one),
a list of the ids drawn after c in at least `min_hits` positions of the store, most often first (at
most `max_list`); an id's place at a position is its rank in its context's list, or, for an id not
listed, the list's length plus its compact place. Everything else is the compact coding exactly (head
and tail, Rice parameters by rank bucket: `store.codec.encode_compact_places`), so the sizes are
real stream bytes.

The lists are part of the store, so their bytes count: 2 bytes per listed id (a lower bound for any
plain table of 16-bit ids) over all the store's scored tokens, since a store would hold one table. `fit` says which records the lists are
counted from: `all` (the store's own draws: what a rewrite of a finished store could do) or `half`
(the first half of the records, measured on the second half: what a table made from the first part
of a run could do for the rest).

    python bench/context_order.py --store $TMPDIR/potstill-fidelity-cpu/stores/systematic128.compact.store
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from potstill.store import Record, open_store
from potstill.store.codec import IdOrder, encode_compact_places


def contexts(record: Record) -> np.ndarray:
    """Each scored position's current token: entry j predicts input_ids[s + j] after input_ids[s + j − 1]."""
    ids = np.asarray(record.input_ids, dtype=np.int64)
    return ids[record.score_start - 1 : len(ids) - 1]


def entry_keys(records: list[Record], vocab: int) -> np.ndarray:
    """context · vocab + id for every drawn entry of `records`."""
    return np.concatenate([np.repeat(contexts(r), np.diff(r.sampled.offsets)) * vocab + r.sampled.ids for r in records])


def context_lists(records: list[Record], vocab: int, order: IdOrder, min_hits: int, max_list: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sorted keys context · vocab + id of the listed ids, their ranks in their list, each context's list length)."""
    keys, hits = np.unique(entry_keys(records, vocab), return_counts=True)
    keep = hits >= min_hits
    ctx, ids, hits = keys[keep] // vocab, keys[keep] % vocab, hits[keep]
    by_rank = np.lexsort((order.rank(ids), -hits, ctx))  # most hits first, then the compact order
    ctx, ids = ctx[by_rank], ids[by_rank]
    rank = np.arange(len(ctx)) - np.searchsorted(ctx, ctx, side="left")
    ctx, ids, rank = ctx[rank < max_list], ids[rank < max_list], rank[rank < max_list]
    key = ctx * vocab + ids
    at = np.argsort(key)
    return key[at], rank[at], np.bincount(ctx, minlength=vocab)


def coded_bytes(records: list[Record], vocab: int, order: IdOrder, lists: tuple[np.ndarray, np.ndarray, np.ndarray] | None
                ) -> int:
    """The records' ids and counts streams in the compact coding, with places from `lists` (None: the store's id order)."""
    total = 0
    for r in records:
        t = r.sampled
        places = order.rank(t.ids)
        if lists is not None and len(lists[0]):
            listed, rank, length = lists
            ctx = np.repeat(contexts(r), np.diff(t.offsets))
            key = ctx * vocab + t.ids
            at = np.minimum(np.searchsorted(listed, key), len(listed) - 1)
            places = np.where(listed[at] == key, rank[at], length[ctx] + places)
        total += sum(len(s) for s in encode_compact_places(t, places))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True, help="a store with sampled targets")
    parser.add_argument("--min-hits", default="2,4,8,16")
    parser.add_argument("--max-list", default="256,1024")
    parser.add_argument("--records", type=int, default=None, help="only the store's first RECORDS records (a quick look)")
    args = parser.parse_args()
    started = time.time()
    store = open_store(args.store)
    if not store.manifest.targets.has_sampled:
        raise SystemExit(f"{args.store}: the store has no sampled targets")
    records = list(store.iter_records())[: args.records]
    scored = sum(r.sampled.num_positions for r in records)
    vocab = 1 << int(store.manifest.targets.id_bits or 0)
    order = IdOrder(IdOrder.from_tokens([r.input_ids for r in records]), vocab=vocab)
    half = len(records) // 2
    print(f"{args.store}: {len(records)} records, "
          f"{sum(r.sampled.num_entries for r in records) / scored:.2f} "
          f"distinct ids per position, N = {store.manifest.targets.samples}\n")
    print("| fit | min hits | max list | listed ids | coded draws, B/token | lists, B/token | total, B/token | total / compact |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for fit, fitted, measured in (("all", records, records), ("half", records[:half], records[half:])):
        positions = sum(r.sampled.num_positions for r in measured)
        base = coded_bytes(measured, vocab, order, None) / positions
        print(f"| {fit} | compact | - | - | {base:.2f} | - | {base:.2f} | 1.00 |")
        for min_hits in map(int, args.min_hits.split(",")):
            for max_list in map(int, args.max_list.split(",")):
                lists = context_lists(fitted, vocab, order, min_hits, max_list)
                data = coded_bytes(measured, vocab, order, lists) / positions
                table = 2 * len(lists[0]) / scored
                print(f"| {fit} | {min_hits} | {max_list:,} | {len(lists[0]):,} | {data:.2f} | {table:.2f} | "
                      f"{data + table:.2f} | {(data + table) / base:.2f} |", flush=True)
    print(f"\n({(time.time() - started) / 60:.1f} min)")


if __name__ == "__main__":
    main()
