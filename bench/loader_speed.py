"""The training loader against MosaicML Streaming (MDS) on the same records.

Writes the same records (512 tokens each by default) twice: through potstill's `ShardWriter` and
through MDS's `MDSWriter` (uncompressed, its default shard size), for two target sets:

- `top64`: the top-64 ids (int32) and log-probs (float16) with the log tail, plain columns;
- `sampled`: the default targets of `potstill generate` (64 systematic draws per position as
  distinct ids with counts, the compact codec); MDS holds the same draws as plain arrays
  (per-position offsets, ids, counts), having no codec of its kind.

Then reads each through a torch DataLoader with 0 and 2 worker processes, batch 8, torch threads 1:
potstill's `StoreDataset` with its default checks on (every shard file against its commit record,
the records file by its pieces, and its values, checked once per job), MDS's `StreamingDataset` (no hash check: its default) with a numpy collate that
produces the same tensors (padded input ids and attention mask; the top-k rows with the log tail,
or the draws as ids and weights padded to the batch's widest position). Both shuffle: potstill its
default buffer of 1,024 samples, MDS its default algorithm. A pass reads every record once.

Reported per contender: tokens/s over the whole pass (input tokens / seconds from creating the
dataset to the last batch), tokens per CPU-second (of the process, its threads and its worker
processes: what a pass costs, whatever else the machine runs), the time to the first batch (from
creating the dataset) and, with `--step-ms` (a training step's time, spent sleeping after each batch
while the loader works on), the time spent waiting for batches; medians of `--rounds` rounds interleaved contender by contender so that load
from others slows each alike. The checks are run afresh in every round (their per-process memory is
cleared). potstill's first batch checks only the records it reads (their pieces of the Arrow file
and their values), not its whole first shard (`--shard-records`; MDS's shards are 64 MB, 320 top-64
records of 512 tokens).

It imports potstill from the checkout it lives in, whatever the interpreter has installed, so a
Python that has mosaicml-streaming (and torch) installed measures this checkout's code:

    python bench/loader_speed.py                       # 2,048 records, ~2 minutes on 2 cores
    python bench/loader_speed.py --records 256 --rounds 1   # smoke run
    python bench/loader_speed.py --step-ms 10 --shard-records 320 --targets top64   # a paced consumer
    python bench/loader_speed.py --profile top64       # cProfile of potstill's pass, one process
"""

from __future__ import annotations

import argparse
import functools
import gc
import math
import os
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from checkout import import_this_checkout, streaming

import_this_checkout()

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from potstill.store import (  # noqa: E402
    HiddenSpec,
    Record,
    StoreManifest,
    TargetSpec,
    TeacherInfo,
    TokenizerInfo,
    create_store,
)
from potstill.store import reader as store_reader  # noqa: E402
from potstill.store.codec import bits_for, sampled_from_draws  # noqa: E402
from potstill.store.targets import codec_names  # noqa: E402
from potstill.student_train.data import StoreDataset  # noqa: E402

VOCAB = 32_000
TARGETS = ("top64", "sampled")


# -- records -----------------------------------------------------------------------------------------
def make_record(rng: np.random.Generator, i: int, length: int, target: str, k: int, samples: int) -> Record:
    """A record of `length` tokens, every position after the first scored, with valid targets."""
    m = length - 1
    ids = rng.integers(0, VOCAB, size=length).astype(np.int32)
    if target == "top64":
        mass = rng.exponential(size=(m, k + 1))
        mass /= mass.sum(axis=1, keepdims=True)
        top_lp = np.log(-np.sort(-mass[:, :k], axis=1)).astype(np.float32)
        top_ids = ((rng.integers(0, VOCAB, size=(m, 1)) + np.arange(k)) % VOCAB).astype(np.int32)
        return Record(id=f"r{i:07d}", input_ids=ids, score_start=1, topk_ids=top_ids,
                      topk_logprobs=top_lp.astype(np.float16), token_logprob=top_lp[:, 0],
                      tail_logprob=np.log(mass[:, k]).astype(np.float32))
    # draws concentrated on a few ids per position, with a tail of rare ones (geometric ranks)
    draws = (rng.integers(0, VOCAB, size=(m, 1)) + rng.geometric(0.3, size=(m, samples)) - 1) % VOCAB
    return Record(id=f"r{i:07d}", input_ids=ids, score_start=1,
                  token_logprob=-rng.exponential(size=m).astype(np.float32), sampled=sampled_from_draws(draws))


def manifest(target: str, k: int, samples: int) -> StoreManifest:
    if target == "top64":
        spec = TargetSpec(k=k, logprob_dtype="float16")
    else:  # `potstill generate`'s defaults (teacher_gen/config.py)
        codec = "compact2" if "compact2" in codec_names() else "compact"
        spec = TargetSpec(kind="sampled", k=0, samples=samples, seed=0, sampler="systematic", codec=codec,
                          id_bits=bits_for(VOCAB - 1), logprob_bits=12, logprob_min=-24.0)
    return StoreManifest(teacher=TeacherInfo(name_or_path="bench-random-teacher", vocab_size=VOCAB),
                         tokenizer=TokenizerInfo(fingerprint="sha256:bench", vocab_size=VOCAB),
                         targets=spec, hidden=HiddenSpec(), generation={"bench": "loader_speed"})


