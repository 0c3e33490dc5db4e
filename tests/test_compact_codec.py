"""The compact codec (docs/store-format.md §4.3.1): sampled ids gap-coded (Rice), counts gamma-coded.

It is lossless: every record reads back exactly what the packed codec reads back, in the same order;
damaged streams are refused in one line naming the record, never read as other targets; a store
that uses it is format 2.3, and older readers refuse it; `potstill generate` and `potstill train`
carry it end to end, with fewer bytes than the packed codec."""

from __future__ import annotations

import json

import numpy as np
import pytest
from genhelpers import config, prompt_rows, run_cli, write_jsonl

from store import open_store, store_info, verify_store
from store.codec import (
    SampledTargets,
    check_sampled,
    decode_sampled,
    decode_sampled_compact,
    encode_sampled,
    encode_sampled_compact,
    pack_unary,
    pack_varbits,
    sampled_from_draws,
    unpack_unary,
    unpack_varbits,
)
from store.errors import StoreError
from store.info import describe_targets
from store.manifest import StoreManifest, TargetSpec
from teacher_gen.errors import GenerateError
from teacher_gen.runner import generate


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
    rng = np.random.default_rng(0)
    for trial in range(400):
        t, n, vocab = _random_targets(rng)
        ids_stream, counts_stream = encode_sampled_compact(t)
        got = decode_sampled_compact(ids_stream, counts_stream, t.num_entries, t.num_positions, n, vocab)
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


def test_damaged_streams_are_refused_or_still_valid_never_anything_else() -> None:
    """A flipped byte either decodes to targets that obey every rule of the format (the checksums,
    not the codec, are what catch such damage) or raises one StoreError naming the record."""
    rng = np.random.default_rng(3)
    vocab, n = 4096, 24
    t = sampled_from_draws(np.minimum(rng.geometric(0.02, size=(40, n)) - 1, vocab - 1))
    ids_stream, counts_stream = encode_sampled_compact(t)
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
            got = decode_sampled_compact(a, b, t.num_entries, t.num_positions, n, vocab, where="record 'r7'")
        except StoreError as e:
            assert str(e).startswith("record 'r7': ") and "\n" not in str(e)
            refused += 1
            continue
        check_sampled(got, t.num_positions, n, vocab, "t")
    assert refused > 100


def test_manifest_versions_and_refusals() -> None:
    spec = TargetSpec(kind="sampled", k=0, samples=24, seed=1, sampler="systematic", codec="compact", id_bits=12,
                      logprob_bits=12, logprob_min=-24.0)
    assert spec.required_version() == "2.3" and spec.packed
    d = spec.to_dict()
    assert d["codec"] == "compact" and d["sampler"] == "systematic" and "count_bits" not in d
    assert "compact codec: sampled ids gap-coded" in describe_targets(d)
    with pytest.raises(StoreError, match="targets.codec compact codes sampled draws; topk targets use the packed codec"):
        TargetSpec(kind="topk", k=4, codec="compact", id_bits=12, logprob_bits=12, logprob_min=-24.0)


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
    assert open_store(str(tmp_path / "compact.store")).manifest.format_version == "2.3"
    assert records["packed"].keys() == records["compact"].keys()
    for rid, packed in records["packed"].items():
        compact = records["compact"][rid]
        assert _same(compact.sampled, packed.sampled), rid
        if targets == "hybrid":
            assert np.array_equal(compact.topk_ids, packed.topk_ids)
            assert np.array_equal(compact.tail_logprob, packed.tail_logprob)
    assert sizes["compact"] < sizes["packed"], sizes


def test_a_2_2_reader_refuses_a_compact_store_in_one_line(tmp_path, tiny_teacher_dir, prompts, monkeypatch) -> None:
    import store.manifest as manifest_module

    url = str(tmp_path / "c.store")
    generate(config(tiny_teacher_dir, prompts, url, targets="sampled", samples=8, codec="compact"))
    obj = json.loads(open_store(url).manifest.to_json())
    obj["format_version"] = "2.2"
    with pytest.raises(StoreError, match="need format 2.3, but the manifest says 2.2"):
        StoreManifest.from_dict(obj, "m")
    monkeypatch.setattr(manifest_module, "CODECS", ("none", "packed"))  # what a 2.2 reader knows
    with pytest.raises(StoreError) as info:
        open_store(url)
    assert "\n" not in str(info.value) and "unknown targets.codec 'compact'" in str(info.value)


def test_compact_top_k_targets_are_refused_before_anything_is_written(tmp_path, tiny_teacher_dir, prompts) -> None:
    with pytest.raises(GenerateError, match="--codec compact codes sampled draws"):
        config(tiny_teacher_dir, prompts, str(tmp_path / "x"), targets="topk", codec="compact")
    out = run_cli(["generate", "--teacher", tiny_teacher_dir, "--prompts", prompts, "--out", str(tmp_path / "y"),
                   "--codec", "compact", "--device", "cpu", "--no-progress"])
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode != 0 and len(lines) == 1 and "--codec compact codes sampled draws" in lines[0], out.stderr
    assert not (tmp_path / "y").exists()


def test_generate_compact_then_train_through_the_cli(tmp_path, tiny_teacher_dir, tiny_tokenizer_dir, prompts) -> None:
    from trainhelpers import build_student

    url = str(tmp_path / "cli.store")
    out = run_cli(["generate", "--teacher", tiny_teacher_dir, "--prompts", prompts, "--out", url, "--targets", "sampled",
                   "--samples", "24", "--sampler", "systematic", "--codec", "compact", "--device", "cpu", "--no-progress"])
    assert out.returncode == 0, out.stderr
    info = run_cli(["store", "info", url])
    assert info.returncode == 0 and "compact codec" in info.stdout, info.stdout
    student = build_student(str(tmp_path / "student"), tiny_tokenizer_dir, hidden=16)
    run = run_cli(["train", "--store", url, "--student", student, "--out", str(tmp_path / "run"), "--max-steps", "3",
                   "--batch-size", "2", "--eval-fraction", "0", "--report-to", "none", "--num-workers", "0"])
    assert run.returncode == 0, run.stderr[-2000:]
    with open(tmp_path / "run" / "training_report.json") as f:
        assert json.load(f)["global_step"] == 3
