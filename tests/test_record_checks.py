"""Records checked one by one before their shard's whole check is done (format §3.1, §8): a training
loader's first batch reads only what it has checked against the pieces file, and damage it did not
read is still refused once its record, or the whole check, is reached."""

from __future__ import annotations

import os
import re
import threading

import numpy as np
import pyarrow as pa
import pytest
from common import TOKENIZER_FILES, make_manifest, random_record
from faults import rewrite_column

from potstill.store import StoreError, create_store, open_store
from potstill.store.pieces import PIECE_BYTES
from potstill.student_train import data
from potstill.student_train.data import StoreDataset

RECORDS, TOKENS, K = 24, 120, 64  # ~40 KB a record: pieces of its own, apart from the others'
BATCH = 4
DAMAGED = RECORDS // 2  # a record whose pieces hold no other column's offsets (opening checks those)


@pytest.fixture
def store_url(tmp_path) -> str:
    manifest = make_manifest(k=K, layers=(), vocab=200)
    store = create_store(str(tmp_path / "s"), manifest, TOKENIZER_FILES)
    rng = np.random.default_rng(5)
    with store.writer("w", shard_records=RECORDS) as w:
        for i in range(RECORDS):
            rec = random_record(rng, f"r{i:03d}", manifest, n=TOKENS)
            while rec.score_start > TOKENS // 4:  # most positions scored: a record's targets span pieces
                rec = random_record(rng, f"r{i:03d}", manifest, n=TOKENS)
            w.write(rec)
    return str(tmp_path / "s")


def _records_file(url: str) -> str:
    return os.path.join(url, "shards", "w-000000", "records.arrow")


def _byte_of(url: str, row: int) -> int:
    """Where in the records file a byte of record `row`'s top-k log-probs lies."""
    with pa.memory_map(_records_file(url)) as source:
        buffer = source.read_buffer()
    column = pa.ipc.open_file(buffer).get_batch(0).column("topk_logprobs")
    first = int(column.offsets[row].as_py()) * K * 2  # float16 log-probs
    return column.values.values.buffers()[1].address - buffer.address + first + 7


