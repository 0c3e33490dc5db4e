"""Format 2.x on the store side: bit packing, log-prob quantisation, sampled targets, the packed
codec through real Arrow files, verify / info, and the version rules (docs/reference/store-format.md §4.2-4.4)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from common import make_manifest, random_record
from compact_reference import encode_sampled
from typer.testing import CliRunner

from potstill.share import store_info
from potstill.store import (
    StoreError,
    TargetSpec,
    create_store,
    open_store,
    verify_store,
)
from potstill.store.codec import (
    LogprobQuantizer,
    bits_for,
    check_sampled,
    decode_sampled,
    pack_bits,
    packed_size,
    sampled_from_draws,
    unpack_bits,
)

VOCAB = 300
N = 50


@pytest.mark.parametrize("bits", [1, 3, 7, 8, 9, 12, 13, 16, 17, 25, 32])
def test_bit_packing_round_trips_and_matches_the_documented_bit_order(bits: int) -> None:
    rng = np.random.default_rng(bits)
    values = rng.integers(0, 1 << bits, size=1001, dtype=np.uint64)
    data = pack_bits(values, bits)
    assert len(data) == packed_size(len(values), bits)
    assert np.array_equal(unpack_bits(data, len(values), bits), values)
    # The format's definition, bit by bit: value i's bit b is stream bit i*bits + b, LSB first.
    stream = np.unpackbits(data, bitorder="little")
    i, b = 17, bits - 1
    assert stream[i * bits + b] == (int(values[i]) >> b) & 1
    with pytest.raises(StoreError, match="does not fit"):
        pack_bits(np.array([1 << bits], dtype=np.uint64), bits)


def test_unpacking_a_short_field_fails_in_one_line() -> None:
    with pytest.raises(StoreError, match="holds 2 bytes, 3 values of 12 bits need 5"):
        unpack_bits(np.zeros(2, np.uint8), 3, 12)


@pytest.mark.parametrize("bits,lo", [(8, -20.0), (12, -24.0), (16, -30.0)])
def test_quantized_logprobs_stay_within_the_stated_bound(bits: int, lo: float) -> None:
    q = LogprobQuantizer(bits, lo)
    rng = np.random.default_rng(bits)
    lp = np.concatenate([rng.uniform(lo, 0, 10_000), [lo, 0.0, -1e-9]]).astype(np.float32)
    back = q.decode(q.encode(lp))
    assert np.abs(back - lp).max() <= q.max_error + 1e-5
    assert q.max_error == pytest.approx(-lo / ((1 << bits) - 2) / 2)
    special = q.decode(q.encode(np.array([-np.inf, lo - 50, 1e-6], np.float32)))
    assert special[0] == -np.inf and special[1] == pytest.approx(lo) and special[2] == 0.0


def test_draws_become_distinct_ids_with_counts_in_canonical_order() -> None:
    draws = np.array([[5, 3, 5, 9, 3, 5], [7, 7, 7, 7, 7, 7], [1, 2, 3, 4, 5, 6]])
    t = sampled_from_draws(draws)
    assert t.offsets.tolist() == [0, 3, 4, 10]
    assert t.position(0)[0].tolist() == [5, 3, 9] and t.position(0)[1].tolist() == [3, 2, 1]
    assert t.position(1)[0].tolist() == [7] and t.position(1)[1].tolist() == [6]
    assert t.position(2)[0].tolist() == [1, 2, 3, 4, 5, 6]
    check_sampled(t, 3, 6, 10, "test")
    ids, counts = t.padded()
    assert ids.shape == (3, 6) and ids[1].tolist() == [7, -1, -1, -1, -1, -1] and counts.sum() == 18


def test_packed_sampled_targets_need_no_position_lengths() -> None:
    rng = np.random.default_rng(0)
    draws = rng.integers(0, VOCAB, size=(40, N)) // rng.integers(1, 40, size=(40, 1))  # rows of varied spread
    t = sampled_from_draws(draws)
    id_bits, count_bits = bits_for(VOCAB - 1), bits_for(N)
    ids_data, counts_data = encode_sampled(t, id_bits, count_bits)
    back = decode_sampled(ids_data, counts_data, t.num_entries, 40, N, id_bits, count_bits)
    assert np.array_equal(back.offsets, t.offsets) and np.array_equal(back.ids, t.ids)
    assert np.array_equal(back.counts, t.counts)
    with pytest.raises(StoreError, match="do not split into 41 positions"):
        decode_sampled(ids_data, counts_data, t.num_entries, 41, N, id_bits, count_bits)


# -- stores ------------------------------------------------------------------------------------------
def _spec(kind: str, codec: str, k: int = 8, tail_logprob: str | None = "direct") -> TargetSpec:
    packed = codec == "packed"
    return TargetSpec(tail_logprob=tail_logprob,
        kind=kind, k=k if kind != "sampled" else 0, samples=N if kind != "topk" else 0, seed=7,
        sampling="test draws", codec=codec, id_bits=bits_for(VOCAB - 1) if packed else None,
        count_bits=bits_for(N) if packed and kind != "topk" else None,
        logprob_bits=12 if packed else None, logprob_min=-24.0 if packed else None,
    )


def _records(manifest, count: int = 12, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        rec = random_record(rng, f"r{i:03d}", manifest)
        s = rec.num_scored
        if not manifest.targets.has_topk:
            rec.topk_ids = rec.topk_logprobs = rec.tail_logprob = None
        if manifest.targets.has_sampled:
            rec.sampled = sampled_from_draws(rng.integers(0, VOCAB, size=(s, N)) // rng.integers(1, 30))
        out.append(rec)
    return out


def _make_store(tmp_path, kind: str, codec: str, name: str = "s", tail_logprob: str | None = "direct"):
    """A store of random records."""
    manifest = make_manifest(k=8, layers=(), vocab=VOCAB)
    manifest = type(manifest)(teacher=manifest.teacher, tokenizer=manifest.tokenizer,
                              targets=_spec(kind, codec, tail_logprob=tail_logprob),
                              hidden=manifest.hidden, generation={"mode": "test"})
    url = str(tmp_path / name)
    store = create_store(url, manifest, tokenizer_files={"tokenizer.json": b"{}"})
    records = _records(manifest)
    with store.writer("w0", shard_records=5) as w:
        for rec in records:
            w.write(rec)
    return open_store(url), _records(manifest)  # fresh copies: the writer converted its inputs in place


@pytest.mark.parametrize("kind,codec", [("topk", "none"), ("topk", "packed"), ("sampled", "none"), ("sampled", "packed"),
                                        ("both", "none"), ("both", "packed")])
def test_every_kind_and_codec_round_trips_through_real_files(tmp_path, kind: str, codec: str) -> None:
    store, expected = _make_store(tmp_path, kind, codec)
    assert store.manifest.format_version == "1.0" and store.manifest.features == []
    q = store.manifest.targets.quantizer() if codec == "packed" else None
    for i, want in enumerate(expected):
        got = store.record(i)
        assert got.id == want.id and np.array_equal(got.input_ids, want.input_ids)
        tol = q.max_error + 1e-5 if q else 0.0
        finite = np.isfinite(want.token_logprob)
        assert np.abs(got.token_logprob[finite] - np.maximum(want.token_logprob[finite], -24.0)).max(initial=0) <= tol
        if kind in ("topk", "both"):
            assert np.array_equal(got.topk_ids, want.topk_ids)
            if q:
                lp_want = want.topk_logprobs.astype(np.float32)
                assert np.abs(got.topk_logprobs - np.maximum(lp_want, -24.0)).max(initial=0) <= tol
            else:
                assert np.array_equal(got.topk_logprobs, want.topk_logprobs)
            # the log tail is stored as it was given, in every codec
            assert got.tail_logprob.dtype == np.float32
            assert np.array_equal(got.tail_logprob, want.tail_logprob)
        else:
            assert got.topk_ids is None and got.tail_logprob is None
        if kind in ("sampled", "both"):
            assert np.array_equal(got.sampled.offsets, want.sampled.offsets)
            assert np.array_equal(got.sampled.ids, want.sampled.ids)
            assert np.array_equal(got.sampled.counts, want.sampled.counts)  # counts are exact in every codec
        else:
            assert got.sampled is None
    report = verify_store(store.url)
    assert report.ok, report.problems


def test_packed_sampled_store_is_far_smaller_and_info_shows_bytes_by_field(tmp_path) -> None:
    plain, _ = _make_store(tmp_path, "sampled", "none", "plain")
    packed, _ = _make_store(tmp_path, "sampled", "packed", "packed")
    a, b = store_info(plain), store_info(packed)
    assert b["target_bytes_per_scored_token"] < 0.6 * a["target_bytes_per_scored_token"]
    assert {"sampled_ids_packed", "sampled_counts_packed", "token_logprob_packed", "sampled_entries"} <= set(b["fields"])
    assert {"sampled_ids", "sampled_counts", "token_logprob"} <= set(a["fields"])
    from potstill.cli.main import app

    out = CliRunner().invoke(app, ["store", "info", packed.url])
    assert out.exit_code == 0, out.output
    assert "sampled N=50" in out.output and "packed codec: 9-bit ids, 6-bit counts" in out.output
    assert "sampled_ids_packed" in out.output


@pytest.mark.parametrize("kind,codec,keys", [
    ("topk", "none", set()),
    ("sampled", "packed", {"samples", "seed", "sampling", "sampler", "id_bits", "count_bits", "logprob_bits",
                           "logprob_min", "logprob_step", "logprob_max_error"}),
])
def test_every_store_is_format_1_0_with_the_keys_of_its_kind_and_codec(tmp_path, kind: str, codec: str,
                                                                       keys: set[str]) -> None:
    store, _ = _make_store(tmp_path, kind, codec)
    with open(os.path.join(store.url, "manifest.json")) as f:
        raw = json.load(f)
    assert raw["format_version"] == "1.0" and raw["features"] == []
    tail = {"tail_logprob"} if kind != "sampled" else set()
    assert set(raw["targets"]) == {"kind", "k", "logprob_dtype", "temperature", "logprobs_from", "codec"} | tail | keys
    with open(os.path.join(store.url, "commits", "w0-000000.json")) as f:
        assert json.load(f)["format_version"] == "1.0"


def test_records_that_do_not_fit_the_store_are_refused_naming_them(tmp_path) -> None:
    store, _ = _make_store(tmp_path, "sampled", "packed")
    manifest = store.manifest
    rec = _records(manifest, 1, seed=5)[0]
    rec.sampled.counts = rec.sampled.counts.copy()
    rec.sampled.counts[0] += 1
    with store.writer("w1") as w, pytest.raises(StoreError, match=r"record 'r000'.*sum to 51, not N=50"):
        w.write(rec)
    rec = _records(manifest, 1, seed=5)[0]
    rec.sampled = None
    with store.writer("w2") as w, pytest.raises(StoreError, match="record 'r000': the store holds sampled targets"):
        w.write(rec)


def test_target_spec_rejects_inconsistent_settings() -> None:
    with pytest.raises(StoreError, match="targets.k must be 0"):
        TargetSpec(kind="sampled", k=8, samples=N)
    with pytest.raises(StoreError, match="targets.samples"):
        TargetSpec(kind="both", k=8, samples=0)
    with pytest.raises(StoreError, match="count_bits must be 6"):
        TargetSpec(kind="sampled", k=0, samples=N, codec="packed", id_bits=9, count_bits=5, logprob_bits=12, logprob_min=-24.0)
    with pytest.raises(StoreError, match="log-prob bits"):
        TargetSpec(kind="topk", k=8, codec="packed", id_bits=9, logprob_bits=20, logprob_min=-24.0)


def test_decoding_refuses_counts_that_break_the_format() -> None:
    """Found by fuzzing: a count of 0, or counts that overshoot N within a position, decoded silently."""
    for counts, n in (([0], 1), ([2, 6], 4), ([1, 0, 3], 4)):
        data = pack_bits(np.array(counts, dtype=np.uint64), 4)
        ids = pack_bits(np.zeros(len(counts), dtype=np.uint64), 9)
        with pytest.raises(StoreError, match="count is 0|do not split"):
            decode_sampled(ids, data, len(counts), 1, n, 9, 4)
