"""bench/fidelity_common.py: its cached teacher (the reference, full KD, of the real-teacher student comparison
trains against log-probabilities computed once, so they must be the teacher's own, row for row), and
its verdict against the goal."""

from __future__ import annotations

import dataclasses
import itertools
import json

import fidelity_bands
import fidelity_common
import fidelity_real_students
import fidelity_students
import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def teacher() -> object:
    # imported here, not at collection: the model module imports Triton, which must not happen before
    # test_fused_capture.py sets TRITON_INTERPRET
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def _blocks() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    # mostly one length (batched), one shorter block (the one-at-a-time path)
    return [rng.integers(0, 97, size=n) for n in (12, 12, 12, 7, 12, 12, 12, 12, 12, 12)]


def test_cached_log_probs_are_the_teachers_row_for_row(tmp_path, teacher):
    blocks = _blocks()
    cache = fidelity_real_students.CachedTeacher(str(tmp_path / "t.f16"), blocks, teacher)
    # a right-padded batch in another order, as the store loader makes them
    order = [3, 0, 9]
    x = torch.zeros(3, 12, dtype=torch.int64)
    mask = torch.zeros_like(x)
    for b, i in enumerate(order):
        x[b, : len(blocks[i])] = torch.from_numpy(blocks[i])
        mask[b, : len(blocks[i])] = 1
    got = cache(input_ids=x, attention_mask=mask).logits
    for b, i in enumerate(order):
        with torch.no_grad():
            want = torch.log_softmax(teacher(input_ids=torch.from_numpy(blocks[i])[None]).logits[0].double(), -1)
        n = len(blocks[i])
        assert torch.allclose(got[b, :n].double(), want, atol=1e-2, rtol=2e-3)  # float16 log-probs
        assert torch.all(got[b, n:] == 0)
    # full KD through the cache is full KD through the teacher, at float16 precision
    student = type(teacher)(teacher.config)
    s_log = torch.log_softmax(student(input_ids=x).logits.double(), -1)
    with torch.no_grad():
        t_log = torch.log_softmax(teacher(input_ids=x, attention_mask=mask).logits.double(), -1)
    c_log = torch.log_softmax(got.double(), -1)
    live = (t_log.exp() * (t_log - s_log)).sum(-1)[mask.bool()]
    cached = (c_log.exp() * (c_log - s_log)).sum(-1)[mask.bool()]
    assert torch.allclose(live, cached, atol=5e-3, rtol=5e-3)


def test_cache_is_reused_only_for_the_same_blocks(tmp_path, teacher):
    blocks = _blocks()
    path = str(tmp_path / "t.f16")
    first = fidelity_real_students.CachedTeacher(path, blocks, teacher)
    again = fidelity_real_students.CachedTeacher(path, blocks, None)  # no teacher needed: read from the work folder
    x = torch.from_numpy(np.stack([blocks[0], blocks[1]]))
    assert torch.equal(first(input_ids=x).logits, again(input_ids=x).logits)
    with pytest.raises(SystemExit, match="no cached teacher log-probabilities"):
        fidelity_real_students.CachedTeacher(path, blocks[:5], None)
    with pytest.raises(KeyError):  # a row the cache never saw is not silently zero
        first(input_ids=torch.full((1, 12), 5, dtype=torch.int64))


def _run(ce: float, ece: float) -> dict[str, float]:
    return {"ce": ce, "kl": ce - 3.5, "ece": ece, "top1": 0.5}


def test_verdict_needs_every_seed_and_compares_ece_as_printed():
    # CE-only 5.0 and full KD 4.0 on each seed: a student at 4.04 keeps 96 % of the gain, at 4.06 94 %
    results = {
        "ce": [_run(5.0, 0.03)] * 3,
        "full": [_run(4.0, 0.02)] * 3,
        "steady": [_run(4.04, 0.020001), _run(4.04, 0.019999), _run(4.03, 0.02)],  # ECE equal as printed
        "one-bad-seed": [_run(3.99, 0.01), _run(3.99, 0.01), _run(4.06, 0.01)],  # mean 97.3 %, worst 94 %
        "dear": [_run(4.0, 0.01)] * 3,
        "miscalibrated": [_run(4.0, 0.0201)] * 3,
    }
    sizes = {"steady": 30.0, "one-bad-seed": 30.0, "dear": 40.1, "miscalibrated": 30.0}
    rows = fidelity_students.summarize(results, {k: {"target_bytes_per_token": v} for k, v in sizes.items()})
    lines = dict(line.split(": ", 1) for line in fidelity_students.verdict(rows))
    assert lines["steady"].endswith("MEETS the target"), lines["steady"]
    assert "94.0 % on its worst of 3 seeds (< 95 %)" in lines["one-bad-seed"]
    assert lines["one-bad-seed"].endswith("misses the target")
    assert "(> 40)" in lines["dear"] and lines["dear"].endswith("misses the target")
    assert "ECE 2.01 % vs full KD 2.00 % (worse; above it on 3 of 3 seeds)" in lines["miscalibrated"]
    assert lines["miscalibrated"].endswith("misses the target")


