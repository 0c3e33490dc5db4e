"""`potstill store export --with-targets`: the teacher's targets in a Parquet file that `datasets`
loads, equal to what the store holds, for every kind of target and codec."""

from __future__ import annotations

import json
import subprocess
import sys

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
from storehelpers import build_store

from potstill.share.export import MANIFEST_KEY, export_store
from potstill.store import StoreError, open_store


def load(path: str, tmp_path) -> datasets.Dataset:
    return datasets.load_dataset("parquet", data_files=path, split="train", cache_dir=str(tmp_path / "hf-cache"))


@pytest.mark.parametrize("kind,codec,tail", [
    ("topk", "none", "direct"), ("topk", "packed", "complement"), ("topk", "none", "complement"), ("sampled", "packed", None),
    ("both", "none", "direct"), ("both", "packed", "direct"),
])
def test_exported_targets_equal_the_stores(tmp_path, kind: str, codec: str, tail: str | None) -> None:
    url = build_store(str(tmp_path / "s"), kind, codec, tail_logprob=tail, layers=(), records=9)
    out = str(tmp_path / "t.parquet")
    assert export_store(open_store(url, verify_reads=True), out, with_targets=True) == 9
    ds = load(out, tmp_path).with_format("numpy")
    records = list(open_store(url).iter_records())
    assert ds["id"][:].tolist() == [r.id for r in records]
    for i, rec in enumerate(records):
        row = ds[i]
        assert np.array_equal(row["input_ids"], rec.input_ids) and row["score_start"] == rec.score_start
        np.testing.assert_array_equal(row["token_logprob"], rec.token_logprob.astype(np.float32))
        if kind == "sampled":
            assert "topk_ids" not in row
        else:
            got_ids = np.array(list(row["topk_ids"]), dtype=np.int32).reshape(rec.num_scored, 8)
            got_lp = np.array(list(row["topk_logprobs"]), dtype=np.float32).reshape(rec.num_scored, 8)
            assert np.array_equal(got_ids, rec.topk_ids)
            np.testing.assert_array_equal(got_lp, rec.topk_logprobs.astype(np.float32))  # fp16 widens exactly
            np.testing.assert_array_equal(row["tail_logprob"], rec.tail_logprob)
        if kind == "topk":
            assert "sampled_ids" not in row
        else:
            for j in range(rec.num_scored):
                ids, counts = rec.sampled.position(j)
                assert list(row["sampled_ids"][j]) == ids.tolist()
                assert list(row["sampled_counts"][j]) == counts.tolist()
                assert sum(row["sampled_counts"][j]) == 40
    # who made the targets travels with them
    manifest = json.loads(pq.read_schema(out).metadata[MANIFEST_KEY])
    assert manifest["targets"]["kind"] == kind and manifest["teacher"]["name_or_path"] == "test-teacher"


def potstill(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "potstill.cli.main", *args], capture_output=True, text=True, timeout=120)


def test_cli_plain_export_has_no_targets_and_with_targets_adds_them(tmp_path) -> None:
    url = build_store(str(tmp_path / "s"), "both", "none", layers=((2, 16, "bfloat16"),), records=6)
    plain, full = str(tmp_path / "plain.parquet"), str(tmp_path / "full.parquet")
    assert potstill("store", "export", url, "--to", plain).returncode == 0
    proc = potstill("store", "export", url, "--to", full, "--with-targets")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"wrote 6 records to {full}"
    plain_cols, full_cols = set(pq.read_schema(plain).names), set(pq.read_schema(full).names)
    assert not plain_cols & {"token_logprob", "topk_ids", "sampled_ids"}  # what the docs say plain export omits
    assert full_cols - plain_cols == {"token_logprob", "topk_ids", "topk_logprobs", "tail_logprob", "sampled_ids",
                                      "sampled_counts"}
    assert not any("hidden" in c for c in full_cols)  # hidden states are never exported
    bad = potstill("store", "export", url, "--to", str(tmp_path / "t.jsonl"), "--with-targets")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        f"error: --to {tmp_path / 't.jsonl'}: teacher targets are exported to Parquet only; name the file .parquet"]


def test_a_damaged_shard_is_refused_before_its_targets_are_exported(tmp_path) -> None:
    url = build_store(str(tmp_path / "s"), "topk", "none", layers=(), records=6)
    arrow = sorted((tmp_path / "s" / "shards").glob("*/records.arrow"))[1]
    data = bytearray(arrow.read_bytes())
    data[len(data) // 2] ^= 0x01
    arrow.write_bytes(bytes(data))
    out = tmp_path / "t.parquet"
    with pytest.raises(StoreError, match="records.arrow: fails its sha256 check"):
        export_store(open_store(url, verify_reads=True), str(out), with_targets=True)
    assert not out.exists() and not (tmp_path / "t.parquet.partial").exists()
