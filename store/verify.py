"""Integrity checks and crash leftovers (docs/reference/store-format.md §3, §6, §8).

`verify_store` recomputes every checksum and checks schema, counts, values and id uniqueness; it
never writes, unless asked to `clean`. What it may remove is narrow on purpose: only what no commit
record names and no live writer owns (format §6). A commit record that does not parse is damage
(commit records are written atomically, so a crash cannot leave half of one): it is reported BAD
and its shard is kept, never deleted.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from potstill.store.checks import value_problems
from potstill.store.commit import parse_shard_name
from potstill.store.errors import StoreError
from potstill.store.fs import is_local, join, listdir_names, pid_alive, temp_pid, temp_target
from potstill.store.hidden import DATA_KEY, Layout, layout_problem, scan_data_file, stored_dtype
from potstill.store.ids import ids_problem
from potstill.store.leases import STALE_AFTER_S, LeaseStatus, all_leases, lease_status
from potstill.store.reader import MANIFEST, ShardReader, Store, commits_problem

_BLOCK = 8 << 20


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
    for folder in ("commits", "writers"):  # temporary files of atomic writes cut short
        for name in listdir_names(store.fs, join(store.root, folder)):
            target = temp_target(name)
            if target is None or not target.endswith(".json"):
                continue
            if folder == "commits":
                parsed = parse_shard_name(target[:-5])
                owner = parsed[0] if parsed else None
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
def verify_store(url: str, *, clean: bool = False, storage_options: dict | None = None) -> VerifyReport:
    """Check every committed shard against its commit record and the format; optionally clean."""
    store = Store(url, storage_options, strict=False)
    if store.damage is not None and clean:
        raise StoreError(f"store {url} is damaged: {store.damage}; verify --clean removes nothing from it "
                         f"(every shard would look uncommitted): restore the commits folder first")
    report = VerifyReport()
    if store.damage is not None:
        report.problems.append(Problem("commits", f"{store.damage}; no shard is read, every shard is kept"))
    for shard, why in store.bad_commits:
        report.problems.append(Problem(f"commits/{shard}.json", f"{why}; shard {shard} is kept, unread"))
    for entry in store.manifest.tokenizer.files:
        _check_file(store, entry.path, entry.bytes, entry.sha256, "manifest", report)
    hidden = store.manifest.hidden
    sound = []  # shards whose files match their commit records: their ids files can be read
    for commit in store.commits:
        report.shards += 1
        before = len(report.problems)
        data_files = {f"{commit.hidden_path}/{layer.array_name}/{DATA_KEY}": layer for layer in hidden.layers}
        for entry in commit.files:
            layer = data_files.get(entry.path)
            layout = None if layer is None else (Layout(commit.hidden_rows, layer.width, hidden.chunk_tokens), layer.dtype)
            _check_file(store, entry.path, entry.bytes, entry.sha256, f"shard {commit.shard}", report, layout)
        listed = {f.path for f in commit.files}
        for path in _files_under(store, f"shards/{commit.shard}"):
            if path not in listed:
                report.problems.append(Problem(f"shard {commit.shard}", f"file {path} is not in its commit record"))
        # bytes are sound: check content against the format
        if len(report.problems) == before and _check_content(store, commit, report):
            sound.append(commit.shard)
        report.records += commit.records
        report.tokens += commit.tokens
    _check_duplicates(store, report, sound)
    report.leftovers = find_leftovers(store)
    if clean:
        report.cleaned = clean_leftovers(store, report.leftovers)
    return report


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


def _files_under(store: Store, rel: str) -> list[str]:
    root = join(store.root, rel)
    try:
        found = store.fs.find(root)
    except FileNotFoundError:
        return []
    prefix = store.root.rstrip("/") + "/"
    return sorted(p[len(prefix) :] if p.startswith(prefix) else p for p in found)


def _check_file(store: Store, rel: str, size: int, digest: str, where: str, report: VerifyReport,
                hidden: tuple[Layout, str] | None = None) -> None:
    """Size and sha256 of a file; for a hidden-state data file (its layout and dtype given) also each
    inner chunk's crc32c and finite values, and its index, in the same pass."""
    h, got_size, inside = hashlib.sha256(), 0, None
    try:
        with store.fs.open(join(store.root, rel), "rb") as f:
            if hidden is not None:
                got_size, inside = scan_data_file(f.read, *hidden, h)
            else:
                while block := f.read(_BLOCK):
                    h.update(block)
                    got_size += len(block)
    except FileNotFoundError:
        report.problems.append(Problem(where, f"file {rel} is missing"))
        return
    if got_size != size:
        report.problems.append(Problem(where, f"file {rel} has {got_size} bytes, its record says {size} (truncated?)"))
    elif h.hexdigest() != digest:
        found = f": {inside}" if inside is not None else ""
        report.problems.append(Problem(where, f"file {rel} fails its sha256 check (corrupted bytes){found}"))
    elif inside is not None:
        report.problems.append(Problem(where, f"file {rel}: {inside}"))


def _check_content(store: Store, commit, report: VerifyReport) -> bool:
    """Check a shard's content against the format; returns whether its ids file could be read."""
    where = f"shard {commit.shard}"
    try:
        reader = ShardReader(store, commit)
    except StoreError as e:
        report.problems.append(Problem(where, str(e).split(": ", 1)[-1]))
        return False
    v = reader.views
    n = np.diff(v.tok_off)
    scored = np.diff(v.tgt_off)
    ids_read = True
    try:
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
            report.problems.append(Problem(where, message))
    shape_problems = v.columns.shape_problems(v, store.manifest)
    for message in shape_problems:
        report.problems.append(Problem(where, message))
    if not shape_problems:
        for message in value_problems(v, store.manifest):
            report.problems.append(Problem(where, message))
    for layer in layers:
        try:
            arr = reader._zarr_group()[layer.array_name]
        except (StoreError, KeyError) as e:
            report.problems.append(Problem(where, f"hidden layer {layer.index} unreadable ({e})"))
            continue
        want = (commit.hidden_rows, layer.width)
        if tuple(arr.shape) != want or str(arr.dtype) != stored_dtype(layer.dtype) \
                or arr.attrs.get("potstill_dtype") != layer.dtype:
            report.problems.append(
                Problem(where, f"hidden layer {layer.index} is {tuple(arr.shape)} {arr.dtype}, expected {want} {layer.dtype}")
            )
        elif (problem := layout_problem(arr, store.manifest.hidden.chunk_tokens)) is not None:
            report.problems.append(Problem(where, f"hidden layer {layer.index}: {problem} (format §5)"))
        elif commit.hidden_rows and f"{commit.hidden_path}/{layer.array_name}/{DATA_KEY}" not in listed:
            report.problems.append(Problem(where, f"hidden layer {layer.index}: its data file {DATA_KEY} is not in its "
                                                  "commit record"))
    return ids_read


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
        },
        indent=2,
    )
