"""Store I/O benchmark: write and read throughput of top-64 targets plus one hidden layer.

Writes random but valid records through `ShardWriter`, alternating with writing the same arrays
as raw .npy files (the disk's speed), then reads the targets several ways, interleaved round by
round so that load from others on a shared machine slows every contender alike:

- the potstill store (`Store.shard(name).views.targets_of(j)`, the loader's zero-copy path);
- the limit: the raw .npy files, memory-mapped, with an offsets array;
- a Hugging Face `datasets.Dataset` with the same columns (`save_to_disk` + `load_from_disk`),
  read record by record and in batches, in "numpy" format (and "python" format for reference);
- for reference, the Arrow table under that Dataset, read the way the store reads its own.

Every reader feeds the same loop: copy each record's targets into a preallocated token-major batch
buffer (torch tensors), the way a packing loader does. The hidden layer is read per record through
`ShardReader.hidden` against the raw memmap. Results are Markdown tables on stdout and, with
`--json OUT`, a JSON file.

    python bench/store_io.py                 # the full run (a few minutes on 2 cores)
    python bench/store_io.py --quick         # a smoke run (seconds)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from potstill.share import store_info
from potstill.store import (
    HiddenLayer,
    HiddenSpec,
    Record,
    Store,
    StoreManifest,
    TargetSpec,
    TeacherInfo,
    TokenizerInfo,
    create_store,
    open_store,
)

# One record's targets, token-major: topk_ids [n, K], topk_logprobs [n, K], token_logprob [n], tail_logprob [n].
Targets = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
TARGET_COLUMNS = ("topk_ids", "topk_logprobs", "token_logprob", "tail_logprob")
MB = 1e6


@dataclass
class BenchConfig:
    records: int = 512  # ~330k tokens, ~250k scored tokens, ~1.3 GB of hidden states
    min_len: int = 256
    max_len: int = 1024
    k: int = 64
    vocab: int = 32000
    hidden_width: int = 2048
    hidden_layer: int = 12
    shard_records: int = 128
    batch_tokens: int = 8192  # scored tokens per loader batch
    ds_batch_records: int = 32  # records per `ds[i:i+B]` read in the batched datasets reader
    python_fraction: float = 0.1  # share of records the slow python-format reference reads
    rounds: int = 7
    write_rounds: int = 3
    min_sample_s: float = 0.3  # repeat fast passes within a sample until it lasts this long
    seed: int = 0
    workdir: str | None = None  # default: a temporary folder, removed at the end
    keep: bool = False
    json: str | None = None
    quick: bool = False


QUICK = {
    "records": 24,
    "min_len": 64,
    "max_len": 256,
    "shard_records": 8,
    "rounds": 3,
    "write_rounds": 1,
    "min_sample_s": 0.02,
    "python_fraction": 0.5,
}


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    defaults = BenchConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    for f in dataclasses.fields(BenchConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            p.add_argument(flag, action="store_true", default=f.default)
        else:
            kind = {int: int, float: float}.get(type(f.default), str)
            p.add_argument(flag, type=kind, default=f.default, metavar=f.name.upper())
    args = vars(p.parse_args(argv))
    if args["quick"]:  # quick settings replace the defaults, but flags given explicitly still win
        for name, value in QUICK.items():
            if args[name] == getattr(defaults, name):
                args[name] = value
    cfg = BenchConfig(**args)
    if not 1 <= cfg.min_len <= cfg.max_len or min(cfg.records, cfg.rounds, cfg.write_rounds) < 1:
        p.error("need 1 <= min-len <= max-len, and records, rounds and write-rounds >= 1")
    return cfg


# -- data -------------------------------------------------------------------------------------------


def bench_manifest(cfg: BenchConfig) -> StoreManifest:
    return StoreManifest(
        teacher=TeacherInfo(name_or_path="bench-random-teacher", config_hash="sha256:bench", dtype="bfloat16"),
        tokenizer=TokenizerInfo(fingerprint="sha256:bench", vocab_size=cfg.vocab),
        targets=TargetSpec(k=cfg.k, logprob_dtype="float16"),
        hidden=HiddenSpec(layers=[HiddenLayer(cfg.hidden_layer, cfg.hidden_width, "bfloat16")]),
        generation={"mode": "bench"},
    )


class RecordMaker:
    """Random but valid records: distinct top-K ids by descending probability, log-probs and log
    tail of a real distribution, the actual token drawn from the top-K. Hidden rows are slices of a
    random bfloat16 pool so generating them does not dominate the run (nothing is compressed, so
    their content does not change any timing)."""

    def __init__(self, cfg: BenchConfig) -> None:
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)
        pool = self.rng.standard_normal((cfg.max_len * 2, cfg.hidden_width), dtype=np.float32)
        self.hidden_pool = (pool.view(np.uint32) >> 16).astype(np.uint16)  # bfloat16 bits

    def make(self, i: int) -> Record:
        cfg, rng = self.cfg, self.rng
        n = int(rng.integers(cfg.min_len, cfg.max_len + 1))
        s = max(1, int(n * rng.uniform(0.1, 0.4)))  # the prompt is 10-40% of the sequence
        m = n - s
        mass = rng.exponential(size=(m, cfg.k + 1))  # K top tokens + the rest of the vocabulary
        mass /= mass.sum(axis=1, keepdims=True)
        top = -np.sort(-mass[:, : cfg.k], axis=1)
        starts = rng.integers(0, cfg.vocab, size=(m, 1))
        topk_ids = ((starts + np.arange(cfg.k)) % cfg.vocab).astype(np.int32)  # distinct per row
        topk_lp = np.log(top).astype(np.float32)
        pick = rng.integers(0, cfg.k, size=m)  # the actual next token: one of the top-K
        input_ids = rng.integers(0, cfg.vocab, size=n).astype(np.int32)
        input_ids[s:] = topk_ids[np.arange(m), pick]
        h0 = int(rng.integers(0, len(self.hidden_pool) - n + 1))
        return Record(
            id=f"rec-{i:07d}",
            input_ids=input_ids,
            score_start=s,
            topk_ids=topk_ids,
            topk_logprobs=topk_lp.astype(np.float16),
            token_logprob=topk_lp[np.arange(m), pick],
            tail_logprob=np.log(mass[:, cfg.k]).astype(np.float32),
            prompt="lorem ipsum " * (s // 3),
            generated="dolor sit amet " * (m // 4),
            hidden_start=0,  # hidden states of every token
            hidden={cfg.hidden_layer: self.hidden_pool[h0 : h0 + n]},
        )


def make_records(cfg: BenchConfig) -> list[Record]:
    maker = RecordMaker(cfg)
    return [maker.make(i) for i in range(cfg.records)]


@dataclass
class WriteResult:
    seconds: float
    records: int
    tokens: int
    scored_tokens: int
    bytes: int


def write_store(cfg: BenchConfig, records: list[Record], url: str) -> WriteResult:
    """Write the records through ShardWriter into a new store; the writer's calls are timed."""
    if os.path.exists(url):
        shutil.rmtree(url)
    store = create_store(url, bench_manifest(cfg), {"tokenizer.json": b"{}"})
    fresh = [dataclasses.replace(r) for r in records]  # the writer takes over what it is given
    t0 = time.perf_counter()
    with store.writer("bench", shard_records=cfg.shard_records) as writer:
        for rec in fresh:
            writer.write(rec)
    seconds = time.perf_counter() - t0
    commits = writer.committed
    return WriteResult(
        seconds=seconds,
        records=sum(c.records for c in commits),
        tokens=sum(c.tokens for c in commits),
        scored_tokens=sum(c.scored_tokens for c in commits),
        bytes=sum(c.bytes for c in commits),
    )


