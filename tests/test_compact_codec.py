"""The compact codec (docs/reference/store-format.md §4.3.2): sampled draws split into head and tail, ids
coded by their place in the store's id order as gaps (Rice, a parameter per rank bucket), counts
gamma-coded.

It is lossless: every record reads back exactly what the packed codec reads back, in the same
order; damaged streams are refused in one line naming the record, never read as other targets; a
reader without the codec refuses such a store in one line; `potstill generate` and `potstill train`
carry it end to end, with fewer bytes than the packed codec. The old name `compact2` still selects
it on the command line, with a note."""

from __future__ import annotations

import json

import numpy as np
import pytest
from common import prompt_rows, write_jsonl
from compact_reference import encode_sampled, pack_unary, pack_varbits, unpack_unary, unpack_varbits
from genhelpers import config, run_cli, run_main

from potstill.share import store_info
from potstill.share.info import describe_targets
from potstill.store import open_store, verify_store
from potstill.store.codec import (
    MAX_ID_ORDER,
    IdOrder,
    SampledTargets,
    check_sampled,
    decode_sampled,
    decode_sampled_compact,
    encode_sampled_compact,
    sampled_from_draws,
)
from potstill.store.errors import StoreError
from potstill.store.manifest import TargetSpec
from potstill.teacher_gen.errors import GenerateError
from potstill.teacher_gen.runner import generate


def _random_targets(rng: np.random.Generator) -> tuple[SampledTargets, int, int]:
    s = int(rng.integers(0, 30))
    n = int(rng.choice([1, 2, 12, 24, 64, 1000, 65535]))
    vocab = int(rng.choice([1, 2, 50, 4096, 49_152, 1 << 20, 1 << 31]))
    if rng.random() < 0.5:  # spread over the vocabulary
        draws = rng.integers(0, vocab, size=(s, n))
    else:  # a peaked head of low ids, as a BPE teacher's are
        draws = np.minimum(rng.geometric(0.05, size=(s, n)) - 1, vocab - 1)
    return sampled_from_draws(draws), n, vocab


def _same(a: SampledTargets, b: SampledTargets) -> bool:
    return (np.array_equal(a.offsets, b.offsets) and np.array_equal(a.ids, b.ids) and np.array_equal(a.counts, b.counts)
            and a.ids.dtype == b.ids.dtype and a.counts.dtype == b.counts.dtype)


def test_bit_streams_round_trip() -> None:
    rng = np.random.default_rng(1)
    widths = rng.integers(0, 33, size=500)
    values = rng.integers(0, 1 << 32, size=500, dtype=np.uint64) & ((np.uint64(1) << widths.astype(np.uint64)) - np.uint64(1))
    data = pack_varbits(values, widths)
    assert len(data) == (int(widths.sum()) + 7) // 8
    assert np.array_equal(unpack_varbits(data, widths, "t"), values)
    q = rng.integers(0, 40, size=300)
    stream = pack_unary(q)
    got, used = unpack_unary(np.concatenate([stream, np.full(3, 255, np.uint8)]), len(q), "t")
    assert np.array_equal(got, q) and used == len(stream)


def test_every_record_reads_back_exactly_what_the_packed_codec_reads_back() -> None:
    encode, decode = encode_sampled_compact, decode_sampled_compact
    rng = np.random.default_rng(0)
    for trial in range(400):
        t, n, vocab = _random_targets(rng)
        ids_stream, counts_stream = encode(t)
        got = decode(ids_stream, counts_stream, t.num_entries, t.num_positions, n, vocab)
        assert _same(got, t), trial
        check_sampled(got, t.num_positions, n, vocab, "t")
        if vocab <= 1 << 20 and n < 65535:
            id_bits, count_bits = max(1, (vocab - 1).bit_length()), n.bit_length()
            packed = decode_sampled(*encode_sampled(t, id_bits, count_bits), t.num_entries, t.num_positions, n,
                                    id_bits, count_bits)
            assert _same(got, packed), trial


def test_it_takes_fewer_bytes_than_the_packed_codec_on_peaked_draws() -> None:
    rng = np.random.default_rng(2)
    vocab, n = 4096, 24
    probs = rng.dirichlet(np.full(vocab, 0.02), size=256)
    t = sampled_from_draws(np.stack([rng.choice(vocab, size=n, p=p) for p in probs]))
    compact = sum(map(len, encode_sampled_compact(t)))
    packed = sum(map(len, encode_sampled(t, 12, 5)))
    assert compact < 0.75 * packed, (compact, packed)


