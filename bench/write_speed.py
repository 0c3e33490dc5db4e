"""Write speed of the store's `ShardWriter` on one core, against plain Arrow IPC, Parquet and MosaicML
Streaming's `MDSWriter` writing the same arrays.

The records are built before any timing, as the teacher job hands them to the writer: 512-token
sequences, every position but the first scored, a vocabulary of 128,256 (17-bit ids), and either

    sampled   N = 64 systematic draws per position (ids + counts) from a heavy-tailed, teacher-like
              distribution, and the token's log-prob (the default targets)
    top64     the top-64 ids and log-probs per position, the token's log-prob and the log tail

Contenders, each writing every record into a fresh folder (then its files fsynced):

    potstill-default   ShardWriter, kind sampled, sampler systematic, N = 64, codec compact with the
                       store's id order (what `potstill generate` writes by default)
    potstill-top64     ShardWriter, top-64, codec none (float16 log-probs)
    potstill-top64-packed  ShardWriter, top-64, codec packed (17-bit ids, 12-bit log-probs)
    arrow-ipc-*        the same arrays as one Arrow IPC file per 1,024 records (list columns, no codec)
    parquet-*          the same table as Parquet (pyarrow's defaults: snappy)
    mds-*              MDSWriter, one sample per record, the arrays as `ndarray` columns (no compression)

Each contender runs `--rounds` times, interleaved; the figure is the median. Everything runs in this
one process, pinned to one core, torch at one thread. The writer's own phases (validate, encode,
Arrow batch, the file: IPC serialised into it with sha256 and the writes, the fsync; sha256 alone
too) are timed apart with `--breakdown`.

MDS needs mosaicml-streaming, which needs an environment of its own (its pins clash with
potstill's). Run the bench with that environment's Python: it imports the potstill of the
repository it lives in (`bench/checkout.py`), whatever potstill that environment has installed. Without mosaicml-streaming the MDS rows are left out.

    python bench/write_speed.py                         # 2,048 records, 3 rounds, ~3 minutes
    python bench/write_speed.py --records 256 --rounds 1  # smoke run
    /path/to/mds-venv/bin/python bench/write_speed.py    # with MDSWriter
    python bench/write_speed.py --profile potstill-default  # cProfile of one contender
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from checkout import import_this_checkout, streaming

import_this_checkout()
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from potstill.store import (  # noqa: E402
    HiddenSpec,
    Record,
    StoreManifest,
    TargetSpec,
    TeacherInfo,
    TokenizerInfo,
    create_store,
)
from potstill.store.codec import IdOrder, bits_for, sampled_from_draws  # noqa: E402

VOCAB = 128_256
TOKENIZER = {"tokenizer.json": b'{"version": "1.0", "model": {"type": "WordLevel"}}', "tokenizer_config.json": b"{}"}
SHARD_RECORDS = 1024  # potstill generate's default --shard-records; the Arrow files split the same way


def _pin_one_core(core: int | None) -> str:
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    if hasattr(os, "sched_setaffinity"):
        core = min(os.sched_getaffinity(0)) if core is None else core
        os.sched_setaffinity(0, {core})
        return f"core {core}"
    return "all cores (no sched_setaffinity)"


# -- the records -------------------------------------------------------------------------------------
_ZIPF_CDF = np.cumsum(1.0 / np.arange(1, VOCAB + 1) ** 1.2)
_ZIPF_CDF /= _ZIPF_CDF[-1]


def _zipf_tokens(rng: np.random.Generator, size: Any, perm: np.ndarray) -> np.ndarray:
    """Token ids with text-like frequencies: a Zipf rank (exponent 1.2, over the vocabulary) mapped through
    a fixed permutation of the vocabulary."""
    return perm[np.minimum(np.searchsorted(_ZIPF_CDF, rng.random(size)), VOCAB - 1)]


def make_records(count: int, length: int, kind: str, seed: int = 0, samples: int = 64, k: int = 64) -> list[Record]:
    """Records as a teacher job hands them to the writer. Each position's distribution: 256 candidate
    tokens (text-like ids) with geometric rank probabilities whose sharpness varies by position, so a
    position's 64 systematic draws hold from one id to a few dozen."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(VOCAB).astype(np.int32)
    out = []
    s = length - 1
    cands = 256
    for i in range(count):
        ids = _zipf_tokens(rng, length, perm).astype(np.int32)
        ratio = rng.uniform(0.3, 0.97, size=(s, 1))
        p = ratio ** np.arange(cands)[None, :]
        p /= p.sum(-1, keepdims=True)
        logp = np.log(p)
        rec = Record(id=f"job-0001/rec-{i:06d}", input_ids=ids, score_start=1,
                     token_logprob=logp[:, 0].astype(np.float32), prompt=f"prompt {i}", completion=f"completion {i}")
        if kind == "sampled":
            cand = _zipf_tokens(rng, (s, cands), perm)
            cdf = np.cumsum(p, -1) + np.arange(s)[:, None]  # rows stacked, so one searchsorted draws for all
            points = (np.arange(samples)[None, :] + rng.random((s, 1))) / samples + np.arange(s)[:, None]
            at = np.minimum(np.searchsorted(cdf.reshape(-1), points.reshape(-1), side="right").reshape(s, samples)
                            - np.arange(s)[:, None] * cands, cands - 1)
            rec.sampled = sampled_from_draws(np.take_along_axis(cand, at, 1))
        else:
            base = _zipf_tokens(rng, (s, 1), perm)
            rec.topk_ids = ((base + np.arange(k)[None, :] * 1999) % VOCAB).astype(np.int32)  # distinct in a row
            rec.topk_logprobs = logp[:, :k].astype(np.float16)
            rec.tail_logprob = np.log(p[:, k:].sum(-1)).astype(np.float32)
        out.append(rec)
    return out


