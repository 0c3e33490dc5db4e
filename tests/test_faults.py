"""Fault injection: `kill -9` of real `potstill generate`, `store copy` and `train` processes at
seeded random moments (from outside, and at kill points inside: mid-shard, mid-commit-record,
mid-checkpoint), each followed by a rerun of the same command, then compared with an uninterrupted
reference run: every record exactly once and byte for byte the same, every copied file the same,
the same loss curve and weights; nothing left behind. The campaigns live in bench/faultcampaigns.py
(bench/reliability.py runs them at a larger scale); the kill points in bench/killpoints.py.

Each campaign collects what it finds as `violations`, one sentence each, so that a failure says
which kill broke what.
"""

from __future__ import annotations

import os
import shutil

import bytedamage
import pytest
from common import build_student, prompt_rows, write_jsonl
from faultcampaigns import (
    TrainSetup,
    Trigger,
    build_copy_source,
    complete_checkpoints,
    copy_campaign,
    export_campaign,
    files_under,
    generate_args,
    generate_campaign,
    run_potstill,
    store_contents,
    strays,
    train_campaign,
    train_result,
)
from genhelpers import run_main
from trainhelpers import arithmetic_items, build_teacher_store

SEED = 11


# -- store copy: regressions -----------------------------------------------------------------------
def test_a_copy_killed_while_creating_its_destination_completes_on_rerun(tmp_path):
    """Killed between the destination manifest's temporary file and its link, a copy used to leave
    that file behind, and every rerun then refused the folder as "not a potstill store"."""
    source, dest = str(tmp_path / "src"), str(tmp_path / "dst")
    build_copy_source(source, shards=6, seed=SEED)
    killed = run_potstill(["store", "copy", source, dest], Trigger("manifest", point="manifest"))
    assert killed.killed, killed.tail()
    assert [n for n in os.listdir(dest) if n.startswith(".manifest.json.")], os.listdir(dest)  # the kill landed there

    rerun = run_potstill(["store", "copy", source, dest])
    assert rerun.returncode == 0, rerun.tail()
    assert files_under(dest) == files_under(source)  # every file, byte for byte, and nothing else


def test_a_copy_rerun_removes_what_the_killed_copy_left(tmp_path):
    """Killed between a commit record's temporary file and its link, a copy leaves that file, a
    half-copied shard and its lease; the rerun used to finish the copy but leave the temporary file
    (and, when it had nothing left to copy for that writer, the dead lease) in the destination."""
    source, dest = str(tmp_path / "src"), str(tmp_path / "dst")
    build_copy_source(source, shards=6, seed=SEED)
    killed = run_potstill(["store", "copy", source, dest], Trigger("commit", point="commit-record", nth=6))
    assert killed.killed, killed.tail()
    left = strays(dest)
    assert any(s.startswith("commits/.") for s in left) and "writers/c.json" in left, left

    rerun = run_potstill(["store", "copy", source, dest])
    assert rerun.returncode == 0, rerun.tail()
    assert "removed 3 leftover(s) of interrupted runs" in rerun.stdout, rerun.stdout  # shard, temporary file, lease
    assert strays(dest) == []
    assert files_under(dest) == files_under(source)


# -- generate: regression --------------------------------------------------------------------------
@pytest.mark.slow
def test_a_manifest_temporary_file_of_a_killed_generate_is_a_leftover_verify_cleans(tmp_path, tiny_teacher_dir):
    """Killed between the manifest's temporary file and its link, `generate` left that file in the
    store's root, where `verify` did not look: once a rerun had created the store it stayed for good."""
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(4, seed=SEED))
    store = str(tmp_path / "s")
    args = generate_args(tiny_teacher_dir, prompts, store)
    first = run_potstill(args, Trigger("manifest", point="manifest"))
    assert first.killed and not os.path.exists(os.path.join(store, "manifest.json")), first.tail()
    temp = [n for n in os.listdir(store) if n.startswith(".manifest.json.")]
    assert temp, os.listdir(store)
    second = run_potstill(args, Trigger("claim", point="lease", nth=1))  # store created, killed before it cleans up
    assert second.killed and os.path.exists(os.path.join(store, "manifest.json")), second.tail()

    listed = run_main(["store", "verify", store])  # (the generate runs are the processes this test is about)
    assert listed.returncode == 0, listed.stderr
    assert f"leftover    {temp[0]}: temporary file; never linked" in listed.stdout, listed.stdout
    cleaned = run_main(["store", "verify", "--clean", store])
    assert cleaned.returncode == 0 and f"removed     {temp[0]}" in cleaned.stdout, cleaned.stdout
    assert strays(store) == [] and os.path.exists(os.path.join(store, "manifest.json"))


