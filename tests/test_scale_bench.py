"""bench/scale.py runs end to end at a tiny size: a store written through the real writer and a
metadata-only store, every step measured in a fresh process, and the table it prints."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


@pytest.mark.slow
def test_scale_bench_measures_every_step_at_a_tiny_size(tmp_path) -> None:
    out = tmp_path / "scale.json"
    run = subprocess.run([sys.executable, "scale.py", "--sizes", "1500", "--length", "8", "--metadata", "3000",
                          "--json", str(out)], cwd=BENCH, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = json.loads(out.read_text())
    assert [r["records"] for r in rows] == [1500, 3000]
    real, meta = rows
    assert real["shards"] == 2 and meta["shards"] == 3
    for key in ("write_s", "open_s", "split_s", "resume_s", "duplicates_s", "verify_s", "verify_quick_s", "hash_s"):
        assert real[key] > 0, key
    assert "verify_s" not in meta and meta["duplicates"] == 3  # the metadata store repeats 0.1 % of its ids
    # records, pieces, ids and commit record per shard, and the manifest
    assert round(real["files_per_1k_records"] * real["records"] / 1000) == 4 * real["shards"] + 1
    assert "| verify --jobs 1 |" in run.stdout and "| open |" in run.stdout
