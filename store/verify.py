"""Integrity checks and crash leftovers (docs/reference/store-format.md §3, §6, §8).

`verify_store` recomputes every checksum and checks schema, counts, values and id uniqueness; it
never writes, unless asked to `clean`. What it may remove is narrow on purpose: only what no commit
record names and no live writer owns (format §6). A commit record that does not parse is damage
(commit records are written atomically, so a crash cannot leave half of one): it is reported BAD
and its shard is kept, never deleted.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from potstill.store.checks import value_problems
from potstill.store.commit import parse_shard_name
from potstill.store.errors import StoreError
from potstill.store.fs import is_local, join, listdir_names, pid_alive, read_bytes, temp_pid, temp_target
from potstill.store.hidden import DATA_KEY, Layout, layout_problem, scan_data_file, stored_dtype
from potstill.store.ids import ids_problem
from potstill.store.leases import STALE_AFTER_S, LeaseStatus, all_leases, lease_status
from potstill.store.pieces import read_pieces
from potstill.store.provenance import RUN_NAME_RE, RUNS, JobStatus, read_runs, store_job_status
from potstill.store.reader import MANIFEST, ShardReader, Store, commits_problem

# Read in 256 KiB blocks into one buffer per thread, reused across files: a block hashed while it is
# still in the core's cache, and no fresh buffer per file (a new multi-MiB buffer costs its page
# faults, more than hashing a small file). 8 MiB blocks in a new buffer per file hashed 20% slower.
_BLOCK = 256 << 10
_buffers = threading.local()


def hash_file(path: str, opener: Callable[[str, str], Any] = open) -> tuple[int, str]:
    """(bytes, sha256 hex) of a file, read in blocks into this thread's reused buffer."""
    if (buf := getattr(_buffers, "block", None)) is None:
        buf = _buffers.block = bytearray(_BLOCK)
    view = memoryview(buf)
    h, size = hashlib.sha256(), 0
    with opener(path, "rb") as f:
        while got := f.readinto(buf):
            h.update(view[:got])
            size += got
    return size, h.hexdigest()


@dataclass
class Problem:
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class Leftover:
    """Something a crashed writer left behind, and whether its writer still runs.

    `kind`: "uncommitted shard" (a folder under shards/ with no commit record), "temporary file" (an
    atomic write cut short) or "stale lease" (the lease of a writer that is gone). `path` is relative
    to the store.
    """

    path: str
    kind: str
    writer_id: str | None
    live: bool
    reason: str


@dataclass
class VerifyReport:
    shards: int = 0
    records: int = 0
    tokens: int = 0
    duplicates: int = 0
    problems: list[Problem] = field(default_factory=list)
    leftovers: list[Leftover] = field(default_factory=list)
    cleaned: list[str] = field(default_factory=list)
    hashed: bool = True  # False: a quick verify (sizes and commit records only)
    # How complete the job is (format §10), None without run records; run files that cannot be read
    # are warnings, never problems: nothing in them can fail a verify.
    job: JobStatus | None = None
    run_warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


