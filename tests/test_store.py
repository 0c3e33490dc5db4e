"""The store format end to end: round trips, concurrency, crashes, corruption, escapes, versions."""

from __future__ import annotations

import copy
import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest
from common import TOKENIZER_FILES, make_manifest, random_record

from potstill.store import (
    FormatVersionError,
    Store,
    StoreError,
    create_store,
    decode_hidden,
    find_leftovers,
    open_store,
    verify_store,
)
from potstill.store.manifest import manifest_checksum

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")  # bench/common.py


def assert_same(got, want, with_hidden=True):
    assert got.id == want.id
    for name in ("input_ids", "topk_ids", "topk_logprobs", "token_logprob", "tail_mass"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype, name
        np.testing.assert_array_equal(a, b, err_msg=name)
    for name in ("score_start", "hidden_start", "sample_index", "prompt", "messages", "completion",
                 "generated", "rationale", "answer", "meta"):
        assert getattr(got, name) == getattr(want, name), name
    if with_hidden:
        assert set(got.hidden) == set(want.hidden)
        for k in want.hidden:
            assert got.hidden[k].dtype == want.hidden[k].dtype
            np.testing.assert_array_equal(got.hidden[k], want.hidden[k])


def write_records(store, writer_id, records, **kw):
    with store.writer(writer_id, **kw) as w:
        for r in records:
            w.write(copy.deepcopy(r))
    return w.committed


@pytest.mark.parametrize(
    "logprob_dtype,layers",
    [("float16", ((2, 16, "bfloat16"), (0, 8, "float16"))), ("float32", ()), ("float16", ((4, 24, "bfloat16"),))],
)
def test_round_trip_every_field(tmp_path, logprob_dtype, layers):
    m = make_manifest(k=8, layers=layers, logprob_dtype=logprob_dtype, chunk_tokens=16)
    url = str(tmp_path / "s")
    store = create_store(url, m, TOKENIZER_FILES)
    rng = np.random.default_rng(1)
    recs = [random_record(rng, f"r{i:03d}", m) for i in range(45)]
    commits = write_records(store, "wA", recs, shard_records=20)
    assert [c.records for c in commits] == [20, 20, 5]

    store = open_store(url)
    assert store.num_records == 45
    assert store.num_tokens == sum(len(r.input_ids) for r in recs)
    assert store.num_scored_tokens == sum(r.num_scored for r in recs)
    assert store.shard_names == ["wA-000000", "wA-000001", "wA-000002"]
    for i, want in enumerate(recs):  # random access by global index, hidden states included
        assert_same(store.record(i, with_hidden=True), want)
    got = list(store.iter_records(with_hidden=True))
    for g, want in zip(got, recs, strict=True):
        assert_same(g, want)
    assert [r.id for r in store.iter_shard("wA-000001")] == [r.id for r in recs[20:40]]
    for layer in m.hidden.layers:  # one record's hidden states, decoded exactly
        h = store.hidden(7, layer.index)
        want = recs[7].hidden[layer.index]
        np.testing.assert_array_equal(decode_hidden(h, layer.dtype), decode_hidden(want, layer.dtype))
    with open(os.path.join(url, "tokenizer", "tokenizer.json"), "rb") as f:
        assert f.read() == TOKENIZER_FILES["tokenizer.json"]
    assert verify_store(url).ok


def test_bad_record_is_named_and_nothing_committed_is_touched(tmp_path):
    m = make_manifest()
    store = create_store(str(tmp_path / "s"), m, TOKENIZER_FILES)
    rng = np.random.default_rng(2)
    good = [random_record(rng, f"g{i}", m) for i in range(3)]
    write_records(store, "wA", good)
    bad = random_record(rng, "broken-7", m)
    bad.topk_ids = bad.topk_ids[:, :3]
    with store.writer("wB") as w, pytest.raises(StoreError, match="record 'broken-7': topk_ids has shape"):
        w.write(bad)
    store = open_store(str(tmp_path / "s"))
    assert [r.id for r in store.iter_records()] == ["g0", "g1", "g2"]
    assert verify_store(str(tmp_path / "s")).ok


def test_create_refuses_other_settings(tmp_path):
    url = str(tmp_path / "s")
    create_store(url, make_manifest(k=8), TOKENIZER_FILES)
    assert create_store(url, make_manifest(k=8), TOKENIZER_FILES, exist_ok=True).manifest.targets.k == 8
    with pytest.raises(StoreError, match="already exists"):
        create_store(url, make_manifest(k=8), TOKENIZER_FILES)
    with pytest.raises(StoreError, match=r"other settings: targets\.k: store has 8, this run has 4$"):
        create_store(url, make_manifest(k=4), TOKENIZER_FILES, exist_ok=True)


def _writer_process(url: str, writer_id: str, seed: int, count: int) -> None:
    sys.path.insert(0, BENCH)
    from common import make_manifest, random_record

    store = open_store(url)
    rng = np.random.default_rng(seed)
    m = make_manifest()
    with store.writer(writer_id, shard_records=7) as w:
        for i in range(count):
            w.write(random_record(rng, f"{writer_id}-r{i}", m))


def test_several_writer_processes_at_once(tmp_path):
    url = str(tmp_path / "s")
    create_store(url, make_manifest(), TOKENIZER_FILES)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer_process, args=(url, f"node{i}", i, 20)) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    store = open_store(url)
    ids = [r.id for r in store.iter_records()]
    assert sorted(ids) == sorted(f"node{i}-r{j}" for i in range(3) for j in range(20))
    assert len(store.commits) == 9  # 20 records in shards of 7: 7 + 7 + 6, per writer
    report = verify_store(url)
    assert report.ok and report.records == 60 and not report.leftovers
    assert not os.listdir(os.path.join(url, "writers"))  # leases released on close


