"""The writer's files byte for byte: the same records give the same `records.arrow` (and hidden data)
as the writer before its encode / validate / batch path was vectorised.

The `records.arrow` digests below were computed with that earlier writer (row-by-row encoding, one
Arrow array per record) from the records `_records` makes; the hidden-state digests with the first
writer of the sharded layout (format §5). Any change to the bytes a store holds shows here. Each
case covers a kind and codec, with records of every shape the writer must handle: no scored
position, empty top-k slots, −inf tails, texts and messages present or not, hidden states.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
from compact_reference import (
    _gamma_stream,
    _gaps,
    _rank_bucket,
    _rice_k,
    _within,
    encode_topk,
    pack_unary,
    pack_varbits,
)

from potstill.store import (
    HiddenLayer,
    HiddenSpec,
    Record,
    StoreManifest,
    TargetSpec,
    TeacherInfo,
    TokenizerInfo,
    create_store,
)
from potstill.store.codec import (
    RANK_BUCKETS,
    IdOrder,
    LogprobQuantizer,
    SampledTargets,
    _csr,
    bits_for,
    encode_logprobs_many,
    encode_sampled_compact_many,
    encode_topk_many,
    pack_bits,
    pack_bits_many,
    sampled_from_draws,
)
from potstill.store.columns import surely_sound_topk, unsound_topk
from potstill.store.errors import StoreError

VOCAB = 300
TOKENIZER = {"tokenizer.json": b'{"version": "1.0", "model": {"type": "WordLevel"}}', "tokenizer_config.json": b"{}"}


def _spec(kind: str, codec: str, *, order: bool = False, dtype: str = "float16") -> TargetSpec:
    topk, sampled = kind in ("topk", "both", "hybrid"), kind != "topk"
    packed = codec != "none"
    return TargetSpec(
        kind=kind, k=8 if topk else 0, logprob_dtype=dtype, samples=64 if sampled else 0, seed=1 if sampled else None,
        sampler="systematic" if sampled else "iid", codec=codec,
        id_bits=bits_for(VOCAB - 1) if packed else None,
        count_bits=(None if codec == "compact" else bits_for(64)) if sampled and packed else None,
        logprob_bits=12 if packed else None, logprob_min=-24.0 if packed else None,
        tail_logprob="direct" if topk else None,
        id_order=IdOrder.from_tokens([np.arange(VOCAB) % 37 * 7], limit=40) if order else None,
    )


def _manifest(spec: TargetSpec, hidden: bool) -> StoreManifest:
    layers = [HiddenLayer(1, 8, "bfloat16"), HiddenLayer(3, 4, "float16")] if hidden else []
    return StoreManifest(
        teacher=TeacherInfo(name_or_path="t", config_hash="sha256:abc", dtype="float32", vocab_size=VOCAB),
        tokenizer=TokenizerInfo(fingerprint="sha256:tok", vocab_size=VOCAB, special_tokens={"eos_token_id": 1}),
        targets=spec, hidden=HiddenSpec(layers=layers, chunk_tokens=16), rationales=True, generation={"mode": "test"},
    )


def _records(manifest: StoreManifest, count: int = 23, seed: int = 7) -> list[Record]:
    rng = np.random.default_rng(seed)
    spec = manifest.targets
    out = []
    for i in range(count):
        n = int(rng.integers(1, 50))
        s = int(rng.integers(1, n + 1))  # s == n: no scored position
        m = n - s
        logits = rng.normal(size=(m, VOCAB)) * rng.uniform(0.5, 4.0)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        ids = rng.integers(0, VOCAB, size=n).astype(np.int32)
        rec = Record(
            id=f"rec-{i:03d}", input_ids=ids, score_start=s,
            token_logprob=logp[np.arange(m), ids[s:]].astype(np.float32),
            prompt=None if i % 4 == 1 else f"prompt {i} ünïcode", messages=[{"role": "user", "content": f"hi {i}"}] if i % 3 else None,
            completion=None if i % 5 == 2 else f"c{i}", generated="g" if i % 2 else None, rationale=None,
            answer=str(i), meta={"i": i} if i % 2 else None, sample_index=i % 3, hidden_start=int(rng.integers(0, n + 1)),
        )
        if spec.has_topk:
            k = spec.k
            top = np.argsort(-logp, axis=-1, kind="stable")[:, :k].astype(np.int32)
            top_lp = np.take_along_axis(logp, top, -1)
            rest = logp.copy()
            np.put_along_axis(rest, top, -np.inf, axis=-1)
            with np.errstate(divide="ignore"):
                tail = np.log(np.exp(rest).sum(-1))
            if m > 1:  # a row with empty slots and an empty tail
                top[0, k // 2:], top_lp[0, k // 2:], tail[0] = -1, -np.inf, -np.inf
            rec.topk_ids = top
            rec.topk_logprobs = top_lp.astype(np.float16 if spec.logprob_dtype == "float16" else np.float32)
            rec.tail_logprob = np.minimum(tail, 0.0).astype(np.float32)
        if spec.has_sampled:
            p = np.exp(logp)
            cdf = np.cumsum(p, -1)
            points = (np.arange(64) + rng.random((m, 1))) / 64
            draws = np.array([np.searchsorted(cdf[r], points[r] * cdf[r, -1], side="right") for r in range(m)],
                             dtype=np.int64).reshape(m, 64)
            rec.sampled = sampled_from_draws(np.minimum(draws, VOCAB - 1))
        if manifest.hidden.layers:
            rows = n - rec.hidden_start
            rec.hidden = {1: rng.integers(0, 0x3F00, size=(rows, 8)).astype(np.uint16),
                          3: rng.normal(size=(rows, 4)).astype(np.float16)}
        out.append(rec)
    return out


CASES = {
    # case: (kind, codec, id order, logprob dtype, hidden) -> sha256 of each shard's records.arrow
    "topk-none-f16": ("topk", "none", False, "float16", True),
    "topk-none-f32": ("topk", "none", False, "float32", False),
    "topk-packed": ("topk", "packed", False, "float16", False),
    "sampled-none": ("sampled", "none", False, "float16", False),
    "sampled-packed": ("sampled", "packed", False, "float16", False),
    "sampled-compact": ("sampled", "compact", False, "float16", True),
    "sampled-compact-order": ("sampled", "compact", True, "float16", False),
    "both-packed": ("both", "packed", False, "float16", False),
    "both-compact": ("both", "compact", True, "float16", False),
    "hybrid-compact": ("hybrid", "compact", False, "float16", False),
}

EXPECTED: dict[str, list[str]] = {
    'both-compact': ['362c8082c191fc068bb650cf984aeba83a0e27a7c182adb87d3f0a1e90dac0b2', '8d6cb4f15d9ebe8e22ea2597736a69c38bebea10834e317ea926dc8661b49016', 'a2994a2358d102b8634aec9c50fb560997ae5f11025c78a3d8303ba6cf453ab5'],
    'both-packed': ['e4fa40c7dc5a5216155f57b7340af277941c58b6558e9e8c30ba2dbd30f1164c', '20f8d6884c53d3135c727bdcc31279c2e17577c60304a3e788dbdf1a63b61a69', 'fab2c493b0a696ad736c316c8344c7922b2393b576e2091ab80ae9cccd9ad385'],
    'hybrid-compact': ['8b4e2e572d5a28fcf893bf36b4ee13a68929df6417647e105b614d897cca7fdf', '0fe66cf948800f4791b1b11aab55a7a618738855959cca69c28e61f7a4c1bc35', '56c8f3bcf2ac8fcd7c6f52da2df201156b92246151488d6354136da5346f29b0'],
    'sampled-compact': ['93fb315142ae26b75ef236282f192dc9fc3d26c6770533d42939b456a61e0a65', '8f47a61cdd878b53782876cfb7cabb4277ef8695dd5f2e0653405fbf969f51ec', 'a11515798f392a98b1162939e636db171cb1b956969213084a2ac36513dd0a4c'],
    'sampled-compact/hidden': ['fcfc48dcefa383bf940eabee85fd58d45985a357f8adaf276c1a1a840209b224'],
    'sampled-compact-order': ['780426a08738380edcd323afd457bf9fa59e3e1d3ae0604aa1d6230796771fe9', 'b27b56386e96846c947bad1a9ca0ee7729e7a473e10c99055087c325166e87dd', 'cec7801930c0d8f9a20d34f995d980feea864525feb8fd1a01d3c472624a55be'],
    'sampled-none': ['8c32fb606e2edf802814b5f457a1efb520d579ed925c1d0c31ecbb4ba8b996c8', 'f0c4ec65d595312123679a20de8850c44d9687c60156d4ac695c29c076e25243', '4d455307ec3f9a40264e3ec8256f2afe5beb6d29ea3cc6eb0fa48e4e6baf8c7c'],
    'sampled-packed': ['34c6d0af453db10316432f559939ed10c53c5f07c2e3b4eff826d939815432f3', 'bf53bd8d982d8e7ac17810b87c15cffabc9f8f4b92a491c0e31aa0b2cc201020', '341d7fbfff88ca378b0456828ca133ac5bb3ee1a90a0d75e8579e83a980504db'],
    'topk-none-f16': ['bb8bf87f29d7754c0fff346fe342230fc8d339732865eb024f3929835e0cd081', '5a5b3c79e56ad081685cf7d0b420bda630a37bac0225bf9085b23da6456da958', '5a748603cadaec688bc0efb67e2bae6ec854a53f8eb1ec86365d19db9d384ace'],
    'topk-none-f16/hidden': ['b128745855470011cce5fe985d8c502880eebab8626a35f173a14c7ef1787be5'],
    'topk-none-f32': ['a73955b120777fde4b68a0556aae872b4ff884183ed487c1bf3e346f77b5499f', 'e8268b103dc9ab280550d3dc29e21015d0a634fc6ede84a81b4d6184644ad26c', 'c1ea609eaa0c08e757df7512004b0e923d2732ab09e8db07731b40ef2cf6baec'],
    'topk-packed': ['99ac37842e8c0d77736d78bee7e1d5358f36d4914739aa8887726d184c970ca0', '9ddae8ad5dc577402ab88b3ac2d3da3b77a571eda1a83fad346a16123a84ae6f', '39c0899647d6bfe576a26b24697e8194dbf459a5b86aa245ab9806ecd777e08b'],
}


def _write(tmp_path: str, case: str) -> dict[str, str]:
    kind, codec, order, dtype, hidden = CASES[case]
    manifest = _manifest(_spec(kind, codec, order=order, dtype=dtype), hidden)
    store = create_store(os.path.join(tmp_path, case), manifest, TOKENIZER)
    with store.writer("w-fixed", shard_records=10) as w:
        w.write_many(_records(manifest))
    digests = {}
    for commit in w.committed:
        for f in commit.files:
            with open(os.path.join(tmp_path, case, f.path), "rb") as fh:
                digest = hashlib.sha256(fh.read()).hexdigest()
            assert digest == f.sha256  # the commit record lists what is on disk
            digests[f.path] = digest
    return digests


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_records_same_bytes(tmp_path, case):
    digests = _write(str(tmp_path), case)
    arrow = [d for p, d in sorted(digests.items()) if p.endswith("records.arrow")]
    assert len(arrow) == 3  # 23 records: shards of 10, 10, 3
    assert arrow == EXPECTED[case]
    hidden = {p: d for p, d in digests.items() if "/hidden/" in p and "/c/" in p}
    assert bool(hidden) == CASES[case][4]
    if hidden:
        assert _digest_of(hidden) == EXPECTED[f"{case}/hidden"][0]


def _digest_of(digests: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{p}={d}\n" for p, d in sorted(digests.items())).encode()).hexdigest()


# -- the compact encoder of many records against the earlier one-record encoder ------------------------
def _reference_compact(t, places, buckets=RANK_BUCKETS):
    """The compact encoder as it was, one record at a time (format §4.3.2)."""
    row = _within(t.offsets)[0]
    counts = t.counts.astype(np.int64)
    parts, ks = [], []
    for part in (counts >= 2, counts == 1):
        order = np.lexsort((places[part], row[part]))
        offsets = _csr(np.bincount(row[part], minlength=t.num_positions))
        gaps = _gaps(offsets, places[part][order])
        bucket = _rank_bucket(offsets, buckets)
        k = np.array([_rice_k(gaps[bucket == b]) for b in range(buckets)], dtype=np.int64)
        parts.append((gaps, k[bucket], counts[part][order], offsets))
        ks.append(k)
    gaps = np.concatenate([parts[0][0], parts[1][0]])
    width = np.concatenate([parts[0][1], parts[1][1]])
    head = np.concatenate([[buckets], *ks]).astype(np.uint8)
    ids_stream = np.concatenate([head, pack_varbits(gaps & ((1 << width) - 1), width), pack_unary(gaps >> width)])
    counts_stream = np.concatenate([_gamma_stream(np.diff(parts[0][3]) + 1), _gamma_stream(parts[0][2] - 1)])
    return ids_stream, counts_stream


def _random_targets(rng: np.random.Generator, vocab: int, samples: int) -> SampledTargets:
    s = int(rng.integers(0, 40))
    if s == 0:
        return sampled_from_draws(np.zeros((0, samples), np.int64))
    spread = rng.choice([1, 3, 50, vocab])  # from one id per position to draws all over the vocabulary
    centre = rng.integers(0, vocab, size=(s, 1))
    draws = (centre + rng.integers(0, spread, size=(s, samples)) ** rng.integers(1, 3)) % vocab
    return sampled_from_draws(draws)


@pytest.mark.parametrize("seed", range(6))
def test_compact_of_many_records_is_the_one_record_coding(seed):
    rng = np.random.default_rng(seed)
    vocab = int(rng.choice([2, 300, 1 << 17]))
    samples = int(rng.choice([1, 2, 64, 1000]))
    targets = [_random_targets(rng, vocab, samples) for _ in range(int(rng.integers(1, 30)))]
    order = IdOrder(rng.permutation(vocab)[: min(vocab, 500)].tolist(), vocab=vocab) if seed % 2 else None
    buckets = int(rng.choice([1, RANK_BUCKETS, 13]))
    ids_data, ids_off, counts_data, counts_off = encode_sampled_compact_many(targets, order, buckets)
    for r, t in enumerate(targets):
        places = order.rank(t.ids) if order is not None else t.ids.astype(np.int64)
        want_ids, want_counts = _reference_compact(t, places, buckets)
        assert ids_data[ids_off[r] : ids_off[r + 1]].tobytes() == want_ids.tobytes()
        assert counts_data[counts_off[r] : counts_off[r + 1]].tobytes() == want_counts.tobytes()


@pytest.mark.parametrize("bits", [1, 7, 12, 17, 32])
def test_packing_many_records_is_packing_each(bits):
    rng = np.random.default_rng(bits)
    for counts in (rng.integers(0, 300, 25), np.full(6, 64 * 5), np.zeros(3, np.int64)):
        values = rng.integers(0, 1 << bits, int(counts.sum()), dtype=np.uint64)
        data, offsets = pack_bits_many(values, counts, bits)
        first = np.concatenate([[0], np.cumsum(counts)])
        for r in range(len(counts)):
            assert data[offsets[r] : offsets[r + 1]].tobytes() == pack_bits(values[first[r] : first[r + 1]], bits).tobytes()
    with pytest.raises(StoreError, match="does not fit"):
        pack_bits_many(np.array([1 << bits], dtype=np.uint64), np.array([1]), bits)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_the_compiled_quantiser_is_the_quantiser(dtype):
    q = LogprobQuantizer(12, -24.0)
    rng = np.random.default_rng(5)
    edges = [-np.inf, np.nan, np.inf, 0.0, -0.0, 1e-3, -24.0, -24.001, -6e4, -q.step / 2, -q.step * 1.5, -q.step * 2.5]
    lp = np.concatenate([edges, -rng.exponential(3.0, 3000), -np.arange(0, 24, q.step / 2)]).astype(dtype)
    counts = np.array([len(edges), 1000, 0, len(lp) - len(edges) - 1000])
    data, offsets = encode_logprobs_many(lp, counts, q)
    first = np.concatenate([[0], np.cumsum(counts)])
    for r in range(len(counts)):
        want = pack_bits(q.encode(lp[first[r] : first[r + 1]].astype(np.float32)), q.bits)
        assert data[offsets[r] : offsets[r + 1]].tobytes() == want.tobytes()
    if dtype == np.float16:  # whole top-k rows, empty slots included
        ids = rng.integers(-1, 300, (40, 8)).astype(np.int32)
        rows = lp[: 320].reshape(40, 8)
        ids_data, ids_off, lp_data, lp_off = encode_topk_many(ids, rows, np.array([0, 15, 25]), 9, q)
        for r, (a, b) in enumerate([(0, 0), (0, 15), (15, 40)]):
            want_ids, want_lp = encode_topk(ids[a:b], rows[a:b], 9, q)
            assert ids_data[ids_off[r] : ids_off[r + 1]].tobytes() == want_ids.tobytes()
            assert lp_data[lp_off[r] : lp_off[r + 1]].tobytes() == want_lp.tobytes()


def test_the_fast_top_k_check_passes_only_what_the_full_check_passes():
    rng = np.random.default_rng(3)
    edge = [-np.inf, np.nan, np.inf, -3.0, 0.0, -0.0, 1e-3, 0.0009765625, 0.001000047, 2e-3, -1e-3]
    passed = 0
    for trial in range(3000):
        ids = rng.integers(-2, 12, (3, 4)).astype(np.int32) if trial % 2 else rng.integers(0, 10, (3, 4)).astype(np.int32)
        lp = -rng.random((3, 4)).astype(np.float16 if trial % 3 else np.float32)
        if trial % 5:  # one value at an edge: only some of them pass
            lp[rng.integers(3), rng.integers(4)] = rng.choice(edge)
        if surely_sound_topk(ids, lp, 10):
            passed += 1
            assert not unsound_topk(ids, lp, 10).any()
    assert passed  # the fast path is taken
    fine = (-np.arange(12, dtype=np.float16) / 3).reshape(3, 4)
    assert surely_sound_topk(np.arange(12, dtype=np.int32).reshape(3, 4), fine, 12)