# -- leftovers -------------------------------------------------------------------------------------
def find_leftovers(store: Store, stale_after_s: float = STALE_AFTER_S) -> list[Leftover]:
    """Uncommitted shard folders, temporary files and leases of dead writers (format §6).

    A shard folder is never a leftover while a commit record of that name exists, whether or not
    it parses: what a commit names is kept. With the commits folder damaged (`commits_problem`) no
    shard folder or commit record's temporary file is one: which shards are committed is unknown.
    """
    status: dict[str, LeaseStatus] = {}

    def writer(writer_id: str | None) -> tuple[bool, str]:
        if writer_id is None:
            return False, "not a shard name"
        if writer_id not in status:
            status[writer_id] = lease_status(store, writer_id, stale_after_s)
        return status[writer_id].live, status[writer_id].why

    damaged = commits_problem(store.fs, store.root) is not None
    commit_names = [] if damaged else listdir_names(store.fs, join(store.root, "commits"))
    has_commit = {n[:-5] for n in commit_names if n.endswith(".json")}
    out = []
    for name in [] if damaged else listdir_names(store.fs, join(store.root, "shards")):
        if name in has_commit:
            continue
        parsed = parse_shard_name(name)
        owner = parsed[0] if parsed else None
        live, why = writer(owner)
        out.append(Leftover(f"shards/{name}", "uncommitted shard", owner, live, why))
    for folder in ("commits", "writers", RUNS):  # temporary files of atomic writes cut short
        for name in listdir_names(store.fs, join(store.root, folder)):
            target = temp_target(name)
            if target is None or not target.endswith(".json"):
                continue
            if folder == "commits":
                parsed = parse_shard_name(target[:-5])
                owner = parsed[0] if parsed else None
            elif folder == RUNS:
                run = RUN_NAME_RE.match(target)
                owner = run.group("writer") if run else None
            else:
                owner = target[:-5]
            live, why = writer(owner)
            pid = temp_pid(name)
            # A writer's first lease is a temporary file before its lease exists: the process writing it
            # (its pid is in the name; atomic writes through temporary files are local only) decides.
            if not live and pid is not None and is_local(store.fs) and pid_alive(pid):
                live, why = True, f"its writing process (pid {pid} on this host) is running"
            out.append(Leftover(f"{folder}/{name}", "temporary file", owner, live, why))
    # A store's creator killed between its manifest's temporary file and the link leaves that file at
    # the root. Once the manifest exists it is useless: a creator still racing for the manifest fails
    # to link either way (the link is exclusive), and opens the store that won.
    for name in listdir_names(store.fs, store.root):
        if temp_target(name) == MANIFEST:
            out.append(Leftover(name, "temporary file", None, False, f"never linked; the store's {MANIFEST} exists"))
    for lease in all_leases(store, stale_after_s):
        status.setdefault(lease.writer_id, lease)
        if not lease.live:
            out.append(Leftover(f"writers/{lease.writer_id}.json", "stale lease", lease.writer_id, False, lease.why))
    return out


def clean_leftovers(store: Store, leftovers: list[Leftover]) -> list[str]:
    """Remove the leftovers of dead writers; returns their paths. Never a committed (or damaged)
    shard, never a live writer's folder: `find_leftovers` lists neither as removable."""
    removed = []
    for left in leftovers:
        if left.live:
            continue
        path = join(store.root, left.path)
        if store.fs.exists(path):
            store.fs.rm(path, recursive=True)
        removed.append(left.path)
    return removed


# -- verify ----------------------------------------------------------------------------------------
MAX_JOBS = 8


def default_jobs() -> int:
    """Shards `verify` checks at once (each in a thread): one per core this process may use, at most
    `MAX_JOBS`."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # (not on Linux)
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_JOBS))


def verify_store(url: str, *, clean: bool = False, storage_options: dict | None = None, jobs: int | None = None,
                 quick: bool = False) -> VerifyReport:
    """Check every committed shard against its commit record and the format; optionally clean.

    `jobs`: shards checked at once, each in a thread (None: `default_jobs()`); the report is the same
    for any number, its problems in shard order. `quick`: only the commit records, the manifest and
    each listed file's presence and size; nothing is hashed and no value is read."""
    store = Store(url, storage_options, strict=False)
    if store.damage is not None and clean:
        raise StoreError(f"store {url} is damaged: {store.damage}; verify --clean removes nothing from it "
                         f"(every shard would look uncommitted): restore the commits folder first")
    report = VerifyReport(hashed=not quick)
    if store.damage is not None:
        report.problems.append(Problem("commits", f"{store.damage}; no shard is read, every shard is kept"))
    for shard, why in store.bad_commits:
        report.problems.append(Problem(f"commits/{shard}.json", f"{why}; shard {shard} is kept, unread"))
    for entry in store.manifest.tokenizer.files:
        if quick:
            report.problems += _size_problems(entry.path, entry.bytes, _size(store, entry.path), "manifest")
        else:
            report.problems += _file_problems(store, entry.path, entry.bytes, entry.sha256, "manifest")
    sound = []  # shards whose files match their commit records: their ids files can be read
    for commit, (problems, ids_readable) in zip(store.commits, _each_shard(store, quick, jobs), strict=True):
        report.shards += 1
        report.problems += problems
        if ids_readable:
            sound.append(commit.shard)
        report.records += commit.records
        report.tokens += commit.tokens
    _check_duplicates(store, report, sound)
    runs = read_runs(store.fs, store.root)
    report.run_warnings = list(runs.warnings)
    try:
        report.job, _ = store_job_status(store, runs)
    except StoreError as e:  # damaged ids files are problems above; completeness is then unknown
        report.run_warnings.append(f"completeness not computed: {e}")
    report.leftovers = find_leftovers(store)
    if clean:
        report.cleaned = clean_leftovers(store, report.leftovers)
    return report