# -- the same bytes as raw numpy files: the limit ----------------------------------------------------


@dataclass
class Memmaps:
    """Each column as one raw .npy file, memory-mapped, with per-record offsets."""

    target_offsets: np.ndarray  # [records + 1] into the target rows
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    token_logprob: np.ndarray
    tail_logprob: np.ndarray
    hidden_offsets: np.ndarray  # [records + 1] into the hidden rows
    hidden: np.ndarray


MEMMAP_COLUMNS = tuple(f.name for f in dataclasses.fields(Memmaps))


def write_raw(records: list[Record], layer: int, folder: str) -> WriteResult:
    """Write the records' target columns and hidden rows as .npy files, each streamed record by
    record and fsynced like the store's files: the disk's own write speed, for reference."""
    if os.path.exists(folder):
        shutil.rmtree(folder)
    os.makedirs(folder)
    scored = np.array([0] + [len(r.token_logprob) for r in records], dtype=np.int64)
    rows = np.array([0] + [len(r.hidden[layer]) for r in records], dtype=np.int64)
    columns = {
        "target_offsets": [np.cumsum(scored)],
        "hidden_offsets": [np.cumsum(rows)],
        **{col: [getattr(r, col) for r in records] for col in TARGET_COLUMNS},
        "hidden": [r.hidden[layer] for r in records],
    }
    t0 = time.perf_counter()
    nbytes = 0
    for col, parts in columns.items():
        nbytes += _save_npy(os.path.join(folder, f"{col}.npy"), parts)
    seconds = time.perf_counter() - t0
    tokens = sum(len(r.input_ids) for r in records)
    return WriteResult(seconds, len(records), tokens, int(scored.sum()), nbytes)


