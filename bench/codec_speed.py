"""Decode speed of the packed and compact target codecs against the loader's need.

Builds six stores of the same records through the store API (real Arrow files on disk), shaped
like the anchor run: 1024-token records, every position scored, a vocabulary of 128,256 (17-bit
ids), top-64 targets and N = 50 sampled targets drawn from a heavy-tailed distribution:

    top64           top-64, float16 log-probs, unpacked
    top64-packed    top-64, 17-bit ids, 12-bit log-probs
    sampled50       N = 50 sampled, unpacked list<list<int32>> ids + list<list<uint16>> counts
    sampled50-packed  N = 50 sampled, 17-bit ids, 6-bit counts
    sampled50-compact N = 50 sampled, ids Rice-coded with a parameter per rank bucket, counts gamma-coded
    sampled50-compact-order  the same with an id order of 4,096 listed ids (its slowest case)

and times, per store, in interleaved rounds (median of the rounds):

- decode: every record's targets out of the shard (`ColumnViews.targets_of` / `sampled_of`);
- loader: what a loader worker does per batch of 8 records: `record_sequence` (read, decode) and
  `collate` (pad, align, build tensors), i.e. `StoreDataset`'s per-batch work without the shuffle.

The bar: a loader worker must feed the anchor's offline training step, 144.6k tokens/s (H100,
docs/guides/train.md), with room to spare.

    python bench/codec_speed.py                # ~1 minute
    python bench/codec_speed.py --records 16   # smoke run

`--walk` times the compact codec's compiled check walk alone instead (`store.kernels.compact_bad`, what
`store verify` runs on the default targets and what the loader's compact decoders share): stores of
the default targets (sampled, systematic draws, N = 64, codec compact with an id order of 4,096 listed
ids; `bench/verify_speed.py`'s records) of 512-token and of 32-token records, written through the real
`ShardWriter`; CPU time per drawn entry (a distinct id of a position) over every shard's columns,
the median of interleaved rounds, next to the walk as it was when it read the unary codes through a
bit buffer, entry by entry (`bench/compact_walk_before.py`), on the same columns in the same run; and
the loader's per-record decoder `compact_weighted` (the walk, its scratch built per call, the rows
placed and padded) over every record of the same shards, one call per record as `sampled_rows` makes
them (CPU time per drawn entry; no copy of it before is kept, so its figure stands alone):

    python bench/codec_speed.py --walk         # ~1 minute
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np

from potstill.share import store_info
from potstill.store import (
    HiddenSpec,
    Record,
    StoreManifest,
    TargetSpec,
    TeacherInfo,
    TokenizerInfo,
    create_store,
    open_store,
)
from potstill.store.codec import MAX_ID_ORDER, bits_for, compact_order, sampled_from_draws
from potstill.student_train.data import collate, record_sequence

VOCAB = 128_256
ANCHOR_STEP_TOKENS_PER_S = 144_600


def make_records(count: int, length: int, k: int, n: int, seed: int) -> list[Record]:
    """Records with a valid top-k and N draws from a heavy-tailed teacher-like distribution per position:
    token ranks are geometric (p = 0.2), so most draws land on a few ids and some on rare ones."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        s = length - 1
        ranks_lp = np.log(0.2) + np.arange(k) * np.log(0.8)  # geometric probabilities of ranks 0..k-1
        noise = rng.normal(0, 0.3, size=(s, k)).cumsum(-1) * 0.1
        top_lp = (ranks_lp[None, :] + noise).astype(np.float32)
        top_lp -= np.maximum(np.log(np.exp(top_lp).sum(-1, keepdims=True)), 0)  # mass ≤ 1
        top_lp = -np.sort(-top_lp, axis=-1)
        top_ids = np.stack([rng.choice(VOCAB, size=k, replace=False) for _ in range(s)]).astype(np.int32)
        rank_draws = np.minimum(rng.geometric(0.2, size=(s, n)) - 1, k - 1)
        draws = np.take_along_axis(top_ids, rank_draws, axis=1)
        ids = rng.integers(0, VOCAB, size=length).astype(np.int32)
        out.append(Record(
            id=f"r{i:05d}", input_ids=ids, score_start=1, topk_ids=top_ids, topk_logprobs=top_lp,
            token_logprob=top_lp[:, 0].copy(),
            tail_logprob=np.log1p(-np.minimum(np.exp(top_lp.astype(np.float64)).sum(-1), 1 - 1e-7)).astype(np.float32),
            sampled=sampled_from_draws(draws),
        ))
    return out