ShardFiles = dict[str, dict[str, int]]  # shard -> {path of each file under its folder: bytes}


def shard_files(store: Store) -> ShardFiles:
    """Every file under shards/ with its size, by shard, in one listing. A committed shard's files never
    change, so one listing taken after the commit records were read serves every shard they name."""
    top, prefix = join(store.root, "shards"), store.root.rstrip("/") + "/"
    if is_local(store.fs):  # (fsspec's walk costs several times the system calls it makes)
        found = _local_files(top)
    else:
        store.fs.invalidate_cache(top)  # (writers add shards: never a cached listing)
        try:
            found = {path: info["size"] for path, info in store.fs.find(top, detail=True).items()}
        except FileNotFoundError:
            found = {}
    out: ShardFiles = collections.defaultdict(dict)
    for path, size in found.items():
        rel = path[len(prefix):] if path.startswith(prefix) else path
        parts = rel.split("/")
        if len(parts) >= 2:  # (shards/<shard> itself when it is a file: listed, and in no commit record)
            out[parts[1]][rel] = int(size)
    return out


def _local_files(top: str) -> dict[str, int]:
    """Every file under a local folder with its size, as fsspec lists them: links followed, a broken
    link listed with its own size."""
    found = {}
    for folder, _, names in os.walk(top, followlinks=True):
        for name in names:
            path = os.path.join(folder, name)
            try:
                found[path] = os.stat(path).st_size
            except FileNotFoundError:
                with contextlib.suppress(FileNotFoundError):  # (else a live writer's file, gone since)
                    found[path] = os.lstat(path).st_size
    return found


def _each_shard(store: Store, quick: bool, jobs: int | None) -> Iterator[tuple[list[Problem], bool]]:
    """Each committed shard's problems, in commit order: `jobs` shards at once, each in a thread (sha256
    and the compiled value checks release the GIL, so threads use the cores without starting processes
    that each load numba's kernels again), else one at a time with the next one hashed ahead. The
    shards' files are listed once, up front: one listing of a remote store, not a request per shard."""
    files = shard_files(store)
    jobs = min(default_jobs() if jobs is None else jobs, len(store.commits))
    if quick:  # (the sizes are the listing's: nothing to wait for)
        for commit in store.commits:
            yield shard_problems(store, commit, quick, files)
    elif jobs > 1:
        with ThreadPoolExecutor(jobs, thread_name_prefix="potstill-verify") as threads:
            yield from threads.map(lambda commit: shard_problems(store, commit, quick, files), store.commits)
    else:
        yield from _hash_ahead(store, files)


def _hash_ahead(store: Store, files: ShardFiles) -> Iterator[tuple[list[Problem], bool]]:
    """`shard_problems` of each shard, one at a time: a thread hashes the next shard's files while this
    one's content is checked, so a shard costs about the longer of the two rather than their sum. One
    shard ahead, no more: its pages are still in the cache when its content is read."""
    commits = store.commits
    with ThreadPoolExecutor(1, thread_name_prefix="potstill-hash") as hasher:
        ahead = collections.deque([hasher.submit(shard_file_problems, store, commits[0], False, files)]
                                  if commits else [])
        for i, commit in enumerate(commits):
            if i + 1 < len(commits):  # (queued now: hashed as soon as this shard's files are)
                ahead.append(hasher.submit(shard_file_problems, store, commits[i + 1], False, files))
            problems = ahead.popleft().result()
            yield (problems, False) if problems else _content_problems(store, commit)


def shard_problems(store: Store, commit, quick: bool = False, files: ShardFiles | None = None
                   ) -> tuple[list[Problem], bool]:
    """One committed shard against its commit record: its files (`shard_file_problems`), then (unless
    `quick`, and only when its bytes are sound) its content. Also whether its ids file was read sound
    (what the duplicates check may then read)."""
    problems = shard_file_problems(store, commit, quick, files)
    if problems or quick:
        return problems, False
    return _content_problems(store, commit)  # bytes are sound: check content against the format


