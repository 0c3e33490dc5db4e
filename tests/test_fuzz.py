"""Property-based fuzzing (hypothesis) of the two places hostile bytes enter potstill: the prompt
reader (any line a user hands `generate`) and the packed codec (any bytes a store holds). No input
may produce a traceback or a wrong record: the reader turns every line into an item that holds
exactly what the line said, or into a one-line reason; the codec decodes what it encoded, and
anything else into a `StoreError`. Derandomised, so CI runs the same cases every time."""

from __future__ import annotations

import json
import math
import os
import tempfile

import numpy as np
from compact_reference import encode_sampled, encode_topk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from potstill.store.codec import (
    LogprobQuantizer,
    decode_sampled,
    decode_topk,
    pack_bits,
    sampled_from_draws,
    unpack_bits,
)
from potstill.store.errors import StoreError
from potstill.teacher_gen.errors import InputError
from potstill.teacher_gen.prompts import FieldMap, SourceItem, load_prompts, parse_json, parse_row

FUZZ = settings(derandomize=True, deadline=None, max_examples=300,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Text with everything a JSON string can spell: control characters, astral planes, lone surrogates.
any_text = st.text(st.characters(codec=None, categories=None), max_size=40)
sound_text = st.text(st.characters(codec="utf-8"), max_size=40)
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | any_text
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
    max_leaves=20,
)
row_objects = st.dictionaries(
    st.sampled_from(["id", "prompt", "messages", "completion", "meta", "x"]) | any_text, json_values, max_size=6,
)


def _strict_json(value: object) -> str:
    """What the store keeps must be strict JSON and valid UTF-8."""
    text = json.dumps(value, ensure_ascii=False, allow_nan=False)
    text.encode("utf-8")
    return text


def _check_parsed(row: object, parsed: SourceItem | InputError) -> None:
    if isinstance(parsed, InputError):
        assert parsed.reason and "\n" not in parsed.reason and parsed.line == 7
        return
    assert isinstance(row, dict)
    assert parsed.prompt == row.get("prompt") and parsed.completion == row.get("completion")
    if "id" in row:
        assert parsed.id == str(row["id"])
    if parsed.messages is not None:
        assert [m["content"] for m in parsed.messages] == [m["content"] for m in row["messages"]]
    if parsed.meta is not None:
        assert set(parsed.meta) == set(row) - {"id", "prompt", "messages", "completion"}
        _strict_json(parsed.meta)
    _strict_json([parsed.id, parsed.prompt, parsed.completion, parsed.messages])


@FUZZ
@given(row_objects | json_values)
def test_parse_row_never_raises_and_keeps_exactly_what_the_row_says(row) -> None:
    _check_parsed(row, parse_row(7, row, FieldMap()))


@FUZZ
@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_any_line_parses_or_gets_a_reason(line: bytes) -> None:
    try:
        row = parse_json(line)
    except ValueError as e:
        assert str(e) and "\n" not in str(e)
        return
    _check_parsed(row, parse_row(7, row, FieldMap()))


@FUZZ
@given(st.lists(st.binary(max_size=60).filter(lambda b: b"\n" not in b and b"\r" not in b), max_size=12))
def test_a_file_of_arbitrary_lines_loads_without_a_traceback(lines: list[bytes]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "p.jsonl")
        with open(path, "wb") as f:
            f.write(b"\n".join(lines))
        prompts = load_prompts(path, FieldMap())
    assert len(prompts.items) + len(prompts.errors) == prompts.rows
    assert prompts.rows == sum(1 for ln in lines if ln.strip())


@FUZZ
@given(st.lists(st.fixed_dictionaries({"prompt": sound_text.filter(str.strip), "completion": sound_text}),
                min_size=1, max_size=8))
