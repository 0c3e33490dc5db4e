"""A disk that fills up or turns read-only under `generate`, `store copy` and `store export`: one line,
nothing committed lost or changed, nothing half-made that breaks the rerun, which completes exactly.
The faults are real (bench/diskfaults.py): `RLIMIT_FSIZE` in the child, a folder made read-only."""

from __future__ import annotations

import os

import pytest
from common import prompt_rows, write_jsonl
from diskfaults import DiskFault, copy_trial, export_trial, generate_trial, one_line_refusal, run_faulted
from faultcampaigns import build_copy_source, files_under, generate_args, run_potstill, store_contents

SEED = 11


def _report(trial) -> str:
    return "\n".join(trial.violations)


@pytest.mark.slow
def test_a_disk_full_before_the_store_exists_is_one_line_and_the_rerun_completes(tmp_path, tiny_teacher_dir):
    """The limit hit while the teacher's tokenizer is saved for the new store ended in a traceback."""
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(6, seed=SEED))
    store = str(tmp_path / "s")
    args = generate_args(tiny_teacher_dir, prompts, store)
    failed = run_faulted(args, DiskFault("2,000 bytes", fsize=2000), store)
    assert failed.returncode == 1 and one_line_refusal(failed) is None, failed.tail()
    assert "File too large" in failed.stderr and not os.path.exists(os.path.join(store, "manifest.json"))
    rerun = run_potstill(args)
    assert rerun.returncode == 0, rerun.tail()
    ids, _ = store_contents(store)
    assert sorted(ids) == [f"r{i:04d}" for i in range(6)]


def test_a_disk_full_while_a_copy_creates_its_destination_is_one_line_and_the_rerun_completes(tmp_path):
    """The limit hit while the destination's tokenizer files were written ended in a traceback."""
    source, dest = str(tmp_path / "src"), str(tmp_path / "dst")
    build_copy_source(source, shards=4, seed=SEED)
    trial = copy_trial(source, dest, [DiskFault("600 bytes", fsize=600)], "copy")
    assert trial.injected == 1 and trial.survived == 1 and trial.violations == [], _report(trial)
    assert files_under(dest) == files_under(source)


@pytest.mark.slow
def test_generate_under_a_full_disk_and_a_read_only_store_ends_complete(tmp_path, tiny_teacher_dir):
    """Mid-run, one fault after the other into one store of four 12-record shards: the limit hit by a
    shard's hidden-state file (the tokenizer's 14 KB pass); the shards, then the commits folder made
    read-only after a new commit. After each, what is committed is the uninterrupted run's; the rerun
    writes every record once, byte for byte, nothing left behind."""
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(48, seed=SEED))
    reference_store = str(tmp_path / "ref")
    assert run_potstill(generate_args(tiny_teacher_dir, prompts, reference_store)).returncode == 0
    _, reference = store_contents(reference_store)
    store = str(tmp_path / "s")
    # (one writer thread: the shards commit one after another, so each fault lands after the same commit)
    args = [*generate_args(tiny_teacher_dir, prompts, store), "--shard-records", "12", "--writer-threads", "1"]
    faults = [DiskFault("limit", fsize=15_000), DiskFault("shards", readonly="shards", after_commits=1),
              DiskFault("commits", readonly="commits", after_commits=1)]
    trial = generate_trial(args, store, reference, faults, "full, then read-only")
    assert trial.injected == 3 and trial.survived == 3 and trial.violations == [], _report(trial)
    assert trial.lost == trial.doubled == trial.altered == 0


def test_an_export_under_a_full_disk_leaves_no_file_and_the_rerun_is_whole(tmp_path):
    source = str(tmp_path / "src")
    build_copy_source(source, shards=6, seed=SEED)
    to = str(tmp_path / "out.parquet")
    assert run_potstill(["store", "export", source, "--to", to]).returncode == 0
    with open(to, "rb") as f:
        reference = f.read()
    trial = export_trial(source, to, reference, len(reference) // 2, "export")
    assert trial.injected == 1 and trial.survived == 1 and trial.violations == [], _report(trial)