def _save_npy(path: str, parts: list[np.ndarray]) -> int:
    """Write the concatenation of `parts` as one .npy file without building it in memory."""
    shape = (sum(len(p) for p in parts), *parts[0].shape[1:])
    header = {"descr": np.lib.format.dtype_to_descr(parts[0].dtype), "fortran_order": False, "shape": shape}
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        for part in parts:
            f.write(np.ascontiguousarray(part).data)
        f.flush()
        os.fsync(f.fileno())
        return f.tell()


def open_memmaps(folder: str) -> Memmaps:
    # np.asarray: plain ndarray views of the maps (slicing an np.memmap subclass costs extra per call)
    return Memmaps(**{c: np.asarray(np.load(os.path.join(folder, f"{c}.npy"), mmap_mode="r")) for c in MEMMAP_COLUMNS})


def time_writes(cfg: BenchConfig, records: list[Record], workdir: str) -> tuple[list[WriteResult], list[WriteResult]]:
    """Write the store and the raw files `write_rounds` times, alternating which goes first; the
    last of each stays for the read benchmarks."""
    store_runs, raw_runs = [], []
    for r in range(cfg.write_rounds):
        jobs = [
            lambda: store_runs.append(write_store(cfg, records, os.path.join(workdir, "bench.store"))),
            lambda: raw_runs.append(write_raw(records, cfg.hidden_layer, os.path.join(workdir, "memmap"))),
        ]
        for job in jobs if r % 2 == 0 else jobs[::-1]:
            job()
    return store_runs, raw_runs


def export_dataset(store: Store, folder: str) -> Any:
    """A datasets.Dataset of the same target columns (same Arrow types), saved and loaded back."""
    import datasets
    import pyarrow as pa

    datasets.disable_progress_bars()
    tables = [pa.Table.from_batches([store.shard(n).views.batch.select(list(TARGET_COLUMNS))]) for n in store.shard_names]
    datasets.Dataset(pa.concat_tables(tables)).save_to_disk(folder)
    return datasets.load_from_disk(folder)


# -- readers: each yields every record's targets as numpy arrays -------------------------------------


def store_targets(store: Store) -> Iterator[Targets]:
    for name in store.shard_names:
        views = store.shard(name).views
        for j in range(views.num_rows):
            yield views.targets_of(j)


def memmap_targets(mm: Memmaps) -> Iterator[Targets]:
    off = mm.target_offsets.tolist()  # Python ints slice fastest: the limit should be the best loop
    ids, lps, tok, tail = mm.topk_ids, mm.topk_logprobs, mm.token_logprob, mm.tail_logprob
    for j in range(len(off) - 1):
        a, b = off[j], off[j + 1]
        yield ids[a:b], lps[a:b], tok[a:b], tail[a:b]


