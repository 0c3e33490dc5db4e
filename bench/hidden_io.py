"""Hidden-state I/O: files on disk, write speed and writer memory, random-record read speed.

Writes `--records` records of `--tokens` tokens with one bfloat16 hidden layer of `--width` into one
shard, then reads random records back: potstill's direct path without checks, with the training
readers' checks (`verify_reads`, each inner chunk checked once per process: the first pass pays it),
and plain zarr-python (`zarr.open_array(...)[a:b]`) for reference, in a fresh process, each the best
of three rounds. Records are views of one pool of rows, so the writer's memory growth is its own.
Page cache warm (the files were just written).

    python bench/hidden_io.py                        # 256 records x 512 tokens, width 2048 (256 MB)
    python bench/hidden_io.py --records 64 --reads 500   # a smoke run
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import zarr
from common import TOKENIZER_FILES, make_manifest, random_record

from potstill.store import create_store, open_store
from potstill.store import reader as reader_module

LAYER = 12


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--chunk-tokens", type=int, default=1024)
    ap.add_argument("--reads", type=int, default=2000)
    ap.add_argument("--dir", default=None, help="where to write the store (default: a temporary folder)")
    ap.add_argument("--read", metavar="STORE", help=argparse.SUPPRESS)  # the reading half, in its own process
    args = ap.parse_args()
    if args.read:
        return read(args, args.read)
    work = tempfile.mkdtemp(dir=args.dir, prefix="hidden-io-")
    try:
        run(args, os.path.join(work, "store"))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, url: str) -> None:
    m = make_manifest(k=4, layers=((LAYER, args.width, "bfloat16"),), chunk_tokens=args.chunk_tokens)
    rng = np.random.default_rng(0)
    pool = (rng.standard_normal((args.tokens * 4, args.width), dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    template = random_record(rng, "t", m, n=args.tokens)
    store = create_store(url, m, TOKENIZER_FILES)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    with store.writer("w", shard_records=args.records) as w:
        for i in range(args.records):
            start = int(rng.integers(0, len(pool) - args.tokens))
            template.id, template.hidden_start = f"r{i}", 0
            template.hidden = {LAYER: pool[start : start + args.tokens]}
            w.write(template)
    write_s = time.perf_counter() - t0
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    hidden_bytes = args.records * args.tokens * args.width * 2

    hidden_dir = os.path.join(url, "shards", "w-000000", "hidden", f"layer_{LAYER}")
    files = sum(len(names) for _, _, names in os.walk(hidden_dir))
    print(f"records {args.records} x {args.tokens} tokens, width {args.width}, chunk_tokens {args.chunk_tokens}: "
          f"{hidden_bytes / 1e6:.0f} MB of hidden states in one shard")
    print(f"files of the layer in the shard of {args.records} records: {files}")
    print(f"write: {write_s:.2f} s, {args.records * args.tokens / write_s / 1e3:.0f}k tokens/s, "
          f"{hidden_bytes / write_s / 1e6:.0f} MB/s of hidden states; peak RSS grew {grown:.0f} MB")

    # Reads in a fresh process, as a loader worker's (and clear of the writer's memory).
    subprocess.run([sys.executable, __file__, "--read", url, "--records", str(args.records), "--tokens", str(args.tokens),
                    "--width", str(args.width), "--reads", str(args.reads)], check=True)


def read(args: argparse.Namespace, url: str) -> None:
    """Random records, each pass best of three rounds (the machine may be shared)."""
    rows = np.random.default_rng(1).integers(0, args.records, size=args.reads)
    out = np.empty((args.tokens, args.width), dtype=np.uint16)
    for label, verify in (("direct, no checks", False), ("direct, checked (first pass)", True),
                          ("direct, checked (checks done)", True)):
        best = math.inf
        for _ in range(3):
            if label.endswith("(first pass)"):
                reader_module._VERIFIED.clear()  # as a fresh loader process
            shard = open_store(url, verify_reads=verify).shard("w-000000")
            t0 = time.perf_counter()
            for row in rows:
                a, b = shard.hidden_rows(int(row))
                shard.hidden_block(LAYER, a, b, out=out[: b - a])
            best = min(best, time.perf_counter() - t0)
        report(label, args, best)
    plain = zarr.open_array(os.path.join(url, "shards", "w-000000", "hidden", f"layer_{LAYER}"), mode="r")
    few = rows[: max(1, args.reads // 10)]
    t0 = time.perf_counter()
    for row in few:
        a = int(row) * args.tokens
        out[...] = plain[a : a + args.tokens]
    report("zarr-python", args, (time.perf_counter() - t0) * len(rows) / len(few))


def report(label: str, args: argparse.Namespace, seconds: float) -> None:
    print(f"random record reads, {label}: {args.reads / seconds:,.0f} records/s, "
          f"{args.reads * args.tokens * args.width * 2 / seconds / 1e9:.2f} GB/s")


if __name__ == "__main__":
    main()
