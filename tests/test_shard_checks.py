"""Value checks over whole shards (docs/reference/store-format.md §8): the shard-level decoders read
every record exactly as the per-record decoders do and refuse exactly the records those refuse;
verify names the first record at fault; `--jobs N` gives the report of one job; `--quick`
checks commit records and file sizes without hashing."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pyarrow as pa
import pytest
from common import TOKENIZER_FILES, make_manifest, random_record
from faults import flip_bytes, rewrite_column
from typer.testing import CliRunner

from potstill.cli.main import app
from potstill.store import StoreError, TargetSpec, create_store, open_store, verify_store
from potstill.store.codec import (
    decode_sampled_compact,
    pack_bits,
    sampled_from_draws,
    unpack_bits,
    unpack_bits_shard,
)

VOCAB = 300


def _damaged(rng: np.random.Generator, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The streams with one bit flipped, cut short or given trailing bytes (or as they are)."""
    how = int(rng.integers(0, 6))
    a, b = a.copy(), b.copy()
    if how == 0 and len(a):
        a[rng.integers(len(a))] ^= np.uint8(1 << int(rng.integers(8)))
    elif how == 1 and len(b):
        b[rng.integers(len(b))] ^= np.uint8(1 << int(rng.integers(8)))
    elif how == 2:
        a = a[: rng.integers(0, len(a) + 1)]
    elif how == 3:
        b = b[: rng.integers(0, len(b) + 1)]
    elif how == 4:
        a = np.concatenate([a, rng.integers(0, 256, size=3).astype(np.uint8)])
    return a, b


def _flat(parts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    values = np.concatenate([np.zeros(0, np.uint8), *parts]).astype(np.uint8)
    return values, np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int32)


@pytest.mark.parametrize("bits", [1, 5, 12, 17, 32])
def test_unpacking_a_shard_gives_each_record_its_values(bits: int) -> None:
    rng = np.random.default_rng(bits)
    for k in (1, 3, 8):  # 8 values of any width fill whole bytes: the one-stream path
        counts = rng.integers(0, 20, size=9) * k
        values = [rng.integers(0, 1 << bits, size=c, dtype=np.uint64) for c in counts]
        flat, offsets = _flat([pack_bits(v, bits) if len(v) else np.zeros(0, np.uint8) for v in values])
        got = unpack_bits_shard(flat, offsets, counts, bits)
        want = np.concatenate([unpack_bits(flat[offsets[j]:offsets[j + 1]], c, bits) for j, c in enumerate(counts)])
        assert np.array_equal(got.astype(np.uint64), want) and np.array_equal(want, np.concatenate(values))


# -- stores ------------------------------------------------------------------------------------------
def _store(path: str, codec: str, kind: str = "sampled", records: int = 8, shard_records: int = 8,
           bad_id_in: int | None = None) -> str:
    base = make_manifest(k=8, layers=(), vocab=VOCAB)
    spec = TargetSpec(kind=kind, k=8 if kind != "sampled" else 0, samples=40 if kind != "topk" else 0, seed=7,
                      sampling="test draws" if kind != "topk" else None, codec=codec, sampler="systematic",
                      tail_logprob="direct" if kind != "sampled" else None, id_bits=9, logprob_bits=12,
                      logprob_min=-24.0, count_bits=6 if codec == "packed" and kind != "topk" else None,
                      id_order=[5, 3, 250, 7] if codec == "compact" else None)
    manifest = type(base)(teacher=base.teacher, tokenizer=base.tokenizer, targets=spec, hidden=base.hidden,
                          generation={"mode": "test"})
    store = create_store(path, manifest, TOKENIZER_FILES)
    rng = np.random.default_rng(3)
    with store.writer("w0", shard_records=shard_records) as w:
        for i in range(records):
            rec = random_record(rng, f"r{i:03d}", manifest, n=int(rng.integers(2, 30)))
            if kind == "sampled":
                rec.topk_ids = rec.topk_logprobs = rec.tail_logprob = None
            if kind != "topk":
                draws = rng.integers(0, VOCAB, size=(rec.num_scored, 40)) // rng.integers(1, 30)
                if i == bad_id_in:
                    draws[0, 0] = 400
                rec.sampled = sampled_from_draws(draws)
            w.write(copy.deepcopy(rec))
    return path