# -- train: regression -----------------------------------------------------------------------------
def _checkpoint(out: str, step: int, torn: bool = False) -> str:
    """A checkpoint folder's state files as the Trainer and the loader write them (the optimizer and
    scheduler states empty); `torn`: the trainer state cut in half, as a kill while the Trainer writes
    it (in place) leaves it."""
    import json

    import torch
    from transformers import TrainerState

    folder = os.path.join(out, f"checkpoint-{step}")
    os.makedirs(folder)
    for name in ("optimizer.pt", "scheduler.pt"):
        torch.save({}, os.path.join(folder, name))
    with open(os.path.join(folder, "loader_state_rank0.json"), "w") as f:
        json.dump({"batches_consumed": step}, f)
    path = os.path.join(folder, "trainer_state.json")
    TrainerState(global_step=step, max_steps=8, log_history=[{"loss": 1.0, "step": s} for s in range(1, step + 1)]
                 ).save_to_json(path)
    if torn:
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
    return folder


def test_a_checkpoint_whose_trainer_state_was_cut_short_is_never_resumed_from(tmp_path):
    """A job killed while the Trainer wrote a checkpoint's trainer_state.json left a checkpoint that
    `--resume` took for the newest complete one (and failed on: "unreadable trainer state"), and
    that made a fresh start refuse ("already holds checkpoints"): no way on without deleting it by hand."""
    from potstill.student_train import TrainConfig
    from potstill.student_train.trainer import latest_checkpoint, resume_point

    out = str(tmp_path / "out")
    good = _checkpoint(out, 2)
    _checkpoint(out, 4, torn=True)
    assert latest_checkpoint(out) == good
    assert resume_point(TrainConfig(store="s", student="m", out=out, resume=True), 0)[0] == good

    only_torn = str(tmp_path / "out2")
    _checkpoint(only_torn, 2, torn=True)
    assert latest_checkpoint(only_torn) is None
    assert resume_point(TrainConfig(store="s", student="m", out=only_torn), 0) == (None, None)  # a fresh start


# -- the campaigns ---------------------------------------------------------------------------------
def _report(campaign) -> str:
    kills = [f"{o.trigger.what}: {'killed' if o.killed else f'exit {o.returncode}'}" for o in campaign.outcomes]
    return "\n".join(["kills:", *kills, "violations:", *campaign.violations])


@pytest.mark.slow
def test_generate_killed_at_random_moments_commits_every_record_exactly_once_as_an_uninterrupted_run(
        tmp_path, tiny_teacher_dir):
    """Three kills: a seeded delay after the writers start (the random moment), after a hidden-state
    chunk (mid-shard) and between a commit record's temporary file and its link (mid-commit-record);
    after each, what is committed is what the reference run wrote, each record once, and the store
    verifies. The final rerun completes the store: identical records (ids, tokens, targets, hidden
    states, byte for byte), nothing left behind. (Kills at the manifest's creation and at a lease: the
    regression test above; a kill just after the N-th commit record and every kill point, many times:
    bench/reliability.py.)"""
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(24, seed=SEED))
    kinds = ["delay", "hidden-chunk", "commit-record"]
    campaign, reference = generate_campaign(tiny_teacher_dir, prompts, str(tmp_path), kinds, seed=SEED, log=print)
    assert campaign.violations == [], _report(campaign)
    assert campaign.landed >= len(kinds) - 1, _report(campaign)  # (a seeded delay may outlast a fast run)
    left = [s for lefts in campaign.left_behind for s in lefts]
    assert any(s.startswith("commits/.") for s in left), left  # the kills landed where they were aimed
    assert any(s.startswith("shards/") for s in left), left  # a shard without its commit record

    store = str(tmp_path / f"killed-{SEED}.store")
    ids, records = store_contents(store)
    assert sorted(ids) == sorted(reference.records) and len(ids) == 24
    assert records == reference.records
    assert strays(store) == []  # the final rerun itself removed every leftover, lease and temporary file
    verify = run_main(["store", "verify", "--clean", store])
    assert verify.returncode == 0 and verify.stdout.startswith("OK: "), verify.stdout + verify.stderr


@pytest.mark.slow
def test_store_copy_killed_at_random_moments_ends_identical_to_its_source(tmp_path):
    """A store of 24 one-record shards (hidden states in several chunk files each), copied with five
    kills: a seeded delay (the random moment), mid-shard (after a file; halfway through a file), just
    after a commit, at a lease. After each, every commit record at the destination and every file it
    names are the source's; after the final rerun the destination is the source, file for file and
    byte for byte, and nothing else. (Kills creating the destination and mid-commit-record: the
    regression tests above; a kill on the N-th new commit and every kill point, many times:
    bench/reliability.py.)"""
    source = str(tmp_path / "source.store")
    build_copy_source(source, shards=24, seed=SEED)
    kinds = ["delay", "copy-file", "copy-file-torn", "after-commit", "lease"]
    campaign = copy_campaign(source, str(tmp_path), kinds, seed=SEED, log=print)
    assert campaign.violations == [], _report(campaign)
    assert campaign.landed >= len(kinds) - 1, _report(campaign)
    left = [s for lefts in campaign.left_behind for s in lefts]
    assert any(s.startswith("shards/") for s in left), left  # a shard copied in part

    dest = str(tmp_path / f"copy-{SEED}.store")
    assert files_under(dest) == files_under(source)
    assert strays(dest) == [] and store_contents(dest) == store_contents(source)
    verify = run_main(["store", "verify", dest])
    assert verify.returncode == 0 and verify.stdout.startswith("OK: 24 shards"), verify.stdout + verify.stderr


