"""Integrity checks and crash leftovers (docs/store-format.md §6, §8)."""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field

import numpy as np

from store.codec import check_sampled
from store.commit import loads_json_object, parse_shard_name
from store.errors import StoreError
from store.fs import join, listdir_names, read_bytes, sha256_file
from store.reader import ShardReader, Store
from store.records import ColumnViews, packed_lengths_ok, target_vocab

STALE_AFTER_S = 600.0


@dataclass
class Problem:
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class Leftover:
    """An uncommitted shard folder (or torn commit record) and whether its writer still runs."""

    shard: str
    writer_id: str | None
    live: bool
    reason: str


@dataclass
class VerifyReport:
    shards: int = 0
    records: int = 0
    tokens: int = 0
    problems: list[Problem] = field(default_factory=list)
    leftovers: list[Leftover] = field(default_factory=list)
    cleaned: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def writer_status(store: Store, writer_id: str, stale_after_s: float = STALE_AFTER_S) -> tuple[bool, str]:
    """(alive, why) for a writer, from its lease (format §6)."""
    try:
        lease = loads_json_object(read_bytes(store.fs, join(store.root, "writers", f"{writer_id}.json")))
    except FileNotFoundError:
        return False, "its writer holds no lease"
    if lease is None:
        return False, "its writer's lease is unreadable"
    age = time.time() - float(lease.get("heartbeat_unix", 0))
    if lease.get("host") == socket.gethostname() and isinstance(lease.get("pid"), int):
        if not _pid_alive(lease["pid"]):
            return False, f"its writer (pid {lease['pid']} on this host) is not running"
        return True, f"its writer (pid {lease['pid']}) is running"
    if age > stale_after_s:
        return False, f"its writer's last heartbeat was {age:.0f}s ago"
    return True, f"its writer's heartbeat is {age:.0f}s old"


def find_leftovers(store: Store, stale_after_s: float = STALE_AFTER_S) -> list[Leftover]:
    committed = set(store.shard_names) | {shard for shard, _ in store.bad_commits}
    commit_files = {n[:-5] for n in listdir_names(store.fs, join(store.root, "commits")) if n.endswith(".json")}
    names = set(listdir_names(store.fs, join(store.root, "shards"))) | (commit_files - committed)
    out = []
    for name in sorted(names - committed):
        parsed = parse_shard_name(name)
        writer = parsed[0] if parsed else None
        torn = name in commit_files
        if writer is None:
            live, why = False, "not a shard name"
        else:
            live, why = writer_status(store, writer, stale_after_s)
        what = "torn commit record" if torn else "uncommitted shard"
        out.append(Leftover(name, writer, live, f"{what}; {why}"))
    return out


def clean_leftovers(store: Store, leftovers: list[Leftover]) -> list[str]:
    """Remove the leftovers of dead writers (never a committed shard, never a live writer's)."""
    removed = []
    for left in leftovers:
        if left.live:
            continue
        for path in (join(store.root, "commits", f"{left.shard}.json"), join(store.root, "shards", left.shard)):
            if store.fs.exists(path):
                store.fs.rm(path, recursive=True)
        removed.append(left.shard)
    return removed


def verify_store(url: str, *, clean: bool = False, storage_options: dict | None = None) -> VerifyReport:
    """Check every committed shard against its commit record and the format; optionally clean."""
    store = Store(url, storage_options, strict=False)
    report = VerifyReport()
    for shard, message in store.bad_commits:
        report.problems.append(Problem(f"commits/{shard}.json", message.split(": ", 1)[-1]))
    for entry in store.manifest.tokenizer.files:
        _check_file(store, entry.path, entry.bytes, entry.sha256, "manifest", report)
    for commit in store.commits:
        report.shards += 1
        before = len(report.problems)
        for entry in commit.files:
            _check_file(store, entry.path, entry.bytes, entry.sha256, f"shard {commit.shard}", report)
        listed = {f.path for f in commit.files}
        for path in _files_under(store, f"shards/{commit.shard}"):
            if path not in listed:
                report.problems.append(Problem(f"shard {commit.shard}", f"file {path} is not in its commit record"))
        if len(report.problems) == before:  # bytes are sound: check content against the format
            _check_content(store, commit, report)
        report.records += commit.records
        report.tokens += commit.tokens
    report.leftovers = find_leftovers(store)
    if clean:
        report.cleaned = clean_leftovers(store, report.leftovers)
    return report


