"""Ids files (format §3) and everything that goes by them: duplicates, the split, resume.

The vectorised code is compared with the per-id code it replaced (kept here as the reference) on
the same ids: random ids, ids repeated across shards committed in another order than their names,
the eval floor, and 64-bit key collisions forced through the key function.
"""

from __future__ import annotations

import bisect
import copy
import hashlib
import json
import os

import numpy as np
import pyarrow as pa
import pytest
from common import TOKENIZER_FILES, make_manifest, random_record
from faults import write_commit

from potstill.store import StoreError, create_store, open_store, verify_store
from potstill.store import ids as ids_module
from potstill.store import reader as reader_module
from potstill.store.ids import id_key, id_keys, ids_file_bytes, key_fractions
from potstill.student_train.data import (
    MIN_EVAL_RECORDS,
    MIN_TRAIN_SHARE,
    eval_cut,
    held_out_rows,
    id_fraction,
    plan_split,
)


# -- the per-id reference (the code before ids files) --------------------------------------------------
def ref_fraction(record_id: str) -> float:
    return int.from_bytes(hashlib.sha256(record_id.encode("utf-8")).digest()[:8], "big") / 2.0**64


def ref_eval_cut(record_ids, eval_fraction: float) -> float:
    if eval_fraction <= 0:
        return 0.0
    fractions = sorted({ref_fraction(i) for i in record_ids})
    held = bisect.bisect_left(fractions, eval_fraction)
    if held >= MIN_EVAL_RECORDS or len(fractions) * (1 - MIN_TRAIN_SHARE) < MIN_EVAL_RECORDS:
        return eval_fraction
    return fractions[MIN_EVAL_RECORDS]


def ref_duplicates(commits: list[tuple[str, str, list[str]]]) -> dict[str, list[tuple[int, str]]]:
    """commits: (shard, created_at, ids)."""
    first: dict[str, str] = {}
    found: dict[str, list[tuple[int, str]]] = {}
    for shard, _, ids in sorted(commits, key=lambda c: (c[1], c[0])):
        for row, rid in enumerate(ids):
            if rid in first:
                found.setdefault(shard, []).append((row, first[rid]))
            else:
                first[rid] = shard
    return found


def ref_split(commits, names, eval_fraction):
    """(train rows per shard, held-out (shard, row)s, duplicates skipped, cut) as plan_split computed them."""
    by_name = {c[0]: c for c in commits}
    duplicates = ref_duplicates([by_name[n] for n in names])
    cut = ref_eval_cut([i for n in names for i in by_name[n][2]], eval_fraction)
    train, held, skipped = [], [], 0
    for name in names:
        keep = np.array([ref_fraction(i) >= cut for i in by_name[name][2]], dtype=bool)
        eval_keep = ~keep
        for row, _ in duplicates.get(name, []):
            keep[row] = eval_keep[row] = False
            skipped += 1
        train.append(np.flatnonzero(keep).tolist())
        held += [(name, int(r)) for r in np.flatnonzero(eval_keep)]
    return train, held, skipped, cut


# -- helpers ---------------------------------------------------------------------------------------------
def build(tmp_path, shards: list[list[str]], created: list[str] | None = None, name: str = "s") -> str:
    """A store of one shard per list of ids (records of 2-4 tokens, no hidden states); `created` rewrites
    each commit record's created_at (commit order other than name order)."""
    m = make_manifest(k=2, layers=(), vocab=20)
    url = str(tmp_path / name)
    store = create_store(url, m, TOKENIZER_FILES)
    rng = np.random.default_rng(0)
    with store.writer("w", shard_records=10**6) as w:
        for ids in shards:
            for rid in ids:
                w.write(copy.deepcopy(random_record(rng, rid, m, n=int(rng.integers(2, 5)))))
            w.commit()
    for i, stamp in enumerate(created or []):
        path = os.path.join(url, "commits", f"w-{i:06d}.json")
        with open(path) as f:
            obj = json.load(f)
        obj["created_at"] = stamp
        write_commit(path, obj)  # (its checksum recomputed)
    return url


def commits_of(url):
    s = open_store(url)
    return [(c.shard, c.created_at, s.shard_ids(c.shard).to_pylist()) for c in s.commits]