def shard_file_problems(store: Store, commit, quick: bool = False, files: ShardFiles | None = None) -> list[Problem]:
    """A committed shard's files against its commit record: their sizes, unless `quick` their sha256
    (and each hidden-state chunk's crc32c), and no file beside them. `files`: the store's listing
    (`shard_files`), else it is listed here."""
    where = f"shard {commit.shard}"
    present = (shard_files(store) if files is None else files).get(commit.shard, {})
    hidden = store.manifest.hidden
    data_files = {f"{commit.hidden_path}/{layer.array_name}/{DATA_KEY}": layer for layer in hidden.layers}
    problems: list[Problem] = []
    for entry in commit.files:
        if quick:
            problems += _size_problems(entry.path, entry.bytes, present.get(entry.path), where)
            continue
        layer = data_files.get(entry.path)
        layout = None if layer is None else (Layout(commit.hidden_rows, layer.width, hidden.chunk_tokens), layer.dtype)
        problems += _file_problems(store, entry.path, entry.bytes, entry.sha256, where, layout)
    listed = {f.path for f in commit.files}
    for path in sorted(present):
        if path not in listed:
            problems.append(Problem(where, f"file {path} is not in its commit record"))
    return problems


def _check_duplicates(store: Store, report: VerifyReport, shards: list[str]) -> None:
    """Ids are unique within a store (format §4): name each shard that repeats ids of an earlier commit
    (among `shards`, those whose files are sound)."""
    for shard, rows in sorted(store.duplicates(shards).items()):
        ids = store.shard_ids(shard)
        first = sorted({kept for _, kept in rows})
        shown = ", ".join(repr(ids[row].as_py()) for row, _ in rows[:3]) + (", ..." if len(rows) > 3 else "")
        report.problems.append(Problem(
            f"shard {shard}",
            f"{len(rows)} record id(s) already committed in {', '.join(first[:3])}{', ...' if len(first) > 3 else ''} "
            f"({shown}); readers use the first committed copy and skip these",
        ))
        report.duplicates += len(rows)


def _size_problems(rel: str, size: int, got_size: int | None, where: str) -> list[Problem]:
    if got_size is None:
        return [Problem(where, f"file {rel} is missing")]
    if got_size != size:
        return [Problem(where, f"file {rel} has {got_size} bytes, its record says {size} (truncated?)")]
    return []


def _size(store: Store, rel: str) -> int | None:
    try:
        return store.fs.size(join(store.root, rel))
    except FileNotFoundError:
        return None


def _file_problems(store: Store, rel: str, size: int, digest: str, where: str,
                   hidden: tuple[Layout, str] | None = None) -> list[Problem]:
    """Size and sha256 of a file; for a hidden-state data file (its layout and dtype given) also each
    inner chunk's crc32c and finite values, and its index, in the same pass."""
    path = join(store.root, rel)
    inside = None
    try:
        if hidden is not None:
            h = hashlib.sha256()
            with store.fs.open(path, "rb") as f:
                got_size, inside = scan_data_file(f.read, *hidden, h)
            got_digest = h.hexdigest()
        else:  # (a local file opened directly: fsspec's wrapper costs more than hashing a small file)
            got_size, got_digest = hash_file(path, open if is_local(store.fs) else store.fs.open)
    except FileNotFoundError:
        return [Problem(where, f"file {rel} is missing")]
    if got_size != size:
        return [Problem(where, f"file {rel} has {got_size} bytes, its record says {size} (truncated?)")]
    if got_digest != digest:
        found = f": {inside}" if inside is not None else ""
        return [Problem(where, f"file {rel} fails its sha256 check (corrupted bytes){found}")]
    if inside is not None:
        return [Problem(where, f"file {rel}: {inside}")]
    return []


