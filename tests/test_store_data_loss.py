"""Data-loss holes: runs sharing a writer id, a damaged `commits` folder, impossible top-K targets and
`--out` mistakes. Each must end in one clear line, and nothing committed is ever lost."""

from __future__ import annotations

import os
import shutil

import pytest
from common import prompt_rows, write_jsonl
from genhelpers import popen_cli, run_cli, run_main

from potstill.store import open_store, verify_store


def _all_files(root: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, n), root) for d, _, names in os.walk(root) for n in names)


@pytest.mark.slow
def test_two_runs_with_one_writer_id_never_destroy_committed_shards(tmp_path, tiny_teacher_dir):
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(80, seed=11))
    store = str(tmp_path / "s")
    args = ["generate", "--teacher", tiny_teacher_dir, "--prompts", prompts, "--out", store, "--device", "cpu",
            "--no-progress", "--shard-records", "4", "--batch-tokens", "64", "--workers", "2"]
    # The store exists first, so each run claims its share right after reading its tokenizer and holds
    # the claim through its teacher's loading and scoring: the two runs surely overlap.
    seed_prompts = write_jsonl(str(tmp_path / "seed.jsonl"), [{"id": "seed", "prompt": "one seed", "completion": "prompt"}])
    seeded = run_cli([*args[:4], seed_prompts, *args[5:-2]])
    assert seeded.returncode == 0, seeded.stderr[-2000:]
    procs = [popen_cli([*args, "--writer-id", "shared", "--worker-index", str(i)]) for i in (0, 1)]
    results = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 1], results
    err = next(e for p, (_, e) in zip(procs, results, strict=True) if p.returncode == 1)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert "--writer-id shared is in use" in lines[0] and "pid" in lines[0], lines[0]
    report = verify_store(store)
    assert report.ok, [str(p) for p in report.problems]
    for i in (0, 1):  # a rerun of each share completes the store
        rerun = run_cli([*args, "--worker-index", str(i)])
        assert rerun.returncode == 0, rerun.stderr[-3000:]
    ids = open_store(store).id_index().ids().to_pylist()
    assert len(ids) == len(set(ids)) == 81  # the seed's and the 80
    report = verify_store(store)
    assert report.ok and not report.leftovers, [str(p) for p in report.problems]


def test_a_writer_id_held_in_this_process_is_refused_and_free_once_closed(tmp_path):
    from storehelpers import build_store

    from potstill.store import ShardWriter
    from potstill.store.leases import WriterIdInUse

    store = open_store(build_store(str(tmp_path / "s"), records=3))
    first = ShardWriter(store, "same")
    with pytest.raises(WriterIdInUse, match=rf"writer id same is in use .*pid {os.getpid()}"):
        ShardWriter(store, "same")
    first.close()
    ShardWriter(store, "same").close()


@pytest.fixture(scope="module")
def generated(tmp_path_factory, tiny_teacher_dir) -> tuple[str, list[str]]:
    """A store of 3 shards written by `generate` (in this process: only the commands that meet the
    damage need their own), and the generate command's flags, less --out."""
    from potstill.cli.main import app

    root = tmp_path_factory.mktemp("generated")
    prompts = write_jsonl(str(root / "p.jsonl"), prompt_rows(6, seed=12))
    flags = ["--teacher", tiny_teacher_dir, "--prompts", prompts, "--device", "cpu", "--no-progress",
             "--shard-records", "2"]
    assert not app(["generate", *flags, "--out", str(root / "s")], standalone_mode=False)
    return str(root / "s"), flags


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["a file", "missing"])
def test_a_damaged_commits_folder_is_damage_and_no_shard_is_deleted(tmp_path, generated, damage):
    store = str(tmp_path / "s")
    shutil.copytree(generated[0], store)
    args = ["generate", *generated[1], "--out", store]
    os.rename(os.path.join(store, "commits"), str(tmp_path / "commits-away"))
    if damage == "a file":
        with open(os.path.join(store, "commits"), "w") as f:
            f.write("not a folder")
    shard_files = _all_files(os.path.join(store, "shards"))
    assert len(shard_files) >= 3

    for command in (["store", "verify", store], ["store", "verify", "--clean", store], args):
        result = run_cli(command)
        out = (result.stdout + result.stderr).strip()
        assert result.returncode == 1 and "Traceback" not in out, (command, out)
        assert "commits" in out and "OK" not in out and "leftover" not in out, (command, out)
        if command[-2] == "--clean" or command is args:
            assert len([ln for ln in result.stderr.splitlines() if ln.strip()]) == 1, (command, result.stderr)
        assert _all_files(os.path.join(store, "shards")) == shard_files, command