# -- the ids file ------------------------------------------------------------------------------------------
def test_each_shard_has_its_ids_file_listed_and_matching_its_records(tmp_path):
    url = build(tmp_path, [["a", "b", "c"], ["d", "é", "f\u2603"]])
    store = open_store(url, verify_reads=True)
    for commit in store.commits:
        with open(os.path.join(url, "commits", f"{commit.shard}.json")) as f:
            assert "ids" not in json.load(f)  # small and fixed-size: no list of ids
        assert commit.ids_path == f"shards/{commit.shard}/ids.arrow"
        assert commit.ids_path in {f.path for f in commit.files}
        table = pa.ipc.open_file(pa.memory_map(os.path.join(url, commit.ids_path))).read_all()
        assert table.schema.names == ["id", "key"] and table.schema.field("key").type == pa.uint64()
        records = [r.id for r in store.iter_shard(commit.shard)]
        assert table.column("id").to_pylist() == records == store.shard_ids(commit.shard).to_pylist()
        want = [int.from_bytes(hashlib.sha256(i.encode()).digest()[:8], "big") for i in records]
        assert table.column("key").to_pylist() == want == store.shard_keys(commit.shard).tolist()
        assert [id_key(i) for i in records] == want
    index = store.id_index()
    assert index.ids().to_pylist() == ["a", "b", "c", "d", "é", "f\u2603"]
    assert index.shard.tolist() == [0, 0, 0, 1, 1, 1] and index.row.tolist() == [0, 1, 2, 0, 1, 2]
    assert store.commit("w-000001").shard == "w-000001"
    with pytest.raises(StoreError, match="no committed shard 'w-000009'"):
        store.commit("w-000009")
    assert verify_store(url).ok


def test_key_fractions_are_the_per_id_fractions_exactly():
    rng = np.random.default_rng(5)
    keys = np.concatenate([rng.integers(0, 2**63, 5000, dtype=np.uint64) * np.uint64(2) + np.uint64(1),
                           np.array([0, 1, 2**53 + 1, 2**63 - 1, 2**63 + 1, 2**64 - 1, 2**64 - 1025], dtype=np.uint64)])
    assert key_fractions(keys).tolist() == [int(k) / 2.0**64 for k in keys.tolist()]
    ids = [f"id-{i}-{rng.integers(1 << 30)}" for i in range(2000)]
    assert key_fractions(id_keys(ids)).tolist() == [ref_fraction(i) for i in ids] == [id_fraction(i) for i in ids]


def _damage(url: str, shard: str) -> str:
    path = os.path.join(url, "shards", shard, "ids.arrow")
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        at = data.index(b"r1")  # an id's bytes: the file still parses
        data[at] ^= 0x01
        f.seek(0)
        f.write(data)
    return path


def test_a_damaged_ids_file_is_named_by_verify_and_by_every_read_that_uses_it(tmp_path):
    url = build(tmp_path, [["r0", "r1", "r2"], ["r3", "r4"]])
    _damage(url, "w-000000")
    report = verify_store(url)
    assert [str(p) for p in report.problems] == [
        "shard w-000000: file shards/w-000000/ids.arrow fails its sha256 check (corrupted bytes)"]
    where = "shards/w-000000/ids.arrow: fails its sha256 check"
    for strict_read in (lambda s: s.shard_ids("w-000000"), lambda s: s.id_index(), lambda s: s.committed_mask(["r0"]),
                        lambda s: plan_split(s, 0.1, 1, 0), lambda s: s.duplicates()):
        with pytest.raises(StoreError, match=where):
            strict_read(open_store(url))
    with pytest.raises(StoreError, match=where):  # training's checked reads: the shard's ids against its records
        open_store(url, verify_reads=True).shard("w-000000")


def _reseal_ids(url: str, data: bytes) -> None:
    """Shard w-000000's ids file replaced by `data`, its commit record resealed, as a buggy writer would."""
    with open(os.path.join(url, "shards", "w-000000", "ids.arrow"), "wb") as f:
        f.write(data)
    path = os.path.join(url, "commits", "w-000000.json")
    with open(path) as f:
        obj = json.load(f)
    for entry in obj["files"]:
        if entry["path"].endswith("ids.arrow"):
            entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    obj["bytes"] = sum(e["bytes"] for e in obj["files"])
    write_commit(path, obj)


def test_ids_that_differ_from_the_records_are_named_though_their_checksum_matches(tmp_path):
    url = build(tmp_path, [["r0", "r1", "r2"]])
    _reseal_ids(url, ids_file_bytes(["r0", "rX", "r2"]).to_pybytes())
    report = verify_store(url)
    assert [str(p) for p in report.problems] == [
        "shard w-000000: ids file differs from the records' ids at row 1 ('rX', record 'r1') "
        "(shards/w-000000/ids.arrow)"]
    with pytest.raises(StoreError, match="ids.arrow: ids file differs from the records' ids at row 1"):
        open_store(url, verify_reads=True).shard("w-000000")


def test_a_key_that_is_not_its_ids_key_is_named_though_its_checksum_matches(tmp_path):
    url = build(tmp_path, [["r0", "r1", "r2"]])
    keys = id_keys(["r0", "r1", "r2"])
    keys[2] ^= np.uint64(1 << 40)
    _reseal_ids(url, ids_file_bytes(["r0", "r1", "r2"], keys).to_pybytes())
    report = verify_store(url)
    assert [str(p) for p in report.problems] == [
        "shard w-000000: ids file's key of id 'r2' (row 2) is not its id's key (shards/w-000000/ids.arrow)"]
    with pytest.raises(StoreError, match="ids.arrow: ids file's key of id 'r2' \\(row 2\\) is not its id's key"):
        open_store(url, verify_reads=True).shard("w-000000")