def manifest_for(kind: str, codec: str, records: list[Record]) -> StoreManifest:
    packed = codec != "none"
    if kind == "sampled":
        order = IdOrder.from_tokens([r.input_ids for r in records]) if codec == "compact" else None
        spec = TargetSpec(kind="sampled", k=0, samples=64, seed=0, sampler="systematic", codec=codec,
                          id_bits=bits_for(VOCAB - 1), count_bits=None if codec == "compact" else bits_for(64),
                          logprob_bits=12, logprob_min=-24.0, id_order=order)
    else:
        spec = TargetSpec(kind="topk", k=64, codec=codec, id_bits=bits_for(VOCAB - 1) if packed else None,
                          logprob_bits=12 if packed else None, logprob_min=-24.0 if packed else None)
    return StoreManifest(
        teacher=TeacherInfo(name_or_path="bench-teacher", config_hash="sha256:bench", dtype="bfloat16", vocab_size=VOCAB),
        tokenizer=TokenizerInfo(fingerprint="sha256:bench", vocab_size=VOCAB, special_tokens={"eos_token_id": 1}),
        targets=spec, hidden=HiddenSpec(layers=[], chunk_tokens=1024), rationales=False, generation={"mode": "bench"},
    )


# -- the contenders ------------------------------------------------------------------------------------
def arrays_of(records: list[Record], kind: str) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """The records' arrays, flat, with each record's offsets; built once, outside the timing."""
    def flat(parts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        lengths = np.array([len(p) for p in parts], dtype=np.int64)
        return np.concatenate(parts), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)

    out = {"input_ids": flat([r.input_ids for r in records]), "token_logprob": flat([r.token_logprob for r in records])}
    if kind == "sampled":
        out["sampled_offsets"] = flat([np.asarray(r.sampled.offsets, np.int32) for r in records])
        out["sampled_ids"] = flat([r.sampled.ids for r in records])
        out["sampled_counts"] = flat([r.sampled.counts for r in records])
    else:
        out["topk_ids"] = flat([r.topk_ids.reshape(-1) for r in records])
        out["topk_logprobs"] = flat([r.topk_logprobs.reshape(-1) for r in records])
        out["tail_logprob"] = flat([r.tail_logprob for r in records])
    return out


