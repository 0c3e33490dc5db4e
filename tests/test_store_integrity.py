"""A store never lies: duplicates are named by `verify` and skipped by readers, `info` says what it
did not check and fails on what it sees, `copy` commits atomically and repairs a damaged copy,
writers refuse values no teacher writes, dead writers' leases do not pile up."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from common import TOKENIZER_FILES, make_manifest, random_record

from potstill.store import StoreError, copy_store, create_store, open_store, verify_store


def potstill(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "potstill.cli.main", *args], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _store_with_duplicates(tmp_path) -> str:
    """Writer A commits r0..r9; writer B, later, commits r5..r9 again and r10..r12 (two runs on one store)."""
    url = str(tmp_path / "dup.store")
    m = make_manifest(layers=())
    store = create_store(url, m, TOKENIZER_FILES)
    rng = np.random.default_rng(0)
    with store.writer("wA", shard_records=5) as w:
        for i in range(10):
            w.write(random_record(rng, f"r{i}", m))
    with store.writer("wB", shard_records=8) as w:
        for i in range(5, 13):
            w.write(random_record(rng, f"r{i}", m))
    return url


def test_verify_names_duplicate_ids_and_their_shards(tmp_path):
    url = _store_with_duplicates(tmp_path)
    report = verify_store(url)
    assert not report.ok and report.duplicates == 5
    assert [str(p) for p in report.problems] == [
        "shard wB-000000: 5 record id(s) already committed in wA-000001 ('r5', 'r6', 'r7', ...); "
        "readers use the first committed copy and skip these"]
    out = potstill("store", "verify", url)
    assert out.returncode == 1 and "BAD   shard wB-000000: 5 record id(s) already committed" in out.stderr


def test_info_counts_each_id_once_says_it_did_not_verify_and_fails_on_what_it_sees(tmp_path):
    url = _store_with_duplicates(tmp_path)
    out = potstill("store", "info", url, "--json")
    assert out.returncode == 1
    info = json.loads(out.stdout)
    assert info["records"] == 13 and info["duplicates"] == 5 and info["verified"] is False
    assert info["problems"] == ["5 record(s) repeat an id committed earlier (readers skip them)"]
    text = potstill("store", "info", url)
    assert "records      13 (5 duplicate rows skipped)" in text.stdout and "not verified" in text.stdout

    clean = str(tmp_path / "clean.store")
    m = make_manifest(layers=())
    with create_store(clean, m, TOKENIZER_FILES).writer("w") as w:
        w.write(random_record(np.random.default_rng(1), "x", m))
    out = potstill("store", "info", clean)
    assert out.returncode == 0 and "integrity    not verified (`potstill store verify` hashes every file)" in out.stdout
    with open(os.path.join(clean, "commits", "w-000000.json"), "r+b") as f:
        f.truncate(20)
    out = potstill("store", "info", clean)
    assert out.returncode == 1 and "BAD  commits/w-000000.json: damaged commit record (not JSON)" in out.stdout


def test_export_writes_each_id_once(tmp_path):
    url = _store_with_duplicates(tmp_path)
    out = potstill("store", "export", url, "--to", str(tmp_path / "x.jsonl"))
    assert out.returncode == 0 and "wrote 13 records" in out.stdout and "5 duplicate rows" in out.stdout
    with open(tmp_path / "x.jsonl") as f:
        ids = [json.loads(line)["id"] for line in f]
    assert sorted(ids) == sorted(f"r{i}" for i in range(13))


def test_verify_of_a_newer_format_commit_gives_the_whole_message(tmp_path):
    url = _store_with_duplicates(tmp_path)
    path = os.path.join(url, "commits", "wA-000000.json")
    with open(path) as f:
        commit = json.load(f)
    commit["format_version"] = "9.0"
    with open(path, "w") as f:
        json.dump(commit, f)
    out = potstill("store", "verify", url)
    line = next(ln for ln in out.stderr.splitlines() if "wA-000000.json" in ln)
    assert out.returncode == 1
    assert "uses format 9.0, newer than this potstill" in line and "reads (1.x): upgrade potstill" in line, line


def test_writers_refuse_values_no_teacher_writes(tmp_path):
    m = make_manifest(layers=())
    store = create_store(str(tmp_path / "s"), m, TOKENIZER_FILES)
    rng = np.random.default_rng(2)
    cases = {
        "nan log-prob": lambda r: r.topk_logprobs.__setitem__((0, 1), np.nan),
        "positive log-prob": lambda r: r.topk_logprobs.__setitem__((0, 0), 0.5),
        "id beyond the vocabulary": lambda r: r.topk_ids.__setitem__((0, 2), 100),
        "log tail above 0": lambda r: r.tail_logprob.__setitem__(0, 0.5),
        "nan token log-prob": lambda r: r.token_logprob.__setitem__(0, np.nan),
        "input id beyond the vocabulary": lambda r: r.input_ids.__setitem__(0, 1000),
    }
    with store.writer("w") as w:
        for name, spoil in cases.items():
            rec = random_record(rng, name, m, n=12)
            rec.score_start = 2
            rec.topk_ids, rec.topk_logprobs = rec.topk_ids[-10:].copy(), rec.topk_logprobs[-10:].copy()
            rec.token_logprob, rec.tail_logprob = rec.token_logprob[-10:].copy(), rec.tail_logprob[-10:].copy()
            spoil(rec)
            with pytest.raises(StoreError, match=f"record '{name}'"):
                w.write(rec)
        w.write(random_record(rng, "fine", m))
    assert [r.id for r in open_store(str(tmp_path / "s")).iter_records()] == ["fine"]

    hidden = make_manifest(layers=((2, 8, "bfloat16"), (3, 8, "float16")))
    store = create_store(str(tmp_path / "h"), hidden, TOKENIZER_FILES)
    with store.writer("w") as w:
        for layer, infinity in ((2, np.uint16(0x7F80)), (3, np.float16(np.inf))):
            rec = random_record(rng, f"inf-{layer}", hidden, n=6)
            rec.hidden[layer][0, 0] = infinity
            with pytest.raises(StoreError, match=f"record 'inf-{layer}': hidden layer {layer} holds 1 non-finite"):
                w.write(rec)


def test_copy_commits_atomically_and_repairs_a_damaged_copy(tmp_path):
    src = str(tmp_path / "src")
    m = make_manifest(layers=((2, 8, "bfloat16"),), chunk_tokens=8)
    store = create_store(src, m, TOKENIZER_FILES)
    rng = np.random.default_rng(3)
    with store.writer("w", shard_records=3) as w:
        for i in range(9):
            w.write(copy.deepcopy(random_record(rng, f"c{i}", m)))
    dst = str(tmp_path / "dst")
    report = copy_store(src, dst)
    assert report.shards_copied == ["w-000000", "w-000001", "w-000002"]
    assert not [n for n in os.listdir(os.path.join(dst, "commits")) if n.startswith(".")]  # no temporary files left
    assert not os.listdir(os.path.join(dst, "writers"))  # the copy's leases are released

    # damage the copy: a commit record cut short, a data file flipped
    with open(os.path.join(dst, "commits", "w-000001.json"), "r+b") as f:
        f.truncate(30)
    with pytest.raises(StoreError, match="damaged commit record"):
        open_store(dst)
    report = copy_store(src, dst)  # the rerun does not skip the damaged shard for good: it copies it again
    assert report.shards_repaired == ["w-000001"] and report.shards_skipped == ["w-000000", "w-000002"]
    assert verify_store(dst).ok
    assert [r.id for r in open_store(dst).iter_records()] == [f"c{i}" for i in range(9)]


@pytest.mark.parametrize("jobs", [1, 2])
def test_verify_hashes_every_file_once_and_its_reads_take_them_as_checked(tmp_path, monkeypatch, jobs) -> None:
    """verify hashes each file of the store once (`hash_file`); the ids files it then reads for their
    content and the duplicates are not hashed again (`Store.note_verified`)."""
    from storehelpers import build_store

    from potstill.store import reader, verify

    url = build_store(str(tmp_path / "s"), "sampled", "compact", tail_logprob=None, layers=())
    hashed, digested = [], []
    real_hash, real_digest = verify.hash_file, reader._check_digest
    monkeypatch.setattr(verify, "hash_file", lambda path, *a: hashed.append(path) or real_hash(path, *a))
    monkeypatch.setattr(reader, "_check_digest", lambda data, entry, where: digested.append(where)
                        or real_digest(data, entry, where))
    report = verify_store(url, jobs=jobs)
    assert report.ok and report.shards == 3, report.problems
    files = [os.path.join(folder, name) for folder, _, names in os.walk(os.path.join(url, "shards")) for name in names]
    assert sorted(p for p in hashed if "/shards/" in p) == sorted(files)  # each once
    assert digested == []  # the ids files: read three times in all (content, duplicates), hashed by verify alone
