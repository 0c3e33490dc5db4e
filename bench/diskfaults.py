"""Disk faults: a disk that fills up or turns read-only under a running potstill command.

Two loop-free ways, both real: `RLIMIT_FSIZE` (set in the child before it starts, with SIGXFSZ
ignored, so that a write past the limit fails with EFBIG as a full disk fails with ENOSPC), and a
folder of the store made read-only from outside in the middle of the run, after its N-th commit
(the run's capabilities to override file permissions are dropped first: these runs may be root's).
A fault landed when the run exited 1; it survived when the run said so in one line (no traceback),
everything it had committed was the reference run's, each record once, the store verified (leftovers
of the failed run allowed), and a rerun with room and permissions back completed the store or copy
exactly, with nothing left behind.

Shared by bench/reliability.py (the `disk` campaign) and tests/test_disk_faults.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from faultcampaigns import (
    ENV,
    FINAL,
    REPO,
    Outcome,
    copy_invariants,
    count_entries,
    files_under,
    store_invariants,
    strays,
    tally,
    verify_problems,
)

_PR_CAPBSET_DROP = 24
_DAC_CAPS = (1, 2, 3)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER: root would write a 0555 folder


@dataclass(frozen=True)
class DiskFault:
    """A file-size limit (bytes), or a folder of the store (`shards`, `commits`) made read-only once
    `after_commits` new commit records appeared."""

    what: str
    fsize: int | None = None
    readonly: str | None = None
    after_commits: int = 1


def _limits(fsize: int | None) -> Callable[[], None]:
    libc = ctypes.CDLL(None, use_errno=True)

    def apply() -> None:  # (runs in the child between fork and exec)
        for cap in _DAC_CAPS:
            libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)  # (fails harmlessly when not root)
        if fsize is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    return apply


def run_faulted(args: list[str], fault: DiskFault, store: str, timeout: float = 600) -> Outcome:
    """Run `potstill ARGS` under `fault`; a read-only folder is given its permissions back before
    this returns."""
    started = time.monotonic()
    folder = os.path.join(store, fault.readonly) if fault.readonly else None
    commits = os.path.join(store, "commits")
    base = count_entries(commits)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "potstill.cli.main", *args], stdout=out, stderr=err,
                                text=True, env=ENV, cwd=REPO, start_new_session=True,
                                preexec_fn=_limits(fault.fsize))
        try:
            if folder is not None:
                while proc.poll() is None and time.monotonic() < started + timeout:
                    if count_entries(commits) >= base + fault.after_commits and os.path.isdir(folder):
                        os.chmod(folder, 0o555)
                        break
                    time.sleep(0.002)
            proc.wait(timeout=max(1.0, started + timeout - time.monotonic()))
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            if folder is not None and os.path.isdir(folder):
                os.chmod(folder, 0o755)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    return Outcome(None, False, proc.returncode, time.monotonic() - started, stdout, stderr)


def one_line_refusal(outcome: Outcome) -> str | None:
    """What is wrong with how a failed run reported its failure, or None (one `error:` line)."""
    lines = [ln for ln in outcome.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    if "Traceback" in outcome.stderr or len(errors) != 1 or lines[-1] != errors[0]:  # (after any progress lines)
        return f"exit {outcome.returncode} without one error line: {outcome.tail(4)}"
    return None


def draw_fault(rng: random.Random, kinds: tuple[str, ...], low: int, high: int, commits: int) -> DiskFault:
    """A seeded fault: a file-size limit, log-uniform in [low, high] bytes, or a read-only folder after
    1..`commits` new commit records."""
    kind = rng.choice(kinds)
    if kind == "fsize":
        limit = int(math.exp(rng.uniform(math.log(low), math.log(high))))
        return DiskFault(f"files limited to {limit:,} bytes", fsize=limit)
    n = rng.randint(1, max(1, commits))
    return DiskFault(f"{kind}/ made read-only after {n} new commit(s)", readonly=kind, after_commits=n)


@dataclass
class DiskTrial:
    name: str
    injected: int = 0  # faults that made a run fail
    survived: int = 0
    lost: int = 0
    doubled: int = 0
    altered: int = 0
    violations: list[str] = field(default_factory=list)


def _judge(trial: DiskTrial, fault: DiskFault, outcome: Outcome, checks: list[str]) -> None:
    if outcome.returncode == 0:  # the fault did not land (every file stayed under the limit)
        trial.violations += checks
        return
    trial.injected += 1
    problems = [p for p in [one_line_refusal(outcome)] if p] + checks
    trial.survived += not problems
    trial.violations += [f"{fault.what}: {p}" for p in problems]


def generate_trial(args: list[str], store: str, reference: dict[str, Any], faults: list[DiskFault],
                   name: str) -> DiskTrial:
    """`generate ARGS` (into a new `store`) under each fault in turn, then once with room and
    permissions back: every record of `reference`, once, byte for byte."""
    trial = DiskTrial(name)
    shutil.rmtree(store, ignore_errors=True)
    for fault in faults:
        outcome = run_faulted(args, fault, store)
        _judge(trial, fault, outcome, store_invariants(store, reference, fault.what, leftovers_allowed=True))
    final = run_faulted(args, DiskFault("none"), store)
    if final.returncode != 0:
        trial.violations.append(f"{FINAL}: exit {final.returncode}: {final.tail(3)}")
    trial.violations += store_invariants(store, reference, FINAL, leftovers_allowed=False)
    trial.violations += [f"{FINAL}: {s} remains in the store" for s in strays(store)]
    trial.lost, trial.doubled, trial.altered = tally(store, reference)
    if trial.lost:
        trial.violations.append(f"{FINAL}: {trial.lost} record(s) missing")
    if any(v.startswith(FINAL) for v in trial.violations):
        trial.survived = 0
    return trial


def copy_trial(source: str, dest: str, faults: list[DiskFault], name: str) -> DiskTrial:
    """`store copy SOURCE DEST` under each fault in turn, then once more: DEST ends the source, file
    for file; after each fault every committed file at DEST is the source's."""
    trial = DiskTrial(name)
    shutil.rmtree(dest, ignore_errors=True)
    want = files_under(source)
    args = ["store", "copy", source, dest]
    for fault in faults:
        outcome = run_faulted(args, fault, dest)
        _judge(trial, fault, outcome, copy_invariants(dest, want, fault.what))
    final = run_faulted(args, DiskFault("none"), dest)
    if final.returncode != 0:
        trial.violations.append(f"{FINAL}: exit {final.returncode}: {final.tail(3)}")
    got = files_under(dest)
    trial.lost = sum(1 for rel in want if rel not in got)
    trial.altered = sum(1 for rel in want if rel in got and got[rel] != want[rel])
    extra = sorted(set(got) - set(want))
    if trial.lost or trial.altered or extra:
        trial.violations.append(f"{FINAL}: {trial.lost} file(s) missing, {trial.altered} differ, extra {extra[:3]}")
    trial.violations += verify_problems(dest, FINAL, leftovers_allowed=False)
    if any(v.startswith(FINAL) for v in trial.violations):
        trial.survived = 0
    return trial


def export_trial(store: str, to: str, reference: bytes, fsize: int, name: str) -> DiskTrial:
    """`store export STORE --to TO` with files limited to `fsize` bytes: one line, no file (or the
    old one) at TO and no partial file; then the export again, equal to `reference`."""
    trial = DiskTrial(name)
    for path in (to, f"{to}.partial"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    fault = DiskFault(f"files limited to {fsize:,} bytes", fsize=fsize)
    outcome = run_faulted(["store", "export", store, "--to", to], fault, store)
    left = [p for p in (to, f"{to}.partial") if os.path.exists(p)]
    _judge(trial, fault, outcome, [f"{fault.what}: {p} left behind" for p in left] if outcome.returncode else [])
    final = run_faulted(["store", "export", store, "--to", to], DiskFault("none"), store)
    with open(to, "rb") if os.path.exists(to) else contextlib.nullcontext(None) as f:
        got = f.read() if f is not None else None
    if final.returncode != 0 or got != reference or os.path.exists(f"{to}.partial"):
        trial.violations.append(f"{FINAL}: exit {final.returncode}, file equal to the reference: {got == reference}")
        trial.survived = 0
        trial.lost, trial.altered = (1, 0) if got is None else (0, int(got != reference))
    return trial
