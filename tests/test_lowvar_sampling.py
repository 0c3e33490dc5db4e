"""Lower-variance sampled targets (docs/reference/store-format.md §4.2, §4.5): systematic and stratified draws
and hybrid targets (the exact top-H plus draws from the rest). Each estimate of the teacher's
distribution, and so each gradient of the sampled KD loss, is unbiased against the exact float64
value (mean over many seeded draws, tolerance from the standard error); systematic counts stay within
floor/ceil of N·p; the variance is below i.i.d. draws'; manifests, resumes, both codecs and
`potstill generate` + `potstill train` carry the new modes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from common import prompt_rows, write_jsonl
from genhelpers import config, run_cli

from potstill.share.info import describe_targets
from potstill.store import open_store, verify_store
from potstill.store.codec import sampled_from_draws
from potstill.store.errors import StoreError
from potstill.store.manifest import TargetSpec
from potstill.student_train.data import hybrid_weights
from potstill.student_train.losses import sampled_kd
from potstill.teacher_gen.capture import sample_chunk, topk_logprobs
from potstill.teacher_gen.errors import GenerateError
from potstill.teacher_gen.runner import generate

V, N, REPEATS = 40, 8, 4000


def _logits(seed: int = 0) -> torch.Tensor:
    """One teacher row: a peaked head and a spread-out rest (fp32, like the capture's widened logits)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(V, generator=g) * 1.5
    x[:3] += torch.tensor([4.0, 3.0, 2.0])
    return x


def _exact(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x.double(), -1)


def _estimates(x: torch.Tensor, sampler: str, hybrid_k: int = 0, n: int = N, repeats: int = REPEATS,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`repeats` independent target sets for one teacher row, made by the capture code (top-k,
    log tail, draws) and weighted as the loader weights them: (ids [R, W], weights [R, W])."""
    rows = x.expand(repeats, V).contiguous()
    uniforms = torch.from_numpy(np.random.default_rng(seed).random((repeats, n)))
    draws = torch.empty(uniforms.shape, dtype=torch.int32)
    head = torch.nn.Identity()
    ids, lp, _, tail = topk_logprobs(rows, head, torch.zeros(repeats, dtype=torch.long), hybrid_k, uniforms=uniforms,
                                     draws_out=draws, sampler=sampler, draw_from_rest=hybrid_k > 0)
    sampled = sampled_from_draws(draws.numpy())
    if hybrid_k:
        return hybrid_weights(ids.numpy(), lp.numpy(), tail.numpy(), sampled, np.arange(repeats))
    got, counts = sampled.padded()
    return got, counts / n


def _dense(ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
    out = np.zeros((len(ids), V))
    for r in range(len(ids)):
        keep = ids[r] >= 0
        np.add.at(out[r], ids[r][keep], weights[r][keep])
    return out


MODES = [("iid", 0), ("systematic", 0), ("stratified", 0), ("iid", 2), ("systematic", 3), ("stratified", 2)]


@pytest.mark.parametrize(("sampler", "hybrid_k"), MODES)
def test_every_mode_s_gradient_is_an_unbiased_estimate_of_full_kd(sampler: str, hybrid_k: int) -> None:
    x = _logits()
    p = _exact(x)
    z = torch.randn(V, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ids, weights = _estimates(x, sampler, hybrid_k)
    logits = z.expand(REPEATS, V).clone().requires_grad_(True)
    sampled_kd(logits, torch.from_numpy(ids), torch.from_numpy(weights.astype(np.float64))).sum().backward()
    grads = logits.grad
    exact = torch.softmax(z, -1) - p  # full forward KL's gradient, float64
    se = grads.std(0) / REPEATS**0.5
    drawn = se > 1e-9  # the exact top-H: no variance, and exact to the float32 weights the loader hands out
    z_scores = (grads.mean(0) - exact)[drawn] / se[drawn]
    assert z_scores.abs().max() < 5.0, z_scores
    assert torch.allclose(grads.mean(0)[~drawn], exact[~drawn], atol=1e-6)
    assert drawn.sum() >= V - hybrid_k - 1
    if hybrid_k:  # power: weighting the draws from the rest as if they came from p is biased far beyond that
        dense = _dense(ids, weights)
        wrong = dense.copy()
        wrong[:, hybrid_k:] = 0
        rest = np.isin(np.arange(V), ids[0, :hybrid_k], invert=True)
        wrong[:, rest] = dense[:, rest] / dense[:, rest].sum(1, keepdims=True)  # counts / N, no tail weight
        bias = (wrong.mean(0) - p.numpy()) / (dense.std(0) / REPEATS**0.5 + 1e-12)
        assert np.abs(bias).max() > 20


def test_systematic_counts_stay_within_floor_and_ceil_of_n_p() -> None:
    for seed in range(5):
        x = _logits(seed)
        p = _exact(x).numpy()
        for n in (7, 12, 50):
            ids, weights = _estimates(x, "systematic", n=n, repeats=200, seed=seed)
            counts = np.rint(_dense(ids, weights) * n)
            assert np.all(counts.sum(1) == n)
            assert np.all(counts >= np.floor(n * p - 1e-9)) and np.all(counts <= np.ceil(n * p + 1e-9))
    # stratified and i.i.d. counts do leave that band
    ids, weights = _estimates(_logits(), "iid", repeats=200)
    counts = np.rint(_dense(ids, weights) * N)
    assert np.any(counts > np.ceil(N * _exact(_logits()).numpy()))


def test_spaced_and_hybrid_draws_have_lower_variance_than_iid_at_the_same_n() -> None:
    x = _logits(1)
    variance = {f"{s}/{k}": _dense(*_estimates(x, s, k)).var(0).sum() for s, k in MODES}
    assert variance["systematic/0"] < 0.5 * variance["iid/0"]
    assert variance["stratified/0"] < 0.8 * variance["iid/0"]
    assert variance["iid/2"] < 0.8 * variance["iid/0"]
    assert variance["systematic/3"] < variance["iid/2"]


def test_points_follow_the_recipe_and_draws_depend_only_on_their_row() -> None:
    x = torch.stack([_logits(s) for s in range(6)])
    u = torch.from_numpy(np.random.default_rng(3).random((6, N)))
    cdf = torch.softmax(x.double(), -1).cumsum(-1)
    for sampler, points in (("systematic", (torch.arange(N) + u[:, :1]) / N), ("stratified", (torch.arange(N) + u) / N)):
        want = torch.searchsorted(cdf, (points * cdf[:, -1:]).contiguous(), right=True)
        got = sample_chunk(x, u, sampler=sampler)
        assert torch.equal(got.long(), want)
        assert torch.equal(sample_chunk(x[2:3], u[2:3], sampler=sampler), got[2:3])
    top = x.topk(2, -1).indices
    rest = sample_chunk(x, u, sampler="systematic", exclude=top)
    assert not (rest[..., None] == top[:, None, :]).any()


def test_manifest_round_trip_and_refusals() -> None:
    spec = TargetSpec(kind="hybrid", k=3, samples=12, seed=1, sampling="s", sampler="systematic")
    assert spec.has_topk and spec.has_sampled and spec.draws_from_rest
    d = spec.to_dict()
    assert d["sampler"] == "systematic" and d["kind"] == "hybrid"
    assert TargetSpec(**{k: v for k, v in d.items() if k in TargetSpec.__dataclass_fields__}) == spec
    assert TargetSpec(kind="sampled", k=0, samples=12).to_dict()["sampler"] == "iid"  # written for every sampler
    with pytest.raises(StoreError, match="targets.sampler must be one of"):
        TargetSpec(kind="sampled", k=0, samples=12, sampler="antithetic")


def test_a_reader_without_the_hybrid_kind_refuses_a_hybrid_store_in_one_line(tmp_path, tiny_teacher_dir, monkeypatch) -> None:
    from potstill.store import targets

    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(2, seed=1))
    url = str(tmp_path / "h.store")
    generate(config(tiny_teacher_dir, prompts, url, targets="hybrid", top_k=2, samples=6))
    monkeypatch.delitem(targets.KINDS, "hybrid")  # a reader that knows topk, sampled and both
    with pytest.raises(StoreError) as info:
        open_store(url)
    assert "\n" not in str(info.value) and "unknown target kind 'hybrid'" in str(info.value)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> str:
    return write_jsonl(str(tmp_path_factory.mktemp("lowvar") / "p.jsonl"), prompt_rows(6, seed=4))


def test_hybrid_targets_in_both_codecs_hold_the_same_draws_and_exact_tails(tmp_path, tiny_teacher_dir, prompts) -> None:
    stores = {}
    for codec in ("none", "packed"):
        url = str(tmp_path / f"{codec}.store")
        generate(config(tiny_teacher_dir, prompts, url, targets="hybrid", top_k=3, samples=10, sampler="stratified",
                        codec=codec, seed=5, logprob_dtype="float32"))
        assert verify_store(url).ok
        stores[codec] = {r.id: r for r in open_store(url).iter_records()}
    both = str(tmp_path / "both.store")  # same top-3 and tails as "both" targets; the draws differ (from the rest)
    generate(config(tiny_teacher_dir, prompts, both, targets="both", top_k=3, samples=10, seed=5, logprob_dtype="float32"))
    plain = {r.id: r for r in open_store(both).iter_records()}
    for rid, rec in stores["none"].items():
        packed = stores["packed"][rid]
        assert np.array_equal(rec.topk_ids, packed.topk_ids) and np.array_equal(rec.tail_logprob, packed.tail_logprob)
        for a, b in zip((rec.sampled.offsets, rec.sampled.ids, rec.sampled.counts),
                        (packed.sampled.offsets, packed.sampled.ids, packed.sampled.counts), strict=True):
            assert np.array_equal(a, b)
        assert np.array_equal(rec.topk_ids, plain[rid].topk_ids)
        assert np.array_equal(rec.tail_logprob, plain[rid].tail_logprob)  # the exact, directly formed tail
        for j in range(rec.num_scored):
            ids, counts = rec.sampled.position(j)
            assert counts.sum() == 10 and not np.isin(ids, rec.topk_ids[j]).any()


def test_a_resumed_run_refuses_another_sampler_and_writes_nothing(tmp_path, tiny_teacher_dir) -> None:
    half = write_jsonl(str(tmp_path / "half.jsonl"), prompt_rows(6, seed=4)[:3])
    whole = write_jsonl(str(tmp_path / "whole.jsonl"), prompt_rows(6, seed=4))
    url = str(tmp_path / "s.store")
    generate(config(tiny_teacher_dir, half, url, targets="sampled", samples=8, sampler="systematic"))
    for other in (dict(targets="sampled", sampler="iid"), dict(targets="sampled", sampler="stratified"),
                  dict(targets="hybrid", top_k=2, sampler="systematic")):
        with pytest.raises(StoreError) as info:
            generate(config(tiny_teacher_dir, whole, url, samples=8, **other))
        assert "\n" not in str(info.value) and "another sampler" in str(info.value)
    assert open_store(url).num_records == 3
    summary = generate(config(tiny_teacher_dir, whole, url, targets="sampled", samples=8, sampler="systematic"))
    assert summary.records == 3 and summary.already_done == 3


def test_bad_sampler_settings_are_refused_in_one_line(tmp_path, tiny_teacher_dir, prompts) -> None:
    with pytest.raises(GenerateError, match="--sampler must be one of iid, systematic, stratified; got 'sobol'"):
        config(tiny_teacher_dir, prompts, str(tmp_path / "x"), targets="sampled", sampler="sobol")


@pytest.mark.slow
def test_generate_hybrid_then_train_through_the_cli(tmp_path, tiny_teacher_dir, tiny_tokenizer_dir, prompts) -> None:
    from common import build_student

    url = str(tmp_path / "cli.store")
    out = run_cli(["generate", "--teacher", tiny_teacher_dir, "--prompts", prompts, "--out", url, "--targets", "hybrid",
                   "--top-k", "2", "--samples", "12", "--sampler", "systematic", "--codec", "packed", "--device", "cpu",
                   "--no-progress"])
    assert out.returncode == 0, out.stderr
    t = open_store(url).manifest.targets
    assert (t.kind, t.k, t.samples, t.sampler, t.codec) == ("hybrid", 2, 12, "systematic", "packed")
    assert "sampled N=12 from the rest (systematic draws" in describe_targets(open_store(url).manifest.targets.to_dict())
    student = build_student(str(tmp_path / "student"), tiny_tokenizer_dir, hidden=16)
    run = run_cli(["train", "--store", url, "--student", student, "--out", str(tmp_path / "run"), "--max-steps", "4",
                   "--batch-size", "2", "--eval-fraction", "0", "--report-to", "none", "--num-workers", "0"])
    assert run.returncode == 0, run.stderr[-2000:]
    with open(tmp_path / "run" / "training_report.json") as f:
        report = json.load(f)
    assert report["targets"] == "sampled" and report["global_step"] == 4  # auto: the unbiased hybrid estimate