def _record_bytes(url: str, shard: str, column: str, row: int) -> tuple[int, int]:
    with pa.memory_map(os.path.join(url, "shards", shard, "records.arrow")) as source:
        offsets = pa.ipc.open_file(source).get_batch(0).column(column).offsets.to_numpy()
    return int(offsets[row]), int(offsets[row + 1])


def _break_compact_record(url: str, shard: str, row: int) -> str:
    """Flip the first bit of record `row`'s counts stream that the record decoder refuses; its error."""
    store = open_store(url)
    views = store.shard(shard).views
    a, b = _record_bytes(url, shard, "sampled_counts_packed", row)
    counts = views.batch.column("sampled_counts_packed").values.to_numpy().copy()
    ids = views.columns.streams["sampled_ids_packed"]
    spec = store.manifest.targets
    for bit in range((b - a) * 8):
        counts[a + bit // 8] ^= np.uint8(1 << (bit % 8))
        try:
            decode_sampled_compact(ids[1][ids[0][row]:ids[0][row + 1]], counts[a:b], int(views.columns.sampled_entries[row]),
                                    views.num_scored_of(row), spec.samples, 1 << spec.id_bits, id_order=spec.id_order_map)
        except StoreError:
            def flip(flat: np.ndarray, at: int = a + bit // 8, mask: int = 1 << (bit % 8)) -> None:
                flat[at] ^= np.uint8(mask)

            rewrite_column(url, shard, "sampled_counts_packed", flip)
            with pytest.raises(StoreError) as err:
                open_store(url).shard(shard).views.sampled_of(row)
            with pytest.raises(StoreError) as rows_err:  # the loader's rows, decoded on their own path
                open_store(url).shard(shard).views.columns.sampled_rows(row)
            assert str(rows_err.value) == str(err.value)
            return str(err.value)
        counts[a + bit // 8] ^= np.uint8(1 << (bit % 8))
    raise AssertionError("no single flipped bit is refused")


def test_verify_names_the_first_record_whose_compact_streams_do_not_decode(tmp_path) -> None:
    url = _store(str(tmp_path / "s"), "compact")
    assert verify_store(url).ok
    shard = open_store(url).shard_names[0]
    why = _break_compact_record(url, shard, 5)
    _break_compact_record(url, shard, 6)
    assert why.startswith("record 'r005': ")
    assert [str(p) for p in verify_store(url).problems] == [f"shard {shard}: {why}"]
    with pytest.raises(StoreError, match="record 'r005'"):
        open_store(url, verify_reads=True).shard(shard)


@pytest.mark.parametrize("codec,column", [("packed", None), ("compact", None), ("packed", "topk_ids_packed")])
def test_verify_names_the_first_record_with_an_id_the_vocabulary_lacks(tmp_path, codec: str, column: str | None) -> None:
    """9-bit ids hold up to 511; the vocabulary is 300: an id of 400 is named, in record r004."""
    kind = "topk" if column == "topk_ids_packed" else "sampled"
    url = _store(str(tmp_path / "s"), codec, kind)
    shard = open_store(url).shard_names[0]
    assert verify_store(url).ok
    if kind == "sampled":  # the writer takes what fits 9 bits: a draw of id 400 is written as is
        url = _store(str(tmp_path / "s2"), codec, kind, bad_id_in=4)
    else:
        lo, hi = _record_bytes(url, shard, column, 4)

        def put(flat: np.ndarray) -> None:
            values = unpack_bits(flat[lo:hi], (hi - lo) * 8 // 9, 9)
            values[0] = 400
            flat[lo:hi] = pack_bits(values, 9)[: hi - lo]

        rewrite_column(url, shard, column, put)
    shard = open_store(url).shard_names[0]
    problems = [str(p) for p in verify_store(url).problems]
    assert len(problems) == 1 and problems[0].startswith(f"shard {shard}: record 'r004': "), problems
    assert "[0, 300)" in problems[0], problems


def _damaged_store(tmp_path) -> str:
    url = _store(str(tmp_path / "s"), "compact", records=20, shard_records=4)
    names = open_store(url).shard_names
    flip_bytes(os.path.join(url, "shards", names[1], "records.arrow"), count=2, seed=1)
    _break_compact_record(url, names[3], 2)
    os.remove(os.path.join(url, "shards", names[4], "records.arrow"))
    return url


def test_verify_with_two_jobs_reports_what_one_job_reports(tmp_path) -> None:
    url = _damaged_store(tmp_path)
    one, two = verify_store(url, jobs=1), verify_store(url, jobs=2)
    assert [str(p) for p in one.problems] == [str(p) for p in two.problems] and len(one.problems) == 3
    assert (one.shards, one.records, one.tokens) == (two.shards, two.records, two.tokens)
    runner = CliRunner()
    outputs = [runner.invoke(app, ["store", "verify", "--json", "--jobs", jobs, url]) for jobs in ("1", "2")]
    assert outputs[0].exit_code == outputs[1].exit_code == 1
    assert json.loads(outputs[0].stdout) == json.loads(outputs[1].stdout)
    assert runner.invoke(app, ["store", "verify", "--jobs", "-1", url]).exit_code != 0


def test_quick_verify_checks_sizes_and_commit_records_without_hashing(tmp_path) -> None:
    url = _store(str(tmp_path / "s"), "compact", records=12, shard_records=4)
    names = open_store(url).shard_names
    runner = CliRunner()
    out = runner.invoke(app, ["store", "verify", "--quick", url])
    assert out.exit_code == 0 and "no checksum computed" in out.stdout, out.output
    flip_bytes(os.path.join(url, "shards", names[0], "records.arrow"), count=4, seed=2)  # same size
    assert verify_store(url, quick=True).ok and not verify_store(url, quick=True).hashed
    assert not verify_store(url).ok  # (the full verify hashes)
    arrow = os.path.join(url, "shards", names[1], "records.arrow")
    with open(arrow, "r+b") as f:
        f.truncate(os.path.getsize(arrow) - 10)
    os.remove(os.path.join(url, "shards", names[2], "records.arrow"))
    problems = [str(p) for p in verify_store(url, quick=True).problems]
    assert problems[0].startswith(f"shard {names[1]}: file shards/{names[1]}/records.arrow has ")
    assert problems[1] == f"shard {names[2]}: file shards/{names[2]}/records.arrow is missing"
    with open(os.path.join(url, "commits", f"{names[0]}.json"), "w") as f:
        f.write("{ not json")
    problems = [str(p) for p in verify_store(url, quick=True).problems]
    assert problems[0].startswith(f"commits/{names[0]}.json: ") and len(problems) == 3, problems
    out = runner.invoke(app, ["store", "verify", "--quick", "--json", url])
    assert out.exit_code == 1 and json.loads(out.stdout)["hashed"] is False


def test_verify_names_every_file_beside_a_committed_shards_own_in_every_mode(tmp_path) -> None:
    """A file a shard's commit record does not list (nested, or a link) is named with its shard by a
    full verify with any number of jobs and by a quick one; nothing else is named."""
    url = _store(str(tmp_path / "s"), "compact", records=12, shard_records=4)
    names = open_store(url).shard_names
    os.makedirs(os.path.join(url, "shards", names[1], "extra", "deep"))
    with open(os.path.join(url, "shards", names[1], "extra", "deep", "stray.bin"), "wb") as f:
        f.write(b"x")
    os.symlink(os.path.join(url, "manifest.json"), os.path.join(url, "shards", names[2], "link.json"))
    want = [f"shard {names[1]}: file shards/{names[1]}/extra/deep/stray.bin is not in its commit record",
            f"shard {names[2]}: file shards/{names[2]}/link.json is not in its commit record"]
    for how in ({"jobs": 1}, {"jobs": 2}, {"quick": True}):
        assert [str(p) for p in verify_store(url, **how).problems] == want, how


def test_verify_of_a_remote_store_lists_its_shards_once_and_names_the_same(tmp_path) -> None:
    """memory:// stands for object storage: a stray file and a missing one, named alike in every mode."""
    import fsspec

    url = _store(f"memory://{tmp_path.name}/s", "compact", records=12, shard_records=4)
    names = open_store(url).shard_names
    fs = fsspec.filesystem("memory")
    fs.pipe(f"/{tmp_path.name}/s/shards/{names[1]}/extra/stray.bin", b"x")
    fs.rm(f"/{tmp_path.name}/s/shards/{names[2]}/ids.arrow")
    want = [f"shard {names[1]}: file shards/{names[1]}/extra/stray.bin is not in its commit record",
            f"shard {names[2]}: file shards/{names[2]}/ids.arrow is missing"]
    try:
        for how in ({"jobs": 1}, {"jobs": 2}, {"quick": True}):
            assert [str(p) for p in verify_store(url, **how).problems] == want, how
    finally:
        fs.rm(f"/{tmp_path.name}", recursive=True)
