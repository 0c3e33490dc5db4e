"""Format 1.0's version rules (docs/reference/store-format.md §9): a store is written as 1.0 with an empty
`features` list; a store from before 1.0 (a manifest without `features`, or a commit record of another
major version) is refused in one line naming its version, by the API and by every command that opens
it, with no traceback; a store listing a feature this potstill does not know, or of a newer major
version, is refused naming what to do; a newer minor version is read, but not written to."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from common import TOKENIZER_FILES, make_manifest, random_record
from genhelpers import run_cli, run_main

from potstill.store import (
    FORMAT_VERSION,
    FormatVersionError,
    StoreError,
    TargetSpec,
    create_store,
    open_store,
)
from potstill.store.manifest import manifest_checksum

PRE_1_0 = "uses the pre-1.0 format {} (an experimental layout this potstill no longer reads): regenerate it with this potstill"


def _store(url: str, manifest=None) -> str:
    manifest = manifest or make_manifest(k=8, layers=())
    store = create_store(url, manifest, TOKENIZER_FILES)
    rng = np.random.default_rng(0)
    with store.writer("w0", shard_records=4) as w:
        for i in range(6):
            w.write(random_record(rng, f"r{i}", manifest, n=10))
    return url


def _rewrite(url: str, change, checksum: bool = True) -> None:
    """Edit a store's manifest as a file of another version would hold it (its checksum recomputed, or dropped)."""
    path = os.path.join(url, "manifest.json")
    with open(path) as f:
        obj = json.load(f)
    change(obj)
    obj.pop("checksum", None)
    if checksum:
        obj["checksum"] = manifest_checksum(obj)
    with open(path, "w") as f:
        json.dump(obj, f)


def _pre_1_0(obj: dict, version: str) -> None:
    obj["format_version"] = version
    del obj["features"]


def _one_line_error(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and " ... " not in ln]  # less train's start-up phases
    assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_a_new_store_is_1_0_with_no_features(tmp_path) -> None:
    url = _store(str(tmp_path / "s"))
    with open(os.path.join(url, "manifest.json")) as f:
        raw = json.load(f)
    assert FORMAT_VERSION == "1.0" and raw["format_version"] == "1.0" and raw["features"] == []
    store = open_store(url)
    assert store.manifest.format_version == "1.0" and store.manifest.features == [] and len(store) == 6
    assert all(c.format_version == "1.0" for c in store.commits)


@pytest.mark.parametrize("version, checksum", [("2.4", True), ("1.1", False), ("1.0", True)])
def test_a_pre_1_0_store_is_refused_in_one_line_naming_its_version(tmp_path, version: str, checksum: bool) -> None:
    url = _store(str(tmp_path / "old"))
    _rewrite(url, lambda obj: _pre_1_0(obj, version), checksum)
    with pytest.raises(FormatVersionError) as info:
        open_store(url)
    assert str(info.value) == f"store {url} " + PRE_1_0.format(version)
    run = run_cli if version == "2.4" else run_main  # (each command as a process once)
    for args in (["store", "info", url], ["store", "verify", url], ["store", "verify", url, "--clean"]):
        assert _one_line_error(run(args)) == f"error: store {url} " + PRE_1_0.format(version), args


@pytest.mark.slow
def test_training_from_a_pre_1_0_store_is_refused_in_one_line(tmp_path, tiny_tokenizer_dir) -> None:
    from common import build_student

    url = _store(str(tmp_path / "old"))
    _rewrite(url, lambda obj: _pre_1_0(obj, "2.4"))
    student = build_student(str(tmp_path / "student"), tiny_tokenizer_dir)
    proc = run_cli(["train", "--store", url, "--student", student, "--out", str(tmp_path / "run"), "--max-steps", "1",
                    "--report-to", "none", "--num-workers", "0"])
    assert PRE_1_0.format("2.4") in _one_line_error(proc)
    assert not os.path.exists(tmp_path / "run" / "training_report.json")


def test_a_pre_1_0_commit_record_is_refused_naming_it(tmp_path) -> None:
    url = _store(str(tmp_path / "s"))
    path = os.path.join(url, "commits", "w0-000000.json")
    with open(path) as f:
        obj = json.load(f)
    obj["format_version"] = "2.4"
    with open(path, "w") as f:
        json.dump(obj, f)
    with pytest.raises(FormatVersionError) as info:
        open_store(url)
    assert str(info.value) == f"{url}/commits/w0-000000.json " + PRE_1_0.format("2.4")
    info = run_cli(["store", "info", url])  # what info reports of a shard it cannot read
    assert info.returncode == 1 and "BAD  commits/w0-000000.json: uses the pre-1.0 format 2.4" in info.stdout


def test_a_store_listing_an_unknown_feature_is_refused_naming_it(tmp_path) -> None:
    url = _store(str(tmp_path / "s"))
    _rewrite(url, lambda obj: obj.update(format_version="1.3", features=["zstd-shards"]))
    with pytest.raises(FormatVersionError) as info:
        open_store(url)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"store {url} needs the format feature 'zstd-shards'")
    assert message.endswith("does not know: upgrade potstill")
    assert "zstd-shards" in _one_line_error(run_cli(["store", "verify", url]))


def test_a_newer_major_version_is_refused(tmp_path) -> None:
    url = _store(str(tmp_path / "s"))
    _rewrite(url, lambda obj: obj.update(format_version="2.0"))
    with pytest.raises(FormatVersionError) as info:
        open_store(url)
    message = str(info.value)
    assert "\n" not in message and f"store {url} uses format 2.0, newer than this potstill" in message
    assert message.endswith("reads (1.x): upgrade potstill")


def test_a_newer_minor_version_is_read_but_not_written_to(tmp_path) -> None:
    """A minor version only adds what older readers may ignore: a 1.0 reader reads the store, but does
    not add records to it, since it would leave out what the newer version adds."""
    manifest = make_manifest(k=8, layers=())
    url = _store(str(tmp_path / "s"), manifest)
    want = [r.id for r in open_store(url).iter_records()]

    def newer(obj: dict) -> None:
        obj.update(format_version="1.4", optional_index={"kind": "bloom"})
        obj["targets"]["some_new_key"] = 3

    _rewrite(url, newer)
    store = open_store(url)
    assert store.manifest.format_version == "1.4" and [r.id for r in store.iter_records()] == want
    with pytest.raises(StoreError, match="the store is of format 1.4, newer than this potstill writes .1.0.: upgrade"):
        create_store(url, make_manifest(k=8, layers=()), TOKENIZER_FILES, exist_ok=True)


@pytest.mark.parametrize("kind, key", [("topk", "tail_logprob"), ("sampled", "sampler"), ("topk", "codec")])
def test_a_manifest_without_a_required_targets_key_is_refused_naming_it(tmp_path, kind: str, key: str) -> None:
    base = make_manifest(k=8, layers=())
    targets = TargetSpec(kind=kind, k=8 if kind == "topk" else 0, samples=4 if kind == "sampled" else 0, seed=1,
                         sampling="test draws" if kind == "sampled" else None)
    url = str(tmp_path / "s")
    create_store(url, type(base)(teacher=base.teacher, tokenizer=base.tokenizer, targets=targets,
                                 generation={"mode": "test"}), TOKENIZER_FILES)
    _rewrite(url, lambda obj: obj["targets"].pop(key))
    with pytest.raises(StoreError) as info:
        open_store(url)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{url}/manifest.json:") and key in message