def dataset_rows(ds: Any, limit: int | None = None) -> Iterator[Targets]:
    """Record by record, `ds[i]`; in python format each row is nested lists, turned into arrays."""
    for i in range(len(ds) if limit is None else limit):
        row = ds[i]
        yield tuple(np.asarray(row[c]) for c in TARGET_COLUMNS)  # type: ignore[misc]


def dataset_batches(ds: Any, batch_records: int) -> Iterator[Targets]:
    """`ds[i:i+B]`, the way a datasets user reads in batches; ragged rows come back per record."""
    for i in range(0, len(ds), batch_records):
        batch = ds[i : i + batch_records]
        cols = [batch[c] for c in TARGET_COLUMNS]
        yield from zip(*cols, strict=True)


def arrow_under_dataset(ds: Any) -> Iterator[Targets]:
    """Not datasets' API: the Arrow table a loaded Dataset memory-maps, sliced zero-copy per
    record the way the store's ColumnViews does; shows where datasets' own time goes."""

    def flat(column: Any, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        values = column.values.values if width else column.values
        arr = values.to_numpy(zero_copy_only=True)
        return column.offsets.to_numpy(zero_copy_only=True), arr.reshape(-1, width) if width else arr

    for batch in ds.data.table.to_batches():
        k = batch.schema.field("topk_ids").type.value_type.list_size
        off, ids = flat(batch.column("topk_ids"), k)
        _, lps = flat(batch.column("topk_logprobs"), k)
        _, tok = flat(batch.column("token_logprob"))
        _, tail = flat(batch.column("tail_logprob"))
        bounds = off.tolist()
        for j in range(batch.num_rows):
            a, b = bounds[j], bounds[j + 1]
            yield ids[a:b], lps[a:b], tok[a:b], tail[a:b]


class TargetBatcher:
    """What a loader does with targets: pack records token-major into preallocated torch tensors
    and hand each full batch on. Sources whose dtypes differ (datasets' numpy format widens to
    int64/float32) are cast back to the stored dtypes by the copy, as a loader would have to."""

    def __init__(self, capacity: int, k: int) -> None:
        import torch

        self.capacity = capacity
        self.tensors = (
            torch.empty((capacity, k), dtype=torch.int32),
            torch.empty((capacity, k), dtype=torch.float16),
            torch.empty(capacity, dtype=torch.float32),
            torch.empty(capacity, dtype=torch.float32),
        )
        self.buffers = tuple(t.numpy() for t in self.tensors)  # the same memory, for numpy copies

    def run(self, source: Iterator[Targets], digest: Any = None) -> int:
        """Pack every record of `source`; returns the scored tokens. `digest` (a hashlib object)
        takes in the bytes of every batch handed on, to check that all sources deliver the same."""
        pos = tokens = 0
        for targets in source:
            n = len(targets[2])
            if pos + n > self.capacity:
                self._hand_on(pos, digest)
                pos = 0
            for buf, values in zip(self.buffers, targets, strict=True):
                buf[pos : pos + n] = values
            pos += n
            tokens += n
        self._hand_on(pos, digest)
        return tokens

    def _hand_on(self, rows: int, digest: Any) -> None:
        if digest is not None:
            for buf in self.buffers:
                digest.update(buf[:rows].tobytes())


def hidden_store(store: Store, layer: int, out: np.ndarray, into: bool) -> int:
    """Each record's hidden rows through `ShardReader.hidden`, copied into a batch buffer, or with
    `into` read straight into it (`out=`)."""
    rows = 0
    for name in store.shard_names:
        shard = store.shard(name)
        for j in range(shard.num_records):
            a, b = shard.hidden_rows(j)
            if into:
                shard.hidden(j, layer, out=out[: b - a])
            else:
                out[: b - a] = shard.hidden(j, layer)
            rows += b - a
    return rows


def hidden_memmap(mm: Memmaps, out: np.ndarray) -> int:
    off = mm.hidden_offsets.tolist()
    rows = 0
    for j in range(len(off) - 1):
        block = mm.hidden[off[j] : off[j + 1]]
        out[: len(block)] = block
        rows += len(block)
    return rows


# -- timing -----------------------------------------------------------------------------------------


@dataclass
class Contender:
    name: str
    run: Callable[[], int]  # one full pass; returns the tokens (or rows) it read
    bytes_per_unit: float  # bytes of the stored columns per token
    note: str = ""
    reps: int = 1  # passes per timed sample
    seconds: list[float] = dataclasses.field(default_factory=list)  # per pass, one entry per sample
    units: int = 0

    def warm_up(self, min_sample_s: float) -> None:
        """One untimed pass (warms the page cache); sets how many passes make one sample."""
        t0 = time.perf_counter()
        self.run()
        self.reps = max(1, math.ceil(min_sample_s / max(time.perf_counter() - t0, 1e-6)))

    def sample(self) -> None:
        t0 = time.perf_counter()
        for _ in range(self.reps):
            self.units = self.run()
        self.seconds.append((time.perf_counter() - t0) / self.reps)

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def tokens_per_s(self) -> float:
        return self.units / self.median_s

    @property
    def mb_per_s(self) -> float:
        return self.units * self.bytes_per_unit / self.median_s / MB


def interleave(contenders: list[Contender], rounds: int, min_sample_s: float) -> None:
    """Warm up each contender, then take `rounds` samples of each, one contender after the other
    and the order rotated every round, so that load from other processes on the shared machine
    falls on all of them alike and no contender always runs right after a given other."""
    for c in contenders:
        c.warm_up(min_sample_s)
    for r in range(rounds):
        for i in range(len(contenders)):
            contenders[(r + i) % len(contenders)].sample()


def paired_ratio(a: Contender, b: Contender) -> float:
    """Median over rounds of the per-token speed of a over that of b, each pair measured in the
    same round, close in time (a ratio of medians would mix samples taken under different load)."""
    ratios = [(a.units / sa) / (b.units / sb) for sa, sb in zip(a.seconds, b.seconds, strict=True)]
    return statistics.median(ratios)


# -- report -----------------------------------------------------------------------------------------


def write_entry(name: str, runs: list[WriteResult], vs: list[WriteResult]) -> dict[str, Any]:
    """Medians over the write rounds; `vs_raw`: median of this writer's speed over the raw files'
    speed in the same round."""
    median_s = statistics.median(w.seconds for w in runs)
    w = runs[0]
    return {
        "name": name,
        "records": w.records,
        "tokens": w.tokens,
        "scored_tokens": w.scored_tokens,
        "bytes": w.bytes,
        "seconds": [x.seconds for x in runs],
        "median_s": median_s,
        "tokens_per_s": w.tokens / median_s,
        "scored_tokens_per_s": w.scored_tokens / median_s,
        "mb_per_s": w.bytes / median_s / MB,
        "vs_raw": statistics.median((a.bytes / a.seconds) / (b.bytes / b.seconds) for a, b in zip(runs, vs, strict=True)),
    }


def read_entry(c: Contender, limit: Contender, datasets_best: Contender | None) -> dict[str, Any]:
    return {
        "name": c.name,
        "note": c.note,
        "units": c.units,
        "passes_per_sample": c.reps,
        "seconds_per_pass": c.seconds,
        "median_s": c.median_s,
        "units_per_s": c.tokens_per_s,
        "mb_per_s": c.mb_per_s,
        "vs_limit": paired_ratio(c, limit),
        "vs_datasets": None if datasets_best is None else paired_ratio(c, datasets_best),
    }


def build_report(
    cfg: BenchConfig,
    store_writes: list[WriteResult],
    raw_writes: list[WriteResult],
    info: dict[str, Any],
    targets: list[Contender],
    hidden: list[Contender],
) -> dict[str, Any]:
    """Everything measured, as JSON; the Markdown tables are rendered from this alone."""
    store_c, limit_c, *datasets_cs, _ = targets  # the last reads Arrow directly, not through datasets
    ds_best = max(datasets_cs, key=lambda c: c.tokens_per_s)  # the bar is against datasets' fastest way
    vs_limit, vs_ds = paired_ratio(store_c, limit_c), paired_ratio(store_c, ds_best)
    return {
        "config": dataclasses.asdict(cfg),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "write": [
            write_entry("potstill ShardWriter", store_writes, raw_writes),
            write_entry("raw .npy files, same arrays (reference)", raw_writes, raw_writes),
        ],
        "read_targets": [read_entry(c, limit_c, ds_best) for c in targets],
        "read_hidden": [read_entry(c, hidden[-1], None) for c in hidden],
        "fields": info["fields"],
        "bars": {
            "store_vs_memmap": vs_limit,
            "store_vs_datasets": vs_ds,
            "datasets_reader": f"{ds_best.name} ({ds_best.note})",
            "met": vs_limit >= 0.8 and vs_ds >= 3.0,
        },
    }


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def read_table(entries: list[dict[str, Any]], unit: str) -> str:
    rows = [
        [
            e["name"] + (f" ({e['note']})" if e["note"] else ""),
            f"{e['units_per_s'] / 1e6:.2f} M",
            f"{e['mb_per_s']:,.0f}",
            f"{e['median_s'] * 1e3:,.1f}",
            f"{e['vs_limit']:.0%}",
            "-" if e["vs_datasets"] is None else f"{e['vs_datasets']:.1f}×",
        ]
        for e in entries
    ]
    return markdown_table(["reader", f"{unit}/s", "MB/s", "median ms/pass", "vs memmap", "vs fastest datasets"], rows)


def markdown(report: dict[str, Any]) -> str:
    cfg, bars = report["config"], report["bars"]
    write_rows = [
        [
            w["name"],
            f"{w['tokens']:,}",
            f"{w['scored_tokens']:,}",
            f"{w['bytes'] / MB:,.0f} MB",
            f"{w['median_s']:.1f}",
            f"{w['tokens_per_s'] / 1e3:,.0f} k",
            f"{w['mb_per_s']:,.0f}",
            f"{w['vs_raw']:.0%}",
        ]
        for w in report["write"]
    ]
    field_rows = [
        [name, f"{f['bytes'] / MB:,.2f} MB", f"{f['per_token']:.1f}", f"{f['per_scored_token']:.1f}"]
        for name, f in report["fields"].items()
    ]
    k, width = cfg["k"], cfg["hidden_width"]
    return "\n\n".join(
        [
            f"{cfg['records']} records of {cfg['min_len']}-{cfg['max_len']} tokens, top-{k} float16 targets, "
            f"hidden layer {cfg['hidden_layer']} [{width}] bfloat16 on every token; reads: medians of "
            f"{cfg['rounds']} interleaved samples, warm page cache, one thread.",
            f"**Write** (ShardWriter: Arrow + Zarr, sha256 of every file, fsync, commit record; "
            f"medians of {cfg['write_rounds']} rounds alternating with the raw files)",
            markdown_table(
                ["writer", "tokens", "scored tokens", "bytes", "median s", "tokens/s", "MB/s", "vs raw"], write_rows
            ),
            f"**Read top-{k} targets** into batch tensors ({k * 6 + 8} bytes per scored token)",
            read_table(report["read_targets"], "scored tokens"),
            f"**Read hidden layer {cfg['hidden_layer']}** into a batch buffer ({width * 2} bytes per token)",
            read_table(report["read_hidden"], "tokens"),
            "**Bytes per token by field** (`store_info`)",
            markdown_table(["field", "bytes", "B/token", "B/scored token"], field_rows),
            f"**Bars**: store {bars['store_vs_memmap']:.0%} of the memmap limit (need ≥ 80%), "
            f"{bars['store_vs_datasets']:.1f}× {bars['datasets_reader']} (need ≥ 3×): "
            + ("met." if bars["met"] else "NOT met."),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    workdir = cfg.workdir or tempfile.mkdtemp(prefix="potstill-bench-")
    os.makedirs(workdir, exist_ok=True)
    try:
        report = run(cfg, workdir)
    finally:
        if not cfg.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(markdown(report))
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def check_same_targets(batcher: TargetBatcher, sources: dict[str, Iterator[Targets]], reference: Iterator[Targets]) -> None:
    """Every reader must hand on exactly the batches the store does, or the comparison is void."""
    want = hashlib.sha256()
    batcher.run(reference, want)
    for name, source in sources.items():
        got = hashlib.sha256()
        batcher.run(source, got)
        if got.digest() != want.digest():
            raise SystemExit(f"bench: {name} delivered other targets than the store")


def run(cfg: BenchConfig, workdir: str) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)  # every contender copies on one thread
    log(f"writing {cfg.records} records, {cfg.write_rounds}x as a store and as raw .npy files ...")
    records = make_records(cfg)
    store_writes, raw_writes = time_writes(cfg, records, workdir)
    del records
    store = open_store(os.path.join(workdir, "bench.store"))
    mm = open_memmaps(os.path.join(workdir, "memmap"))
    log("exporting the same targets to a datasets.Dataset ...")
    ds = export_dataset(store, os.path.join(workdir, "dataset"))
    ds_numpy = ds.with_format("numpy")
    n_python = max(1, int(len(ds) * cfg.python_fraction))
    b = cfg.ds_batch_records

    target_bytes = cfg.k * 4 + cfg.k * 2 + 4 + 4  # per scored token, as stored
    max_scored = max(len(t[2]) for t in store_targets(store))
    batcher = TargetBatcher(max(cfg.batch_tokens, max_scored), cfg.k)
    log("checking that every reader delivers the same targets ...")
    check_same_targets(
        batcher,
        {
            "memmap": memmap_targets(mm),
            "ds[i]": dataset_rows(ds_numpy),
            "ds[i:i+B]": dataset_batches(ds_numpy, b),
            "ds.data.table": arrow_under_dataset(ds),
        },
        store_targets(store),
    )

    def reads(source: Callable[[], Iterator[Targets]]) -> Callable[[], int]:
        return lambda: batcher.run(source())

    targets = [  # the store first, the limit second, then the datasets readers
        Contender("potstill store", reads(lambda: store_targets(store)), target_bytes, "views.targets_of"),
        Contender("raw .npy memmap (limit)", reads(lambda: memmap_targets(mm)), target_bytes),
        Contender("datasets, numpy format", reads(lambda: dataset_rows(ds_numpy)), target_bytes, "ds[i]"),
        Contender("datasets, numpy format", reads(lambda: dataset_batches(ds_numpy, b)), target_bytes, f"ds[i:i+{b}]"),
        Contender(
            "datasets, python format",
            reads(lambda: dataset_rows(ds, n_python)),
            target_bytes,
            f"ds[i], first {n_python} records",
        ),
        Contender(
            "Arrow table under the Dataset",
            reads(lambda: arrow_under_dataset(ds)),
            target_bytes,
            "ds.data.table, zero-copy; not datasets' API",
        ),
    ]
    log(f"timing target reads: {cfg.rounds} interleaved rounds ...")
    interleave(targets, cfg.rounds, cfg.min_sample_s)

    out = np.empty((cfg.max_len, cfg.hidden_width), dtype=np.uint16)
    layer, hidden_bytes = cfg.hidden_layer, cfg.hidden_width * 2
    hidden = [  # the limit last
        Contender("potstill store", lambda: hidden_store(store, layer, out, False), hidden_bytes, "hidden(j, layer)"),
        Contender(
            "potstill store", lambda: hidden_store(store, layer, out, True), hidden_bytes, "hidden(j, layer, out=batch)"
        ),
        Contender("raw .npy memmap (limit)", lambda: hidden_memmap(mm, out), hidden_bytes),
    ]
    log(f"timing hidden reads: {cfg.rounds} interleaved rounds ...")
    interleave(hidden, cfg.rounds, cfg.min_sample_s)

    return build_report(cfg, store_writes, raw_writes, store_info(store), targets, hidden)


if __name__ == "__main__":
    sys.exit(main())
