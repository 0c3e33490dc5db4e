"""Hidden states on disk (format §5): one sharded Zarr array per layer per shard, read by potstill in
one ranged read per record and by plain zarr alike, each inner chunk checked by its crc32c."""

from __future__ import annotations

import copy
import hashlib
import json
import os

import google_crc32c
import numpy as np
import pytest
import zarr
from common import TOKENIZER_FILES, make_manifest, random_record
from faults import write_commit

from potstill.store import StoreError, create_store, decode_hidden, open_store, verify_store
from potstill.store.hidden import CRC

LAYERS = ((2, 12, "bfloat16"), (5, 12, "float16"))
CHUNK = 8


def _store(tmp_path, n=40, shard_records=20, url=None):
    """Records of 1-29 tokens (so many span inner chunks of 8 rows), two shards, both dtypes."""
    url = url or str(tmp_path / "s")
    m = make_manifest(layers=LAYERS, chunk_tokens=CHUNK)
    store = create_store(url, m, TOKENIZER_FILES)
    rng = np.random.default_rng(7)
    recs = []
    with store.writer("w", shard_records=shard_records) as w:
        for i in range(n):
            rec = random_record(rng, f"r{i}", m, n=int(rng.integers(2, 30)))
            recs.append(rec)
            w.write(copy.deepcopy(rec))  # the writer takes over its arrays
    return url, recs