def test_valid_rows_come_back_exactly(rows: list[dict]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "p.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for i, row in enumerate(rows):
                f.write(json.dumps({"id": f"r{i}", **row}) + "\n")
        items = load_prompts(path, FieldMap()).items
    assert [(i.id, i.prompt, i.completion) for i in items] == [(f"r{i}", r["prompt"], r["completion"])
                                                               for i, r in enumerate(rows)]


# -- the packed codec ------------------------------------------------------------------------------
@FUZZ
@given(st.integers(1, 32).flatmap(lambda b: st.tuples(st.just(b), st.lists(st.integers(0, (1 << b) - 1), max_size=50))))
def test_bit_packing_round_trips(case) -> None:
    bits, values = case
    data = pack_bits(np.array(values, dtype=np.uint64), bits)
    assert unpack_bits(data, len(values), bits).tolist() == values


@FUZZ
@given(st.integers(0, 6), st.integers(1, 8), st.integers(2, 500), st.integers(2, 16),
       st.floats(-60, -0.5), st.integers(0, 2**32 - 1))
def test_top_k_targets_decode_to_what_was_encoded(positions, k, vocab, bits, lo, seed) -> None:
    rng = np.random.default_rng(seed)
    q = LogprobQuantizer(bits, lo)
    k = min(k, vocab)  # distinct ids per position
    ids = np.array([rng.permutation(vocab)[:k] for _ in range(positions)], dtype=np.int32).reshape(positions, k)
    lp = np.sort(rng.uniform(lo, 0, size=(positions, k)).astype(np.float32), axis=-1)[:, ::-1].copy()
    empty = rng.random((positions, k)) < 0.2
    ids[empty], lp[empty] = -1, -np.inf
    id_bits = max(1, (vocab - 1).bit_length())
    ids_data, lp_data = encode_topk(ids, lp, id_bits, q)
    got_ids, got_lp = decode_topk(ids_data, lp_data, positions, k, id_bits, q)
    assert np.array_equal(got_ids, ids)
    finite = ~empty
    assert np.all(np.abs(got_lp[finite] - lp[finite]) <= q.max_error * (1 + 1e-6) + 1e-6)
    assert np.all(np.isneginf(got_lp[empty]))


@FUZZ
@given(st.integers(0, 5), st.integers(1, 40), st.integers(1, 3000), st.integers(0, 2**32 - 1))
def test_sampled_targets_decode_to_what_was_encoded(positions, samples, vocab, seed) -> None:
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, vocab, size=(positions, samples))
    t = sampled_from_draws(draws)
    id_bits, count_bits = max(1, (vocab - 1).bit_length()), max(1, samples.bit_length())
    ids_data, counts_data = encode_sampled(t, id_bits, count_bits)
    got = decode_sampled(ids_data, counts_data, t.num_entries, positions, samples, id_bits, count_bits)
    assert np.array_equal(got.offsets, t.offsets) and np.array_equal(got.ids, t.ids)
    assert np.array_equal(got.counts, t.counts)


@FUZZ
@given(st.binary(max_size=64), st.binary(max_size=64), st.integers(0, 40), st.integers(1, 8), st.integers(1, 20),
       st.integers(1, 32), st.integers(1, 17))
def test_decoding_arbitrary_bytes_fails_cleanly_or_gives_well_formed_targets(a, b, positions, k, samples, id_bits,
                                                                             count_bits) -> None:
    q = LogprobQuantizer(12, -24.0)
    ids_data, other = np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8)
    try:
        ids, lp = decode_topk(ids_data, other, positions, k, id_bits, q)
        assert ids.shape == lp.shape == (positions, k)
        assert np.all(np.isneginf(lp) | ((lp >= -24.0 - 1e-5) & (lp <= 1e-6)))
        assert np.all((ids >= -1) & (ids < (1 << id_bits)))
    except StoreError as e:
        assert "\n" not in str(e)
    try:
        entries = len(a) * 8 // id_bits
        t = decode_sampled(ids_data, other, entries, positions, samples, id_bits, count_bits)
        assert t.num_positions == positions and np.all(t.counts >= 1)
        sums = np.add.reduceat(t.counts.astype(np.int64), t.offsets[:-1]) if positions and t.num_entries else []
        assert all(s == samples for s in sums)
    except StoreError as e:
        assert "\n" not in str(e)


@FUZZ
@given(st.floats(allow_nan=True, allow_infinity=True), st.integers(2, 16))
def test_the_quantiser_maps_every_float_into_its_range(value, bits) -> None:
    q = LogprobQuantizer(bits, -24.0)
    code = q.encode(np.array([value]))
    assert 0 <= int(code[0]) < (1 << bits)
    back = float(q.decode(code)[0])
    if math.isnan(value) or value == -math.inf:
        assert back == -math.inf
    else:
        assert -24.0 - 1e-4 <= back <= 0.0