@pytest.mark.slow
def test_train_killed_at_random_moments_resumes_to_the_same_loss_curve_and_weights(
        tmp_path, tiny_teacher_dir, tiny_tokenizer_dir):
    """Three kills of `potstill train` (one loader worker, hidden-state loss, a checkpoint every 3 of
    16 steps, 2 kept): halfway through a checkpoint's trainer_state.json, a seeded delay after a
    checkpoint folder appears, halfway through writing the finished student. Each rerun resumes
    (`--resume`) from the newest complete checkpoint, never from one cut short; the final loss curve,
    step by step, and the final weights equal an uninterrupted run's. (A run that dies between two
    checkpoints: tests/test_train.py's crash after a step, in-process; the kill point after a
    step's backward pass, many times: bench/reliability.py.)"""
    store = str(tmp_path / "store")
    build_teacher_store(store, tiny_teacher_dir, arithmetic_items(30, seed=SEED), shard_records=6, layer_indices=(2,))
    student = build_student(str(tmp_path / "student"), tiny_tokenizer_dir, hidden=16)
    setup = TrainSetup(store, student, max_steps=16, save_steps=3, save_total_limit=2)
    kinds = ["checkpoint-state-torn", "delay", "final-save"]
    campaign, (ref_report, ref_weights) = train_campaign(setup, str(tmp_path), kinds, seed=SEED, log=print)
    assert campaign.violations == [], _report(campaign)
    assert all(o.killed for o in campaign.outcomes if o.trigger.point), _report(campaign)
    assert any(lefts for lefts in campaign.left_behind), campaign.left_behind  # a checkpoint was cut short

    out = str(tmp_path / f"killed-out-{SEED}")
    report, weights = train_result(out)
    assert [e["step"] for e in report["loss_curve"]] == list(range(1, 17))
    assert report["loss_curve"] == ref_report["loss_curve"]  # every logged value, exactly
    assert weights == ref_weights
    assert complete_checkpoints(out) == [15, 16]  # what the uninterrupted run keeps; nothing cut short is left
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-15", "checkpoint-16"]


def test_store_export_killed_at_random_moments_leaves_no_part_file_and_ends_whole(tmp_path):
    """Two kills of `store export` from outside (seeded delays after the start or after its partial
    file appears): the file is absent or whole after each, and the rerun's equals an uninterrupted export."""
    source = str(tmp_path / "source.store")
    build_copy_source(source, shards=24, seed=SEED)
    campaign, _ = export_campaign(source, str(tmp_path), kills=2, seed=SEED, log=print)
    assert campaign.violations == [], _report(campaign)
    assert campaign.landed >= 1, _report(campaign)
    assert not os.path.exists(str(tmp_path / f"export-{SEED}.parquet.partial"))


# -- byte damage: a seeded slice of bench/bytedamage.py ---------------------------------------------
@pytest.fixture(scope="module")
def byte_slice(tmp_path_factory) -> list[bytedamage.Result]:
    """Seed 11: one file of each kind of a small store (three writers, hidden states in several chunk
    files), each flipped, zeroed and cut short (each in another third: every third of every file is
    damaged once), extended, and deleted (not the commit record: that is a shard never committed):
    44 faults (98 with every way in every third), each checked by verify and a checked read. (Every
    way in every third of 16 files of each kind: bench/reliability.py `bytes`.)"""
    from potstill.store import open_store

    tmp_path = tmp_path_factory.mktemp("bytes")
    pristine, scratch = str(tmp_path / "pristine"), str(tmp_path / "scratch")
    build_copy_source(pristine, shards=4, seed=SEED)
    shutil.copytree(pristine, scratch)
    records = {c.shard: c.records for c in open_store(pristine).commits}
    return [bytedamage.run_trial(scratch, t, SEED, records, pristine)
            for t in bytedamage.trial_plan(pristine, SEED, files_per_kind=1, every_third=False)]


def test_every_damaged_byte_is_named_by_verify_and_loses_nothing_else(byte_slice):
    """Every fault of the slice: `verify` names the damaged file or its shard and nothing else (never
    a traceback), `--clean` removes nothing, and no record of another shard is lost."""
    results = byte_slice
    kinds = {r.kind for r in results}
    assert len(results) >= 40 and set(bytedamage.FILE_KINDS) <= kinds, kinds
    verify_failures = [f"{r.trial.name}: {r.why}" for r in results
                       if not r.survived and "checked read" not in r.why]
    assert verify_failures == []
    assert sum(r.lost for r in results) == 0


def test_a_checked_read_refuses_every_damaged_shard_file(byte_slice):
    assert [f"{r.trial.name}: {r.why}" for r in byte_slice if not r.survived] == []