def _files_under(store: Store, rel: str) -> list[str]:
    root = join(store.root, rel)
    try:
        found = store.fs.find(root)
    except FileNotFoundError:
        return []
    prefix = store.root.rstrip("/") + "/"
    return sorted(p[len(prefix) :] if p.startswith(prefix) else p for p in found)


def _check_file(store: Store, rel: str, size: int, digest: str, where: str, report: VerifyReport) -> None:
    try:
        got_digest, got_size = sha256_file(store.fs, join(store.root, rel))
    except FileNotFoundError:
        report.problems.append(Problem(where, f"file {rel} is missing"))
        return
    if got_size != size:
        report.problems.append(Problem(where, f"file {rel} has {got_size} bytes, its record says {size} (truncated?)"))
    elif got_digest != digest:
        report.problems.append(Problem(where, f"file {rel} fails its sha256 check (corrupted bytes)"))


def _check_content(store: Store, commit, report: VerifyReport) -> None:
    where = f"shard {commit.shard}"
    try:
        reader = ShardReader(store, commit)
    except StoreError as e:
        report.problems.append(Problem(where, str(e).split(": ", 1)[-1]))
        return
    v = reader.views
    n = np.diff(v.tok_off)
    scored = np.diff(v.tgt_off)
    ids = v.batch.column("id").to_pylist()
    checks = [
        (ids == commit.ids, "record ids differ from its commit record"),
        (int(n.sum()) == commit.tokens, f"holds {int(n.sum())} tokens, its commit says {commit.tokens}"),
        (int(scored.sum()) == commit.scored_tokens, f"holds {int(scored.sum())} scored tokens, its commit says {commit.scored_tokens}"),
        (bool(np.all((v.score_start >= 1) & (v.score_start <= n))), "a record's score_start is out of range"),
        (bool(np.all(scored == n - v.score_start)), "a record's target count differs from len(input_ids) - score_start"),
        (bool(np.all((v.hidden_start >= 0) & (v.hidden_start <= n))), "a record's hidden_start is out of range"),
    ]
    layers = store.manifest.hidden.layers
    if layers:
        rows = n - v.hidden_start
        expect = np.concatenate([[0], np.cumsum(rows)[:-1]]) if len(rows) else rows
        checks.append((bool(np.array_equal(v.token_offset, expect)), "token offsets are not contiguous"))
        checks.append((int(rows.sum()) == commit.hidden_rows, f"records need {int(rows.sum())} hidden rows, its commit says {commit.hidden_rows}"))
    for ok, message in checks:
        if not ok:
            report.problems.append(Problem(where, message))
    for message in _target_problems(v, store):
        report.problems.append(Problem(where, message))
    for layer in layers:
        try:
            arr = reader._zarr_group()[layer.array_name]
        except (StoreError, KeyError) as e:
            report.problems.append(Problem(where, f"hidden layer {layer.index} unreadable ({e})"))
            continue
        want = (commit.hidden_rows, layer.width)
        dtype = "float16" if layer.dtype == "float16" else "uint16"
        if tuple(arr.shape) != want or str(arr.dtype) != dtype or arr.attrs.get("potstill_dtype") != layer.dtype:
            report.problems.append(
                Problem(where, f"hidden layer {layer.index} is {tuple(arr.shape)} {arr.dtype}, expected {want} {layer.dtype}")
            )


