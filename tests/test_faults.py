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