def mds_sample(rec: Record) -> dict[str, Any]:
    out: dict[str, Any] = {"id": rec.id, "input_ids": rec.input_ids, "score_start": rec.score_start,
                           "token_logprob": rec.token_logprob}
    if rec.topk_ids is not None:
        out.update(topk_ids=rec.topk_ids, topk_logprobs=rec.topk_logprobs, tail_logprob=rec.tail_logprob)
    else:
        s = rec.sampled
        out.update(sampled_offsets=s.offsets.astype(np.int32), sampled_ids=s.ids, sampled_counts=s.counts)
    return out


MDS_COLUMNS = {
    "top64": {"id": "str", "input_ids": "ndarray:int32", "score_start": "int32", "token_logprob": "ndarray:float32",
              "topk_ids": "ndarray:int32", "topk_logprobs": "ndarray:float16", "tail_logprob": "ndarray:float32"},
    "sampled": {"id": "str", "input_ids": "ndarray:int32", "score_start": "int32", "token_logprob": "ndarray:float32",
                "sampled_offsets": "ndarray:int32", "sampled_ids": "ndarray:int32", "sampled_counts": "ndarray:uint16"},
}


def write_both(root: str, target: str, args: argparse.Namespace) -> dict[str, float]:
    """Write the records through both writers (timed, the record making not), in `root`/<target>.*."""
    MDSWriter = streaming().MDSWriter

    rng = np.random.default_rng(args.seed)
    records = [make_record(rng, i, args.length, target, args.k, args.samples) for i in range(args.records)]
    url, mds = os.path.join(root, f"{target}.store"), os.path.join(root, f"{target}.mds")
    started = time.perf_counter()
    store = create_store(url, manifest(target, args.k, args.samples), {"tokenizer.json": b"{}"})
    with store.writer("bench", **({"shard_records": args.shard_records} if args.shard_records else {})) as writer:
        for rec in records:
            writer.write(rec)
    potstill_s = time.perf_counter() - started
    started = time.perf_counter()
    with MDSWriter(out=mds, columns=MDS_COLUMNS[target]) as writer:
        for rec in records:
            writer.write(mds_sample(rec))
    mds_s = time.perf_counter() - started
    tokens = args.records * args.length
    return {"potstill": tokens / potstill_s, "mds": tokens / mds_s}


# -- reading -----------------------------------------------------------------------------------------
def mds_collate(target: str) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """Batch MDS samples into the tensors potstill's collation gives (numpy, whole batch at once)."""

    def collate(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = np.array([len(s["input_ids"]) for s in samples])
        width = int(lengths.max())
        input_ids = np.zeros((len(samples), width), dtype=np.int64)
        mask = np.arange(width)[None, :] < lengths[:, None]
        input_ids[mask] = np.concatenate([s["input_ids"] for s in samples])
        out = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask.astype(np.int64))}
        if target == "top64":
            out["topk_ids"] = torch.from_numpy(np.concatenate([s["topk_ids"] for s in samples]).astype(np.int64))
            out["topk_logprobs"] = torch.from_numpy(np.concatenate([s["topk_logprobs"] for s in samples]))
            out["tail_logprob"] = torch.from_numpy(np.concatenate([s["tail_logprob"] for s in samples]))
            return out
        counts = np.concatenate([s["sampled_counts"] for s in samples]).astype(np.float32)
        ids = np.concatenate([s["sampled_ids"] for s in samples])
        per_pos = np.concatenate([np.diff(s["sampled_offsets"]) for s in samples])
        u = int(per_pos.max(initial=1))
        starts = np.concatenate([[0], np.cumsum(per_pos)[:-1]])
        col = np.arange(len(ids)) - np.repeat(starts, per_pos)
        row = np.repeat(np.arange(len(per_pos)), per_pos)
        padded_ids = np.full((len(per_pos), u), -1, dtype=np.int64)
        probs = np.zeros((len(per_pos), u), dtype=np.float32)
        padded_ids[row, col] = ids
        probs[row, col] = counts / np.repeat(np.add.reduceat(counts, starts), per_pos)
        out["sampled_ids"], out["sampled_probs"] = torch.from_numpy(padded_ids), torch.from_numpy(probs)
        return out

    return collate


