"""The store at scale: every store operation at 10k, 100k and 1M records, beside its baseline.

For each size N it writes a store of N records through the store's own `ShardWriter` (the default
targets of `potstill generate`: sampled, systematic draws, N = 64, the compact codec; records of
`--length` tokens, 1,024 per shard), then measures, in a fresh process per size so that memory is the
store's alone:

| step | potstill | baseline |
|---|---|---|
| write | `ShardWriter` (encode, Arrow, ids file, sha256, fsync, commit) | the same records.arrow tables written again as plain Arrow IPC |
| open | `open_store` (every commit record) and the memory it adds | reading every commit record's bytes |
| split | `plan_split` (ids files, duplicates, eval cut, train rows) | reading every ids file with pyarrow |
| resume | `Store.committed_mask` of all N ids | the same pyarrow reads |
| duplicates | `Store.duplicates()` | the same pyarrow reads |
| commit() | `Store.commit(name)` for every shard | - |
| verify | `store verify` (--jobs 1: every sha256 and value check) | sha256 of every file of the store |
| quick verify | `store verify --quick` | - |

and the files per 1,000 records. `--metadata N …` adds metadata-only stores (commit records and ids
files, no record data: bench/metadata_scale.py) for the steps that read no records, at sizes too
large to write here (10M). Each step's growth per decade of records is the ratio of its times at
10N and N (10 is linear), and the projection to 100M records extends the last measured decade's
growth. Results: a Markdown table on stdout, and JSON with `--json OUT`.

    python bench/scale.py                                   # 10k, 100k, 1M records (~10-20 min on 2 cores)
    python bench/scale.py --sizes 10000 100000 --metadata 10000000
    python bench/scale.py --sizes 2000 --length 16          # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

SHARD_RECORDS = 1024
TEMPLATES = 256  # distinct records written over and over under new ids (making records is not timed)


def build_store(url: str, records: int, length: int) -> dict[str, float]:
    """Write `records` records through the real writer; returns its time and the plain-Arrow baseline's."""
    import pyarrow as pa
    from verify_speed import VOCAB, make_record, spec

    from potstill.store import HiddenSpec, StoreManifest, TeacherInfo, TokenizerInfo, create_store

    manifest = StoreManifest(
        teacher=TeacherInfo(name_or_path="synthetic", vocab_size=VOCAB),
        tokenizer=TokenizerInfo(fingerprint="sha256:synthetic", vocab_size=VOCAB),
        targets=spec("sampled", 64, 64), hidden=HiddenSpec(), generation={"bench": "scale"},
    )
    store = create_store(url, manifest)
    rng = np.random.default_rng(0)
    templates = [make_record(rng, i, length, "sampled", 64, 64) for i in range(TEMPLATES)]
    started = time.perf_counter()
    with store.writer("w0", shard_records=SHARD_RECORDS) as writer:
        for i in range(records):
            writer.write(dataclasses.replace(templates[i % TEMPLATES], id=f"prompt-{i:010d}"))
    write_s = time.perf_counter() - started
    # baseline: the same tables as plain Arrow IPC files (no encoding, hashing or syncing)
    plain = tempfile.mkdtemp(prefix="plain-", dir=os.path.dirname(url))
    store.refresh()
    tables = [pa.ipc.open_file(pa.memory_map(store.path(c.arrow_path))).read_all() for c in store.commits]
    started = time.perf_counter()
    for j, table in enumerate(tables):
        with pa.OSFile(os.path.join(plain, f"{j}.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as out:
            out.write_table(table)
    plain_s = time.perf_counter() - started
    shutil.rmtree(plain)
    return {"write_s": write_s, "write_plain_arrow_s": plain_s, "tokens": records * length}


def measure(url: str, with_records: bool) -> dict[str, float]:
    """Every step of the module docstring on the store at `url` (run in a fresh process)."""
    import pyarrow as pa
    from metadata_scale import measure as measure_metadata

    from potstill.store import open_store, verify_store
    from potstill.store.verify import hash_file

    out = measure_metadata(url)  # open, split, resume, duplicates, commit lookups, peak RSS
    store = open_store(url)
    started = time.perf_counter()
    for name in store.shard_names:
        with open(store.path(f"commits/{name}.json"), "rb") as f:
            f.read()
    out["open_baseline_s"] = time.perf_counter() - started
    started = time.perf_counter()
    for c in store.commits:
        pa.ipc.open_file(pa.memory_map(store.path(c.ids_path))).read_all()
    out["ids_baseline_s"] = time.perf_counter() - started
    files = [os.path.join(folder, f) for folder, _, names in os.walk(url) for f in names]
    out["files_per_1k_records"] = 1000 * len(files) / out["records"]
    out["bytes"] = sum(os.path.getsize(f) for f in files)
    if with_records:
        started = time.perf_counter()
        for f in files:
            hash_file(f)
        out["hash_s"] = time.perf_counter() - started
        started = time.perf_counter()
        assert verify_store(url, jobs=1).ok
        out["verify_s"] = time.perf_counter() - started
        started = time.perf_counter()
        assert verify_store(url, quick=True).ok
        out["verify_quick_s"] = time.perf_counter() - started
    out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


STEPS = [  # (name, key, baseline key)
    ("write", "write_s", "write_plain_arrow_s"),
    ("open", "open_s", "open_baseline_s"),
    ("split (plan + eval cut)", "split_s", "ids_baseline_s"),
    ("resume (committed_mask)", "resume_s", "ids_baseline_s"),
    ("duplicates", "duplicates_s", "ids_baseline_s"),
    ("commit() x every shard", "commit_lookups_s", None),
    ("verify --jobs 1", "verify_s", "hash_s"),
    ("verify --quick", "verify_quick_s", None),
]


def growth(rows: list[dict[str, Any]], key: str) -> tuple[float | None, float | None]:
    """(time ratio over the last measured decade, projection to 100M records) for one step."""
    points = sorted((r["records"], r[key]) for r in rows if r.get(key) is not None)
    if len(points) < 2:
        return None, None
    (n0, t0), (n1, t1) = points[-2], points[-1]
    per_decade = (t1 / max(t0, 1e-9)) ** (1 / math.log10(n1 / n0))
    return per_decade, t1 * per_decade ** math.log10(1e8 / n1)


def markdown(rows: list[dict[str, Any]]) -> str:
    sizes = [f"{r['records']:,}" + ("" if r.get("hash_s") is not None else " (metadata)") for r in rows]
    lines = ["| step | " + " | ".join(sizes) + " | growth per decade | at 100M (projected) |",
             "|---" * (len(rows) + 3) + "|"]
    for name, key, base in STEPS:
        cells = []
        for r in rows:
            if r.get(key) is None:
                cells.append("-")
                continue
            ratio = f" ({r[key] / r[base]:.1f}x)" if base and r.get(base) else ""
            cells.append(f"{r[key]:.3g} s{ratio}")
        per_decade, projected = growth(rows, key)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'-' if per_decade is None else f'{per_decade:.1f}x'} | "
                     f"{'-' if projected is None else f'{projected:.3g} s'} |")
    for name, key in [("RAM added by open (MB)", "open_mb"), ("peak RSS of the process (MB)", "peak_mb"),
                      ("files per 1k records", "files_per_1k_records")]:
        lines.append(f"| {name} | " + " | ".join(f"{r[key]:.3g}" for r in rows) + " | | |")
    writes = [r for r in rows if r.get("write_s")]
    if writes:
        lines.append("")
        lines.append("write: " + ", ".join(f"{r['records']:,} records at {r['tokens'] / r['write_s'] / 1e3:.0f}k tokens/s"
                                          for r in writes) + " (one core, the writer's thread)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--metadata", type=int, nargs="*", default=[], help="metadata-only sizes (no record data)")
    parser.add_argument("--length", type=int, default=32, help="tokens per record")
    parser.add_argument("--work", default=None, help="folder for the stores (default: a temporary one, removed)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--with-records", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.with_records)))
        return
    import torch

    torch.set_num_threads(1)
    from metadata_scale import build_metadata

    work = args.work or tempfile.mkdtemp(prefix="potstill-scale-")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.abspath(__file__)),
                                                       os.environ.get("PYTHONPATH", "")]))
    rows = []
    try:
        for n, real in [(n, True) for n in args.sizes] + [(n, False) for n in args.metadata]:
            url = os.path.join(work, f"{'store' if real else 'meta'}-{n}")
            built: dict[str, float] = {}
            if real:
                built = build_store(url, n, args.length)
            else:
                build_metadata(url, n)
            child = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure", url]
                                   + (["--with-records"] if real else []),
                                   capture_output=True, text=True, env=env)
            if child.returncode:
                sys.exit(f"measuring {url} failed:\n{child.stderr}")
            rows.append(built | json.loads(child.stdout.strip().splitlines()[-1]))
            print(f"{n:,} records measured", file=sys.stderr)
            shutil.rmtree(url, ignore_errors=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"# store scale: records of {args.length} tokens, default targets, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores\n")
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