def arrow_table(records: list[Record], arrays: dict[str, Any], lo: int, hi: int) -> pa.Table:
    cols: dict[str, pa.Array] = {"id": pa.array([r.id for r in records[lo:hi]], pa.string())}
    for name, (values, offsets) in arrays.items():
        off = offsets[lo : hi + 1]
        cols[name] = pa.ListArray.from_arrays(pa.array(off - off[0]), pa.array(values[off[0] : off[-1]]))
    return pa.table(cols)


def _fsync_tree(folder: str) -> int:
    total = 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(dirpath, name)
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
            total += os.path.getsize(path)
    return total


def write_potstill(records: list[Record], manifest: StoreManifest, folder: str) -> int:
    store = create_store(os.path.join(folder, "store"), manifest, TOKENIZER)
    with store.writer("w-bench", shard_records=SHARD_RECORDS) as w:
        w.write_many(records)
    return sum(c.bytes for c in w.committed)


def write_arrow(records: list[Record], arrays: dict[str, Any], folder: str) -> int:
    total = 0
    for lo in range(0, len(records), SHARD_RECORDS):
        table = arrow_table(records, arrays, lo, min(lo + SHARD_RECORDS, len(records)))
        path = os.path.join(folder, f"{lo:08d}.arrow")
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        total += _fsync_one(path)
    return total


def write_parquet(records: list[Record], arrays: dict[str, Any], folder: str) -> int:
    total = 0
    for lo in range(0, len(records), SHARD_RECORDS):
        path = os.path.join(folder, f"{lo:08d}.parquet")
        pq.write_table(arrow_table(records, arrays, lo, min(lo + SHARD_RECORDS, len(records))), path)
        total += _fsync_one(path)
    return total


