"""Where a store came from and whether its job is done (docs/reference/store-format.md §10).

Two optional additions to format 1.0, neither needed to read a store:

- `manifest["provenance"]`: the stable facts of the job, written once with the manifest (so its checksum
  covers them) by the run that creates the store: teacher, tokenizer, prompt set, settings, licences.
- `runs/<writer_id>.<start>.json`: one small file per generate run, written atomically when the run
  starts and rewritten when it ends: command line (secrets removed), times, hardware, its `--workers`
  share, the prompt set it read and how many records of its share it wrote or skipped.

From the runs, `job_status` tells how complete the store is against the latest run's prompt set:
N of M records committed, and which `--workers` shares never ran or are behind. Run files are never
damage: one that cannot be read is a warning, and verification never depends on them.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import re
import socket
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np

from potstill.store.fs import join, listdir_names, read_bytes, temp_target, write_bytes
from potstill.store.manifest import potstill_version

RUNS = "runs"
RUN_FORMAT = "potstill-run"
RUN_NAME_RE = re.compile(r"^(?P<writer>[A-Za-z0-9_][A-Za-z0-9_.-]{0,63})\.(?P<start>\d{8}T\d{12}Z)\.json$")
SAMPLE_SEP = "#"  # record ids of --num-samples > 1 are ID#k (teacher_gen numbers the samples so)
REDACTED = "<redacted>"
# A flag whose value is a secret, by its words (`--token-file`, `--api-key`): never `--max-new-tokens`.
_SECRET_WORDS = frozenset({"token", "secret", "password", "passwd", "key", "apikey", "credential", "credentials",
                           "auth", "authorization"})


# -- the shares of a --workers split -------------------------------------------------------------------
def share_of(key: str, workers: int) -> int:
    """The `--workers` share that handles a prompt id (or a bad row's line): a hash, not a position."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") % workers


def item_id(record_id: str, num_samples: int) -> str:
    """The prompt id a record id belongs to: `ID#k` is sample k of prompt ID when num_samples > 1."""
    return record_id if num_samples == 1 else record_id.rsplit(SAMPLE_SEP, 1)[0]


def shares_of_keys(keys: np.ndarray, workers: int) -> np.ndarray:
    """`share_of` of each record id from its stored key (ids file, format §4): the key is the first 8 bytes
    of its sha256 read big-endian, the share those bytes read little-endian, mod workers. Exact, with no
    hashing: valid where a record id is its prompt id (num_samples 1)."""
    return (np.asarray(keys, dtype=np.uint64).byteswap() % np.uint64(workers)).astype(np.int64)


# -- what a run records ----------------------------------------------------------------------------------
def run_stamp(when: _dt.datetime) -> str:
    """A run's start, as it names its file: 20261205T180132123456Z (UTC, to the microsecond)."""
    return when.strftime("%Y%m%dT%H%M%S%fZ")


def iso(when: _dt.datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]+")


def redact(text: str) -> str:
    """`text` with what its URLs may carry as a secret removed: user info and any query value whose name
    is secret-like (`?token=`, `X-Amz-Signature`)."""
    return _URL.sub(lambda m: _redact_url(m.group(0)), text) if "://" in text else text


def _redact_url(text: str) -> str:
    try:
        parts = urlsplit(text)
    except ValueError:
        return REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, REDACTED if _secret_name(k) or "signature" in k.lower() else v) for k, v in pairs],
                          safe="<>")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _secret_name(name: str) -> bool:
    return bool(set(re.split(r"[-_.\s]+", name.lower().lstrip("-"))) & _SECRET_WORDS)


def redact_command(argv: Iterable[str]) -> list[str]:
    """A command line fit to record: the value of every secret-like flag (`--token X`, `--token-file=X`)
    replaced, and URLs stripped of credentials (`redact`)."""
    out: list[str] = []
    hide_next = False
    for arg in map(str, argv):
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        if arg.startswith("-") and _secret_name(arg.split("=", 1)[0]):
            if "=" in arg:
                out.append(arg.split("=", 1)[0] + "=" + REDACTED)
            else:
                out.append(arg)
                hide_next = True
            continue
        out.append(redact(arg))
    return out


