"""How a store's metadata scales with its records: open, split, resume, duplicates, commit lookups.

For each size N it builds a store's metadata directly, without a model or any record data: N ids in
shards of 1,024 (the writer's default), each shard's ids file written by the store's own writer
(`potstill.store.ids.ids_file_bytes`) and its commit record, with 0.1% of the ids repeated in a later
shard. records.arrow (with its pieces file) is an empty placeholder: nothing timed here reads records. Then, in a fresh
process per size (so that its RSS is the store's alone), it times

- `open`: `open_store` (reads every commit record), and the RSS it adds;
- `split`: `plan_split` with --eval-fraction 0.05 (reads every ids file, checks its sha256,
  builds the id index, finds duplicates, computes the eval cut);
- `resume`: `committed_mask` of all N ids (what a rerun of the whole prompt file asks);
- `duplicates`: `Store.duplicates()` on the open store (the index already built);
- `commit()`: `Store.commit(name)` for every shard;

and the process's peak RSS. Usage: python bench/metadata_scale.py [--records 10000 100000 1000000]
[--work DIR]. The scale bench (bench/scale.py) imports `build_metadata` and `measure`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

SHARD_RECORDS = 1024
REPEATED = 0.001


def build_metadata(url: str, records: int, repeated: float = REPEATED) -> list[str]:
    """A store at `url` holding the metadata of `records` records (see the module docstring); returns the
    ids in store order."""
    from common import TOKENIZER_FILES, make_manifest

    from potstill.store import CommitRecord, create_store
    from potstill.store.fs import sha256_bytes, write_bytes
    from potstill.store.ids import IDS_FILE, id_keys, ids_file_bytes
    from potstill.store.manifest import FileEntry
    from potstill.store.pieces import PIECES_FILE, pieces_file_bytes

    store = create_store(url, make_manifest(k=8, layers=()), TOKENIZER_FILES)
    ids = [f"prompt-{i:010d}" for i in range(records)]
    again = max(int(records * repeated), 1) if records > SHARD_RECORDS else 0
    if again:  # the last shard repeats the first ids
        ids[-again:] = ids[:again]
    for seq, start in enumerate(range(0, records, SHARD_RECORDS)):
        shard = f"bench-{seq:06d}"
        chunk = ids[start : start + SHARD_RECORDS]
        data = ids_file_bytes(chunk, id_keys(chunk))
        ids_entry = FileEntry(f"shards/{shard}/{IDS_FILE}", data.size, sha256_bytes(memoryview(data)))
        write_bytes(store.fs, store.path(ids_entry.path), memoryview(data))
        arrow = FileEntry(f"shards/{shard}/records.arrow", 0, sha256_bytes(b""))
        write_bytes(store.fs, store.path(arrow.path), b"")
        no_pieces = pieces_file_bytes([])
        pieces = FileEntry(f"shards/{shard}/{PIECES_FILE}", no_pieces.size, sha256_bytes(memoryview(no_pieces)))
        write_bytes(store.fs, store.path(pieces.path), memoryview(no_pieces))
        commit = CommitRecord(shard=shard, writer_id="bench", seq=seq, records=len(chunk), tokens=512 * len(chunk),
                              scored_tokens=500 * len(chunk), hidden_rows=0, files=[arrow, pieces, ids_entry],
                              bytes=data.size + no_pieces.size, created_at=f"2030-01-01T00:00:{seq:09d}Z")
        write_bytes(store.fs, store.path(f"commits/{shard}.json"), commit.to_json(), atomic=True)
    return ids


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(url: str) -> dict[str, float]:
    """Times (s) and memory (MB) of the metadata operations on the store at `url` (see the module docstring)."""
    import numpy as np
    import pyarrow as pa

    # what every reader has loaded before: pyarrow's pandas shim, numpy.random (not timed)
    pa.array([1], pa.uint64()).to_numpy()
    np.random.default_rng(0)

    from potstill.store import open_store
    from potstill.student_train.data import plan_split

    out: dict[str, float] = {}
    base = _rss_mb()
    t = time.perf_counter()
    store = open_store(url)
    out["open_s"] = time.perf_counter() - t
    out["open_mb"] = _rss_mb() - base
    out["records"] = store.num_records
    out["shards"] = len(store.commits)
    t = time.perf_counter()
    plan = plan_split(store, 0.05, 1, 0)
    out["split_s"] = time.perf_counter() - t
    out["held_out"] = plan.eval_records
    ids = store.id_index().ids().to_pylist()  # the prompt file's ids, as a rerun would hold them
    t = time.perf_counter()
    mask = store.committed_mask(ids)
    out["resume_s"] = time.perf_counter() - t
    assert mask.all()
    del ids, mask
    store._duplicates = None
    t = time.perf_counter()
    out["duplicates"] = store.num_duplicates
    out["duplicates_s"] = time.perf_counter() - t
    t = time.perf_counter()
    for name in store.shard_names:
        store.commit(name)
    out["commit_lookups_s"] = time.perf_counter() - t
    out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--work", default=None, help="folder for the stores (default: a temporary one, removed)")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    work = args.work or tempfile.mkdtemp(prefix="potstill-metadata-")
    rows = []
    try:
        for n in args.records:
            url = os.path.join(work, f"meta-{n}")
            if not os.path.exists(url):
                t = time.perf_counter()
                build_metadata(url, n)
                print(f"built {n} records in {time.perf_counter() - t:.1f} s", file=sys.stderr)
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
            child = subprocess.run([sys.executable, __file__, "--measure", url], capture_output=True, text=True, env=env,
                                   check=True)
            rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    head = ["records", "shards", "open_s", "open_mb", "split_s", "resume_s", "duplicates", "duplicates_s",
            "commit_lookups_s", "peak_mb"]
    print(" ".join(f"{h:>16}" for h in head))
    for row in rows:
        print(" ".join(f"{row[h]:>16.3f}" if isinstance(row[h], float) else f"{row[h]:>16}" for h in head))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
