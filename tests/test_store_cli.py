"""`potstill store info | verify | export | copy` as a user runs them: each command, and each exit 1 for
damage, as a real process; the further cases through the same entry point in this process."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from common import TOKENIZER_FILES, make_manifest, random_record
from genhelpers import run_main

from potstill.store import create_store


def process(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "potstill.cli.main", *args], capture_output=True, text=True, timeout=120)


def potstill(*args: str) -> subprocess.CompletedProcess:
    return run_main(list(args))


def one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def store_url(tmp_path):
    url = str(tmp_path / "cli.store")
    m = make_manifest(layers=((3, 16, "bfloat16"),), chunk_tokens=8)
    store = create_store(url, m, TOKENIZER_FILES)
    rng = np.random.default_rng(11)
    with store.writer("w0", shard_records=4) as w:
        for i in range(10):
            w.write(copy.deepcopy(random_record(rng, f"id{i}", m)))
    return url


def test_info(store_url):
    out = process("store", "info", store_url, "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["records"] == 10 and info["shards"] == 3
    assert info["targets"]["k"] == 8 and info["hidden_layers"][0]["index"] == 3
    assert info["fields"]["topk_ids"]["bytes"] > 0 and info["fields"]["hidden/layer_3"]["bytes"] > 0
    assert info["bytes_per_scored_token"] > 0
    text = potstill("store", "info", store_url)
    assert text.returncode == 0 and "records      10" in text.stdout and "topk_ids" in text.stdout


def test_verify_and_clean(store_url):
    out = process("store", "verify", store_url)
    assert out.returncode == 0 and out.stdout.startswith("OK: 3 shards, 10 records"), out.stdout
    os.makedirs(os.path.join(store_url, "shards", "deadwriter-000000"))
    out = potstill("store", "verify", store_url)
    assert out.returncode == 0 and "leftover" in out.stdout and "deadwriter-000000" in out.stdout
    assert os.path.isdir(os.path.join(store_url, "shards", "deadwriter-000000"))
    out = potstill("store", "verify", store_url, "--clean")
    assert out.returncode == 0 and "removed" in out.stdout
    assert not os.path.exists(os.path.join(store_url, "shards", "deadwriter-000000"))

    path = os.path.join(store_url, "shards", "w0-000002", "records.arrow")
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    out = process("store", "verify", store_url)
    assert out.returncode == 1
    assert "BAD   shard w0-000002: file shards/w0-000002/records.arrow fails its sha256 check" in out.stderr
    assert "FAILED: 1 problem(s)" in out.stdout


def test_export_parquet_and_jsonl_load_with_datasets(store_url, tmp_path):
    import datasets

    pq_path, jl_path = str(tmp_path / "out.parquet"), str(tmp_path / "out.jsonl")
    assert process("store", "export", store_url, "--to", pq_path).returncode == 0
    assert potstill("store", "export", store_url, "--to", jl_path).returncode == 0
    ds = datasets.load_dataset("parquet", data_files=pq_path, split="train")
    assert ds.num_rows == 10 and ds[3]["id"] == "id3"
    assert {"prompt", "messages", "completion", "generated", "rationale", "answer", "input_ids", "score_start"} <= set(ds.column_names)
    with open(jl_path) as f:
        rows = [json.loads(line) for line in f]
    assert [r["id"] for r in rows] == [f"id{i}" for i in range(10)]
    assert rows[0]["meta"]["source"] == "unit"
    assert rows[0]["input_ids"] == ds[0]["input_ids"]
    one_line_error(potstill("store", "export", store_url, "--to", str(tmp_path / "x.csv")), ".parquet or .jsonl")


def test_user_errors_are_one_line(store_url, tmp_path):
    one_line_error(process("store", "info", str(tmp_path / "missing")), "no such store")
    (tmp_path / "plain").mkdir()
    one_line_error(potstill("store", "verify", str(tmp_path / "plain")), "not a potstill store")
    path = os.path.join(store_url, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    written_as = manifest["format_version"]
    manifest["format_version"] = "3.0"
    with open(path, "w") as f:
        json.dump(manifest, f)
    one_line_error(potstill("store", "info", store_url), "format 3.0", "upgrade potstill")
    manifest["format_version"] = written_as
    with open(path, "w") as f:
        json.dump(manifest, f)
    os.remove(os.path.join(store_url, "shards", "w0-000001", "records.arrow"))
    one_line_error(potstill("store", "export", store_url, "--to", str(tmp_path / "o.jsonl")), "w0-000001/records.arrow", "missing")
    assert not os.path.exists(tmp_path / "o.jsonl") and not os.path.exists(tmp_path / "o.jsonl.partial")
    out = process("store", "verify", store_url)
    assert out.returncode == 1 and "w0-000001" in out.stderr and "Traceback" not in out.stderr


def test_copy_checks_checksums_and_refuses_other_stores(store_url, tmp_path):
    dst = str(tmp_path / "copy.store")
    proc = process("store", "copy", store_url, dst)
    assert proc.returncode == 0, proc.stderr
    assert "copied 3 shards (10 records" in proc.stdout
    assert potstill("store", "verify", dst).returncode == 0
    again = potstill("store", "copy", store_url, dst)
    assert again.returncode == 0 and "copied 0 shards" in again.stdout and "3 already there" in again.stdout

    # a different store at the destination is never mixed in
    other = str(tmp_path / "other.store")
    create_store(other, make_manifest(k=4), TOKENIZER_FILES)
    one_line_error(potstill("store", "copy", store_url, other), other, "another store")
    # nor a folder that is not a store
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("x")
    one_line_error(potstill("store", "copy", store_url, str(tmp_path / "notes")), "not a potstill store")

    # a corrupted source shard stops the copy before that shard is committed at the destination
    shard = sorted(os.listdir(os.path.join(store_url, "shards")))[1]
    arrow = os.path.join(store_url, "shards", shard, "records.arrow")
    with open(arrow, "rb") as f:
        data = bytearray(f.read())
    data[len(data) // 2] ^= 0xFF
    with open(arrow, "wb") as f:
        f.write(bytes(data))
    fresh = str(tmp_path / "fresh.store")
    proc = process("store", "copy", store_url, fresh)
    progress = [ln for ln in proc.stderr.splitlines() if ln.startswith("  [")]
    assert progress == ["  [1/3] w0-000000"]  # the progress before it, then the error in one line
    proc.stderr = "\n".join(ln for ln in proc.stderr.splitlines() if not ln.startswith("  ["))
    one_line_error(proc, "records.arrow", "checksum")
    from potstill.store import open_store

    copied = open_store(fresh)
    assert shard not in copied.shard_names and len(copied.shard_names) == 1
    assert potstill("store", "verify", fresh).returncode == 0


def test_export_never_writes_inside_the_store_and_names_the_accepted_suffixes(store_url, tmp_path):
    manifest = os.path.join(store_url, "manifest.json")
    commit = os.path.join(store_url, "commits", sorted(os.listdir(os.path.join(store_url, "commits")))[0])
    before = {p: Path(p).read_bytes() for p in (manifest, commit)}
    os.symlink(store_url, tmp_path / "via-link")
    for to in (manifest, commit, os.path.join(store_url, "export.parquet"), os.path.join(store_url, "shards", "x.jsonl"),
               str(tmp_path / "via-link" / "manifest.jsonl")):
        one_line_error(potstill("store", "export", store_url, "--to", to),
                       f"--to {to}: is inside the store {store_url}; write the export outside it")
    assert {p: Path(p).read_bytes() for p in before} == before
    assert not os.path.exists(os.path.join(store_url, "export.parquet"))
    assert not os.path.exists(os.path.join(store_url, "shards", "x.jsonl"))
    assert potstill("store", "verify", store_url).returncode == 0
    for name in ("x.json", "x.JSONL.gz", "x"):
        one_line_error(potstill("store", "export", store_url, "--to", str(tmp_path / name)),
                       "the file name must end in .parquet or .jsonl (one JSON record a line)")
        assert not os.path.exists(tmp_path / name)


def test_info_on_an_empty_store_says_it_holds_no_records_yet(tmp_path):
    url = str(tmp_path / "empty.store")
    create_store(url, make_manifest(chunk_tokens=8), TOKENIZER_FILES)
    text = process("store", "info", url)
    assert text.returncode == 0, text.stderr
    assert "None per token" not in text.stdout and "records      0 (no records yet)" in text.stdout, text.stdout
    assert "bytes        " in text.stdout and "field" not in text.stdout
    info = json.loads(potstill("store", "info", url, "--json").stdout)
    assert info["records"] == 0