def redact_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings fit to record: secret-like keys dropped, URLs stripped of credentials."""
    def clean(value: Any) -> Any:
        if isinstance(value, str):
            return redact(value)
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if not _secret_name(str(k))}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    return clean(settings)


def hardware() -> dict[str, Any]:
    """The machine a run ran on: host, OS, CPU model and cores, memory, and the GPUs when torch is
    already loaded (never imported here)."""
    info: dict[str, Any] = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
    }
    try:
        info["memory_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        info["memory_bytes"] = None
    torch = sys.modules.get("torch")
    gpus: list[str] = []
    if torch is not None:
        try:
            if torch.cuda.is_available():
                gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        except Exception:  # a broken driver must not stop a run from recording what it can
            gpus = []
    info["gpus"] = gpus
    return info


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def prompt_fingerprint(path: str) -> str:
    """`sha256:<hex>` of a prompt set: of its file's bytes; for a folder (a saved datasets folder), of
    every file in it, in order of relative path, each as its path, its length and its bytes."""
    digest = hashlib.sha256()
    if not os.path.isdir(path):
        _hash_into(digest, path)
        return "sha256:" + digest.hexdigest()
    for folder, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(folder, name)
            rel = os.path.relpath(full, path).replace(os.sep, "/").encode()
            digest.update(len(rel).to_bytes(8, "little") + rel + os.path.getsize(full).to_bytes(8, "little"))
            _hash_into(digest, full)
    return "sha256:" + digest.hexdigest()


def _hash_into(digest: Any, path: str) -> None:
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)


# -- run files -------------------------------------------------------------------------------------------
@dataclass
class RunFile:
    """One run's record in a store, and where it lives (`runs/<writer>.<start>.json`)."""

    store_fs: Any
    path: str  # relative to the store
    body: dict[str, Any]

    def write(self, store_root: str) -> None:
        data = (json.dumps(self.body, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()
        write_bytes(self.store_fs, join(store_root, self.path), data, atomic=True)


def new_run(fs: Any, writer_id: str, workers: int, worker_index: int, command: list[str],
            settings: dict[str, Any], started: _dt.datetime | None = None) -> RunFile:
    """The record of a run that starts now (written by `RunFile.write`; state "running")."""
    started = started or _dt.datetime.now(_dt.UTC)
    body = {
        "format": RUN_FORMAT,
        "writer_id": writer_id,
        "workers": workers,
        "worker_index": worker_index,
        "command": redact_command(command),
        "settings": redact_settings(settings),
        "started": iso(started),
        "ended": None,
        "state": "running",
        "hardware": hardware(),
        "potstill_version": potstill_version(),
        "prompts": None,
        "skipped": None,
        "already_done": None,
        "records": 0,
        "error": None,
    }
    return RunFile(fs, f"{RUNS}/{writer_id}.{run_stamp(started)}.json", body)


def end_run(run: RunFile, state: str, *, records: int, error: str | None = None,
            ended: _dt.datetime | None = None) -> None:
    """Mark a run's record ended (`state`: complete, stopped or failed) with the records it wrote."""
    run.body.update(state=state, records=records, ended=iso(ended or _dt.datetime.now(_dt.UTC)),
                    error=None if error is None else redact(error.splitlines()[0] if error else error))


@dataclass
class RunRecords:
    runs: list[dict[str, Any]] = field(default_factory=list)  # by start time
    warnings: list[str] = field(default_factory=list)  # run files that cannot be read: never damage


def read_runs(fs: Any, root: str) -> RunRecords:
    """Every readable run record of a store, oldest first; the others are warnings, never damage."""
    out = RunRecords()
    for name in listdir_names(fs, join(root, RUNS)):
        if temp_target(name) is not None:
            continue  # an atomic write in progress (or cut short): `verify --clean` removes the latter
        if RUN_NAME_RE.match(name) is None:
            out.warnings.append(f"{RUNS}/{name}: not a run record's name (ignored)")
            continue
        try:
            body = json.loads(read_bytes(fs, join(root, RUNS, name)))
            problem = _run_problem(body)
        except (OSError, ValueError) as e:
            body, problem = None, f"not readable JSON ({type(e).__name__})"
        if problem is not None:
            out.warnings.append(f"{RUNS}/{name}: {problem} (ignored)")
            continue
        body["_file"] = f"{RUNS}/{name}"
        out.runs.append(body)
    out.runs.sort(key=lambda r: (r["started"], r["_file"]))
    return out


def _run_problem(body: Any) -> str | None:
    if not isinstance(body, dict) or body.get("format") != RUN_FORMAT:
        return "not a potstill run record"
    try:
        workers, index = int(body["workers"]), int(body["worker_index"])
        str(body["started"])
    except (KeyError, TypeError, ValueError):
        return "lacks its workers, worker_index or started"
    if workers < 1 or not 0 <= index < workers:
        return f"worker_index {index} is outside [0, workers {workers})"
    prompts = body.get("prompts")
    if prompts is not None and not _prompts_sound(prompts, workers):
        return "its prompts entry is malformed"
    return None


def _prompts_sound(prompts: Any, workers: int) -> bool:
    try:
        per_share = prompts["per_share"]
        return (isinstance(prompts["fingerprint"], str) and int(prompts["count"]) >= 0
                and int(prompts["num_samples"]) >= 1 and isinstance(per_share, list) and len(per_share) == workers
                and all(isinstance(x, int) and x >= 0 for x in per_share))
    except (KeyError, TypeError, ValueError):
        return False


# -- how complete the job is -----------------------------------------------------------------------------
@dataclass
class ShareStatus:
    index: int
    expected: int  # prompts of this share x num_samples, less what its last run skipped (unknown: none)
    committed: int
    ran: bool  # a run of this share read the current prompt set
    skipped: int | None  # records its last run skipped as invalid or too long (None: it never ran)

    @property
    def state(self) -> str:
        if not self.ran:
            return "never ran"
        return "behind" if self.committed < self.expected else "complete"

    def describe(self) -> str:
        what = f"share {self.index}: {self.committed} of {self.expected} records committed"
        return f"{what} (never ran)" if not self.ran else (f"{what} (behind)" if self.state == "behind" else what)


@dataclass
class JobStatus:
    """The store against the latest run's prompt set (`prompts`: fingerprint, count, num_samples)."""

    prompts: dict[str, Any]
    workers: int
    committed: int  # every committed record (duplicate rows not counted)
    expected: int  # M: the sum of the shares' expected counts
    shares: list[ShareStatus]
    running: list[str] = field(default_factory=list)  # run files with no end

    @property
    def missing(self) -> list[ShareStatus]:
        return [s for s in self.shares if s.state != "complete"]

    @property
    def complete(self) -> bool:
        return not self.missing

    def lines(self) -> list[str]:
        """`N of M records committed`, then one line per share that never ran or is behind."""
        n = self.prompts["num_samples"]
        samples = f" x {n} samples" if n > 1 else ""
        skipped = sum(s.skipped or 0 for s in self.shares)
        less = f" less {skipped} skipped as invalid or too long" if skipped else ""
        split = f", --workers {self.workers}" if self.workers > 1 else ""
        out = [f"{self.committed} of {self.expected} records committed ({self.prompts['count']} prompts{samples}"
               f"{less}{split}): " + ("complete" if self.complete else "incomplete")]
        out += [s.describe() for s in self.missing]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompts": self.prompts, "workers": self.workers, "committed": self.committed,
            "expected": self.expected, "complete": self.complete, "running": self.running,
            "shares": [{"index": s.index, "expected": s.expected, "committed": s.committed, "state": s.state,
                        "skipped": s.skipped} for s in self.shares],
        }


def job_status(runs: list[dict[str, Any]], shard_keys: Callable[[], Iterable[tuple[np.ndarray, Callable[[], list[str]]]]],
               ) -> JobStatus | None:
    """How complete a store is, from its runs (`read_runs`) and its committed records; None when no run
    recorded a prompt set (a store from before run records). The job is the latest such run's prompt set
    and --workers split: a share "ran" when one of its runs read that same set (fingerprint and size).

    `shard_keys` yields, per committed shard, its records' stored keys (duplicate rows left out) and a
    function returning their ids (needed only with num_samples > 1, where a record id is not its prompt's).
    """
    with_prompts = [r for r in runs if r.get("prompts") is not None]
    if not with_prompts:
        return None
    latest = with_prompts[-1]
    prompts, workers = latest["prompts"], int(latest["workers"])
    n = int(prompts["num_samples"])
    same = [r for r in with_prompts if int(r["workers"]) == workers and _same_prompts(r["prompts"], prompts)]
    committed = np.zeros(workers, dtype=np.int64)
    for keys, ids in shard_keys():
        if n == 1:
            shares = shares_of_keys(keys, workers)
        else:  # ID#k hashes unlike ID: the prompt id of each record is hashed again
            shares = np.fromiter((share_of(item_id(i, n), workers) for i in ids()), dtype=np.int64)
        committed += np.bincount(shares, minlength=workers)
    shares = []
    for index in range(workers):
        mine = [r for r in same if int(r["worker_index"]) == index]
        skipped = None
        if mine:  # its last run that got as far as counting what it skipped
            counted = [r for r in mine if isinstance(r.get("skipped"), int)]
            skipped = counted[-1]["skipped"] if counted else 0
        expected = int(prompts["per_share"][index]) * n - (skipped or 0)
        shares.append(ShareStatus(index, expected, int(committed[index]), bool(mine), skipped))
    running = [r["_file"] for r in runs if r.get("state") == "running"]
    return JobStatus(
        prompts={k: prompts[k] for k in ("fingerprint", "count", "num_samples")}, workers=workers,
        committed=int(committed.sum()), expected=sum(s.expected for s in shares), shares=shares, running=running,
    )


def _same_prompts(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["fingerprint"] == b["fingerprint"] and int(a["count"]) == int(b["count"]) \
        and int(a["num_samples"]) == int(b["num_samples"])


def store_job_status(store: Any, runs: RunRecords | None = None) -> tuple[JobStatus | None, RunRecords]:
    """`job_status` of an opened `Store` (its committed shards whose ids file reads; duplicate rows, which
    readers skip, not counted), and the run records it was computed from."""
    runs = runs if runs is not None else read_runs(store.fs, store.root)

    def shard_keys() -> Iterable[tuple[np.ndarray, Callable[[], list[str]]]]:
        for commit in store.commits:
            try:
                keys = store.shard_keys(commit.shard)
            except Exception:  # a damaged ids file is verify's to report; its records are not counted
                continue
            skip = store.duplicate_rows(commit.shard)
            keep = np.ones(len(keys), dtype=bool)
            keep[list(skip)] = False
            yield keys[keep], (lambda name=commit.shard, keep=keep: [
                i for i, k in zip(store.shard_ids(name).to_pylist(), keep, strict=True) if k])

    return job_status(runs.runs, shard_keys), runs
