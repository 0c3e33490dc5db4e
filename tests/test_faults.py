"""Fault injection: `kill -9` of real `potstill generate`, `store copy` and `train` processes at
seeded random moments (from outside, and at kill points inside: mid-shard, mid-commit-record,
mid-checkpoint), each followed by a rerun of the same command, then compared with an uninterrupted
reference run: every record exactly once and byte for byte the same, every copied file the same,
the same loss curve and weights; nothing left behind. The campaigns live in tests/faultcampaigns.py
(bench/reliability.py runs them at a larger scale); the kill points in tests/killpoints.py.

Each campaign collects what it finds as `violations`, one sentence each, so that a failure says
which kill broke what.
"""

from __future__ import annotations

import os

from faultcampaigns import Trigger, build_copy_source, files_under, generate_args, run_potstill, strays
from genhelpers import prompt_rows, run_cli, write_jsonl

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

    listed = run_cli(["store", "verify", store])
    assert listed.returncode == 0, listed.stderr
    assert f"leftover    {temp[0]}: temporary file; never linked" in listed.stdout, listed.stdout
    cleaned = run_cli(["store", "verify", "--clean", store])
    assert cleaned.returncode == 0 and f"removed     {temp[0]}" in cleaned.stdout, cleaned.stdout
    assert strays(store) == [] and os.path.exists(os.path.join(store, "manifest.json"))


# -- train: regression -----------------------------------------------------------------------------
def _checkpoint(out: str, step: int, torn: bool = False) -> str:
    """A checkpoint folder's two state files as the Trainer and the loader write them; `torn`: the
    trainer state cut in half, as a kill while the Trainer writes it (in place) leaves it."""
    import json

    from transformers import TrainerState

    folder = os.path.join(out, f"checkpoint-{step}")
    os.makedirs(folder)
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
    from student_train import TrainConfig
    from student_train.trainer import latest_checkpoint, resume_point

    out = str(tmp_path / "out")
    good = _checkpoint(out, 2)
    _checkpoint(out, 4, torn=True)
    assert latest_checkpoint(out) == good
    assert resume_point(TrainConfig(store="s", student="m", out=out, resume=True), 0)[0] == good

    only_torn = str(tmp_path / "out2")
    _checkpoint(only_torn, 2, torn=True)
    assert latest_checkpoint(only_torn) is None
    assert resume_point(TrainConfig(store="s", student="m", out=only_torn), 0) == (None, None)  # a fresh start