KILLED_WRITER = textwrap.dedent(
    """
    import copy, sys, time
    sys.path.insert(0, {bench!r})
    import numpy as np
    from common import make_manifest, random_record
    from potstill.store import open_store
    store = open_store({url!r})
    m = make_manifest(chunk_tokens=4)
    rng = np.random.default_rng(5)
    w = store.writer("crashy", shard_records=10)
    for i in range(16):          # one committed shard of 10, then 6 pending records
        w.write(random_record(rng, f"c{{i}}", m, n=30))
    print("ready", flush=True)   # pending hidden chunks are already on disk now
    time.sleep(60)
    """
)


def test_writer_killed_mid_shard_leaves_no_visible_partial_shard(tmp_path):
    url = str(tmp_path / "s")
    create_store(url, make_manifest(chunk_tokens=4), TOKENIZER_FILES)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER.format(bench=BENCH, url=url)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = os.path.join(url, "shards", "crashy-000001")
    assert os.path.isdir(partial) and os.listdir(partial)  # the crash did leave files behind

    store = open_store(url)
    assert store.shard_names == ["crashy-000000"]
    assert [r.id for r in store.iter_records(with_hidden=True)] == [f"c{i}" for i in range(10)]
    leftovers = find_leftovers(store)  # the folder, and the lease the killed writer could not remove
    assert [(x.path, x.kind, x.live) for x in leftovers] == [
        ("shards/crashy-000001", "uncommitted shard", False), ("writers/crashy.json", "stale lease", False)]

    report = verify_store(url)  # without --clean: reported, not touched
    assert report.ok and [x.path for x in report.leftovers] == ["shards/crashy-000001", "writers/crashy.json"]
    assert os.path.isdir(partial)
    report = verify_store(url, clean=True)
    assert report.cleaned == ["shards/crashy-000001", "writers/crashy.json"] and not os.path.exists(partial)
    assert verify_store(url).ok and not verify_store(url).leftovers
    assert not os.listdir(os.path.join(url, "writers"))
    # the same writer id carries on after the crash without reusing a shard name
    rng = np.random.default_rng(9)
    write_records(open_store(url), "crashy", [random_record(rng, "later", make_manifest(chunk_tokens=4))])
    assert open_store(url).shard_names == ["crashy-000000", "crashy-000001"]


def test_live_writer_shard_is_not_a_leftover(tmp_path):
    url = str(tmp_path / "s")
    store = create_store(url, make_manifest(), TOKENIZER_FILES)
    w = store.writer("busy", shard_records=100)
    w.write(random_record(np.random.default_rng(0), "x", store.manifest))
    os.makedirs(os.path.join(url, "shards", "busy-000000"), exist_ok=True)
    report = verify_store(url, clean=True)
    assert [(x.path, x.live) for x in report.leftovers] == [("shards/busy-000000", True)] and report.cleaned == []
    w.close()
    assert open_store(url).num_records == 1


