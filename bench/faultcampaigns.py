"""Fault campaigns: run a potstill command again and again, `kill -9` each run at a chosen moment,
check the store (or training output) after every kill, finish with one uninterrupted run, and
compare everything with an uninterrupted reference run of the same command.

Shared by bench/reliability.py (many kills) and tests/test_faults.py (a few, in CI). A campaign
collects what it finds as `violations`, one sentence each; an empty list is the pass.

Kills come two ways (`Trigger`): from outside, at a seeded delay after something appears on disk
(the run's writer lease, the N-th new commit record, a checkpoint folder), like an operator's or a
scheduler's kill; or at a kill point inside the process (bench/killpoints.py), which lands exactly
in the middle of a shard, between a commit record's temporary file and its link, or in the middle of
a checkpoint. Either way the whole process group gets SIGKILL.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILLPOINTS = os.path.join(REPO, "bench", "killpoints.py")
# One torch thread per process: frugal on a shared machine, and the same arithmetic in every run.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
POLL_S = 0.003
FINAL = "after the final run"


# -- running and killing ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Trigger:
    """When a run is killed: at the `nth` call of a kill `point`, or from outside once `ready()`
    holds, after `delay` more seconds. `what` says it in words, for reports."""

    what: str
    point: str | None = None
    nth: int = 1
    ready: Callable[[], bool] | None = None
    delay: float = 0.0


@dataclass
class Outcome:
    trigger: Trigger | None
    killed: bool  # died by SIGKILL (False: the run ended before its trigger fired)
    returncode: int
    seconds: float
    stdout: str
    stderr: str
    ready_after: float | None = None  # seconds from the start until the trigger's `ready()` held

    def tail(self, lines: int = 12) -> str:
        return "\n".join((self.stdout + self.stderr).strip().splitlines()[-lines:])


def run_potstill(args: list[str], trigger: Trigger | None = None, timeout: float = 600) -> Outcome:
    """Run `potstill ARGS` in its own process group, killed as `trigger` says (never, when None)."""
    if trigger is not None and trigger.point is not None:
        cmd = [sys.executable, KILLPOINTS, trigger.point, str(trigger.nth), "--", *args]
    else:
        cmd = [sys.executable, "-m", "potstill.cli.main", *args]
    started = time.monotonic()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:  # (pipes could fill up and block)
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=ENV, cwd=REPO, start_new_session=True)
        ready_at = None
        try:
            if trigger is not None and trigger.ready is not None:
                ready_at = _kill_when(proc, trigger, started + timeout)
            proc.wait(timeout=max(1.0, started + timeout - time.monotonic()))
        finally:
            if proc.poll() is None:  # timed out, or the test failed: never leave a run behind
                _killpg(proc)
                proc.wait()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    return Outcome(trigger, proc.returncode == -signal.SIGKILL, proc.returncode, time.monotonic() - started,
                   stdout, stderr, None if ready_at is None else ready_at - started)


def _kill_when(proc: subprocess.Popen, trigger: Trigger, deadline: float) -> float | None:
    """Kill once `trigger.ready()` has held for `trigger.delay` seconds (an infinite delay only times
    when it held). Returns when it held, or None when the run ended first."""
    assert trigger.ready is not None
    while not trigger.ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            return None
        time.sleep(POLL_S)
    ready_at = time.monotonic()
    fire_at = min(ready_at + trigger.delay, deadline)
    while time.monotonic() < fire_at:
        if proc.poll() is not None:
            return ready_at
        time.sleep(min(POLL_S, max(0.0, fire_at - time.monotonic())))
    _killpg(proc)
    return ready_at


def new_entry(folder: str, accept: Callable[[str], bool] = lambda name: True) -> Callable[[], bool]:
    """A `ready` that holds once `folder` has an entry `accept`ed that it did not have now."""
    old = set(_listdir(folder))
    return lambda: any(accept(n) for n in set(_listdir(folder)) - old)


def timed(args: list[str], ready: Callable[[], bool], what: str) -> tuple[Outcome, float]:
    """Run uninterrupted; returns the outcome and how long the run went on after `ready()` held
    (the span in which a seeded delay lands a kill), or fails."""
    outcome = run_potstill(args, Trigger(what, ready=ready, delay=float("inf")))
    if outcome.returncode != 0 or outcome.ready_after is None:
        raise RuntimeError(f"the {what} run failed (exit {outcome.returncode}): {outcome.tail()}")
    return outcome, outcome.seconds - outcome.ready_after


def _killpg(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # the run leads its own session: its pid is the group's id


# -- what is on disk -------------------------------------------------------------------------------
def files_under(root: str) -> dict[str, bytes]:
    """Every file below `root` (relative path with '/' -> bytes); empty when `root` is missing."""
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, root).replace(os.sep, "/")] = f.read()
    return found


def strays(root: str) -> list[str]:
    """What no finished run may leave in a store: temporary files of atomic writes, writer leases,
    and shard folders without a commit record."""
    out = []
    for rel in files_under(root):
        name = rel.rsplit("/", 1)[-1]
        if name.endswith(".tmp") or ".tmp" in name or rel.startswith("writers/"):
            out.append(rel)
    commits = {n[:-5] for n in _listdir(os.path.join(root, "commits")) if n.endswith(".json")}
    out += [f"shards/{n}/" for n in _listdir(os.path.join(root, "shards")) if n not in commits]
    return sorted(out)


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []


def count_entries(folder: str, suffix: str = ".json") -> int:
    return sum(1 for n in _listdir(folder) if n.endswith(suffix) and not n.startswith("."))


def canonical(value: Any) -> Any:
    """A comparable, exact form of a record field: arrays as (dtype, shape, bytes)."""
    if isinstance(value, np.ndarray):
        return ("array", value.dtype.str, value.shape, value.tobytes())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return tuple((f.name, canonical(getattr(value, f.name))) for f in dataclasses.fields(value))
    if isinstance(value, dict):
        return tuple(sorted((str(k), canonical(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(canonical(v) for v in value)
    if isinstance(value, float):
        return ("float", np.float64(value).tobytes())
    return value


def store_contents(url: str) -> tuple[list[str], dict[str, Any]]:
    """(every committed id, in commit order, repeats included; id -> the record's exact content, hidden
    states too). Opens strictly: a damaged commit record raises."""
    from potstill.store import open_store

    store = open_store(url)
    ids = store.id_index().ids().to_pylist()
    records = {rec.id: canonical(rec) for rec in store.iter_records(with_hidden=True)}
    return ids, records


def compare_records(got: dict[str, Any], want: dict[str, Any], where: str) -> list[str]:
    """Records of `got` that differ from `want` or are not in it (a subset is fine)."""
    problems = []
    for rid, content in got.items():
        if rid not in want:
            problems.append(f"{where}: record {rid!r} is not in the reference run")
        elif content != want[rid]:
            fields = [name for (name, a), (_, b) in zip(content, want[rid], strict=True) if a != b]
            problems.append(f"{where}: record {rid!r} differs from the reference run in {', '.join(fields)}")
    return problems


def tally(url: str, reference: dict[str, Any]) -> tuple[int, int, int]:
    """(lost, doubled, altered) of the store at `url` against `reference` (id -> exact content): the
    reference's records it lacks, committed records beyond the first of each id, records that differ.
    A store that does not open (its checks say why) has lost every record."""
    try:
        ids, records = store_contents(url)
    except Exception:
        return len(reference), 0, 0
    altered = sum(1 for rid, content in records.items() if reference.get(rid, content) != content)
    return len(set(reference) - set(ids)), len(ids) - len(set(ids)), altered


def repeated(ids: list[str]) -> list[str]:
    seen: set[str] = set()
    return sorted({i for i in ids if i in seen or seen.add(i)})


def verify_problems(url: str, where: str, *, leftovers_allowed: bool) -> list[str]:
    """`potstill store verify` through the library: its problems, live leftovers of dead runs, and
    (when not allowed) any leftover at all."""
    from potstill.store import verify_store

    if not os.path.exists(os.path.join(url, "manifest.json")):
        return [f"{where}: {url} is not a store (no manifest.json)"]
    report = verify_store(url)
    problems = [f"{where}: verify: {p}" for p in report.problems]
    for left in report.leftovers:
        if left.live:  # every run is dead here: a live-looking leftover would never be cleaned
            problems.append(f"{where}: {left.path} ({left.kind}) is taken for a live writer's: {left.reason}")
        elif not leftovers_allowed:
            problems.append(f"{where}: leftover {left.path} ({left.kind}) remains: {left.reason}")
    return problems


# -- campaigns -------------------------------------------------------------------------------------
@dataclass
class Campaign:
    """What happened: every killed run, the final uninterrupted one, and what was wrong."""

    name: str
    outcomes: list[Outcome] = field(default_factory=list)
    final: Outcome | None = None
    violations: list[str] = field(default_factory=list)
    left_behind: list[list[str]] = field(default_factory=list)  # after each kill: `strays`, cut-short checkpoints
    lost: int = 0  # records (or steps) the finished run lacks
    doubled: int = 0  # records committed more than once
    checks: int = 0  # kills after which the invariants were checked

    @property
    def landed(self) -> int:
        return sum(o.killed for o in self.outcomes)

    def where(self) -> str:
        """How violations found after the latest kill begin (`survived` relies on it)."""
        return f"after kill {len(self.outcomes)} ({self.outcomes[-1].trigger.what})"

    @property
    def survived(self) -> int:
        """Kills that landed, after which nothing was found wrong, in a campaign that ended well."""
        if any(v.startswith(FINAL) for v in self.violations):
            return 0
        return sum(o.killed and not any(v.startswith(f"after kill {i + 1} (") for v in self.violations)
                   for i, o in enumerate(self.outcomes))

    def kill(self, args: list[str], trigger: Trigger, log: Callable[[str], None] | None = None,
             store: str | None = None) -> Outcome:
        outcome = run_potstill(args, trigger)
        self.outcomes.append(outcome)
        if store is not None:
            self.left_behind.append(strays(store))
        if not outcome.killed and outcome.returncode != 0:
            self.violations.append(f"{self.where()}: the run failed with exit {outcome.returncode}: {outcome.tail(3)}")
        if log is not None:
            state = "killed" if outcome.killed else f"ended first (exit {outcome.returncode})"
            log(f"  {self.name} kill {len(self.outcomes)}: {trigger.what}: {state} after {outcome.seconds:.1f} s")
        return outcome


def _pick(rng: random.Random, low: int, high: int) -> int:
    return rng.randint(low, max(low, high))


# -- generate --------------------------------------------------------------------------------------
def generate_args(teacher: str, prompts: str, store: str, backend: str = "hf") -> list[str]:
    """Small shards, two writer threads, top-k targets (a later --targets wins). The HF backend: hidden layers with small chunks
    (so that chunk files are written in the middle of a shard), one record per forward batch (so that
    a record's bytes do not depend on which other records share its batch). vLLM schedules its own
    batches; it captures the same hidden layers and, besides the top-k, draws (--targets both)."""
    common = ["generate", "--teacher", teacher, "--prompts", prompts, "--out", store, "--shard-records", "2",
              "--writer-threads", "2", "--targets", "topk", "--top-k", "8", "--no-progress"]
    if backend == "vllm":
        return [*common, "--backend", "vllm", "--dtype", "float32", "--targets", "both", "--samples", "8",
                "--hidden-layers", "0,-1", "--hidden-chunk-tokens", "8"]
    return [*common, "--device", "cpu", "--batch-tokens", "1", "--hidden-layers", "0,-1", "--hidden-chunk-tokens", "8"]


GENERATE_POINTS = ("hidden-chunk", "shard-files", "commit-record", "after-commit", "lease")
# vLLM captures no hidden states: no chunk files, and no hidden-state shard whose finish marks a
# shard's files whole (the commit record's kill point comes right after its records file instead)
VLLM_GENERATE_POINTS = tuple(p for p in GENERATE_POINTS if p not in ("hidden-chunk", "shard-files"))


@dataclass
class GenerateReference:
    records: dict[str, Any]  # id -> exact content, from an uninterrupted run
    span: float  # seconds that run took from its writers' start to its end


def _writer_lease(name: str) -> bool:  # a writer thread's lease (not a run's claim, not a temporary file)
    return name.endswith(".json") and not name.endswith(".run.json") and not name.startswith(".")


def generate_trigger(rng: random.Random, kind: str, store: str, remaining: int, reference: GenerateReference) -> Trigger:
    """A kill of one `generate` run with `remaining` records to write (2 per shard)."""
    shards = max(1, remaining // 2)
    commits = os.path.join(store, "commits")
    if kind == "manifest":
        return Trigger("kill point: the manifest's temporary file written, not linked", point="manifest")
    if kind == "delay":  # measured from a new writer lease: the model is loaded and records flow
        delay = round(rng.uniform(0.0, reference.span * remaining / len(reference.records) / 3), 3)
        return Trigger(f"kill -9 {delay:.3f} s after the writers start", delay=delay,
                       ready=new_entry(os.path.join(store, "writers"), _writer_lease))
    if kind == "commits":
        n, base = _pick(rng, 1, shards // 3), count_entries(commits)
        delay = round(rng.uniform(0.0, 0.02), 4)
        return Trigger(f"kill -9 {delay * 1000:.0f} ms after the {n}th new commit record appears",
                       ready=lambda: count_entries(commits) >= base + n, delay=delay)
    # (early in what is left, so that the kills after this one find work too)
    nth = {"hidden-chunk": _pick(rng, 1, shards), "lease": _pick(rng, 1, shards // 3 + 2)}.get(
        kind, _pick(rng, 1, shards // 3))
    words = {
        "hidden-chunk": "after a hidden-state chunk file, mid-shard",
        "shard-files": "with a shard's Arrow and Zarr files whole, before its commit record",
        "commit-record": "between a commit record's temporary file and its link",
        "after-commit": "just after a commit record is linked in",
        "lease": "between a lease's temporary file and its rename",
    }[kind]
    return Trigger(f"kill point #{nth} {words}", point=kind, nth=nth)


def generate_reference(teacher: str, prompts: str, workdir: str, backend: str = "hf") -> GenerateReference:
    store = os.path.join(workdir, "reference.store")
    _, span = timed(generate_args(teacher, prompts, store, backend),
                    new_entry(os.path.join(store, "writers"), _writer_lease), "reference generate")
    ids, records = store_contents(store)
    assert len(ids) == len(set(ids)) == len(records) > 0
    return GenerateReference(records, span)


def generate_campaign(teacher: str, prompts: str, workdir: str, kinds: list[str], seed: int,
                      reference: GenerateReference | None = None, log: Callable[[str], None] | None = None,
                      backend: str = "hf") -> tuple[Campaign, GenerateReference]:
    """Kill `potstill generate --backend BACKEND` once per entry of `kinds` ("delay", "commits",
    "manifest" or a kill point of GENERATE_POINTS; VLLM_GENERATE_POINTS for vLLM), rerunning the same
    command each time, then once more without a kill. Returns the campaign and the reference run
    (pass it back in to reuse it)."""
    rng = random.Random(seed)
    campaign = Campaign("generate" if backend == "hf" else f"generate --backend {backend}")
    reference = reference or generate_reference(teacher, prompts, workdir, backend)
    store = os.path.join(workdir, f"killed-{seed}.store")
    args = generate_args(teacher, prompts, store, backend)
    for kind in kinds:
        remaining = len(set(reference.records) - set(_committed_ids(store)))
        trigger = generate_trigger(rng, kind, store, remaining, reference)
        campaign.kill(args, trigger, log, store)
        campaign.violations += store_invariants(store, reference.records, campaign.where(), leftovers_allowed=True)
        campaign.checks += 1
    campaign.final = run_potstill(args)
    where = FINAL
    if campaign.final.returncode != 0:
        campaign.violations.append(f"{where}: exit {campaign.final.returncode}: {campaign.final.tail(3)}")
    campaign.violations += store_invariants(store, reference.records, where, leftovers_allowed=False)
    campaign.lost, campaign.doubled, _ = tally(store, reference.records)  # (altered: violations above)
    if campaign.lost:
        campaign.violations.append(f"{where}: {campaign.lost} record(s) of the reference run are missing")
    campaign.violations += [f"{where}: {s} remains in the store" for s in strays(store)]
    return campaign, reference


def _committed_ids(store: str) -> list[str]:
    if not os.path.exists(os.path.join(store, "manifest.json")):
        return []
    return store_contents(store)[0]


def store_invariants(store: str, reference: dict[str, Any], where: str, *, leftovers_allowed: bool) -> list[str]:
    """What is committed is exactly what the reference run wrote, each record once; the store verifies."""
    if not os.path.exists(os.path.join(store, "manifest.json")):
        return [] if leftovers_allowed else [f"{where}: the store has no manifest"]
    try:
        ids, records = store_contents(store)
    except Exception as e:  # a store that no longer opens is the worst outcome: report, never raise
        return [f"{where}: the store does not open: {type(e).__name__}: {e}"]
    problems = [f"{where}: record {rid!r} is committed more than once" for rid in repeated(ids)]
    problems += compare_records(records, reference, where)
    return problems + verify_problems(store, where, leftovers_allowed=leftovers_allowed)


# -- store copy ------------------------------------------------------------------------------------
COPY_POINTS = ("copy-file", "copy-file-torn", "commit-record", "after-commit", "lease")


def build_copy_source(url: str, shards: int, seed: int = 0) -> None:
    """A store of `shards` one-record shards from three writers, hidden states in 4-row chunks
    (several chunk files per shard): many small files, as a long-running teacher job leaves them."""
    from common import TOKENIZER_FILES, make_manifest, random_record

    from potstill.store import create_store

    rng = np.random.default_rng(seed)
    manifest = make_manifest(layers=((1, 8, "bfloat16"), (2, 8, "float16")), chunk_tokens=4)
    store = create_store(url, manifest, tokenizer_files=TOKENIZER_FILES)
    writers = [store.writer(w, shard_records=1) for w in ("a", "b", "c")]
    for i in range(shards):
        writers[i % 3].write(random_record(rng, f"r{i:04d}", manifest))
    for w in writers:
        w.close()


def copy_trigger(rng: random.Random, kind: str, source: str, dest: str, span: float) -> Trigger:
    """A kill of one `store copy` run; `span` is how long an uninterrupted copy copies."""
    from potstill.store import open_store

    src = open_store(source)
    done = set(_listdir(os.path.join(dest, "commits")))
    todo = [c for c in src.commits if f"{c.shard}.json" not in done]
    files = sum(len(c.files) for c in todo)
    commits = os.path.join(dest, "commits")
    if kind == "manifest":
        return Trigger("kill point: the destination manifest's temporary file written, not linked", point="manifest")
    if kind == "delay":
        delay = round(rng.uniform(0.0, span * len(todo) / len(src.commits) / 3), 3)
        return Trigger(f"kill -9 {delay:.3f} s after the copy starts a new shard", delay=delay,
                       ready=new_entry(os.path.join(dest, "shards")))
    if kind == "commits":
        n, base = _pick(rng, 1, len(todo) // 4), count_entries(commits)
        return Trigger(f"kill -9 when the {n}th new commit record appears",
                       ready=lambda: count_entries(commits) >= base + n)
    # (early in what is left, so that the kills after this one find work too)
    nth = {"copy-file": _pick(rng, 1, files // 4), "copy-file-torn": _pick(rng, 1, files // 4),
           "lease": _pick(rng, 1, len({c.writer_id for c in todo}))}.get(kind, _pick(rng, 1, len(todo) // 4))
    words = {
        "copy-file": "after a data file is copied, mid-shard",
        "copy-file-torn": "halfway through copying a data file",
        "commit-record": "between a commit record's temporary file and its link",
        "after-commit": "just after a commit record is linked in",
        "lease": "between the lease's temporary file and its rename",
    }[kind]
    return Trigger(f"kill point #{nth} {words}", point=kind, nth=nth)


def copy_campaign(source: str, workdir: str, kinds: list[str], seed: int,
                  log: Callable[[str], None] | None = None) -> Campaign:
    """Kill `potstill store copy SOURCE DEST` once per entry of `kinds` ("delay", "commits",
    "manifest" or a kill point of COPY_POINTS), rerunning it each time, then once more without a kill."""
    rng = random.Random(seed)
    campaign = Campaign("store copy")
    timing = os.path.join(workdir, f"timing-{seed}.store")
    _, span = timed(["store", "copy", source, timing], new_entry(os.path.join(timing, "shards")), "timing copy")
    dest = os.path.join(workdir, f"copy-{seed}.store")
    args = ["store", "copy", source, dest]
    want = files_under(source)
    for kind in kinds:
        trigger = copy_trigger(rng, kind, source, dest, span)
        campaign.kill(args, trigger, log, dest)
        campaign.violations += copy_invariants(dest, want, campaign.where())
        campaign.checks += 1
    campaign.final = run_potstill(args)
    where = FINAL
    if campaign.final.returncode != 0:
        campaign.violations.append(f"{where}: exit {campaign.final.returncode}: {campaign.final.tail(3)}")
    got = files_under(dest)
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    differ = sorted(rel for rel in set(want) & set(got) if got[rel] != want[rel])
    campaign.violations += [f"{where}: {rel} is missing at the destination" for rel in missing]
    campaign.violations += [f"{where}: {rel} is at the destination but not at the source" for rel in extra]
    campaign.violations += [f"{where}: {rel} differs from the source" for rel in differ]
    campaign.violations += verify_problems(dest, where, leftovers_allowed=False)
    if os.path.exists(os.path.join(dest, "manifest.json")):
        src_ids, dst_ids = store_contents(source)[0], store_contents(dest)[0]
        campaign.lost = len(set(src_ids) - set(dst_ids))
        campaign.doubled = len(dst_ids) - len(set(dst_ids))
    return campaign


def copy_invariants(dest: str, want: dict[str, bytes], where: str) -> list[str]:
    """Every commit record at the destination is the source's, and every file it names is the
    source's, byte for byte (a reader never sees a half-copied shard); the destination verifies."""
    from potstill.store import open_store

    if not os.path.exists(os.path.join(dest, "manifest.json")):
        return []
    try:
        store = open_store(dest)
    except Exception as e:
        return [f"{where}: the destination does not open: {type(e).__name__}: {e}"]
    problems = []
    for commit in store.commits:
        rel = f"commits/{commit.shard}.json"
        for path in [rel] + [f.path for f in commit.files]:
            with open(os.path.join(dest, path), "rb") as f:
                if f.read() != want.get(path):
                    problems.append(f"{where}: committed {path} differs from the source")
    return problems + verify_problems(dest, where, leftovers_allowed=True)


# -- train -----------------------------------------------------------------------------------------
TRAIN_POINTS = ("train-step", "checkpoint-model", "checkpoint-optimizer", "checkpoint-state-torn", "final-save")


@dataclass(frozen=True)
class TrainSetup:
    store: str
    student: str
    max_steps: int = 16
    save_steps: int = 3
    save_total_limit: int = 2

    def args(self, out: str) -> list[str]:
        """Two loader workers' worth of determinism is covered elsewhere; one keeps 2 cores busy, no more."""
        return ["train", "--store", self.store, "--student", self.student, "--out", out,
                "--max-steps", str(self.max_steps), "--save-steps", str(self.save_steps),
                "--save-total-limit", str(self.save_total_limit), "--batch-size", "4", "--num-workers", "1",
                "--logging-steps", "1", "--hidden-map", "2:2", "--lr", "0.01", "--shuffle-buffer", "8",
                "--report-to", "none", "--eval-fraction", "0"]


def complete_checkpoints(out: str) -> list[int]:
    """Steps of the checkpoints in `out` a resume may use, judged independently of potstill: the
    trainer state (written last by the Trainer) and the loader state both parse."""
    steps = []
    for name in _listdir(out):
        if not name.startswith("checkpoint-"):
            continue
        try:
            with open(os.path.join(out, name, "trainer_state.json")) as f:
                step = int(json.load(f)["global_step"])
            with open(os.path.join(out, name, "loader_state_rank0.json")) as f:
                json.load(f)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if name == f"checkpoint-{step}":
            steps.append(step)
    return sorted(steps)


def train_trigger(rng: random.Random, kind: str, setup: TrainSetup, out: str) -> Trigger:
    done = max(complete_checkpoints(out), default=0)
    left = setup.max_steps - done
    saves = len([s for s in range(done + 1, setup.max_steps + 1) if s % setup.save_steps == 0])
    if kind in ("checkpoint", "delay"):
        step = done + setup.save_steps * _pick(rng, 1, max(1, saves - 1)) if saves > 1 else setup.max_steps
        delay = round(rng.uniform(0.0, 0.02 if kind == "checkpoint" else 0.3), 3)
        return Trigger(f"kill -9 {delay:.3f} s after checkpoint-{step} starts being written", delay=delay,
                       ready=_rewritten(os.path.join(out, f"checkpoint-{step}", "loader_state_rank0.json")))
    nth = {"train-step": _pick(rng, 1, left - 1), "final-save": 1}.get(kind, _pick(rng, 1, max(1, saves - 1)))
    words = {
        "train-step": "after a step's backward pass, before its optimizer update",
        "checkpoint-model": "with a checkpoint's student saved, nothing else",
        "checkpoint-optimizer": "with a checkpoint's optimizer state saved, not its trainer state",
        "checkpoint-state-torn": "halfway through writing a checkpoint's trainer_state.json",
        "final-save": "halfway through writing the finished student's weights",
    }[kind]
    return Trigger(f"kill point #{nth} {words}", point=kind, nth=nth)


def _rewritten(path: str) -> Callable[[], bool]:
    """A `ready` that holds once `path` is written anew (a killed run may have left a version of it)."""
    def stamp() -> int | None:
        try:
            return os.stat(path).st_mtime_ns
        except FileNotFoundError:
            return None
    old = stamp()
    return lambda: stamp() not in (None, old)


def train_result(out: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the training report, every saved weight tensor of the student and projections by name)."""
    from safetensors.numpy import load_file

    with open(os.path.join(out, "training_report.json")) as f:
        report = json.load(f)
    weights = {}
    for name in ("model.safetensors", "projections.safetensors"):
        for key, value in load_file(os.path.join(out, name)).items():
            weights[f"{name}:{key}"] = canonical(value)
    return report, weights


def train_campaign(setup: TrainSetup, workdir: str, kinds: list[str], seed: int,
                   reference: tuple[dict[str, Any], dict[str, Any]] | None = None,
                   log: Callable[[str], None] | None = None) -> tuple[Campaign, tuple[dict[str, Any], dict[str, Any]]]:
    """Kill `potstill train` once per entry of `kinds` ("checkpoint", "delay" or a kill point of
    TRAIN_POINTS); each rerun passes `--resume` when a complete checkpoint exists, and must resume
    from the newest complete one. Then one run more without a kill, compared with the reference."""
    rng = random.Random(seed)
    campaign = Campaign("train")
    if reference is None:
        ref_out = os.path.join(workdir, "reference-out")
        ref = run_potstill(setup.args(ref_out))
        if ref.returncode != 0:
            raise RuntimeError(f"the reference run failed: {ref.tail()}")
        reference = train_result(ref_out)
    out = os.path.join(workdir, f"killed-out-{seed}")
    for kind in kinds:
        trigger = train_trigger(rng, kind, setup, out)
        before = complete_checkpoints(out)
        outcome = campaign.kill(_resume_args(setup, out), trigger, log)
        complete = {f"checkpoint-{step}" for step in complete_checkpoints(out)}
        campaign.left_behind.append([f"{n}/ (cut short)" for n in _listdir(out)
                                     if n.startswith("checkpoint-") and n not in complete])
        campaign.violations += _resumed_from_newest(outcome, campaign.where(), before)
        campaign.checks += 1
    before = complete_checkpoints(out)
    campaign.final = run_potstill(_resume_args(setup, out))
    where = FINAL
    if campaign.final.returncode != 0:
        campaign.violations.append(f"{where}: exit {campaign.final.returncode}: {campaign.final.tail(3)}")
        return campaign, reference
    campaign.violations += _resumed_from_newest(campaign.final, where, before)
    report, weights = train_result(out)
    ref_report, ref_weights = reference
    curve, ref_curve = report["loss_curve"], ref_report["loss_curve"]
    campaign.lost = setup.max_steps - len(curve)
    for got, want in zip(curve, ref_curve, strict=False):
        if got != want:
            campaign.violations.append(f"{where}: step {want.get('step')} logged {got}, the reference run {want}")
    if [e["step"] for e in curve] != [e["step"] for e in ref_curve]:
        campaign.violations.append(f"{where}: logged steps {[e['step'] for e in curve]}, "
                                   f"the reference run {[e['step'] for e in ref_curve]}")
    if report["global_step"] != ref_report["global_step"]:
        campaign.violations.append(f"{where}: global step {report['global_step']}, the reference run {ref_report['global_step']}")
    differ = sorted(k for k in set(weights) | set(ref_weights) if weights.get(k) != ref_weights.get(k))
    if differ:
        campaign.violations.append(f"{where}: final weights differ from the reference run's: {', '.join(differ[:4])}")
    return campaign, reference


def _resume_args(setup: TrainSetup, out: str) -> list[str]:
    return setup.args(out) + (["--resume"] if complete_checkpoints(out) else [])


def _resumed_from_newest(outcome: Outcome, where: str, checkpoints: list[int]) -> list[str]:
    """A run must resume from the newest checkpoint that was complete when it started (it says which
    on stderr), and start afresh when there was none."""
    line = next((ln for ln in outcome.stderr.splitlines() if "optimizer steps" in ln), None)
    if line is None:  # killed before it said where it starts
        return []
    named = os.path.basename(line.rsplit("resuming from ", 1)[1].strip()) if "resuming from " in line else None
    newest = f"checkpoint-{checkpoints[-1]}" if checkpoints else None
    if named != newest:
        return [f"{where}: resumed from {named or 'the start'}, the newest complete checkpoint is {newest or 'none'}"]
    return []


# -- store export ----------------------------------------------------------------------------------
def export_campaign(store: str, workdir: str, kills: int, seed: int, reference: tuple[bytes, float] | None = None,
                    log: Callable[[str], None] | None = None) -> tuple[Campaign, tuple[bytes, float]]:
    """Kill `potstill store export STORE --to FILE.parquet` `kills` times from outside (a seeded delay
    after the start, or after its partial file appears), rerunning it each time, then once more
    without a kill. After each kill FILE is absent or the reference run's, byte for byte (never a
    part of it); the final run's FILE is the reference's and no partial file is left.
    `reference`: (the uninterrupted run's file, its duration), measured when None."""
    rng = random.Random(seed)
    campaign = Campaign("store export")
    if reference is None:
        ref_to = os.path.join(workdir, "reference.parquet")
        ref = run_potstill(["store", "export", store, "--to", ref_to])
        if ref.returncode != 0:
            raise RuntimeError(f"the reference export failed: {ref.tail()}")
        with open(ref_to, "rb") as f:
            reference = (f.read(), ref.seconds)
    want, span = reference
    to = os.path.join(workdir, f"export-{seed}.parquet")
    args = ["store", "export", store, "--to", to]
    for _ in range(kills):
        if rng.random() < 0.5:
            delay = round(rng.uniform(0.0, span), 3)
            trigger = Trigger(f"kill -9 {delay:.3f} s after the start", ready=lambda: True, delay=delay)
        else:
            delay = round(rng.uniform(0.0, 0.05), 4)
            partial = f"{to}.partial"
            trigger = Trigger(f"kill -9 {delay * 1000:.0f} ms after the partial file appears", delay=delay,
                              ready=lambda partial=partial: os.path.exists(partial))
        campaign.kill(args, trigger, log)
        if os.path.exists(to):
            with open(to, "rb") as f:
                if f.read() != want:
                    campaign.violations.append(f"{campaign.where()}: {to} is there and differs from the reference")
        campaign.checks += 1
    campaign.final = run_potstill(args)
    if campaign.final.returncode != 0:
        campaign.violations.append(f"{FINAL}: exit {campaign.final.returncode}: {campaign.final.tail(3)}")
    got = None
    if os.path.exists(to):
        with open(to, "rb") as f:
            got = f.read()
    if got != want:
        campaign.violations.append(f"{FINAL}: the export {'is missing' if got is None else 'differs from the reference'}")
        campaign.lost = int(got is None)
    if os.path.exists(f"{to}.partial"):
        campaign.violations.append(f"{FINAL}: {to}.partial remains")
    return campaign, reference