def cpu_seconds() -> float:
    """CPU time of this process (all its threads) and of its finished children (loader workers)."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def consume(loader: Any, started: float, batches: int | None, args: argparse.Namespace) -> tuple[float, float, float]:
    """(seconds to the first batch, seconds for the pass, seconds spent waiting for batches) of reading
    `batches` batches (None: all), with a training step of `args.step_ms` after each."""
    first, waited, asked = None, 0.0, started
    for i, batch in enumerate(loader):
        if "error" in batch:
            raise SystemExit(batch["error"])
        int(batch["attention_mask"].sum())
        now = time.perf_counter()
        first = now - started if first is None else first
        waited += now - asked
        if args.step_ms:
            time.sleep(args.step_ms / 1e3)
        asked = time.perf_counter()
        if batches is not None and i + 1 == batches:
            break
    return first or 0.0, time.perf_counter() - started, waited


def potstill_pass(url: str, target: str, workers: int, args: argparse.Namespace,
                  verify_reads: bool = True) -> tuple[float, float, float]:
    """`consume` of one pass of potstill's loader: every record read once."""
    store_reader._VERIFIED.clear()  # each round checks afresh
    started = time.perf_counter()
    ds = StoreDataset.open(url, batch_size=args.batch, eval_fraction=0.0, num_workers=workers,
                           targets="topk" if target == "top64" else "sampled", verify_reads=verify_reads)
    batches = math.ceil(ds.plan.num_train / args.batch)  # = one epoch: every worker's span in whole batches
    loader = DataLoader(ds, batch_size=None, num_workers=workers)
    out = consume(loader, started, batches, args)
    del loader
    gc.collect()
    return out


def mds_pass(mds: str, target: str, workers: int, args: argparse.Namespace) -> tuple[float, float, float]:
    """`consume` of one pass of MDS's StreamingDataset."""
    mds_module = streaming()
    mds_module.base.util.clean_stale_shared_memory()
    started = time.perf_counter()
    ds = mds_module.StreamingDataset(local=mds, shuffle=True, batch_size=args.batch, shuffle_seed=args.seed)
    loader = DataLoader(ds, batch_size=args.batch, num_workers=workers, collate_fn=mds_collate(target))
    out = consume(loader, started, None, args)
    del loader, ds
    gc.collect()
    return out


def profile(root: str, target: str, args: argparse.Namespace) -> None:
    import cProfile
    import pstats

    url = os.path.join(root, f"{target}.store")
    prof = cProfile.Profile()
    prof.enable()
    potstill_pass(url, target, 0, args)
    prof.disable()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(30)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=2048)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", default="0,2", help="DataLoader worker counts, comma-separated")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step-ms", type=float, default=0.0,
                        help="a training step's time after each batch: the loader then works while the step runs")
    parser.add_argument("--unchecked", action="store_true", help="also potstill with its checks off (what they cost)")
    parser.add_argument("--shard-records", type=int, default=0, help="potstill's shard size (default: the writer's)")
    parser.add_argument("--keep", help="write the stores here and keep them (reused when present)")
    parser.add_argument("--profile", choices=TARGETS, help="profile potstill's pass of these targets instead")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    streaming()  # imported before anything is timed
    root = args.keep or tempfile.mkdtemp(prefix="potstill-loader-speed-")
    os.makedirs(root, exist_ok=True)
    try:
        targets = [args.profile] if args.profile else args.targets.split(",")
        for target in targets:
            if not os.path.exists(os.path.join(root, f"{target}.mds", "index.json")):
                shutil.rmtree(os.path.join(root, f"{target}.store"), ignore_errors=True)
                shutil.rmtree(os.path.join(root, f"{target}.mds"), ignore_errors=True)
                speed = write_both(root, target, args)
                print(f"write {target}: potstill {speed['potstill'] / 1e3:.0f}k tokens/s, MDS {speed['mds'] / 1e3:.0f}k",
                      flush=True)
        if args.profile:
            profile(root, args.profile, args)
            return
        step = f" and a {args.step_ms:g} ms step after each batch" if args.step_ms else ""
        print(f"\n{args.records} records of {args.length} tokens, batch {args.batch}{step}, medians of {args.rounds} rounds\n")
        print("| targets | workers | loader | tokens/s | tokens/CPU-s | first batch, s | waiting for batches, s "
              "| speed / MDS's | first batch / MDS's |")
        print("|---|---|---|---|---|---|---|---|---|")
        for target in targets:
            for workers in (int(w) for w in args.workers.split(",")):
                passes: dict[str, tuple[Callable[..., tuple[float, float, float]], str]] = {
                    "potstill": (potstill_pass, os.path.join(root, f"{target}.store")),
                    "MDS": (mds_pass, os.path.join(root, f"{target}.mds"))}
                if args.unchecked:
                    passes["potstill, no checks"] = (functools.partial(potstill_pass, verify_reads=False),
                                                     os.path.join(root, f"{target}.store"))
                runs: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in passes}
                for _ in range(args.rounds):
                    for name, (run, path) in passes.items():
                        cpu = cpu_seconds()
                        first, total, waited = run(path, target, workers, args)
                        runs[name].append((first, total, cpu_seconds() - cpu, waited))
                tokens = args.records * args.length
                med = {name: [statistics.median(x[i] for x in r) for i in range(4)] for name, r in runs.items()}
                for name, (first, total, cpu, waited) in med.items():
                    print(f"| {target} | {workers} | {name} | {tokens / total / 1e3:,.0f}k | {tokens / cpu / 1e3:,.0f}k | "
                          f"{first:.3f} | {waited:.2f} | {med['MDS'][1] / total:.2f} | {first / med['MDS'][0]:.2f} |",
                          flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