def _fsync_one(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    return os.path.getsize(path)


def _mds_writer() -> Any:
    """MDSWriter, or None where mosaicml-streaming is not installed."""
    mds = streaming()
    return None if mds is None else mds.MDSWriter


def write_mds(records: list[Record], kind: str, folder: str) -> int:
    mds = _mds_writer()
    columns = {"id": "str", "input_ids": "ndarray:int32", "token_logprob": "ndarray:float32"}
    if kind == "sampled":
        columns.update(sampled_offsets="ndarray:int32", sampled_ids="ndarray:int32", sampled_counts="ndarray:uint16")
    else:
        columns.update(topk_ids="ndarray:int32", topk_logprobs="ndarray:float16", tail_logprob="ndarray:float32")
    with mds(out=os.path.join(folder, "mds"), columns=columns) as writer:
        for r in records:
            sample = {"id": r.id, "input_ids": r.input_ids, "token_logprob": r.token_logprob}
            if kind == "sampled":
                sample.update(sampled_offsets=np.asarray(r.sampled.offsets, np.int32), sampled_ids=r.sampled.ids,
                              sampled_counts=r.sampled.counts)
            else:
                sample.update(topk_ids=r.topk_ids.reshape(-1), topk_logprobs=r.topk_logprobs.reshape(-1),
                              tail_logprob=r.tail_logprob)
            writer.write(sample)
    return _fsync_tree(os.path.join(folder, "mds"))


def fresh(records: list[Record]) -> list[Record]:
    """Copies of the records sharing their arrays: the writer puts a record's fields in the stored dtypes
    in place, so each run gets the records as the teacher hands them (made outside the timing)."""
    return [dataclasses.replace(r) for r in records]


class Contender:
    def __init__(self, name: str, tokens: int, run: Callable[[list[Record], str], int], records: list[Record]) -> None:
        self.name, self.tokens, self.run, self.records = name, tokens, run, records
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.bytes = 0

    def sample(self, workdir: str) -> None:
        folder = tempfile.mkdtemp(dir=workdir)
        records = fresh(self.records)
        t0, c0 = time.perf_counter(), time.process_time()
        self.bytes = self.run(records, folder)
        self.times.append(time.perf_counter() - t0)
        self.cpu_times.append(time.process_time() - c0)
        shutil.rmtree(folder)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / statistics.median(self.times)

    @property
    def tokens_per_cpu_s(self) -> float:
        return self.tokens / statistics.median(self.cpu_times)


def contenders(count: int, length: int, only: set[str] | None) -> list[Contender]:
    out = []
    for kind in ("sampled", "top64"):
        records = make_records(count, length, "sampled" if kind == "sampled" else "topk")
        tokens = sum(r.num_tokens for r in records)
        arrays = arrays_of(records, kind)
        codecs = {"sampled": [("potstill-default", "compact")],
                  "top64": [("potstill-top64", "none"), ("potstill-top64-packed", "packed")]}[kind]
        for name, codec in codecs:
            manifest = manifest_for("sampled" if kind == "sampled" else "topk", codec, records)
            out.append(Contender(name, tokens, lambda r, f, m=manifest: write_potstill(r, m, f), records))
        out.append(Contender(f"arrow-ipc-{kind}", tokens, lambda r, f, a=arrays: write_arrow(r, a, f), records))
        out.append(Contender(f"parquet-{kind}", tokens, lambda r, f, a=arrays: write_parquet(r, a, f), records))
        if _mds_writer() is not None:
            out.append(Contender(f"mds-{kind}", tokens, lambda r, f, k=kind: write_mds(r, k, f), records))
    return [c for c in out if only is None or c.name in only]


def breakdown(records: list[Record], manifest: StoreManifest, folder: str) -> dict[str, float]:
    """CPU seconds the writer's phases take on these records, each timed alone, shard by shard as
    `ShardWriter` does them: validate, encode (the target codec), Arrow batch (the other columns and
    the record batch), the file (the batch serialised as Arrow IPC straight into it, each piece
    hashed as it goes out and written), and the fsync's wait for the disk (wall clock: it waits, it
    does not compute). sha256 alone (over the same bytes in memory) is timed apart: it is part of
    the file's time, not added to the total. CPU time, since on a busy machine wall time also
    counts the time other processes hold the core."""
    import hashlib

    from potstill.store.records import records_to_batch, validate_record
    from potstill.store.writer import HashedFile

    clock = time.process_time
    spec = manifest.targets
    spec.target_kind.encode([validate_record(r, manifest) for r in fresh(records[:2])], spec)  # warm: id order tables
    out = dict.fromkeys(("validate", "encode", "arrow batch", "ipc+sha256+write", "fsync wait", "sha256 alone"), 0.0)
    t0 = clock()
    records = [validate_record(r, manifest) for r in fresh(records)]
    out["validate"] = clock() - t0
    for lo in range(0, len(records), SHARD_RECORDS):
        shard = records[lo : lo + SHARD_RECORDS]
        t0 = clock()
        batch = records_to_batch(shard, [0] * len(shard), manifest)
        t1 = clock()
        spec.target_kind.encode(shard, spec)  # what records_to_batch spent encoding, subtracted from it
        t2 = clock()
        with HashedFile(os.path.join(folder, f"{lo}.arrow")) as f:
            with pa.ipc.new_file(f, batch.schema) as ipc_writer:
                ipc_writer.write_batch(batch)
            t3, w3 = clock(), time.perf_counter()
            os.fsync(f.fd)
            w4 = time.perf_counter()
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, batch.schema) as ipc_writer:
            ipc_writer.write_batch(batch)
        data = memoryview(sink.getvalue())
        t5 = clock()
        hashlib.sha256(data).hexdigest()
        out["sha256 alone"] += clock() - t5
        out["encode"] += t2 - t1
        out["arrow batch"] += (t1 - t0) - (t2 - t1)
        out["ipc+sha256+write"] += t3 - t2
        out["fsync wait"] += w4 - w3
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=2048)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--core", type=int, default=None, help="the core to run on (default: the first this process may use)")
    ap.add_argument("--only", default=None, help="comma-separated contender names")
    ap.add_argument("--profile", default=None, help="cProfile one contender (one run) and print its top functions")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    ap.add_argument("--breakdown", action="store_true", help="also time the writer's phases apart (median of the rounds)")
    args = ap.parse_args(argv)
    where = _pin_one_core(args.core)
    only = set(args.only.split(",")) if args.only else ({args.profile} if args.profile else None)
    t0 = time.perf_counter()
    runs = contenders(args.records, args.length, only)
    print(f"records built in {time.perf_counter() - t0:.1f} s; {args.records} x {args.length} tokens; one core ({where})")
    workdir = tempfile.mkdtemp(prefix="potstill-write-speed-")
    try:
        if args.profile:
            import cProfile
            import pstats

            runs[0].sample(workdir)  # warm
            prof = cProfile.Profile()
            prof.enable()
            runs[0].sample(workdir)
            prof.disable()
            pstats.Stats(prof).sort_stats(os.environ.get("SORT", "cumulative")).print_stats(35)
            return {}
        if args.breakdown:
            _print_breakdown(args, workdir)
        for c in runs:
            c.sample(workdir)  # warm-up round, not counted
            c.times.clear()
            c.cpu_times.clear()
        for _ in range(args.rounds):
            for c in runs:
                c.sample(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    figures = {c.name: {"tokens_per_s": round(c.tokens_per_s), "tokens_per_cpu_s": round(c.tokens_per_cpu_s),
                        "bytes": c.bytes, "median_s": statistics.median(c.times),
                        "bytes_per_token": round(c.bytes / c.tokens, 2)} for c in runs}
    print(f"{'contender':24s} {'tokens/s':>12s} {'tokens/CPU-s':>13s} {'bytes/token':>12s} {'median s':>9s}")
    for name, f in figures.items():
        print(f"{name:24s} {f['tokens_per_s']:12,d} {f['tokens_per_cpu_s']:13,d} {f['bytes_per_token']:12.2f} "
              f"{f['median_s']:9.3f}")
    for a, b in (("potstill-default", "mds-sampled"), ("potstill-top64", "mds-top64"),
                 ("potstill-top64-packed", "mds-top64"), ("potstill-default", "arrow-ipc-sampled"),
                 ("potstill-default", "parquet-sampled"), ("potstill-top64", "arrow-ipc-top64"),
                 ("potstill-top64", "parquet-top64")):
        if a in figures and b in figures:
            print(f"{a} / {b}: {figures[a]['tokens_per_s'] / figures[b]['tokens_per_s']:.2f}x wall, "
                  f"{figures[a]['tokens_per_cpu_s'] / figures[b]['tokens_per_cpu_s']:.2f}x CPU")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    return figures


def _print_breakdown(args: argparse.Namespace, workdir: str) -> None:
    print("where the writer's time goes (CPU seconds per 1M tokens, the fsync's wait in wall seconds; median of the rounds):")
    for kind, codec, name in (("sampled", "compact", "potstill-default"), ("topk", "none", "potstill-top64"),
                              ("topk", "packed", "potstill-top64-packed")):
        records = make_records(args.records, args.length, kind)
        tokens = sum(r.num_tokens for r in records)
        manifest = manifest_for(kind, codec, records)
        rounds = []
        for _ in range(max(args.rounds, 1)):
            folder = tempfile.mkdtemp(dir=workdir)
            rounds.append(breakdown(records, manifest, folder))
            shutil.rmtree(folder)
        phases = {p: statistics.median(r[p] for r in rounds) * 1e6 / tokens for p in rounds[0]}
        total = sum(v for p, v in phases.items() if p != "sha256 alone")
        print(f"  {name:22s} " + "  ".join(f"{p} {v:.3f} ({100 * v / total:.0f}%)" for p, v in phases.items())
              + f"  = {total:.3f} s, {1e6 / total:,.0f} tokens/CPU-s")


if __name__ == "__main__":
    main()