def test_an_id_order_maps_every_id_to_one_place_and_back() -> None:
    rng = np.random.default_rng(6)
    for vocab in (1, 2, 50, 4096):
        for listed in sorted({min(m, vocab) for m in (0, 1, 7, vocab)}):
            order = IdOrder(rng.permutation(vocab)[:listed])
            ranks = order.rank(np.arange(vocab))
            assert np.array_equal(np.sort(ranks), np.arange(vocab))  # a permutation of [0, V)
            assert np.array_equal(ranks[order.listed], np.arange(listed))  # the listed ids first, in order
            rest = np.setdiff1d(np.arange(vocab), order.listed)
            assert np.array_equal(ranks[rest], np.arange(listed, vocab))  # then the others, ascending
            assert np.array_equal(order.ids(ranks), np.arange(vocab))
            tables = IdOrder(order.listed, vocab=vocab)  # the lookup tables agree with the search
            assert tables.id_at is not None
            assert np.array_equal(tables.rank(np.arange(vocab)), ranks) and np.array_equal(tables.ids(ranks), np.arange(vocab))
    big = IdOrder(rng.choice(1 << 31, size=MAX_ID_ORDER, replace=False))  # no table the size of the vocabulary
    ids = np.concatenate([big.listed[:100], rng.integers(0, 1 << 31, size=1000)])
    assert np.array_equal(big.ids(big.rank(ids)), ids)
    assert IdOrder.from_tokens([np.array([5, 3, 5, 9, 3, 5]), np.array([9, 1])]) == [5, 3, 9, 1]
    assert IdOrder.from_tokens([np.array([4, 4, 2])], limit=1) == [4] and IdOrder.from_tokens([]) == []


def test_compact_with_an_id_order_reads_back_exactly_in_fewer_bytes() -> None:
    """Draws of a teacher whose frequent tokens are scattered over the vocabulary: listed first,
    in the order of their frequency in the text, they code tighter, and read back exactly."""
    rng = np.random.default_rng(7)
    vocab, n, positions = 4096, 48, 256
    scatter = rng.permutation(vocab)  # the frequent tokens' ids, not low ones
    zipf = 1.0 / np.arange(1, vocab + 1) ** 1.1
    probs = (rng.dirichlet(np.full(vocab, 0.3), size=positions) * zipf)[:, np.argsort(scatter)]
    probs /= probs.sum(1, keepdims=True)
    points = (np.arange(n) + rng.random((positions, 1))) / n
    t = sampled_from_draws(np.stack([np.searchsorted(np.cumsum(p), u) for p, u in zip(probs, points, strict=True)]).clip(0, vocab - 1))
    text = [rng.choice(vocab, size=20_000, p=probs.mean(0))]
    order = IdOrder(IdOrder.from_tokens(text))
    plain, ordered = encode_sampled_compact(t), encode_sampled_compact(t, order)
    assert sum(map(len, ordered)) < 0.85 * sum(map(len, plain)), (sum(map(len, ordered)), sum(map(len, plain)))
    got = decode_sampled_compact(*ordered, t.num_entries, t.num_positions, n, vocab, id_order=order)
    assert _same(got, t)
    check_sampled(got, t.num_positions, n, vocab, "t")
    for trial in range(100):  # random records, random orders
        t, n, vocab = _random_targets(rng)
        listed = rng.choice(vocab, size=min(vocab, int(rng.integers(0, 200))), replace=False)
        order = IdOrder(listed)
        got = decode_sampled_compact(*encode_sampled_compact(t, order), t.num_entries, t.num_positions, n, vocab,
                                      id_order=order)
        assert _same(got, t), trial


def test_damaged_streams_are_refused_or_still_valid_never_anything_else() -> None:
    """A flipped byte either decodes to targets that obey every rule of the format (the checksums,
    not the codec, are what catch such damage) or raises one StoreError naming the record."""
    encode, decode = encode_sampled_compact, decode_sampled_compact
    rng = np.random.default_rng(3)
    vocab, n = 4096, 24
    t = sampled_from_draws(np.minimum(rng.geometric(0.02, size=(40, n)) - 1, vocab - 1))
    ids_stream, counts_stream = encode(t)
    refused = 0
    for trial in range(300):
        a, b = ids_stream.copy(), counts_stream.copy()
        target = a if trial % 2 else b
        if trial % 5 == 0:  # truncated
            cut = int(rng.integers(0, len(target)))
            a, b = (a[:cut], b) if trial % 2 else (a, b[:cut])
        else:
            target[int(rng.integers(0, len(target)))] ^= np.uint8(1 << int(rng.integers(0, 8)))
        try:
            got = decode(a, b, t.num_entries, t.num_positions, n, vocab, where="record 'r7'")
        except StoreError as e:
            assert str(e).startswith("record 'r7': ") and "\n" not in str(e)
            refused += 1
            continue
        check_sampled(got, t.num_positions, n, vocab, "t")
    assert refused > 100