def _snapshot(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


def _small_store(tmp_path, n=12, layers=((2, 16, "bfloat16"),)):
    url = str(tmp_path / "s")
    m = make_manifest(layers=layers, chunk_tokens=8)
    store = create_store(url, m, TOKENIZER_FILES)
    rng = np.random.default_rng(3)
    write_records(store, "wA", [random_record(rng, f"r{i}", m, n=20) for i in range(n)], shard_records=6)
    return url


def test_flipped_byte_and_truncated_file_are_named(tmp_path):
    url = _small_store(tmp_path)
    arrow = os.path.join(url, "shards", "wA-000000", "records.arrow")
    chunk = os.path.join(url, "shards", "wA-000001", "hidden", "layer_2", "c", "0", "0")
    with open(arrow, "r+b") as f:  # flip one byte in the middle of the data
        f.seek(os.path.getsize(arrow) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    with open(chunk, "r+b") as f:
        f.truncate(os.path.getsize(chunk) - 10)
    before = _snapshot(url)
    report = verify_store(url)
    assert not report.ok
    messages = [str(p) for p in report.problems]
    assert any("wA-000000" in m and "records.arrow" in m and "sha256" in m for m in messages), messages
    assert any("wA-000001" in m and "layer_2/c/0/0" in m and "truncated" in m for m in messages), messages
    assert len(messages) == 2
    assert _snapshot(url) == before  # verify never writes


def test_missing_shard_file_is_one_line(tmp_path):
    url = _small_store(tmp_path)
    os.remove(os.path.join(url, "shards", "wA-000001", "records.arrow"))
    store = open_store(url)
    with pytest.raises(StoreError, match=r"wA-000001/records.arrow: shard file is missing"):
        store.record(8)
    assert store.record(2).id == "r2"  # the other shard still reads
    report = verify_store(url)
    assert [str(p) for p in report.problems] == ["shard wA-000001: file shards/wA-000001/records.arrow is missing"]


@pytest.mark.parametrize(
    "bad_path",
    ["../../../etc/passwd", "/etc/passwd", "shards/wA-000000/../../manifest.json", "shards/other/records.arrow",
     "s3://elsewhere/x", "shards/wA-000000//records.arrow"],
)
def test_commit_paths_that_escape_are_rejected(tmp_path, bad_path):
    url = _small_store(tmp_path)
    commit_path = os.path.join(url, "commits", "wA-000000.json")
    with open(commit_path) as f:
        commit = json.load(f)
    commit["files"].append({"path": bad_path, "bytes": 1, "sha256": "00"})
    with open(commit_path, "w") as f:
        json.dump(commit, f)
    with pytest.raises(StoreError, match="escapes"):
        open_store(url)
    report = verify_store(url)
    assert not report.ok and any("commits/wA-000000.json" in str(p) and "escapes" in str(p) for p in report.problems)


def test_manifest_paths_that_escape_are_rejected(tmp_path):
    url = _small_store(tmp_path)
    path = os.path.join(url, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    manifest["tokenizer"]["files"][0]["path"] = "tokenizer/../../secret"
    with open(path, "w") as f:
        json.dump(manifest, f)
    with pytest.raises(StoreError, match="escapes"):
        open_store(url)


def test_newer_major_version_is_refused_older_minor_read(tmp_path):
    url = _small_store(tmp_path)
    path = os.path.join(url, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    manifest["format_version"] = "1.7"  # a newer minor: only additions, still readable
    manifest["some_future_key"] = {"x": 1}
    manifest["checksum"] = manifest_checksum(manifest)  # as that newer potstill writes it
    with open(path, "w") as f:
        json.dump(manifest, f)
    assert open_store(url).num_records == 12
    manifest["format_version"] = "3.0"
    with open(path, "w") as f:
        json.dump(manifest, f)
    with pytest.raises(FormatVersionError, match=r"uses format 3.0, newer than this potstill .* reads \(1.x\): upgrade"):
        open_store(url)


@pytest.mark.parametrize("edit", ["created_at", "field_bytes key", "key renamed"])
def test_a_commit_record_edited_after_it_was_written_fails_its_checksum(tmp_path, edit):
    """Fields no reader needs (a creation time, a report's byte counts) are covered too: any edit is damage."""
    url = _small_store(tmp_path)
    path = os.path.join(url, "commits", "wA-000001.json")
    with open(path) as f:
        commit = json.load(f)
    if edit == "created_at":
        commit["created_at"] = "2001-01-01T00:00:00Z"
    elif edit == "field_bytes key":
        commit["field_bytes"]["renamed"] = commit["field_bytes"].pop(next(iter(commit["field_bytes"])))
    else:
        commit["created_by"] = commit.pop("created_at")
    with open(path, "w") as f:
        json.dump(commit, f)
    with pytest.raises(StoreError, match=r"commits/wA-000001.json: damaged commit record \(fails its checksum"):
        open_store(url)
    report = verify_store(url)
    assert not report.ok and [p.where for p in report.problems] == ["commits/wA-000001.json"], report.problems


def test_newer_major_commit_is_refused(tmp_path):
    url = _small_store(tmp_path)
    path = os.path.join(url, "commits", "wA-000001.json")
    with open(path) as f:
        commit = json.load(f)
    commit["format_version"] = "3.1"
    with open(path, "w") as f:
        json.dump(commit, f)
    with pytest.raises(FormatVersionError, match="wA-000001.json uses format 3.1"):
        open_store(url)


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "not-an-object", "wrong-type"])
def test_damaged_commit_record_is_bad_and_its_shard_is_kept(tmp_path, damage):
    """Commit records are written atomically, so one that does not parse is damage, never a crash:
    verify reports it BAD (exit 1) and nothing (not --clean, not a generate rerun) deletes its shard."""
    url = _small_store(tmp_path)
    path = os.path.join(url, "commits", "wA-000001.json")
    with open(path, "rb") as f:
        data = f.read()
    damaged = {
        "truncate": data[: len(data) // 2],
        "flip": data[:10] + bytes([data[10] ^ 0x55]) + data[11:],
        "empty": b"",
        "not-an-object": b"[1, 2, 3]",
        "wrong-type": data.replace(b'"records": 6', b'"records": "six"'),
    }[damage]
    assert damaged != data
    with open(path, "wb") as f:
        f.write(damaged)
    shard_files = _snapshot(os.path.join(url, "shards", "wA-000001"))
    with pytest.raises(StoreError, match=r"commits/wA-000001.json: damaged commit record .*kept"):
        open_store(url)  # a strict reader (training, generate, copy) refuses rather than read less
    report = verify_store(url, clean=True)
    assert not report.ok and [p.where for p in report.problems] == ["commits/wA-000001.json"]
    assert "damaged commit record" in str(report.problems[0]) and "kept" in str(report.problems[0])
    assert report.leftovers == [] and report.cleaned == []
    assert _snapshot(os.path.join(url, "shards", "wA-000001")) == shard_files  # nothing deleted
    lenient = Store(url, strict=False)
    assert lenient.shard_names == ["wA-000000"] and lenient.bad_commits[0][0] == "wA-000001"


def test_temporary_commit_file_of_a_dead_writer_is_a_leftover(tmp_path):
    url = _small_store(tmp_path)
    tmp = os.path.join(url, "commits", ".wA-000002.json.4242-abcd1234.tmp")  # an atomic write cut short
    with open(tmp, "wb") as f:
        f.write(b'{"shard": "wA-00')
    os.makedirs(os.path.join(url, "shards", "wA-000002"))
    store = open_store(url)
    assert store.shard_names == ["wA-000000", "wA-000001"]  # never read as a commit
    kinds = {(x.path, x.kind) for x in find_leftovers(store)}
    assert kinds == {("shards/wA-000002", "uncommitted shard"), ("commits/.wA-000002.json.4242-abcd1234.tmp", "temporary file")}
    report = verify_store(url, clean=True)
    assert report.ok and not os.path.exists(tmp) and not os.path.exists(os.path.join(url, "shards", "wA-000002"))
    assert open_store(url).num_records == 12


def test_commit_records_are_never_overwritten(tmp_path):
    from potstill.store.fs import write_bytes

    url = _small_store(tmp_path)
    path = os.path.join(url, "commits", "wA-000000.json")
    with open(path, "rb") as f:
        before = f.read()
    store = open_store(url)
    with pytest.raises(FileExistsError):
        write_bytes(store.fs, path, b"{}", exclusive=True, atomic=True)
    with open(path, "rb") as f:
        assert f.read() == before
    assert [n for n in os.listdir(os.path.join(url, "commits")) if n.startswith(".")] == []  # no temp left


def test_memory_store(tmp_path):
    url = "memory://potstill-tests/mem-store"
    m = make_manifest(layers=((1, 12, "bfloat16"),), chunk_tokens=8)
    store = create_store(url, m, TOKENIZER_FILES)
    rng = np.random.default_rng(4)
    recs = [random_record(rng, f"m{i}", m) for i in range(9)]
    write_records(store, "mem", recs, shard_records=4)
    store = open_store(url)
    assert store.num_records == 9
    for i, want in enumerate(recs):
        assert_same(store.record(i, with_hidden=True), want)
    assert verify_store(url).ok
    with open(os.path.join(store.tokenizer_dir, "tokenizer.json"), "rb") as f:
        assert f.read() == TOKENIZER_FILES["tokenizer.json"]
    store.fs.rm(store.root, recursive=True)


def test_a_remote_stores_tokenizer_is_cached_once_and_checked(tmp_path, monkeypatch):
    """A remote store's tokenizer is downloaded into the user cache once, by content: a second store
    with the same files reuses the copy, a damaged copy is replaced, nothing is left in the temp dir."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("POTSTILL_CACHE_DIR", str(cache))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    m = make_manifest(layers=(), chunk_tokens=8)
    urls = ["memory://potstill-tests/tok-a", "memory://potstill-tests/tok-b"]
    folders = []
    for url in urls:
        create_store(url, m, TOKENIZER_FILES)
        folders.append(open_store(url).tokenizer_dir)
    assert folders[0] == folders[1] and folders[0].startswith(str(cache / "tokenizers"))
    assert sorted(os.listdir(folders[0])) == sorted(TOKENIZER_FILES)
    assert os.listdir(cache / "tokenizers") == [os.path.basename(folders[0])]  # no staging folder left
    assert os.listdir(tmp_path / "tmp") == []

    with open(os.path.join(folders[0], "tokenizer.json"), "wb") as f:  # a damaged cached copy
        f.write(b"{}")
    assert open_store(urls[0]).tokenizer_dir == folders[0]
    with open(os.path.join(folders[0], "tokenizer.json"), "rb") as f:
        assert f.read() == TOKENIZER_FILES["tokenizer.json"]

    (tmp_path / "file").write_text("")  # a cache that cannot be made: one line, naming it
    monkeypatch.setenv("POTSTILL_CACHE_DIR", str(tmp_path / "file" / "cache"))
    with pytest.raises(StoreError, match=r"tok-b: cannot keep its tokenizer in .*file/cache/tokenizers .*POTSTILL_CACHE_DIR"):
        _ = open_store(urls[1]).tokenizer_dir
    monkeypatch.setenv("POTSTILL_CACHE_DIR", str(cache))

    other = {**TOKENIZER_FILES, "tokenizer.json": TOKENIZER_FILES["tokenizer.json"] + b" "}
    create_store("memory://potstill-tests/tok-c", m, other)  # other files: a folder of their own
    assert open_store("memory://potstill-tests/tok-c").tokenizer_dir != folders[0]

    store = open_store(urls[1])  # the store's own file damaged: refused, the cache left alone
    good = TOKENIZER_FILES["tokenizer.json"]
    store.fs.pipe(store.root + "/tokenizer/tokenizer.json", good[:-1] + b"!")
    shutil.rmtree(cache)
    with pytest.raises(StoreError, match="tok-b/tokenizer/tokenizer.json: fails its sha256 check"):
        _ = store.tokenizer_dir
    store.fs.pipe(store.root + "/tokenizer/tokenizer.json", good[:-1])
    with pytest.raises(StoreError, match=f"tokenizer.json: has {len(good) - 1} bytes, the store lists {len(good)}"):
        _ = open_store(urls[1]).tokenizer_dir
    assert os.listdir(cache / "tokenizers") == []
    for url in [*urls, "memory://potstill-tests/tok-c"]:
        store.fs.rm(url.removeprefix("memory://"), recursive=True)


def test_not_a_store_and_missing_store(tmp_path):
    with pytest.raises(StoreError, match="no such store"):
        open_store(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="is not a potstill store"):
        open_store(str(tmp_path / "empty"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="manifest.json: not valid JSON"):
        open_store(str(tmp_path / "junk"))
