"""`store verify` against hashing the same files, side by side.

Writes stores through the real `ShardWriter` (records of `--length` tokens, every position but the
first scored, a vocabulary of 128,256 with 17-bit ids): the default targets of `potstill generate`
(sampled, systematic draws, N = 64, codec compact with an id order of 4,096 listed ids) and top-64
targets plain and packed, plus a short-record variant of the default. Then, per store, in
interleaved rounds (median of the rounds):

- hash:   sha256 of every file of the store (`store.verify.hash_file`: 256 KiB reads into one reused
          buffer), one thread;
- verify: `verify_store` with --jobs 1 (and --jobs 2: two shards at once, each in a thread), every
  checksum plus the value checks;
  "in turn": --jobs 1 with each shard hashed and then checked, rather than hashed one shard ahead
  in a thread while the one before is checked;
- quick:  `verify_store(quick=True)`: commit records, manifest, file presence and sizes;
- values by shard / by record: the value checks alone on opened shards, as verify runs them (a
  shard at once) and record by record (how the packed codecs' checks ran before).

Shards hold 1,024 records, the writer's default (`--shard-records`). Prints each as seconds and as a
multiple of the hash time (the bar: verify with its default jobs, one per core, <= 2x). The value
checks are compiled (numba, `store.kernels`) on their first call after an install, a few seconds, and
loaded from numba's cache after that: the untimed verify before the rounds takes that cost.

    python bench/verify_speed.py                         # ~4 minutes
    python bench/verify_speed.py --records 64 --rounds 1 # smoke run
    bench/gpu.sh --verify                                # on the 16-core GPU machine (see gpu.sh)

`--jobs` lists the job counts timed (default: 1 and one per core, verify's default); a count above
the stores' shards checks no more shards at once, so on many cores give smaller shards
(`--shard-records`). `--json FILE` writes every median with the machine's core count. Runs from a
checkout where potstill is not installed (the GPU machine): this checkout's packages are imported,
with bench/_gpu_deps on the path for zarr where the machine lacks it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from checkout import import_this_checkout

import_this_checkout()
sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_gpu_deps"))  # (zarr, where missing)

from potstill.store import (  # noqa: E402
    HiddenSpec,
    Record,
    StoreManifest,
    TargetSpec,
    TeacherInfo,
    TokenizerInfo,
    create_store,
    open_store,
    verify,
)
from potstill.store.checks import value_problems  # noqa: E402
from potstill.store.codec import MAX_ID_ORDER, bits_for, sampled_from_draws  # noqa: E402
from potstill.store.columns import input_vocab  # noqa: E402
from potstill.store.targets.codecs import PackedColumns  # noqa: E402
from potstill.store.verify import default_jobs, hash_file, verify_store  # noqa: E402

VOCAB = 128_256
ID_BITS = bits_for(VOCAB - 1)


def spec(name: str, k: int, n: int) -> TargetSpec:
    if name.startswith("sampled"):
        order = list(range(MAX_ID_ORDER))  # the listed ids: the draws' most frequent ones (below)
        return TargetSpec(kind="sampled", k=0, samples=n, sampler="systematic", seed=0, codec="compact",
                          id_bits=ID_BITS, logprob_bits=12, logprob_min=-24.0, id_order=order)
    packed = name.endswith("-packed")
    return TargetSpec(kind="topk", k=k, codec="packed" if packed else "none", tail_logprob="direct",
                      id_bits=ID_BITS if packed else None, logprob_bits=12 if packed else None,
                      logprob_min=-24.0 if packed else None)


def make_record(rng: np.random.Generator, i: int, length: int, name: str, k: int, n: int) -> Record:
    """A record with a teacher-like distribution per position: token ranks geometric (p = 0.2) over a
    position's own ids, frequent ids low (most of them in the id order's listed ids)."""
    s = length - 1
    ids = rng.integers(0, VOCAB, size=length).astype(np.int32)
    ranks_lp = np.log(0.2) + np.arange(k) * np.log(0.8)
    top_lp = (ranks_lp[None, :] - np.abs(rng.normal(0, 0.05, size=(s, k))).cumsum(-1) * 0.1).astype(np.float32)
    top_lp = -np.sort(-top_lp, axis=-1)
    base = rng.integers(0, VOCAB, size=(s, 1))
    j = np.arange(k)[None, :]
    # distinct within a position: the likelier half among the id order's listed ids, the rest above them
    top_ids = np.where(j < k // 2, (base % 61 + j * 67) % MAX_ID_ORDER,
                       MAX_ID_ORDER + (base + j * 977) % (VOCAB - MAX_ID_ORDER)).astype(np.int32)
    tail = np.log1p(-np.minimum(np.exp(top_lp.astype(np.float64)).sum(-1), 1 - 1e-7)).astype(np.float32)
    rec = Record(id=f"r{i:07d}", input_ids=ids, score_start=1, token_logprob=top_lp[:, 0].copy())
    if name.startswith("sampled"):
        u = (rng.random((s, 1)) + np.arange(n)[None, :]) / n  # systematic: one uniform per position
        cdf = np.cumsum(np.exp(top_lp.astype(np.float64)), axis=-1)
        cdf /= cdf[:, -1:]
        rank = np.minimum((u[:, :, None] > cdf[:, None, :]).sum(-1), k - 1)
        rec.sampled = sampled_from_draws(np.take_along_axis(top_ids, rank, axis=1))
    else:
        rec.topk_ids, rec.topk_logprobs, rec.tail_logprob = top_ids, top_lp, tail
    return rec


def build(root: str, name: str, records: int, length: int, k: int, n: int, shard_records: int = 1024) -> str:
    manifest = StoreManifest(
        teacher=TeacherInfo(name_or_path="synthetic", vocab_size=VOCAB),
        tokenizer=TokenizerInfo(fingerprint="sha256:synthetic", vocab_size=VOCAB),
        targets=spec(name, k, n), hidden=HiddenSpec(), generation={"bench": "verify_speed"},
    )
    url = os.path.join(root, name)
    store = create_store(url, manifest)
    rng = np.random.default_rng(0)
    with store.writer("w0", shard_records=shard_records) as w:
        for i in range(records):
            w.write(make_record(rng, i, length, name, k, n))
    return url


def hash_store(url: str) -> int:
    total = 0
    for folder, _, files in os.walk(url):
        for f in files:
            total += hash_file(os.path.join(folder, f))[0]
    return total


def value_checks(url: str, by_record: bool) -> None:
    """The value checks alone (shards already open): over each shard at once, as verify runs them, or
    record by record (the packed codecs' checks before they were vectorised; a plain store has none)."""
    store = open_store(url)
    tv = input_vocab(store.manifest)
    for name in store.shard_names:
        views = store.shard(name).views
        if not by_record:
            assert not value_problems(views, store.manifest)
        elif isinstance(views.columns, PackedColumns):
            assert all(views.columns.record_problem(j, tv) is None for j in range(views.num_rows))


def in_turn(url: str) -> None:
    """verify --jobs 1 with each shard's files hashed and then its content checked, one after the
    other (as before the hashing ran one shard ahead, `store.verify._hash_ahead`)."""
    ahead = verify._hash_ahead
    verify._hash_ahead = lambda store, files: (verify.shard_problems(store, c, False, files) for c in store.commits)
    try:
        verify_store(url, jobs=1)
    finally:
        verify._hash_ahead = ahead


def key_speed(shards: int, ids_per_shard: int, rounds: int) -> None:
    """`--keys`: the ids' keys of `shards` shards (the check each shard's ids get), hashlib's loop
    against the compiled kernel, in one thread and in two: ns per id (CPU time spread over the
    threads is not counted; wall time is). The kernel releases the GIL, so two threads should take
    half the time; hashlib's loop keeps it."""
    import pyarrow as pa

    from potstill.store.ids import array_keys, id_keys

    arrays = [pa.array([f"r{s:05d}-{i:07d}" for i in range(ids_per_shard)], pa.string()) for s in range(shards)]
    ways = {"hashlib": lambda a: id_keys(a.to_pylist()), "compiled": array_keys}
    array_keys(arrays[0])  # (loads the kernel)
    times: dict[str, list[float]] = {}
    with ThreadPoolExecutor(2) as pool:
        for _ in range(rounds):
            for name, way in ways.items():
                for threads in (1, 2):
                    started = time.perf_counter()
                    if threads == 1:
                        for a in arrays:
                            way(a)
                    else:
                        list(pool.map(way, arrays))
                    times.setdefault(f"{name}, {threads} thread(s)", []).append(time.perf_counter() - started)
    total = shards * ids_per_shard
    for what, ts in times.items():
        print(f"{what:<24} {statistics.median(ts) / total * 1e9:7.0f} ns per id")


def timed(fn, url: str) -> float:
    started = time.perf_counter()
    fn(url)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=4096)
    parser.add_argument("--shard-records", type=int, default=1024, help="records per shard (the writer's default)")
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--short", type=int, default=32, help="tokens of the short records' store")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, nargs="+", default=None,
                        help=f"verify's job counts to time (default: 1 and one per core, here {default_jobs()})")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the medians to FILE")
    parser.add_argument("--keys", action="store_true",
                        help="only time the ids' keys (64 shards of 1,024 ids): hashlib against the compiled kernel")
    args = parser.parse_args()
    if args.keys:
        key_speed(64, 1024, args.rounds)
        return
    jobs = sorted(set(args.jobs or [1, default_jobs()]))

    plan = [("sampled64-compact", args.records, args.length), ("top64", args.records, args.length),
            ("top64-packed", args.records, args.length),
            (f"sampled64-compact-short{args.short}", args.records * (args.length // args.short), args.short)]
    with tempfile.TemporaryDirectory(prefix="potstill-verify-") as root:
        urls, megabytes = {}, {}
        for name, records, length in plan:
            started = time.perf_counter()
            urls[name] = build(root, name, records, length, args.k, args.samples, args.shard_records)
            megabytes[name] = hash_store(urls[name]) / 1e6
            print(f"built {name}: {records} records x {length} tokens, {megabytes[name]:.1f} MB "
                  f"in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        for url in urls.values():  # every check must pass: a bench of a failing verify times the wrong thing
            assert verify_store(url).ok, url
        contenders = {"hash": lambda url: hash_store(url)}
        for j in jobs:
            contenders[f"verify --jobs {j}"] = lambda url, j=j: verify_store(url, jobs=j)
        contenders.update({
            "--jobs 1 in turn": lambda url: in_turn(url),
            "verify --quick": lambda url: verify_store(url, quick=True),
            "values by shard": lambda url: value_checks(url, by_record=False),
            "values by record": lambda url: value_checks(url, by_record=True),
        })
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):
            for name, url in urls.items():
                for what, fn in contenders.items():
                    if what == "values by record" and not name.startswith(("sampled", "top64-packed")):
                        continue  # (plain columns were checked a shard at once before too)
                    times.setdefault((name, what), []).append(timed(fn, url))
    medians = {name: {what: statistics.median(times[(name, what)]) for what in contenders if (name, what) in times}
               for name in urls}
    print(f"{'store':<28} {'MB':>7} " + " ".join(f"{w:>20}" for w in contenders))
    for name, row in medians.items():
        cells = [f"{row[w] * 1e3:8.1f} ms {row[w] / row['hash']:6.1f}x" if w in row else "-" for w in contenders]
        print(f"{name:<28} {megabytes[name]:7.1f} " + " ".join(f"{c:>20}" for c in cells))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cores": default_jobs(), "rounds": args.rounds, "shard_records": args.shard_records,
                       "megabytes": megabytes, "seconds": medians,
                       "of_hash": {n: {w: t / row["hash"] for w, t in row.items()} for n, row in medians.items()}},
                      f, indent=1)


if __name__ == "__main__":
    main()
