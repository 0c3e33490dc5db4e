"""Crash safety of `potstill generate` with real processes: kill -9 and resume, concurrent workers."""

from __future__ import annotations

import os
import signal
import time

import pytest
from common import prompt_rows, write_jsonl
from genhelpers import popen_cli, run_cli

from potstill.store import open_store, verify_store

N = 60


def _commits(store: str) -> int:
    try:
        return sum(1 for n in os.listdir(os.path.join(store, "commits")) if n.endswith(".json"))
    except FileNotFoundError:
        return 0


def _args(teacher: str, prompts: str, store: str, *extra: str, shard_records: int = 2) -> list[str]:
    return ["generate", "--teacher", teacher, "--prompts", prompts, "--out", store, "--device", "cpu",
            "--shard-records", str(shard_records), "--batch-tokens", "64", "--hidden-layers", "0,-1",
            "--no-progress", *extra]


def _assert_complete(store: str) -> None:
    s = open_store(store)
    ids = s.id_index().ids().to_pylist()
    assert len(ids) == len(set(ids)) == N  # every id exactly once
    assert set(ids) == {f"r{i:04d}" for i in range(N)}
    report = verify_store(store)
    assert report.ok, [str(p) for p in report.problems]
    assert not report.leftovers
    for rec in s.iter_records():  # spot-check content survived the crash
        assert rec.num_scored == len(rec.input_ids) - rec.score_start > 0


@pytest.mark.slow
def test_kill_9_after_a_commit_then_rerun_finishes_exactly_once(tmp_path, tiny_teacher_dir):
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(N, seed=20))
    store = str(tmp_path / "s")
    proc = popen_cli(_args(tiny_teacher_dir, prompts, store))
    deadline = time.monotonic() + 120
    while _commits(store) < 3:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no commit within 120 s"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = open_store(store).num_records
    assert 0 < done < N  # really interrupted in the middle

    result = run_cli(_args(tiny_teacher_dir, prompts, store))
    assert result.returncode == 0, result.stderr
    assert f"already in the store: {done} records" in result.stdout
    assert f"wrote {N - done} records" in result.stdout
    _assert_complete(store)


@pytest.mark.slow
def test_two_worker_processes_fill_one_store_at_once(tmp_path, tiny_teacher_dir):
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(N, seed=21))
    store = str(tmp_path / "s")
    procs = [popen_cli(_args(tiny_teacher_dir, prompts, store, "--workers", "2", "--worker-index", str(i),
                             shard_records=8))
             for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err
        assert "(worker" in out
    s = open_store(store)
    writers = {c.writer_id for c in s.commits}
    assert {w[:4] for w in writers} == {"g000", "g001"}  # each worker's writer threads
    _assert_complete(store)