def _flip(url: str, at: int) -> None:
    with open(_records_file(url), "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0xFF]))


def test_a_record_is_checked_alone_and_damage_elsewhere_is_refused_when_reached(store_url: str) -> None:
    _flip(store_url, _byte_of(store_url, DAMAGED))
    reader = open_store(store_url, verify_reads=True).shard("w-000000", by_record=True)
    assert reader._pieces is not None and len(reader._pieces.crcs) > RECORDS * 40_000 // PIECE_BYTES
    for row in range(BATCH):  # far from the damage: their own pieces pass
        reader.check_records([row])
        assert reader.record(row).id == f"r{row:03d}" == reader.ids[row]
    assert reader._pieces.passed.sum() < len(reader._pieces.passed) // 2  # not the whole file
    with pytest.raises(StoreError, match=r"w-000000/records.arrow: fails its check \(corrupted bytes "):
        reader.check_records([DAMAGED])
    with pytest.raises(StoreError, match=r"w-000000/records.arrow: fails its sha256 check \(corrupted bytes\)"):
        open_store(store_url, verify_reads=True).shard("w-000000")  # the whole check


@pytest.mark.parametrize("where", ["head", "tail"])
def test_damage_arrow_parses_is_named_before_it_is_parsed(store_url: str, where: str) -> None:
    size = os.path.getsize(_records_file(store_url))
    _flip(store_url, 40 if where == "head" else size - 40)  # in the schema; in the footer
    with pytest.raises(StoreError) as err:
        open_store(store_url, verify_reads=True).shard("w-000000", by_record=True)
    message = str(err.value)
    assert "w-000000/records.arrow: fails its check (corrupted bytes " in message and "\n" not in message
    first = int(message.split("corrupted bytes ")[1].split("-")[0])
    assert (first == 0) if where == "head" else (first > size - PIECE_BYTES), message


def test_a_damaged_pieces_file_is_named(store_url: str) -> None:
    path = os.path.join(store_url, "shards", "w-000000", "pieces.arrow")
    with open(path, "r+b") as f:
        f.seek(100)
        byte = f.read(1)[0]
        f.seek(100)
        f.write(bytes([byte ^ 1]))
    for by_record in (True, False):  # a whole check too refuses every damaged file of its shard
        with pytest.raises(StoreError, match="w-000000/pieces.arrow: fails its sha256 check"):
            open_store(store_url, verify_reads=True).shard("w-000000", by_record=by_record)


@pytest.fixture
def held_check(monkeypatch) -> threading.Event:
    """The loader's whole-shard checks wait until the event is set: the first batches are read before
    them, as on a large shard."""
    release, check = threading.Event(), data.CheckAhead._check

    def held(self, index: int) -> None:
        release.wait(60)
        check(self, index)

    monkeypatch.setattr(data.CheckAhead, "_check", held)
    monkeypatch.setattr("potstill.store.reader._VERIFIED", set())
    return release


def _loader(url: str) -> StoreDataset:
    # one shard, no held-out records, no shuffle: the first batch is rows 0-3
    return StoreDataset.open(url, batch_size=BATCH, eval_fraction=0.0, shuffle_buffer=1, verify_reads=True)


def test_the_first_batch_reads_checked_records_and_the_whole_check_refuses_the_rest(store_url, held_check) -> None:
    _flip(store_url, _byte_of(store_url, DAMAGED))
    batches = _loader(store_url).batches(0)
    first = next(batches)
    assert first["record_ids"] == [f"r{row:03d}" for row in range(BATCH)]
    held_check.set()
    for _ in range(RECORDS // BATCH):  # (the whole check may end before the damaged record is read)
        batch = next(batches)
        if "error" in batch:
            break
    assert re.search(r"w-000000/records.arrow: fails its (sha256 )?check", batch["error"]), batch.get("record_ids")


def test_a_damaged_record_in_the_first_batch_fails_it_in_one_line(store_url, held_check) -> None:
    _flip(store_url, _byte_of(store_url, 2))
    batch = next(_loader(store_url).batches(0))
    assert "w-000000/records.arrow: fails its check (corrupted bytes " in batch["error"]
    assert "--skip-bad-shards" in batch["error"] and "\n" not in batch["error"]


def test_values_of_a_record_in_the_first_batch_are_checked(store_url, held_check) -> None:
    at = int(open_store(store_url).shard("w-000000").views.tgt_off[2]) * K + 1  # record 2's first position

    def nan(flat: np.ndarray) -> None:  # checksums and pieces re-made: a buggy producer
        flat[at] = np.nan

    rewrite_column(store_url, "w-000000", "topk_logprobs", nan)
    batch = next(_loader(store_url).batches(0))
    assert "shard w-000000: record 'r002'" in batch["error"] and "NaN" in batch["error"], batch.get("error")


def test_verify_names_a_pieces_file_that_does_not_tile_the_records_file(store_url: str) -> None:
    from faults import rewrite_file

    from potstill.store import verify_store
    from potstill.store.pieces import pieces_file_bytes

    with open(_records_file(store_url), "rb") as f:
        records = f.read()
    wrong = pieces_file_bytes([0, 1]).to_pybytes()  # checksums re-made: a buggy writer

    def replace(data: bytearray) -> None:
        data[:] = wrong

    rewrite_file(store_url, "shards/w-000000/pieces.arrow", replace)
    problems = [str(p) for p in verify_store(store_url).problems]
    assert problems == ["shard w-000000: shards/w-000000/pieces.arrow: 2 pieces do not cover records.arrow "
                        f"({len(records)} bytes) in pieces of 65536"], problems
    with pytest.raises(StoreError, match="pieces.arrow: 2 pieces do not cover records.arrow"):
        open_store(store_url, verify_reads=True).shard("w-000000", by_record=True)


def test_the_pieces_file_is_the_one_the_format_describes(store_url: str) -> None:
    """Format §3.1, computed here from the spec alone: records.arrow in 65,536-byte pieces from its
    first byte, the last one shorter; each piece's CRC-32C (Castagnoli)."""
    import google_crc32c

    with open(_records_file(store_url), "rb") as f:
        records = f.read()
    table = pa.ipc.open_file(pa.memory_map(os.path.join(store_url, "shards", "w-000000", "pieces.arrow"))).read_all()
    assert table.schema.names == ["crc32c"] and str(table.schema.field("crc32c").type) == "uint32"
    assert table.schema.metadata == {b"piece_bytes": b"65536"}
    expected = [google_crc32c.value(records[a : a + 65536]) for a in range(0, len(records), 65536)]
    assert table.column("crc32c").to_pylist() == expected


def test_the_loaders_whole_check_by_pieces_finds_a_flipped_byte_anywhere(store_url: str, monkeypatch) -> None:
    """The training loader's whole check of a records file (every piece against the pieces file, not
    the file's sha256) names the file and the damaged piece wherever the byte lies: Arrow's framing,
    a record's values, the last byte; an intact file passes and its values are still checked."""
    from potstill.store import reader

    def whole_check() -> None:  # as a fresh loader process
        monkeypatch.setattr(reader, "_VERIFIED", set())
        store = open_store(store_url, verify_reads=True)
        reader.ShardReader(store, store.commit("w-000000"), by_pieces=True)

    whole_check()  # intact: passes
    size = os.path.getsize(_records_file(store_url))
    for at in (20, size // 3, _byte_of(store_url, DAMAGED), size - 1):
        _flip(store_url, at)
        with pytest.raises(StoreError) as err:
            whole_check()
        message = str(err.value)
        assert "w-000000/records.arrow: fails its check (corrupted bytes " in message, message
        first, last = (int(x) for x in message.split("corrupted bytes ")[1].split(" ")[0].split("-"))
        assert first <= at <= last and last - first < PIECE_BYTES, message
        _flip(store_url, at)  # (back as it was)

    rewrite_column(store_url, "w-000000", "topk_logprobs", lambda flat: flat.__setitem__(5, np.nan))
    with pytest.raises(StoreError, match=r"shard w-000000: record 'r000': top-k .*NaN"):  # checksums re-made
        whole_check()