def test_manifest_keys_and_refusals() -> None:
    spec = TargetSpec(kind="hybrid", k=2, samples=24, seed=1, sampler="systematic", codec="compact", id_bits=12,
                      logprob_bits=12, logprob_min=-24.0)
    d = spec.to_dict()
    assert spec.packed and d["codec"] == "compact" and d["sampler"] == "systematic" and "count_bits" not in d
    assert "compact codec: sampled ids gap-coded (Rice parameter by rank)" in describe_targets(d)
    with pytest.raises(StoreError, match="targets.codec compact codes sampled draws; topk targets use the packed codec"):
        TargetSpec(kind="topk", k=4, codec="compact", id_bits=12, logprob_bits=12, logprob_min=-24.0)
    with pytest.raises(StoreError, match="unknown targets.codec 'compact2'"):
        TargetSpec(kind="sampled", k=0, samples=24, codec="compact2", id_bits=12, logprob_bits=12, logprob_min=-24.0)
    ordered = dict(kind="sampled", k=0, samples=24, seed=1, codec="compact", id_bits=12, logprob_bits=12,
                   logprob_min=-24.0)
    assert TargetSpec(**ordered, id_order=[7, 3, 4095]).to_dict()["id_order"] == [7, 3, 4095]
    assert "id_order" not in TargetSpec(**ordered).to_dict()
    for bad in ([7, 7], [4096], [-1], [1.5], list(range(MAX_ID_ORDER + 1)), "7,3"):
        with pytest.raises(StoreError, match="targets.id_order must"):
            TargetSpec(**ordered, id_order=bad)
    with pytest.raises(StoreError, match="targets.id_order is a setting of the compact codec; the codec is 'packed'"):
        TargetSpec(**{**ordered, "codec": "packed", "count_bits": 5}, id_order=[1])


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> str:
    return write_jsonl(str(tmp_path_factory.mktemp("compact") / "p.jsonl"), prompt_rows(6, seed=4))


@pytest.mark.parametrize("targets", ["sampled", "hybrid"])
def test_generated_stores_hold_the_same_targets_as_packed_ones_in_fewer_bytes(tmp_path, tiny_teacher_dir, prompts,
                                                                              targets) -> None:
    records, sizes = {}, {}
    for codec in ("packed", "compact"):
        url = str(tmp_path / f"{codec}.store")
        generate(config(tiny_teacher_dir, prompts, url, targets=targets, top_k=2, samples=24, sampler="systematic",
                        codec=codec, seed=5))
        assert verify_store(url).ok
        s = open_store(url)
        records[codec] = {r.id: r for r in s.iter_records()}
        sizes[codec] = store_info(s)["target_bytes_per_scored_token"]
    assert open_store(str(tmp_path / "compact.store")).manifest.format_version == "1.0"
    assert records["packed"].keys() == records["compact"].keys()
    for rid, packed in records["packed"].items():
        compact = records["compact"][rid]
        assert _same(compact.sampled, packed.sampled), rid
        if targets == "hybrid":
            assert np.array_equal(compact.topk_ids, packed.topk_ids)
            assert np.array_equal(compact.tail_logprob, packed.tail_logprob)
    assert sizes["compact"] < sizes["packed"], sizes


def test_a_reader_without_the_codec_refuses_a_compact_store_in_one_line(tmp_path, tiny_teacher_dir, prompts,
                                                                         monkeypatch) -> None:
    from potstill.store import targets

    url = str(tmp_path / "c.store")
    generate(config(tiny_teacher_dir, prompts, url, targets="sampled", samples=8, codec="compact"))
    monkeypatch.delitem(targets.CODECS, "compact")
    with pytest.raises(StoreError) as info:
        open_store(url)
    assert "\n" not in str(info.value) and "unknown targets.codec 'compact'" in str(info.value)