@pytest.mark.parametrize("codec", ["none", "packed"])
@pytest.mark.parametrize("damage,what", [
    ("mass", "tail probabilities sum to"),
    ("same-id", "a top-k id is in two slots"),
    ("ascending", "not in descending order"),
])
def test_impossible_top_k_written_by_a_buggy_producer_fails_verify(tmp_path, codec, damage, what):
    """Values the writer takes (each a finite log-prob, each id in the vocabulary) that no
    distribution has: verify names the record and what is wrong, in either codec."""
    import copy

    import numpy as np
    from common import random_record
    from storehelpers import build_store

    store = open_store(build_store(str(tmp_path / "s"), "topk", codec, layers=(), records=3))
    rec = random_record(np.random.default_rng(5), "bad", store.manifest)
    k = store.manifest.targets.k
    if damage == "mass":
        rec.topk_logprobs[1] = np.log(7.9 / k)
    elif damage == "same-id":
        rec.topk_ids[1] = rec.topk_ids[1][0]
    else:
        rec.topk_logprobs[1] = np.sort(rec.topk_logprobs[1])
    with store.writer("w1") as w:
        w.write(copy.deepcopy(rec))
    problems = [str(p) for p in verify_store(store.url).problems]
    assert len(problems) == 1 and "record 'bad'" in problems[0] and what in problems[0], problems


@pytest.mark.parametrize("value", ["-1e-300", "-1e300", "-0.001"])
def test_a_logprob_min_the_quantiser_cannot_hold_is_refused_in_one_line(tmp_path, value):
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(2, seed=13))
    store = str(tmp_path / "s")
    result = run_cli(["generate", "--teacher", str(tmp_path / "no-model"), "--prompts", prompts, "--out", store,
                      "--targets", "topk", "--codec", "packed", f"--logprob-min={value}", "--no-progress"])
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "--logprob-min" in lines[0] and "must lie in [-1e+06, -0.004094]" in lines[0], lines[0]
    assert not os.path.exists(store)


def _out_mistake(tmp_path, mistake: str) -> str:
    if mistake == "a file":
        out = tmp_path / "out.txt"
        out.write_text("my notes\n")
    elif mistake == "under a file":
        (tmp_path / "notes.txt").write_text("my notes\n")
        out = tmp_path / "notes.txt" / "store"
    elif mistake == "a symlink loop":
        out = tmp_path / "loop"
        os.symlink(str(tmp_path / "loop"), str(out))
    else:  # a folder of other files
        out = tmp_path / "docs"
        out.mkdir()
        (out / "thesis.tex").write_text("keep me\n")
    return str(out)


@pytest.mark.parametrize("mistake,what", [
    ("a file", "is a file"),
    ("under a file", "is a file"),
    ("a symlink loop", "symbolic link"),
    ("other files", "is not a potstill store (it holds thesis.tex)"),
])
@pytest.mark.slow
def test_an_out_that_cannot_be_a_store_is_refused_in_one_line(tmp_path, tiny_teacher_dir, mistake, what):
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(2, seed=14))
    out = _out_mistake(tmp_path, mistake)
    before = _all_files(str(tmp_path))
    commands = [["generate", "--teacher", tiny_teacher_dir, "--prompts", prompts, "--out", out, "--device", "cpu",
                 "--no-progress"], ["store", "info", out], ["store", "verify", out]]
    run = run_cli if mistake == "a file" else run_main  # (each command as a process once)
    for command in commands if mistake != "other files" else commands[:1]:
        result = run(command)
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert result.returncode == 1 and len(lines) == 1 and "Traceback" not in result.stderr, (command, result.stderr)
        assert out in lines[0] and what in lines[0], (command, lines[0])
        if command[0] == "generate":
            assert "--out" in lines[0], lines[0]
    assert _all_files(str(tmp_path)) == before


@pytest.mark.slow
def test_a_run_that_writes_nothing_fails_saying_why(tmp_path, tiny_teacher_dir):
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(3, seed=15))
    store = str(tmp_path / "s")
    result = run_cli(["generate", "--teacher", tiny_teacher_dir, "--prompts", prompts, "--out", store, "--device", "cpu",
                      "--no-progress", "--max-length", "2"])
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    last = [ln for ln in result.stderr.splitlines() if ln.strip()][-1]
    assert "nothing was written" in last and "all 3 prompt(s) were skipped" in last and "longer than" in last, last
    assert not os.path.exists(store)