def spec(name: str, k: int, n: int) -> TargetSpec:
    codec = next((c for c in ("packed", "compact") if f"-{c}" in name), "none")
    packed = codec != "none"
    # The draws' ids are uniform here, so no order makes them smaller: the store times its mapping.
    order = list(range(0, VOCAB, VOCAB // MAX_ID_ORDER))[:MAX_ID_ORDER][::-1] if name.endswith("-order") else None
    kind = "topk" if name.startswith("top") else "sampled"
    return TargetSpec(kind=kind, k=k if kind == "topk" else 0, samples=n if kind == "sampled" else 0, seed=0,
                      codec=codec, id_bits=bits_for(VOCAB - 1) if packed else None,
                      count_bits=bits_for(n) if codec == "packed" and kind == "sampled" else None,
                      logprob_bits=12 if packed else None, logprob_min=-24.0 if packed else None, id_order=order)


def build(root: str, name: str, records: list[Record], k: int, n: int) -> str:
    manifest = StoreManifest(
        teacher=TeacherInfo(name_or_path="synthetic", vocab_size=VOCAB),
        tokenizer=TokenizerInfo(fingerprint="sha256:synthetic", vocab_size=VOCAB),
        targets=spec(name, k, n), hidden=HiddenSpec(), generation={"bench": "codec_speed"},
    )
    url = f"{root}/{name}"
    store = create_store(url, manifest)
    kind = manifest.targets.kind
    with store.writer("w0", shard_records=len(records)) as w:
        for r in records:
            w.write(Record(id=r.id, input_ids=r.input_ids, score_start=1, token_logprob=r.token_logprob,
                           topk_ids=r.topk_ids if kind == "topk" else None,
                           topk_logprobs=r.topk_logprobs if kind == "topk" else None,
                           tail_logprob=r.tail_logprob if kind == "topk" else None,
                           sampled=r.sampled if kind == "sampled" else None))
    return url


def timed(fn: Callable[[], int], min_seconds: float = 0.3) -> float:
    """Units per second of fn (which returns how many units it processed), repeated for ≥ min_seconds."""
    done, started = 0, time.perf_counter()
    while True:
        done += fn()
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds:
            return done / elapsed


def walk(rounds: int) -> None:
    """`--walk`: ns of CPU time per drawn entry of `compact_bad`, now and before, side by side."""
    import compact_walk_before
    from verify_speed import build as build_default

    from potstill.store import kernels

    def shard_args(url: str) -> list[tuple]:
        store = open_store(url)
        spec, out = store.manifest.targets, []
        order = spec.id_order_map
        for name in store.shard_names:
            columns = store.shard(name).views.columns
            ids_off, ids_values = columns.streams["sampled_ids_packed"]
            counts_off, counts_values = columns.streams["sampled_counts_packed"]
            out.append((ids_values, ids_off.astype(np.int64), counts_values, counts_off.astype(np.int64),
                        columns.sampled_entries.astype(np.int64), np.diff(columns.tgt_off), spec.samples,
                        1 << int(spec.id_bits or 0), order.listed, order.below, True, VOCAB))
        return out

    def record_args(url: str) -> list[tuple]:
        """`compact_weighted`'s arguments, a tuple per record, as `sampled_rows` passes them."""
        spec, out = open_store(url).manifest.targets, []
        vocab = 1 << int(spec.id_bits or 0)
        order = compact_order(spec.id_order_map, vocab)
        for ids_values, ids_off, counts_values, counts_off, entries, positions, *_ in shard_args(url):
            out += [(ids_values[ids_off[r]:ids_off[r + 1]], counts_values[counts_off[r]:counts_off[r + 1]],
                     int(entries[r]), int(positions[r]), spec.samples, vocab, *order) for r in range(len(entries))]
        return out

    walks = {"before": compact_walk_before.compact_bad, "now": kernels.compact_bad}
    with tempfile.TemporaryDirectory(prefix="potstill-walk-") as root:
        plan = {"512-token records": (256, 512), "32-token records": (4096, 32)}
        urls = {what: build_default(root, f"sampled64-compact-{length}", records, length, 64, 64)
                for what, (records, length) in plan.items()}
        shards = {what: shard_args(url) for what, url in urls.items()}
        per_record = {what: record_args(url) for what, url in urls.items()}
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(rounds):
            for what, args in shards.items():
                for who, fn in walks.items():
                    assert not any(fn(*a).any() for a in args)  # (sound shards: the whole walk runs)
                    started = time.process_time()
                    for a in args:
                        fn(*a)
                    times.setdefault((what, who), []).append(time.process_time() - started)
                assert not any(kernels.compact_weighted(*a)[0] for a in per_record[what])
                started = time.process_time()
                for a in per_record[what]:
                    kernels.compact_weighted(*a)
                times.setdefault((what, "weighted"), []).append(time.process_time() - started)
        print(f"compact_bad, CPU time per drawn entry, medians of {rounds} interleaved rounds\n")
        print("| records | entries | entries per position | before: ns/entry | now: ns/entry | before / now |")
        print("|---|---:|---:|---:|---:|---:|")
        for what, args in shards.items():
            entries = sum(int(a[4].sum()) for a in args)
            positions = sum(int(a[5].sum()) for a in args)
            before, now = (statistics.median(times[(what, who)]) * 1e9 / entries for who in walks)
            print(f"| {what} | {entries:,} | {entries / positions:.1f} | {before:.2f} | {now:.2f} | {before / now:.2f}x |")
        print(f"\ncompact_weighted (the loader's decoder, a call per record), CPU time per drawn entry, medians of "
              f"{rounds} interleaved rounds\n")
        print("| records | records decoded | ns/entry | µs/record |")
        print("|---|---:|---:|---:|")
        for what, args in per_record.items():
            entries = sum(a[2] for a in args)
            took = statistics.median(times[(what, "weighted")])
            print(f"| {what} | {len(args):,} | {took * 1e9 / entries:.2f} | {took * 1e6 / len(args):.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=64)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--walk", action="store_true", help="time the compact check walk alone, now and before")
    args = parser.parse_args()
    if args.walk:
        walk(args.rounds)
        return

    records = make_records(args.records, args.length, args.k, args.samples, seed=0)
    names = ["top64", "top64-packed", "sampled50", "sampled50-packed", "sampled50-compact", "sampled50-compact-order"]
    with tempfile.TemporaryDirectory(prefix="potstill-codec-") as root:
        stores = {name: open_store(build(root, name, records, args.k, args.samples)) for name in names}
        views = {name: s.shard(s.shard_names[0]).views for name, s in stores.items()}
        readers = {name: s.shard(s.shard_names[0]) for name, s in stores.items()}
        positions = sum(r.num_scored for r in records)
        uniques = np.mean([r.sampled.num_entries / r.sampled.num_positions for r in records])

        def decode(name: str) -> Callable[[], int]:
            v = views[name]
            get = v.targets_of if name.startswith("top") else v.sampled_of

            def run() -> int:
                for j in range(v.num_rows):
                    get(j)
                return positions

            return run

        def loader(name: str) -> Callable[[], int]:
            reader, target = readers[name], ("topk" if name.startswith("top") else "sampled")

            def run() -> int:
                tokens = 0
                for start in range(0, reader.num_records, args.batch):
                    seqs = [record_sequence(reader, j, target) for j in range(start, min(start + args.batch, reader.num_records))]
                    batch = collate(seqs, k=args.k if target == "topk" else 0, pad_id=0, student_vocab=VOCAB, targets=target)
                    tokens += int(batch["attention_mask"].sum())
                return tokens

            return run

        samples: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):
            for name in names:
                samples.setdefault((name, "decode"), []).append(timed(decode(name)))
                samples.setdefault((name, "loader"), []).append(timed(loader(name)))
        print(f"{args.records} records x {args.length} tokens, vocab {VOCAB}, K={args.k}, N={args.samples} "
              f"({uniques:.1f} distinct ids per position); medians of {args.rounds} rounds\n")
        print("| store | codec | target B/scored token | decode: positions/s | loader (read + collate, batches of "
              f"{args.batch}): tokens/s | loader vs anchor step ({ANCHOR_STEP_TOKENS_PER_S / 1000:.1f}k tok/s) |")
        print("|---|---|---:|---:|---:|---:|")
        for name in names:
            info = store_info(stores[name])
            dec = statistics.median(samples[(name, "decode")])
            load = statistics.median(samples[(name, "loader")])
            print(f"| {name} | {stores[name].manifest.targets.codec} | {info['target_bytes_per_scored_token']:.1f} | "
                  f"{dec / 1e6:.2f} M | {load / 1e3:.0f} k | {load / ANCHOR_STEP_TOKENS_PER_S:.1f}x |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
