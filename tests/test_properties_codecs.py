"""Property-based tests (hypothesis) of every codec's round trip (docs/reference/store-format.md §4.2, §4.3):
for any valid top-K targets (distinct ids, descending log-probs, any K, vocabularies up to 2^20, empty
slots, log tails) and any sampled draws (distinct ids with counts summing to any N up to 65535, any id
order for compact), decoding what was encoded gives the ids and counts back exactly and the log-probs
within the quantiser's `max_error` of their clamped values; directly, and through real Arrow files of
the codecs "none", "packed" and "compact". Derandomised: CI runs the same cases every time."""

from __future__ import annotations

import copy
import math
import tempfile

import numpy as np
import pytest
from common import make_manifest, random_record
from compact_reference import (
    _decode_gamma,
    _gamma_stream,
    encode_sampled,
    encode_topk,
    pack_unary,
    pack_varbits,
    reference_decode_compact,
    unpack_unary,
    unpack_varbits,
)
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from potstill.store import create_store, open_store
from potstill.store.codec import (
    MAX_ID_ORDER,
    IdOrder,
    LogprobQuantizer,
    SampledTargets,
    bits_for,
    check_sampled,
    decode_sampled,
    decode_sampled_compact,
    decode_topk,
    encode_sampled_compact,
    pack_bits,
    sampled_from_draws,
    unpack_bits,
)
from potstill.store.errors import StoreError
from potstill.store.manifest import TargetSpec