def test_target_bounds_systematic_marginals_match_the_sampler():
    """bench/target_bounds.py's closed form for systematic draws (error and distinct ids per position)
    against potstill's own sampler, over many uniforms."""
    import target_bounds

    from potstill.teacher_gen.capture import sample_chunk

    torch.manual_seed(0)
    logits = torch.randn(6, 50, dtype=torch.float64) * 2.5
    p = torch.softmax(logits, -1)
    n, repeats = 16, 4000
    uniforms = torch.from_numpy(np.random.default_rng(0).random((repeats * 6, n)))
    draws = sample_chunk(logits.repeat(repeats, 1), uniforms, sampler="systematic").long()
    counts = torch.zeros(repeats * 6, 50, dtype=torch.float64).scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float64))
    err = ((counts / n - p.repeat(repeats, 1)) ** 2).sum(-1).mean().item()
    distinct = (counts > 0).sum(-1).double().mean().item()
    want_err, want_distinct = target_bounds.systematic_marginals(p, n)
    assert abs(err - want_err) < 0.03 * want_err
    assert abs(distinct - want_distinct) < 0.01 * want_distinct
    # weighted draws (the text's token exact, the rest drawn): the error scales by the weight squared
    half_err, _ = target_bounds.systematic_marginals(p, n, torch.full((6,), 0.5, dtype=torch.float64))
    assert half_err == pytest.approx(want_err / 4)


def test_target_bounds_fisher_basis_is_exact_at_full_rank():
    import target_bounds

    g = torch.Generator().manual_seed(1)
    w = torch.randn(40, 8, generator=g, dtype=torch.float64)
    h = torch.randn(300, 8, generator=g, dtype=torch.float64)
    p = torch.softmax(h @ w.T, -1)
    mean, enc, dec = target_bounds.fisher_basis(h, p, w)
    torch.testing.assert_close(mean + (h - mean) @ enc @ dec, h)
    rows = target_bounds.low_rank_rows(h, p, w, ranks=[2, 8], bits=[8])
    assert rows[1]["kl"] < 1e-3 < rows[0]["kl"]  # int8 at full rank: close; rank 2 of 8: far


def test_report_merges_runs_of_other_seeds_only_with_the_same_settings(tmp_path):
    def run(seed_ce: float, **scale: float) -> dict:
        runs = {"ce": [_run(seed_ce, 0.03)], "full": [_run(4.0, 0.02)]}
        return {"teacher": {"ce": 3.9}, "stores": {}, "runs": runs, "curves": {"ce": [{}], "full": [{}]},
                "gradient_variance": {}, "scale": dataclasses.asdict(fidelity_common.Scale()) | scale}

    paths = []
    for name, saved in {"a": run(5.0), "b": run(5.1), "c": run(5.2, student_beta2=0.999)}.items():
        paths.append(str(tmp_path / f"{name}.json"))
        with open(paths[-1], "w") as f:
            json.dump(saved, f)
    merged = fidelity_students.merged_runs(paths[:2])
    assert [r["ce"] for r in merged["runs"]["ce"]] == [5.0, 5.1]
    with pytest.raises(SystemExit, match="student settings"):
        fidelity_students.merged_runs(paths[1:])
    # a target-error run (no students) merges with nothing, whichever file comes first
    target_error = str(tmp_path / "t.json")
    with open(target_error, "w") as f:
        json.dump({"real_teacher": "t", "runs": []}, f)
    for pair in ([target_error, paths[0]], [paths[0], target_error]):
        with pytest.raises(SystemExit, match="is not a run of the same teacher"):
            fidelity_students.merged_runs(pair)


@pytest.mark.parametrize("final", [0.1, 0.0])
def test_student_schedule_warms_up_then_ends_at_its_final_fraction(final):
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    lr = fidelity_common.schedule(optimizer, steps=100, warmup=5, final=final)
    seen = []
    for _ in range(100):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        lr.step()
    assert seen[0] == pytest.approx(2.0 / 5) and seen[4] == pytest.approx(2.0)
    assert seen[-1] == pytest.approx(2.0 * final, abs=2e-3) and min(seen[5:]) >= 2.0 * final