def _float64(bits_or_half: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values in float64, computed apart from potstill: bfloat16 by its sign, exponent and mantissa."""
    if dtype == "float16":
        return bits_or_half.astype(np.float64)
    b = bits_or_half.astype(np.int64)
    sign, exp, man = np.where(b >> 15, -1.0, 1.0), (b >> 7) & 0xFF, b & 0x7F
    return sign * np.where(exp == 0, man / 128.0 * 2.0**-126, (1 + man / 128.0) * 2.0 ** (exp - 127.0))


def _data_file(url, shard, layer):
    return os.path.join(url, "shards", shard, "hidden", f"layer_{layer}", "c", "0", "0")


@pytest.mark.parametrize("verify_reads", [False, True])
def test_records_read_bit_exact_across_inner_chunks(tmp_path, verify_reads):
    url, recs = _store(tmp_path)
    store = open_store(url, verify_reads=verify_reads)
    spanning = 0
    for i, want in enumerate(recs):
        got = store.record(i, with_hidden=True)
        for index, dtype in ((2, "bfloat16"), (5, "float16")):
            assert got.hidden[index].dtype == want.hidden[index].dtype
            assert got.hidden[index].tobytes() == want.hidden[index].tobytes()
            np.testing.assert_array_equal(decode_hidden(got.hidden[index], dtype).astype(np.float64),
                                          _float64(want.hidden[index], dtype))
    for reader in (store.shard(name) for name in store.shard_names):
        for row in range(reader.num_records):
            a, b = reader.hidden_rows(row)
            spanning += b > a and a // CHUNK != (b - 1) // CHUNK
            out = np.empty((b - a, 12), dtype=np.float16)  # into a caller's buffer too
            assert reader.hidden_block(5, a, b, out=out) is out
    assert spanning >= 10  # the case this test is about


def test_a_record_spanning_inner_chunks_is_one_read(tmp_path, monkeypatch):
    url, recs = _store(tmp_path)
    reader = open_store(url).shard("w-000000")
    row = next(r for r in range(reader.num_records)
               if (lambda a, b: b - a > CHUNK + 1 and a % CHUNK)(*reader.hidden_rows(r)))
    reader.hidden(0, 2)  # the index is read once per array, before
    calls = []
    preadv = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, buffers, offset: calls.append(len(buffers)) or preadv(fd, buffers, offset))
    got = reader.hidden(row, 2)
    assert len(calls) == 1 and calls[0] >= 3  # rows of 2+ chunks, the crc32c between them to a scratch buffer
    assert got.tobytes() == recs[row].hidden[2].tobytes()


def test_few_files_per_layer_and_plain_zarr_reads_the_same(tmp_path):
    url, _ = _store(tmp_path, n=60, shard_records=30)
    store = open_store(url)
    for reader in (store.shard(name) for name in store.shard_names):
        hidden = os.path.join(url, "shards", reader.name, "hidden")
        files = sorted(os.path.relpath(os.path.join(d, f), hidden) for d, _, fs in os.walk(hidden) for f in fs)
        assert files == ["layer_2/c/0/0", "layer_2/zarr.json", "layer_5/c/0/0", "layer_5/zarr.json", "zarr.json"]
        rows = reader.commit.hidden_rows
        assert rows > 10 * CHUNK  # the old layout had one file per inner chunk here
        for index in (2, 5):
            plain = zarr.open_array(os.path.join(hidden, f"layer_{index}"), mode="r")[:]
            assert plain.shape == (rows, 12)
            assert plain.tobytes() == reader.hidden_block(index, 0, rows).tobytes()
            starts = [reader.hidden_rows(r) for r in range(reader.num_records)]
            assert plain[starts[3][0] : starts[3][1]].tobytes() == reader.hidden(3, index).tobytes()


def test_a_remote_store_reads_the_same(tmp_path):
    url, recs = _store(tmp_path, url="memory://hidden-remote")
    store = open_store(url, verify_reads=True)
    for i, want in enumerate(recs):
        got = store.record(i, with_hidden=True)
        assert all(got.hidden[k].tobytes() == want.hidden[k].tobytes() for k in want.hidden)
    assert verify_store(url).ok


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def test_damage_in_one_inner_chunk_is_named_on_read_and_by_verify(tmp_path):
    url, recs = _store(tmp_path)
    stride = CHUNK * 12 * 2 + CRC
    _flip(_data_file(url, "w-000000", 2), 3 * stride + 5)  # inner chunk 3: rows 24-31
    messages = [str(p) for p in verify_store(url).problems]
    assert len(messages) == 1 and "w-000000" in messages[0] and "layer_2/c/0/0" in messages[0], messages
    assert "sha256" in messages[0] and "inner chunk 3 (rows 24-31) fails its crc32c" in messages[0]

    reader = open_store(url, verify_reads=True).shard("w-000000")
    clean = next(r for r in range(reader.num_records) if reader.hidden_rows(r)[1] <= 3 * CHUNK)
    assert reader.hidden(clean, 2).tobytes() == recs[clean].hidden[2].tobytes()  # other chunks still read
    hit = next(r for r in range(reader.num_records) if (lambda a, b: a <= 3 * CHUNK + 1 < b)(*reader.hidden_rows(r)))
    with pytest.raises(StoreError, match=r"w-000000/hidden/layer_2/c/0/0: inner chunk 3 \(rows 24-31\) fails its crc32c"):
        reader.hidden(hit, 2)
    with pytest.raises(StoreError, match="inner chunk 3"):
        reader.check_hidden(hit, 2)  # the loader's check before use: refused again, never marked good


def test_damaged_index_and_truncation_are_named(tmp_path):
    url, _ = _store(tmp_path)
    path = _data_file(url, "w-000001", 5)
    _flip(path, os.path.getsize(path) - CRC - 3)  # inside the shard index
    with pytest.raises(StoreError, match="layer_5/c/0/0: its shard index fails its crc32c check"):
        open_store(url).shard("w-000001").hidden(0, 5)
    messages = [str(p) for p in verify_store(url).problems]
    assert len(messages) == 1 and "layer_5/c/0/0" in messages[0] and "shard index" in messages[0], messages
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(StoreError, match="layer_5/c/0/0: has .* bytes, the store lists"):
        open_store(url, verify_reads=True).shard("w-000001").hidden(0, 5)


@pytest.mark.parametrize("layer,infinity", [(2, 0x7F80), (5, 0x7C00)])
def test_non_finite_values_written_whole_are_refused(tmp_path, layer, infinity):
    """A data file whose checksums all match but which holds an inf (another tool's writer): verify and
    training reads refuse it, naming the inner chunk."""
    url, _ = _store(tmp_path)
    path = _data_file(url, "w-000000", layer)
    stride = CHUNK * 12 * 2 + CRC
    with open(path, "r+b") as f:
        f.seek(stride)  # inner chunk 1, its first value
        f.write(int(infinity).to_bytes(2, "little"))
        f.seek(stride)
        data = f.read(stride - CRC)
        f.write(int(google_crc32c.value(data)).to_bytes(4, "little"))
    commit_path = os.path.join(url, "commits", "w-000000.json")
    with open(commit_path) as f:
        commit = json.load(f)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    for entry in commit["files"]:
        if entry["path"].endswith(f"layer_{layer}/c/0/0"):
            entry["sha256"] = digest
    write_commit(commit_path, commit)  # resealed, as a buggy writer would
    messages = [str(p) for p in verify_store(url).problems]
    assert len(messages) == 1 and f"layer_{layer}/c/0/0: inner chunk 1 (rows 8-15) holds 1 non-finite" in messages[0]
    reader = open_store(url, verify_reads=True).shard("w-000000")
    hit = next(r for r in range(reader.num_records) if (lambda a, b: a <= CHUNK < b)(*reader.hidden_rows(r)))
    with pytest.raises(StoreError, match="inner chunk 1 .* holds 1 non-finite value"):
        reader.hidden(hit, layer)


def test_a_shard_without_hidden_rows(tmp_path):
    m = make_manifest(layers=LAYERS, chunk_tokens=CHUNK)
    url = str(tmp_path / "e")
    store = create_store(url, m, TOKENIZER_FILES)
    rng = np.random.default_rng(1)
    with store.writer("w") as w:
        for i in range(3):
            rec = random_record(rng, f"e{i}", m, n=5)
            rec.hidden_start = 5
            rec.hidden = {k: v[:0] for k, v in rec.hidden.items()}
            w.write(copy.deepcopy(rec))  # the writer takes over its arrays
    assert verify_store(url).ok
    got = open_store(url, verify_reads=True).record(1, with_hidden=True)
    assert got.hidden[2].shape == (0, 12) and got.hidden[5].shape == (0, 12)
    assert zarr.open_array(os.path.join(url, "shards", "w-000000", "hidden", "layer_2"), mode="r")[:].shape == (0, 12)