def test_a_commit_record_without_its_ids_file_is_damage(tmp_path):
    url = build(tmp_path, [["r0"]])
    path = os.path.join(url, "commits", "w-000000.json")
    with open(path) as f:
        obj = json.load(f)
    obj["files"] = [e for e in obj["files"] if not e["path"].endswith("ids.arrow")]
    write_commit(path, obj)  # resealed, as a buggy writer would
    with pytest.raises(StoreError, match="commit record does not list shards/w-000000/ids.arrow"):
        open_store(url)


# -- collisions --------------------------------------------------------------------------------------------
@pytest.fixture
def colliding_keys(monkeypatch):
    """Every id's key is its length: distinct ids of one length collide on all 64 bits."""
    def keys(ids):
        return np.array([len(i) for i in ids], dtype=np.uint64)
    for module in (ids_module, reader_module):
        monkeypatch.setattr(module, "id_keys", keys)
    monkeypatch.setattr(ids_module, "array_keys", lambda array: keys(array.to_pylist()))  # (the checks' keys)


def test_a_key_collision_never_skips_a_record_nor_makes_a_duplicate(tmp_path, colliding_keys):
    url = build(tmp_path, [["aa", "bb", "cc"], ["dd", "aa", "e"]], created=["2030-01-02", "2030-01-01"])
    store = open_store(url)
    assert store.shard_keys("w-000000").tolist() == [2, 2, 2]  # the forced keys are what was written
    asked = ["aa", "zz", "bb", "e", "f", "cc", "dd", "yy"]
    assert store.committed_mask(asked).tolist() == [True, False, True, True, False, True, True, False]
    # "aa" is the only id stored twice; w-000001 was committed first, so w-000000's copy is the later one
    assert store.duplicates() == {"w-000000": [(0, "w-000001")]}
    assert store.duplicates() == ref_duplicates(commits_of(url))


def test_committed_mask_of_a_large_random_set(tmp_path):
    rng = np.random.default_rng(3)
    stored = [f"p{int(x)}" for x in rng.choice(10**6, 300, replace=False)]
    url = build(tmp_path, [stored[:100], stored[100:250], stored[250:] + stored[:20]])
    asked = stored[::3] + [f"p{int(x)}" for x in rng.choice(10**6, 200)] + ["", "p"]
    want = [a in set(stored) for a in asked]
    assert open_store(url).committed_mask(asked).tolist() == want
    assert open_store(url).committed_mask([]).tolist() == []


# -- duplicates and the split against the reference -------------------------------------------------------
def _random_store(tmp_path, seed: int, shards: int, name: str = "s") -> str:
    rng = np.random.default_rng(seed)
    pool = [f"q{seed}-{i}" for i in range(400)]
    lists = [[pool[int(j)] for j in rng.choice(len(pool), int(rng.integers(1, 40)), replace=True)]
             for _ in range(shards)]  # repeats within and across shards
    created = [f"2030-01-{int(d):02d}T00:00:00" for d in rng.integers(1, 4, shards)]  # ties broken by name
    return build(tmp_path, lists, created, name)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_duplicates_and_splits_equal_the_per_id_reference(tmp_path, seed):
    url = _random_store(tmp_path, seed, shards=7)
    store = open_store(url)
    commits = commits_of(url)
    assert store.duplicates() == ref_duplicates(commits)
    assert store.num_duplicates == sum(len(v) for v in ref_duplicates(commits).values())
    names = store.shard_names
    for fraction in (0.0, 1e-9, 0.01, 0.1, 0.5):
        for pinned in (names, names[2:5][::-1]):
            plan = plan_split(store, fraction, 1, 0, pinned if pinned is not names else None)
            train, held, skipped, cut = ref_split(commits, pinned, fraction)
            assert [r.tolist() for r in plan.train_rows] == train
            assert plan.held_out == held and plan.duplicates == skipped and plan.eval_cut == cut
        assert held_out_rows(store, fraction) == ref_split(commits, names, fraction)[1]


@pytest.mark.parametrize("n", [0, 1, 8, 9, 31, 32, 33, 40, 300])
def test_eval_cut_floor_cases_equal_the_reference(n):
    rng = np.random.default_rng(n)
    ids = [f"x{int(i)}" for i in rng.integers(0, max(n, 1) * 2, n)]  # repeats: the floor counts distinct ids
    for fraction in (0.0, 1e-12, 0.001, 0.02, 0.2, 0.25, 0.9, 1.0):
        assert eval_cut(id_keys(ids), fraction) == eval_cut(ids, fraction) == ref_eval_cut(ids, fraction)