def test_a_compact_store_keeps_the_id_order_of_the_run_that_made_it(tmp_path, tiny_teacher_dir, prompts) -> None:
    """The order comes from the text of the run that creates the store; a run that adds records
    to it later, with other text, writes in the store's order, and every record reads back exactly
    what a packed store of the same draws holds."""
    more = write_jsonl(str(tmp_path / "more.jsonl"), [{**r, "id": f"m{i}"} for i, r in enumerate(prompt_rows(4, seed=9))])
    urls = {codec: str(tmp_path / f"{codec}.store") for codec in ("packed", "compact")}
    for codec, url in urls.items():
        for source in (prompts, more):
            generate(config(tiny_teacher_dir, source, url, targets="sampled", samples=24, sampler="systematic",
                            codec=codec, seed=5))
    store = open_store(urls["compact"])
    order = store.manifest.targets.id_order
    assert order and len(order) == len(set(order)) and store.manifest.to_dict()["targets"]["id_order"] == order
    text = store.manifest.to_json().decode()
    assert json.loads(text)["targets"]["id_order"] == order
    assert [line.strip().rstrip(",") for line in text.splitlines() if '"id_order"' in line] == [
        f'"id_order": {json.dumps(order, separators=(",", ":"))}']  # the ids on one line
    first = open_store(urls["packed"])
    tokens = [np.asarray(r.input_ids) for r in first.iter_records() if not r.id.startswith("m")]
    assert order == IdOrder.from_tokens(tokens)  # the first run's text, most frequent token first
    assert f"in an id order of {len(order)} frequent tokens first" in describe_targets(store.manifest.targets.to_dict())
    packed = {r.id: r for r in first.iter_records()}
    got = {r.id: r for r in store.iter_records()}
    assert got.keys() == packed.keys() and len(got) == 10
    for rid, rec in packed.items():
        assert _same(got[rid].sampled, rec.sampled), rid
    assert verify_store(urls["compact"]).ok


def test_compact_top_k_targets_are_refused_before_anything_is_written(tmp_path, tiny_teacher_dir, prompts) -> None:
    with pytest.raises(GenerateError, match="--codec compact codes sampled draws"):
        config(tiny_teacher_dir, prompts, str(tmp_path / "x"), targets="topk", codec="compact")
    out = run_cli(["generate", "--teacher", tiny_teacher_dir, "--prompts", prompts, "--out", str(tmp_path / "y"),
                   "--targets", "topk", "--codec", "compact", "--device", "cpu", "--no-progress"])
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode != 0 and len(lines) == 1 and "--codec compact codes sampled draws" in lines[0], out.stderr
    assert not (tmp_path / "y").exists()


def test_the_old_name_compact2_selects_the_compact_codec_with_a_note(tmp_path, tiny_teacher_dir, prompts, capsys) -> None:
    cfg = config(tiny_teacher_dir, prompts, str(tmp_path / "x"), targets="sampled", codec="compact2")
    assert cfg.codec == "compact"
    err = capsys.readouterr().err
    assert err.count("note: --codec compact2 is now called compact") == 1, err


@pytest.mark.slow
def test_generate_compact_then_train_through_the_cli(tmp_path, tiny_teacher_dir, tiny_tokenizer_dir, prompts) -> None:
    from common import build_student

    url = str(tmp_path / "cli.store")
    out = run_cli(["generate", "--teacher", tiny_teacher_dir, "--prompts", prompts, "--out", url, "--targets", "sampled",
                   "--samples", "24", "--sampler", "systematic", "--codec", "compact", "--device", "cpu", "--no-progress"])
    assert out.returncode == 0, out.stderr
    info = run_main(["store", "info", url])
    assert info.returncode == 0 and "compact codec" in info.stdout, info.stdout
    student = build_student(str(tmp_path / "student"), tiny_tokenizer_dir, hidden=16)
    run = run_cli(["train", "--store", url, "--student", student, "--out", str(tmp_path / "run"), "--max-steps", "3",
                   "--batch-size", "2", "--eval-fraction", "0", "--report-to", "none", "--num-workers", "0"])
    assert run.returncode == 0, run.stderr[-2000:]
    with open(tmp_path / "run" / "training_report.json") as f:
        assert json.load(f)["global_step"] == 3


@pytest.mark.parametrize("codec", ["packed", "compact"])
def test_a_record_whose_streams_do_not_decode_is_named_in_one_line(tmp_path, tiny_teacher_dir, prompts, codec) -> None:
    """The reader names a record only when its streams fail to decode; the other records of the
    shard still read."""
    import glob

    import pyarrow as pa

    from potstill.store.records import ColumnViews

    url = str(tmp_path / "c.store")
    generate(config(tiny_teacher_dir, prompts, url, targets="sampled", samples=12, sampler="systematic", codec=codec))
    s = open_store(url)
    (path,) = glob.glob(f"{url}/**/records.arrow", recursive=True)
    batch = pa.ipc.open_file(pa.memory_map(path)).get_batch(0)
    name = "sampled_ids_packed"
    streams = batch.column(name).to_pylist()
    streams[1] = streams[1][:1]  # record 1's ids stream cut after its first byte
    damaged = batch.set_column(batch.schema.get_field_index(name), name, pa.array(streams, type=batch.column(name).type))
    views = ColumnViews(damaged, s.manifest.targets)
    rid = batch.column("id")[1].as_py()
    with pytest.raises(StoreError) as info:
        views.sampled_of(1)
    assert str(info.value).startswith(f"record {rid!r}: ") and "\n" not in str(info.value)
    whole = ColumnViews(batch, s.manifest.targets)
    assert _same(views.sampled_of(0), whole.sampled_of(0))