def test_eval_steps_for_other_run_lengths_are_the_cpu_scales_fractions():
    assert fidelity_common.eval_steps_for(400) == fidelity_common.SCALES["cpu"].eval_steps
    assert fidelity_common.eval_steps_for(100) == (12, 25, 50, 75)
    assert fidelity_common.eval_steps_for(4) == (1, 2, 3)  # never step 0 or the last step (measured at the end)


def test_student_optimizer_gives_the_output_layer_its_own_learning_rate(teacher):
    scale = dataclasses.replace(fidelity_common.Scale(), student_lr=0.01, student_head_lr=5.0)
    head = teacher.get_output_embeddings().weight
    optimizer = fidelity_common.student_optimizer(teacher, head, scale)
    lr = fidelity_common.schedule(optimizer, steps=10, warmup=1, final=0.1)
    rest, head_group = optimizer.param_groups
    assert head_group["params"] == [head] and all(p is not head for p in rest["params"])
    assert len(rest["params"]) + 1 == len(list(teacher.parameters()))
    optimizer.step()  # no gradients: changes nothing
    lr.step()  # past the warmup: the peak rates
    assert rest["lr"] == pytest.approx(0.01) and head_group["lr"] == pytest.approx(0.05)
    assert rest["betas"] == head_group["betas"] == (0.9, 0.95)  # the head's β₂ is the others' unless set
    assert rest["weight_decay"] == head_group["weight_decay"] == 0.1
    rest, head_group = fidelity_common.student_optimizer(
        teacher, head, dataclasses.replace(scale, student_head_beta2=0.999, student_head_wd=0.0)).param_groups
    assert rest["betas"] == (0.9, 0.95) and head_group["betas"] == (0.9, 0.999)
    assert rest["weight_decay"] == 0.1 and head_group["weight_decay"] == 0.0


def test_frequency_bands_rank_ids_by_their_count_in_the_text():
    counts = np.arange(2000)[::-1]  # id i occurs 2000 - i times: rank = id
    tokens = np.repeat(np.arange(2000), counts)
    bands = fidelity_common.frequency_bands(tokens, 2048)
    assert bands[:16].tolist() == [0] * 16 and bands[16:256].tolist() == [1] * 240
    assert set(bands[256:1024].tolist()) == {2} and set(bands[1024:].tolist()) == {3}
    # ids that never occur rank last, after every id that does
    swapped = fidelity_common.frequency_bands(np.concatenate([tokens, np.full(5000, 1999)]), 2048)
    assert swapped[1999] == 0 and swapped[15] == 1