PROPS = settings(derandomize=True, deadline=None, max_examples=250, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FILES = settings(PROPS, max_examples=30)  # each example writes and reads a store


def _slack(lo: float) -> float:
    """float32 rounding of a decoded value in [lo, 0], on top of the quantiser's own error."""
    return float(np.spacing(np.float32(abs(lo)))) + 1e-7


# -- the quantiser, bit packing and the variable-length codes ---------------------------------------
@PROPS
@given(st.integers(2, 16), st.floats(-1e4, -1e-3), st.lists(st.floats(0, 1), min_size=1, max_size=40))
def test_the_quantiser_is_within_its_max_error_of_every_value_in_its_range(bits, lo, fractions) -> None:
    q = LogprobQuantizer(bits, lo)
    values = np.array([lo * f for f in fractions], dtype=np.float64)  # float64 references in [lo, 0]
    back = q.decode(q.encode(values)).astype(np.float64)
    assert np.all(np.abs(back - values) <= q.max_error + _slack(lo)), (back, values, q.max_error)
    below = q.decode(q.encode(values + 2 * lo - 1))  # below the range: read back as lo
    assert np.all(np.abs(below - lo) <= _slack(lo))


@PROPS
@given(st.integers(1, 32).flatmap(lambda b: st.tuples(st.just(b), st.lists(st.integers(0, (1 << b) - 1), max_size=80))))
def test_bit_packing_of_any_width_round_trips(case) -> None:
    bits, values = case
    data = pack_bits(np.array(values, dtype=np.uint64), bits)
    assert len(data) == (len(values) * bits + 7) // 8
    assert unpack_bits(data, len(values), bits).tolist() == values


@PROPS
@given(st.lists(st.integers(0, 32).flatmap(lambda w: st.tuples(st.just(w), st.integers(0, (1 << w) - 1))), max_size=60),
       st.lists(st.integers(0, 300), max_size=60), st.lists(st.integers(1, 65535), max_size=60))
def test_varbits_unary_and_gamma_codes_round_trip(pairs, unary, counts) -> None:
    widths = np.array([w for w, _ in pairs], dtype=np.int64)
    values = np.array([v for _, v in pairs], dtype=np.uint64)
    assert unpack_varbits(pack_varbits(values, widths), widths, "t").tolist() == values.tolist()
    q, used = unpack_unary(pack_unary(np.array(unary, dtype=np.int64)), len(unary), "t")
    assert q.tolist() == unary and used == (sum(unary) + len(unary) + 7) // 8
    stream = _gamma_stream(np.array(counts, dtype=np.int64))
    got, used = _decode_gamma(stream, len(counts), "t")
    assert got.tolist() == counts and used == len(stream)


# -- top-K ------------------------------------------------------------------------------------------
@st.composite
def topk_case(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int, LogprobQuantizer]:
    vocab = draw(st.integers(1, 1 << 20) | st.sampled_from([1, 2, 255, 256, 257, 1 << 20]))
    k = draw(st.integers(1, min(vocab, 64)))
    positions = draw(st.integers(0, 6))
    q = LogprobQuantizer(draw(st.integers(2, 16)), draw(st.floats(-100, -0.01)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    ids = np.stack([rng.choice(vocab, size=k, replace=False) for _ in range(positions)]).astype(np.int32) \
        if positions else np.zeros((0, k), np.int32)
    # descending log-probs, some below the quantiser's range, float32 like the teacher's
    lp = -np.sort(rng.exponential(abs(q.lo) / 2, size=(positions, k)), axis=-1).astype(np.float32)
    empty = draw(st.integers(0, k - 1)) if positions else 0  # empty slots end a row (the vocabulary ran out)
    if empty:
        ids[:, k - empty:], lp[:, k - empty:] = -1, -np.inf
    return ids, lp, bits_for(vocab - 1), q


@PROPS
@given(topk_case())
def test_top_k_targets_read_back_exactly_and_within_the_quantisers_error(case) -> None:
    ids, lp, id_bits, q = case
    got_ids, got_lp = decode_topk(*encode_topk(ids, lp, id_bits, q), *ids.shape, id_bits, q)
    assert np.array_equal(got_ids, ids) and got_ids.dtype == np.int32
    full = ids >= 0
    want = np.clip(lp[full].astype(np.float64), q.lo, 0.0)
    assert np.all(np.abs(got_lp[full].astype(np.float64) - want) <= q.max_error + _slack(q.lo))
    assert np.all(np.isneginf(got_lp[~full]))
    assert np.all(got_lp[:, :-1] >= got_lp[:, 1:])  # still descending: the quantiser is monotone


# -- sampled draws ----------------------------------------------------------------------------------
@st.composite
def sampled_case(draw: st.DrawFn) -> tuple[SampledTargets, int, int]:
    """Valid sampled targets in the order `SampledTargets` promises, built from their rules (not from
    draws), so that any N up to 65535 and any split of it into counts is reachable."""
    samples = draw(st.integers(1, 65535) | st.sampled_from([1, 2, 3, 64, 65534, 65535]))
    vocab = draw(st.integers(1, 1 << 20) | st.sampled_from([1, 2, 1 << 20]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    ids, counts, lengths = [], [], []
    for _ in range(draw(st.integers(0, 5))):
        d = draw(st.integers(1, min(samples, vocab, 40)))
        cuts = np.sort(rng.choice(np.arange(1, samples), size=d - 1, replace=False)) if d > 1 else np.zeros(0, np.int64)
        c = np.diff(np.concatenate([[0], cuts, [samples]])).astype(np.int64)
        if draw(st.booleans()):  # mostly ones, as real draws over a flat distribution are
            c = np.ones(d, np.int64)
            c[0] += samples - d
        i = rng.choice(vocab, size=d, replace=False).astype(np.int64)
        order = np.lexsort((i, -c))
        ids.append(i[order])
        counts.append(c[order])
        lengths.append(d)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    none = [np.zeros(0, np.int64)]
    return (SampledTargets(offsets, np.concatenate(none + ids).astype(np.int32), np.concatenate(none + counts).astype(np.uint16)),
            samples, vocab)


def _same(a: SampledTargets, b: SampledTargets) -> bool:
    return (np.array_equal(a.offsets, b.offsets) and np.array_equal(a.ids, b.ids) and np.array_equal(a.counts, b.counts)
            and a.ids.dtype == b.ids.dtype and a.counts.dtype == b.counts.dtype)


@PROPS
@given(sampled_case(), st.data())
def test_sampled_targets_read_back_exactly_in_every_codec(case, data) -> None:
    t, samples, vocab = case
    id_bits = bits_for(vocab - 1)
    s, e = t.num_positions, t.num_entries
    packed = decode_sampled(*encode_sampled(t, id_bits, bits_for(samples)), e, s, samples, id_bits, bits_for(samples))
    assert _same(packed, t)
    assert _same(decode_sampled_compact(*encode_sampled_compact(t), e, s, samples, 1 << id_bits), t)
    listed = data.draw(st.lists(st.integers(0, vocab - 1), unique=True, max_size=min(vocab, 50)), "id order")
    if data.draw(st.booleans(), "list the targets' ids too"):
        listed = list(dict.fromkeys(listed + t.ids.tolist()))[:MAX_ID_ORDER]
    for order in (IdOrder(listed), IdOrder(listed, vocab=1 << id_bits)):  # binary search and lookup tables
        got = decode_sampled_compact(*encode_sampled_compact(t, order), e, s, samples, 1 << id_bits, id_order=order)
        assert _same(got, t), listed


# -- through real Arrow files -----------------------------------------------------------------------
@st.composite
def store_case(draw: st.DrawFn) -> tuple[str, str, int, int, int, int, float, list[int], int]:
    codec = draw(st.sampled_from(["none", "packed", "compact"]))
    kind = draw(st.sampled_from(["sampled", "both", "hybrid"] if codec == "compact" else
                                ["topk", "sampled", "both", "hybrid"]))
    vocab = draw(st.integers(8, 1 << 20) | st.sampled_from([8, 1 << 20]))
    k = draw(st.integers(1, 8)) if kind != "sampled" else 0
    samples = draw(st.integers(1, 65535) | st.sampled_from([1, 65535])) if kind != "topk" else 0
    order = draw(st.lists(st.integers(0, vocab - 1), unique=True, max_size=20)) if codec == "compact" else []
    return (kind, codec, vocab, k, samples, draw(st.integers(2, 16)), draw(st.floats(-60, -1)), order,
            draw(st.integers(0, 2**32 - 1)))


@FILES
@given(store_case())
def test_records_read_back_from_real_store_files_in_every_codec(case) -> None:
    kind, codec, vocab, k, samples, lp_bits, lo, order, seed = case
    packed = codec != "none"
    spec = TargetSpec(kind=kind, k=k, samples=samples, seed=7, sampling="test draws" if samples else None,
                      codec=codec, tail_logprob="direct" if kind != "sampled" else None,
                      id_bits=bits_for(vocab - 1) if packed else None,
                      count_bits=bits_for(samples) if codec == "packed" and samples else None,
                      logprob_bits=lp_bits if packed else None, logprob_min=lo if packed else None,
                      id_order=order or None)
    base = make_manifest(k=max(k, 1), layers=(), vocab=min(vocab, 300))
    base.tokenizer.vocab_size = base.teacher.vocab_size = vocab
    manifest = type(base)(teacher=base.teacher, tokenizer=base.tokenizer, targets=spec, hidden=base.hidden,
                          generation={"mode": "test"})
    rng = np.random.default_rng(seed)
    records = []
    for i in range(3):
        rec = random_record(rng, f"r{i}", make_manifest(k=max(k, 1), layers=(), vocab=min(vocab, 300)),
                            n=int(rng.integers(2, 12)))
        rec.input_ids = rng.integers(0, vocab, size=len(rec.input_ids)).astype(np.int32)
        s = rec.num_scored
        if spec.has_topk:
            rec.topk_ids = np.stack([rng.choice(vocab, size=k, replace=False) for _ in range(s)]).astype(np.int32) \
                if s else np.zeros((0, k), np.int32)
            rec.topk_logprobs = -np.sort(rng.exponential(3.0, size=(s, k)), axis=-1).astype(np.float32)
            rec.tail_logprob = -rng.exponential(2.0, size=s).astype(np.float32)
        else:
            rec.topk_ids = rec.topk_logprobs = rec.tail_logprob = None
        if spec.has_sampled:
            d = min(samples, vocab, 6)
            draws = rng.choice(rng.choice(vocab, size=d, replace=False), size=(s, samples))
            rec.sampled = sampled_from_draws(draws)
        records.append(rec)
    with tempfile.TemporaryDirectory() as tmp:
        store = create_store(tmp + "/s", manifest, tokenizer_files={"tokenizer.json": b"{}"})
        with store.writer("w0", shard_records=2) as w:
            for rec in records:
                w.write(copy.deepcopy(rec))
        store = open_store(tmp + "/s")
        q = store.manifest.targets.quantizer() if packed else None
        for i, want in enumerate(records):
            got = store.record(i)
            assert got.id == want.id and np.array_equal(got.input_ids, want.input_ids)
            tol = q.max_error + _slack(q.lo) if q else 0.0
            lo = q.lo if q else -math.inf
            assert np.all(np.abs(got.token_logprob - np.maximum(want.token_logprob, lo)) <= tol)
            if spec.has_topk:
                assert np.array_equal(got.topk_ids, want.topk_ids)
                lp = want.topk_logprobs.astype(np.float16 if not packed else np.float32)  # "none": float16 in
                assert np.all(np.abs(got.topk_logprobs.astype(np.float64) - np.maximum(lp, lo)) <= tol)
                assert np.array_equal(got.tail_logprob, want.tail_logprob)
            if spec.has_sampled:
                assert _same(got.sampled, want.sampled)


# -- streams that no encoder made -------------------------------------------------------------------
@settings(PROPS, max_examples=400)
@given(st.binary(max_size=48), st.binary(max_size=48), st.integers(0, 40), st.integers(0, 6),
       st.integers(1, 65535) | st.sampled_from([1, 2, 3]), st.integers(1, 1 << 20) | st.sampled_from([1, 2]),
       st.lists(st.integers(0, 63), unique=True, max_size=8), st.sampled_from(["packed", "compact", "compact-ordered"]))
# found: entries but no positions (a record with nothing scored) raised IndexError, not a StoreError
@example(ids_bytes=b"", counts_bytes=b"\x01", entries=1, positions=0, samples=2, vocab=1, listed=[], codec="compact")
@example(ids_bytes=b"\x00", counts_bytes=b"\x01", entries=1, positions=0, samples=2, vocab=1, listed=[], codec="packed")
# found: a packed id past the vocabulary (id_bits hold more) passed the test's decode and failed its final check
@example(ids_bytes=b"\x01", counts_bytes=b"\x01", entries=1, positions=1, samples=1, vocab=1, listed=[], codec="packed")
def test_sampled_streams_that_no_encoder_made_fail_in_one_line_or_decode_to_valid_targets(
        ids_bytes, counts_bytes, entries, positions, samples, vocab, listed, codec) -> None:
    ids_data, counts_data = np.frombuffer(ids_bytes, np.uint8), np.frombuffer(counts_bytes, np.uint8)
    try:
        if codec == "packed":
            t = decode_sampled(ids_data, counts_data, entries, positions, samples, bits_for(vocab - 1), bits_for(samples))
            # (id_bits may hold ids past the vocabulary: the reader's record check refuses them, as here)
            check_sampled(t, positions, samples, vocab, "decoded")
        elif codec == "compact":  # without an id order
            t = decode_sampled_compact(ids_data, counts_data, entries, positions, samples, vocab)
        else:  # with one
            order = IdOrder([v for v in listed if v < vocab])
            t = decode_sampled_compact(ids_data, counts_data, entries, positions, samples, vocab, id_order=order)
    except StoreError as e:
        assert str(e) and "\n" not in str(e)
        if codec != "packed":  # the compiled decoder refuses exactly what the numpy reference refuses
            with pytest.raises(StoreError):
                reference_decode_compact(ids_data, counts_data, entries, positions, samples, vocab,
                                         id_order=IdOrder([v for v in listed if v < vocab]) if codec != "compact" else None)
        return
    if codec != "packed":  # ... and decodes what it decodes to the same targets
        ref = reference_decode_compact(ids_data, counts_data, entries, positions, samples, vocab,
                                       id_order=IdOrder([v for v in listed if v < vocab]) if codec != "compact" else None)
        assert all(np.array_equal(a, b) and a.dtype == b.dtype
                   for a, b in ((t.offsets, ref.offsets), (t.ids, ref.ids), (t.counts, ref.counts)))
    check_sampled(t, positions, samples, vocab, "decoded")  # raises unless every rule of the format holds
    assert t.num_entries == entries and t.ids.dtype == np.int32 and t.counts.dtype == np.uint16