def _content_problems(store: Store, commit) -> tuple[list[Problem], bool]:
    """A shard's content against the format, and whether its ids file could be read."""
    where = f"shard {commit.shard}"
    problems: list[Problem] = []
    try:
        reader = ShardReader(store, commit)
    except StoreError as e:
        return [Problem(where, str(e).split(": ", 1)[-1])], False
    v = reader.views
    n = np.diff(v.tok_off)
    scored = np.diff(v.tgt_off)
    ids_read = True
    try:
        # (its sha256 matched in `shard_file_problems` just before: the reads below, and the duplicates
        # check's, do not hash it again)
        store.note_verified(commit.entry(commit.ids_path))
        ids_wrong = ids_problem(store._ids_batch(commit.shard), v.batch.column("id"))
    except StoreError as e:  # sound bytes that are no ids file: another tool wrote it
        ids_wrong, ids_read = str(e).split(": ", 1)[-1], False
    checks = [
        (ids_wrong is None, f"{ids_wrong} ({commit.ids_path})"),
        (int(n.sum()) == commit.tokens, f"holds {int(n.sum())} tokens, its commit says {commit.tokens}"),
        (int(scored.sum()) == commit.scored_tokens, f"holds {int(scored.sum())} scored tokens, its commit says {commit.scored_tokens}"),
        (bool(np.all((v.score_start >= 1) & (v.score_start <= n))), "a record's score_start is out of range"),
        (bool(np.all(scored == n - v.score_start)), "a record's target count differs from len(input_ids) - score_start"),
        (bool(np.all((v.hidden_start >= 0) & (v.hidden_start <= n))), "a record's hidden_start is out of range"),
    ]
    layers = store.manifest.hidden.layers
    listed = {f.path for f in commit.files}
    if layers:
        rows = n - v.hidden_start
        expect = np.concatenate([[0], np.cumsum(rows)[:-1]]) if len(rows) else rows
        checks.append((bool(np.array_equal(v.token_offset, expect)), "token offsets are not contiguous"))
        checks.append((int(rows.sum()) == commit.hidden_rows, f"records need {int(rows.sum())} hidden rows, its commit says {commit.hidden_rows}"))
    for ok, message in checks:
        if not ok:
            problems.append(Problem(where, message))
    try:  # (its sha256 is checked above; its pieces' digests are not hashed again: records.arrow's own covers them)
        size = commit.entry(commit.arrow_path).bytes
        read_pieces(_mapped(store, commit.pieces_path), commit.pieces_path, size)
    except StoreError as e:
        problems.append(Problem(where, str(e)))
    shape_problems = v.columns.shape_problems(v, store.manifest)
    for message in shape_problems:
        problems.append(Problem(where, message))
    if not shape_problems:
        for message in value_problems(v, store.manifest):
            problems.append(Problem(where, message))
    for layer in layers:
        try:
            arr = reader._zarr_group()[layer.array_name]
        except (StoreError, KeyError) as e:
            problems.append(Problem(where, f"hidden layer {layer.index} unreadable ({e})"))
            continue
        want = (commit.hidden_rows, layer.width)
        if tuple(arr.shape) != want or str(arr.dtype) != stored_dtype(layer.dtype) \
                or arr.attrs.get("potstill_dtype") != layer.dtype:
            problems.append(
                Problem(where, f"hidden layer {layer.index} is {tuple(arr.shape)} {arr.dtype}, expected {want} {layer.dtype}")
            )
        elif (problem := layout_problem(arr, store.manifest.hidden.chunk_tokens)) is not None:
            problems.append(Problem(where, f"hidden layer {layer.index}: {problem} (format §5)"))
        elif commit.hidden_rows and f"{commit.hidden_path}/{layer.array_name}/{DATA_KEY}" not in listed:
            problems.append(Problem(where, f"hidden layer {layer.index}: its data file {DATA_KEY} is not in its "
                                           "commit record"))
    return problems, ids_read


def _mapped(store: Store, rel: str) -> pa.Buffer:
    """A file's bytes: memory-mapped when local (fsspec's read costs more than parsing a small file)."""
    path = store.path(rel)
    return pa.memory_map(path, "r").read_buffer() if is_local(store.fs) else pa.py_buffer(read_bytes(store.fs, path))


def report_json(report: VerifyReport) -> str:
    return json.dumps(
        {
            "ok": report.ok,
            "shards": report.shards,
            "records": report.records,
            "tokens": report.tokens,
            "duplicates": report.duplicates,
            "problems": [str(p) for p in report.problems],
            "leftovers": [vars(x) for x in report.leftovers],
            "cleaned": report.cleaned,
            "hashed": report.hashed,
            "job": None if report.job is None else report.job.to_dict(),
            "run_warnings": report.run_warnings,
        },
        indent=2,
    )