def test_kl_by_band_adds_up_to_the_kl_and_the_band_table_pairs_seeds(teacher):
    torch.manual_seed(1)
    student = fidelity_common.llama(97, 32, 1, 64, seed=5).eval()
    head_rms = np.linspace(1.0, 2.0, 97)
    heldout = np.stack(_blocks()[:3])
    bands = np.arange(97) % 4
    out = fidelity_common.evaluate(student, teacher, heldout, "cpu", bands=bands, head_rms=head_rms)
    assert sum(out[f"kl_band{b}"] for b in range(4)) == pytest.approx(out["kl"], rel=1e-5)
    with torch.no_grad():  # float64 reference: Σ over the band's ids of p·(log p − log q), per position
        x = torch.from_numpy(heldout)
        t_log = torch.log_softmax(teacher(input_ids=x).logits[:, :-1].double(), -1)
        s_log = torch.log_softmax(student(input_ids=x).logits[:, :-1].double(), -1)
        terms = (t_log.exp() * (t_log - s_log)).reshape(-1, 97)
    for b in range(4):
        want = terms[:, torch.from_numpy(bands == b)].sum().item() / terms.shape[0]
        assert out[f"kl_band{b}"] == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert out["head_rms_band1"] == pytest.approx(float(np.median(head_rms[bands == 1])))
    # the student's mass on each band's ids minus the teacher's, per position; the bands' sum is 0
    for b in range(4):
        want = (s_log.exp() - t_log.exp()).reshape(-1, 97)[:, torch.from_numpy(bands == b)].sum().item() / terms.shape[0]
        assert out[f"mass_band{b}"] == pytest.approx(want, rel=1e-4, abs=1e-7)
    assert abs(sum(out[f"mass_band{b}"] for b in range(4))) < 1e-6
    # mean top-1 probability minus the accuracy on the text's next tokens
    top, pred = s_log.exp().max(-1)
    assert out["overconfidence"] == pytest.approx((top.mean() - (pred == x[:, 1:]).double().mean()).item(), abs=1e-6)
    assert "kl_band0" not in fidelity_common.evaluate(student, teacher, heldout, "cpu")

    def run(kl: float, rms: float) -> dict[str, float]:
        return {f"kl_band{b}": kl * (b + 1) for b in range(4)} | {f"head_rms_band{b}": rms for b in range(4)}

    table = fidelity_bands.band_table({"ce": [run(0.5, 1.0), run(0.7, 1.0)], "full": [run(0.1, 1.0), run(0.2, 2.0)],
                                 "systematic64": [run(0.2, 2.0), run(0.3, 4.0)]})
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()}
    # paired per seed: band 0's KL gap is +0.1 on both seeds; the RMS ratio is 2 on both
    assert "| +0.1000 ± 0.0000 | +0.2000 ± 0.0000 |" in rows["systematic64"] and "2.00 ± 0.00" in rows["systematic64"]
    assert "full" not in rows and "KL − full KD's, ids 1,024+" in table
    assert fidelity_bands.band_table({"ce": [{"ce": 1.0}], "full": [{"ce": 1.0}]}) == ""
    assert "accuracy" not in table  # runs saved before the mass by band: no calibration table

    def calibrated(kl: float, rms: float, over: float) -> dict[str, float]:
        return run(kl, rms) | {"overconfidence": over} | {f"mass_band{b}": (1.5 - b) * over for b in range(4)}

    table = fidelity_bands.band_table({"ce": [calibrated(0.5, 1.0, 0.01), calibrated(0.7, 1.0, 0.03)],
                                 "full": [calibrated(0.1, 1.0, 0.0), calibrated(0.2, 2.0, 0.0)]})
    second = table.split("\n\n")[1].splitlines()
    # band b holds (1.5 − b) × the gap: seeds 1 % and 3 % give band 0 1.5 % and 4.5 %
    assert second[0].startswith("| variant | top-1 probability − accuracy, % |")
    assert second[2] == "| ce | +2.00 ± 1.41 | +3.00 ± 2.12 | +1.00 ± 0.71 | -1.00 ± 0.71 | -3.00 ± 2.12 |"
    assert second[3].startswith("| full | +0.00 ± 0.00 |")


def _records_with_context_draws(n: int = 40) -> list:
    """Records whose draws depend on the current token only: after token c, ids 200 + 3c .. 200 + 3c + 5,
    far from the small places of the text's own frequent tokens."""
    from types import SimpleNamespace

    from potstill.store.codec import sampled_from_draws

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        ids = rng.integers(0, 20, size=33)
        ctx = ids[:-1]  # score_start 1: position j's current token is ids[j]
        draws = 200 + 3 * ctx[:, None] + rng.integers(0, 6, size=(len(ctx), 8))
        out.append(SimpleNamespace(input_ids=ids, score_start=1, sampled=sampled_from_draws(draws)))
    return out


def test_context_order_lists_and_sizes():
    import context_order

    from potstill.store.codec import IdOrder, encode_sampled_compact

    records = _records_with_context_draws()
    order = IdOrder(IdOrder.from_tokens([r.input_ids for r in records]), vocab=512)
    plain = sum(sum(len(s) for s in encode_sampled_compact(r.sampled, order)) for r in records)
    assert context_order.coded_bytes(records, 512, order, None) == plain  # the compact codec itself, byte for byte
    listed, rank, length = context_order.context_lists(records, 512, order, min_hits=2, max_list=4)
    assert length.max() == 4 and set(np.flatnonzero(length)) <= set(range(20))
    # each listed id was drawn after its context in ≥ 2 positions; rank 0 is the one drawn after it most
    keys, hits = np.unique(context_order.entry_keys(records, 512), return_counts=True)
    hits_of = dict(zip(keys.tolist(), hits.tolist(), strict=True))
    assert all(hits_of[k] >= 2 for k in listed.tolist())
    for c in np.flatnonzero(length):
        in_list = sorted((int(r), hits_of[int(k)]) for k, r in zip(listed, rank, strict=True) if k // 512 == c)
        assert [r for r, _ in in_list] == list(range(length[c]))
        assert all(a[1] >= b[1] for a, b in itertools.pairwise(in_list))  # most hits first
        assert in_list[0][1] == max(h for k, h in hits_of.items() if k // 512 == c)
    # draws that follow their context are coded in fewer bytes by their place in its list
    full_lists = context_order.context_lists(records, 512, order, min_hits=1, max_list=1024)
    assert context_order.coded_bytes(records, 512, order, full_lists) < 0.8 * plain