def _target_problems(v: ColumnViews, store: Store) -> list[str]:
    """Target columns against each other and the format's rules (§4.1–§4.4)."""
    spec = store.manifest.targets
    if spec.packed:
        problems = packed_lengths_ok(v)
        if spec.tail_logprob and not np.array_equal(v.batch.column("tail_logprob").offsets.to_numpy(), v.tgt_off):
            problems.append("column tail_logprob has other row counts than the records' scored tokens")
        problems += _tail_problems(v, store) if not problems else []
        if problems or not spec.has_sampled:
            return problems
    else:
        problems = []
        names = ("tail_mass", "topk_ids", "topk_logprobs") + (("tail_logprob",) if spec.tail_logprob else ())
        for name in names if spec.has_topk else ():
            if not np.array_equal(v.batch.column(name).offsets.to_numpy(), v.tgt_off):
                problems.append(f"column {name} has other row counts than token_logprob")
        problems += _tail_problems(v, store) if not problems else []
        if spec.has_sampled:
            if not np.array_equal(v.sampled_rec_off, v.tgt_off):
                problems.append("column sampled_ids has other row counts than token_logprob")
            counts = v.batch.column("sampled_counts")
            if not (np.array_equal(counts.offsets.to_numpy(), v.sampled_rec_off)
                    and np.array_equal(counts.values.offsets.to_numpy(), v.sampled_pos_off)):
                problems.append("columns sampled_ids and sampled_counts have different shapes")
        if problems or not spec.has_sampled:
            return problems
    vocab = target_vocab(store.manifest)
    for j in range(v.num_rows):  # decoding checks that counts are >= 1 and split into positions of N draws
        rid = v.text_of("id", j)
        try:
            t = v.sampled_of(j)
            check_sampled(t, v.num_scored_of(j), spec.samples, vocab, f"record {rid!r}")
        except StoreError as e:
            problems.append(str(e))
            break
    return problems


def _tail_problems(v: ColumnViews, store: Store) -> list[str]:
    """The log tail against format §4.4: a log-probability (≤ 0, never NaN); −inf, an empty tail, only
    where the top-K covers the teacher's vocabulary, unless the store says the tails are complements
    of the top-K (which round to −inf when the top-K holds all the mass to the backend's precision);
    and in an unpacked store, `tail_mass` = exp(`tail_logprob`) to one float32 rounding."""
    m = store.manifest
    spec = m.targets
    if not spec.tail_logprob:
        return []
    tail = v.tail_logprob
    problems = []
    if not np.all(tail <= 0.0):
        bad = int(np.flatnonzero(~(tail <= 0.0))[0])
        problems.append(f"tail_logprob holds {tail[bad]} (scored position {bad} of the shard), not a log-probability")
    covers = spec.k >= max(m.teacher.vocab_size or 0, m.tokenizer.vocab_size)
    if spec.tail_logprob == "direct" and not covers and np.isneginf(tail).any():
        bad = int(np.flatnonzero(np.isneginf(tail))[0])
        problems.append(f"tail_logprob is -inf at scored position {bad} of the shard, but K={spec.k} does not cover "
                        "the vocabulary: a direct tail is empty only when it does")
    if not spec.packed:
        mass = v.tail_mass
        want = np.exp(tail.astype(np.float64)).astype(np.float32)
        off = np.abs(mass.astype(np.float64) - want) > np.spacing(want)
        if off.any():
            bad = int(np.flatnonzero(off)[0])
            problems.append(f"tail_mass {mass[bad]} differs from exp(tail_logprob) {want[bad]} at scored position {bad} of the shard")
    return problems


def report_json(report: VerifyReport) -> str:
    return json.dumps(
        {
            "ok": report.ok,
            "shards": report.shards,
            "records": report.records,
            "tokens": report.tokens,
            "problems": [str(p) for p in report.problems],
            "leftovers": [vars(x) for x in report.leftovers],
            "cleaned": report.cleaned,
        },
        indent=2,
    )
