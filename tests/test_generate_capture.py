"""The capture math of `potstill generate` against direct references on real tiny models:
full-softmax top-k, output_hidden_states, batching, chunking, logit transforms, chat prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from common import prompt_rows, write_jsonl
from genhelpers import assert_topk_close, config, reference_log_tail, reference_logprobs

from potstill.store import decode_hidden, open_store, verify_store
from potstill.teacher_gen.errors import GenerateError
from potstill.teacher_gen.runner import generate


@pytest.fixture(scope="module")
def teacher_model(tiny_teacher_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()


@pytest.fixture(scope="module")
def scored_store(tmp_path_factory, tiny_teacher_dir):
    """One score-mode run with fp32 log-probs and hidden layers 0, 1 and -1 (= 2, post-norm)."""
    tmp = tmp_path_factory.mktemp("scored")
    prompts = write_jsonl(str(tmp / "p.jsonl"), prompt_rows(12, seed=1))
    cfg = config(tiny_teacher_dir, prompts, str(tmp / "s.store"), hidden_layers="0,1,-1",
                 logprob_dtype="float32", batch_tokens=64, chunk_positions=7)
    summary = generate(cfg)
    assert summary.records == 12 and not summary.errors
    return open_store(str(tmp / "s.store"))


def test_scoring_equals_full_softmax_reference(scored_store, teacher_model):
    k = scored_store.manifest.targets.k
    assert k == 64
    checked = 0
    for rec in scored_store.iter_records():
        ref = reference_logprobs(teacher_model, rec.input_ids)  # row p: distribution of token p + 1
        s, n = rec.score_start, len(rec.input_ids)
        rows = ref[s - 1 : n - 1]
        order = np.argsort(-rows, axis=-1, kind="stable")[:, :k]
        top = np.take_along_axis(rows, order, -1)
        assert_topk_close(rec.topk_ids, rec.topk_logprobs, order.astype(np.int32), top, atol=1e-4)
        np.testing.assert_allclose(rec.token_logprob, rows[np.arange(n - s), rec.input_ids[s:]], atol=1e-4)
        # the log tail against a float64 sum over the other tokens: exact to float32 (mass relative 1e-5)
        want = reference_log_tail(teacher_model, rec.input_ids, rec.topk_ids, s)
        np.testing.assert_allclose(rec.tail_logprob, want, rtol=0, atol=1e-5)
        assert rec.tail_logprob.dtype == np.float32 and np.all(rec.tail_logprob < 0)
        checked += n - s
    assert checked > 20
    assert scored_store.manifest.format_version == "1.0" and scored_store.manifest.targets.tail_logprob == "direct"
    assert verify_store(scored_store.url).ok  # tail_mass = exp(tail_logprob)


def test_fp16_logprobs_within_fp16_precision(tmp_path, tiny_teacher_dir, teacher_model):
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(4, seed=2))
    generate(config(tiny_teacher_dir, prompts, str(tmp_path / "s")))  # default: float16 log-probs
    store = open_store(str(tmp_path / "s"))
    assert store.manifest.targets.logprob_dtype == "float16"
    for rec in store.iter_records():
        assert rec.topk_logprobs.dtype == np.float16
        rows = reference_logprobs(teacher_model, rec.input_ids)[rec.score_start - 1 :]
        order = np.argsort(-rows, axis=-1, kind="stable")[:, :64]
        top = np.take_along_axis(rows, order, -1)
        # fp16 keeps 11 significant bits: |error| <= 2^-11 |x|
        tol = float(np.abs(top).max()) * 2.0**-10
        assert_topk_close(rec.topk_ids, rec.topk_logprobs, order.astype(np.int32), top, atol=tol)
        # the log tail is computed in fp32 and stored as float32, whatever the log-probs' dtype
        want = reference_log_tail(teacher_model, rec.input_ids, rec.topk_ids, rec.score_start)
        np.testing.assert_allclose(rec.tail_logprob, want, rtol=0, atol=1e-5)


def test_hidden_states_equal_output_hidden_states(scored_store, teacher_model):
    layers = scored_store.manifest.hidden.layers
    assert [(x.index, x.post_norm, x.width) for x in layers] == [(0, False, 32), (1, False, 32), (2, True, 32)]
    raw_last = []  # the last decoder layer's own output, before the final norm
    hook = teacher_model.model.layers[-1].register_forward_hook(lambda m, a, out: raw_last.append(out))
    try:
        for i in range(len(scored_store)):
            rec = scored_store.record(i, with_hidden=True)
            assert rec.hidden_start == 0
            with torch.no_grad():
                out = teacher_model(input_ids=torch.from_numpy(rec.input_ids[None].astype(np.int64)),
                                    output_hidden_states=True)
            for layer in layers:
                got = decode_hidden(rec.hidden[layer.index], "bfloat16")
                want = out.hidden_states[layer.index][0].numpy()
                assert got.shape == want.shape == (len(rec.input_ids), 32)
                # bfloat16 keeps 8 significant bits
                np.testing.assert_allclose(got, want, rtol=2.0**-7, atol=1e-6)
            # index 2 = -1 is after the final norm, which differs from the raw last layer output
            raw = raw_last[-1][0].numpy()
            assert not np.allclose(decode_hidden(rec.hidden[2], "bfloat16"), raw, atol=1e-2)
    finally:
        hook.remove()


def test_float16_hidden_and_scored_rows_only(tmp_path, tiny_teacher_dir, teacher_model):
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(3, seed=3))
    generate(config(tiny_teacher_dir, prompts, str(tmp_path / "s"), hidden_layers="-2",
                    hidden_dtype="float16", hidden_tokens="scored"))
    store = open_store(str(tmp_path / "s"))
    assert [(x.index, x.dtype) for x in store.manifest.hidden.layers] == [(1, "float16")]
    for i in range(len(store)):
        rec = store.record(i, with_hidden=True)
        assert rec.hidden_start == rec.score_start
        with torch.no_grad():
            want = teacher_model(input_ids=torch.from_numpy(rec.input_ids[None].astype(np.int64)),
                                 output_hidden_states=True).hidden_states[1][0, rec.hidden_start :].numpy()
        assert rec.hidden[1].dtype == np.float16
        np.testing.assert_allclose(rec.hidden[1].astype(np.float32), want, rtol=2.0**-10, atol=1e-4)


def _teacher(tiny_teacher_dir, tokenizer_dir=None, **overrides):
    from transformers import AutoTokenizer

    from potstill.teacher_gen.capture import resolve_layers
    from potstill.teacher_gen.hf_backend import HFTeacher
    from potstill.teacher_gen.model_info import describe_teacher

    cfg = config(tiny_teacher_dir, "unused.jsonl", "unused.store", **overrides)
    spec = describe_teacher(cfg)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir or tiny_teacher_dir)
    return HFTeacher(cfg, spec, tok, resolve_layers(cfg.hidden_layers, spec.num_layers))


def _jobs(n: int, seed: int = 0):
    from potstill.teacher_gen.jobs import ScoreJob

    rng = np.random.default_rng(seed)
    jobs = []
    for i in range(n):
        length = int(rng.integers(4, 40))
        ids = rng.integers(3, 384, size=length).astype(np.int32)
        s = int(rng.integers(1, length))
        jobs.append(ScoreJob(f"j{i}", None, ids, score_start=s, hidden_start=int(rng.integers(0, length))))
    return jobs


def test_batched_equals_one_by_one_and_chunking_is_invisible(tiny_teacher_dir):
    jobs = _jobs(9)
    big = _teacher(tiny_teacher_dir, hidden_layers="0,2")
    small_chunks = _teacher(tiny_teacher_dir, hidden_layers="0,2", chunk_positions=5)
    batched = big.score(jobs)()
    chunked = small_chunks.score(jobs)()
    for job, together, chunk_run in zip(jobs, batched, chunked, strict=True):
        alone = big.score([job])()[0]
        assert len(together.targets) == len(job) - job.score_start
        for other in (alone, chunk_run):
            assert_topk_close(together.targets.ids, together.targets.logprobs, other.targets.ids,
                              other.targets.logprobs, atol=1e-5)
            np.testing.assert_allclose(together.targets.token_logprob, other.targets.token_logprob, atol=1e-5)
            np.testing.assert_allclose(together.targets.tail_logprob, other.targets.tail_logprob, atol=1e-5)
            for index in (0, 2):
                assert together.hidden[index].shape == (len(job) - job.hidden_start, 32)
                np.testing.assert_allclose(decode_hidden(together.hidden[index], "bfloat16"),
                                           decode_hidden(other.hidden[index], "bfloat16"), rtol=2.0**-7, atol=1e-6)


def test_top_k_equal_to_the_vocabulary_keeps_the_whole_distribution(tmp_path, tiny_teacher_dir, teacher_model):
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(2, seed=4))
    vocab = 384  # (a larger --top-k is refused before anything is written: tests/test_generate_integrity.py)
    generate(config(tiny_teacher_dir, prompts, str(tmp_path / "s"), top_k=vocab, logprob_dtype="float32"))
    rec = open_store(str(tmp_path / "s")).record(0)
    assert rec.topk_ids.shape[1] == vocab
    assert np.all(np.sort(rec.topk_ids, axis=1) == np.arange(vocab))
    assert np.isneginf(rec.tail_logprob).all()  # the whole distribution is kept: no tail at all
    assert verify_store(str(tmp_path / "s")).ok


@pytest.fixture(scope="module")
def softcapped_teacher_dir(tmp_path_factory, tiny_tokenizer_dir):
    """A random Gemma-2 (final_logit_softcapping, scaled embeddings) saved like a checkpoint."""
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("gemma2"))
    cfg = Gemma2Config(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                       final_logit_softcapping=3.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = Gemma2ForCausalLM(cfg)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(20.0)  # big logits, so the soft cap really bends them
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_tokenizer_dir).save_pretrained(path)
    return path


def test_logit_softcapping_matches_the_model(tmp_path, softcapped_teacher_dir):
    from transformers import AutoModelForCausalLM

    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(3, seed=5))
    generate(config(softcapped_teacher_dir, prompts, str(tmp_path / "s"), logprob_dtype="float32",
                    hidden_layers="0"))
    model = AutoModelForCausalLM.from_pretrained(softcapped_teacher_dir).eval()
    store = open_store(str(tmp_path / "s"))
    for i in range(len(store)):
        rec = store.record(i, with_hidden=True)
        rows = reference_logprobs(model, rec.input_ids)[rec.score_start - 1 :]
        order = np.argsort(-rows, axis=-1, kind="stable")[:, :64]
        assert_topk_close(rec.topk_ids, rec.topk_logprobs, order.astype(np.int32),
                          np.take_along_axis(rows, order, -1), atol=1e-4)
        with torch.no_grad():  # hidden_states[0] of Gemma is the *scaled* embedding
            want = model(input_ids=torch.from_numpy(rec.input_ids[None].astype(np.int64)),
                         output_hidden_states=True).hidden_states[0][0].numpy()
        np.testing.assert_allclose(decode_hidden(rec.hidden[0], "bfloat16"), want, rtol=2.0**-7, atol=1e-6)


def test_unknown_logit_transform_is_refused_before_writing(tmp_path, softcapped_teacher_dir, monkeypatch):
    import potstill.teacher_gen.hf_backend as hf

    monkeypatch.setattr(hf, "logit_transform", lambda cfg: None)  # pretend potstill did not know softcapping
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(2, seed=6))
    with pytest.raises(GenerateError, match="does not reproduce the model's logits"):
        generate(config(softcapped_teacher_dir, prompts, str(tmp_path / "s")))
    assert not (tmp_path / "s").exists()  # refused before anything was written


def test_chat_prompts_use_the_chat_template(tmp_path, tiny_teacher_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 12 plus 35 ?"}]
    rows = [
        {"id": "given", "messages": chat, "completion": "the answer is 47"},
        {"id": "last-turn", "messages": [*chat, {"role": "assistant", "content": "the answer is 47"}]},
        {"id": "as-json-string", "messages": __import__("json").dumps(chat), "completion": "the answer is 47"},
    ]
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), rows)
    summary = generate(config(tiny_teacher_dir, prompts, str(tmp_path / "s")))
    assert summary.records == 3 and not summary.errors
    rendered = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<|system|> be brief\n<|user|> what is 12 plus 35 ?\n<|assistant|> ")
    prompt_ids = tok(rendered, add_special_tokens=False).input_ids
    want = [*prompt_ids, *tok("the answer is 47", add_special_tokens=False).input_ids, tok.eos_token_id]
    store = open_store(str(tmp_path / "s"))
    by_id = {r.id: r for r in store.iter_records()}
    for rid in ("given", "last-turn", "as-json-string"):
        rec = by_id[rid]
        assert rec.input_ids.tolist() == want
        assert rec.score_start == len(prompt_ids)
        assert rec.completion == "the answer is 47"
        assert rec.messages[1] == {"role": "user", "content": "what is 12 plus 35 ?"}
    assert store.manifest.generation["chat_template_sha256"]


def test_block_topk_is_exact():
    from potstill.teacher_gen.capture import block_topk, choose_block

    torch.manual_seed(0)
    x = torch.randn(40, 4096)
    values, ids = block_topk(x, 16, 64)
    want_values, want_ids = x.topk(16, dim=-1)
    assert torch.equal(values, want_values) and torch.equal(ids, want_ids)
    ties = torch.randn(40, 4096).to(torch.bfloat16)  # bf16 holds many equal values
    values, ids = block_topk(ties, 16, 64)
    assert torch.equal(values, ties.topk(16, dim=-1).values)
    assert torch.equal(ties.gather(1, ids), values)  # each id really holds its value
    assert choose_block(128256, 64) == 256 and choose_block(32000, 64) == 64 and choose_block(384, 64) is None


def test_block_topk_path_in_the_backend(tiny_teacher_dir):
    jobs = _jobs(5, seed=3)
    plain = _teacher(tiny_teacher_dir, top_k=4)
    blocked = _teacher(tiny_teacher_dir, top_k=4)
    blocked.block = 64  # 6 blocks of 64 over the 384-token vocabulary
    for a, b in zip(plain.score(jobs)(), blocked.score(jobs)(), strict=True):
        assert_topk_close(a.targets.ids, a.targets.logprobs, b.targets.ids, b.targets.logprobs, atol=0)
        np.testing.assert_array_equal(a.targets.tail_logprob, b.targets.tail_logprob)


def _logits_with_tail(tail: float, dtype: torch.dtype, rows: int = 4, vocab: int = 32_000, k: int = 64, seed: int = 0):
    """[rows, vocab] logits whose top-k (ids `k` apart) hold all but `tail` of the mass (before
    rounding to `dtype`), on the scale of a real teacher's (top logits 18-30)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g, dtype=torch.float64)
    top_ids = torch.arange(k) * (vocab // k)
    top = 18 + 12 * torch.rand(rows, k, generator=g, dtype=torch.float64)
    rest_mass = torch.logsumexp(top, -1) + np.log(tail / (1 - tail))  # log Σ exp(rest) for that tail
    logits += (rest_mass - torch.logsumexp(logits, -1))[:, None]
    logits[:, top_ids] = top
    return logits.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tail", [5e-5, 1e-7, 1e-12])
def test_the_stored_log_tail_is_exact_where_one_minus_the_top_k_is_noise(tail: float, dtype: torch.dtype):
    """The capture's chunk loop on logits with a known tail (bfloat16 like a real teacher's, or fp32)
    against a float64 sum over the tokens outside the top-64: relative 1e-5 in the mass. The
    complement 1 − Σ exp(top-K) in float32 (format 1.0's tail) is off by percents at 5e-5 and noise below."""
    from potstill.teacher_gen.capture import topk_logprobs

    logits = _logits_with_tail(tail, dtype)
    ids, lp, _, got = topk_logprobs(logits, torch.nn.Identity(), torch.zeros(4, dtype=torch.long), 64, chunk=3)
    x = logits.double()
    outside = torch.ones_like(x, dtype=torch.bool).scatter(-1, ids.long(), False)
    want = torch.logsumexp(x.masked_fill(~outside, float("-inf")), -1) - torch.logsumexp(x, -1)
    assert torch.allclose(want.exp(), torch.full((4,), tail, dtype=torch.float64), rtol=0.05)  # the case is what it says
    assert got.dtype == torch.float32
    assert (got.double() - want).abs().max() <= 1e-5, (got, want)
    np.testing.assert_allclose(lp.double(), torch.log_softmax(x, -1).gather(-1, ids.long()), rtol=1e-6, atol=1e-6)
    x32 = logits.float()  # format 1.0's capture: log-probs x − logsumexp(x), then 1 − Σ exp, all in float32
    old_lp = x32.gather(-1, ids.long()) - torch.logsumexp(x32, -1, keepdim=True)
    old = (1.0 - old_lp.exp().sum(-1)).clamp(0.0, 1.0).double()
    assert ((old - want.exp()).abs() / want.exp()).max() > 1e-2


def test_a_log_tail_near_zero_keeps_its_relative_precision():
    """A flat teacher: the top-K holds little, the log tail is ~ −Σ p_k ≈ −6e-3, kept to float32's
    relative precision (not to the ~1e-6 of a difference of two logsumexps near 10)."""
    from potstill.teacher_gen.capture import topk_logprobs

    logits = torch.randn(4, 32_000, generator=torch.Generator().manual_seed(1))
    ids, _, _, got = topk_logprobs(logits, torch.nn.Identity(), torch.zeros(4, dtype=torch.long), 8)
    logp = torch.log_softmax(logits.double(), -1)
    want = torch.log1p(-logp.gather(-1, ids.long()).exp().sum(-1))
    assert torch.all(want > -1e-2)
    assert ((got.double() - want).abs() / want.abs()).max() <= 1e-5


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_generate_mode_scored_while_decoding_equals_the_full_forward(tmp_path, tiny_teacher_dir, teacher_model,
                                                                     temperature, monkeypatch):
    """Generate mode scores the completion and takes its hidden layers from the decoder's own forwards
    (no second forward); the second forward over prompt + completion (the path `--score-prompt` takes)
    gives the same records, equal to a direct full softmax and to `output_hidden_states`."""
    from potstill.teacher_gen.hf_backend import HFTeacher

    scored: list[str] = []  # record ids that went through a second forward
    original = HFTeacher.score
    monkeypatch.setattr(HFTeacher, "score", lambda self, jobs: (scored.extend(j.record_id for j in jobs),
                                                                 original(self, jobs))[1])
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(8, seed=40, completion=False))
    common = dict(mode="generate", max_new_tokens=12, sampling_temperature=temperature, seed=3, top_k=16,
                  logprob_dtype="float32", targets="both", samples=8, hidden_layers="0,1,-1", batch_tokens=200)
    decoded = generate(config(tiny_teacher_dir, prompts, str(tmp_path / "decoded"), **common))
    assert scored == ["self-check"]  # the load-time check only
    monkeypatch.setattr(HFTeacher, "capture_while_decoding", False)
    second = generate(config(tiny_teacher_dir, prompts, str(tmp_path / "second"), **common))
    assert len(scored) == 1 + 1 + 8
    assert decoded.records == second.records == 8
    a = {r.id: r for r in open_store(str(tmp_path / "decoded")).iter_records(with_hidden=True)}
    b = {r.id: r for r in open_store(str(tmp_path / "second")).iter_records(with_hidden=True)}
    assert a.keys() == b.keys()
    for rid, rec in a.items():
        assert rec.input_ids.tolist() == b[rid].input_ids.tolist() and rec.score_start == b[rid].score_start
        ref = reference_logprobs(teacher_model, rec.input_ids)[rec.score_start - 1 :]
        targets = rec.input_ids[rec.score_start :]
        for got in (rec, b[rid]):
            top = np.sort(ref, axis=-1)[:, ::-1][:, :16]
            np.testing.assert_allclose(got.topk_logprobs, top, rtol=0, atol=1e-4)
            np.testing.assert_allclose(got.token_logprob, ref[np.arange(len(targets)), targets], rtol=0, atol=1e-4)
            np.testing.assert_allclose(got.tail_mass, 1 - np.exp(top).sum(-1), rtol=0, atol=1e-4)
            counts = np.add.reduceat(got.sampled.counts.astype(int), got.sampled.offsets[:-1])
            assert got.sampled.num_positions == len(targets) and np.all(counts == 8)
        assert_topk_close(rec.topk_ids, rec.topk_logprobs, b[rid].topk_ids, b[rid].topk_logprobs, atol=1e-5)
        # the same uniforms on the same distribution (up to fp32 rounding): the same draws
        assert rec.sampled.ids.tolist() == b[rid].sampled.ids.tolist()
        with torch.no_grad():
            want = teacher_model(input_ids=torch.from_numpy(rec.input_ids[None].astype(np.int64)),
                                 output_hidden_states=True).hidden_states
        assert rec.hidden_start == b[rid].hidden_start == 0 and sorted(rec.hidden) == [0, 1, 2]
        for index in (0, 1, 2):  # every token's row, the last generated one included
            got, other = (decode_hidden(r.hidden[index], "bfloat16") for r in (rec, b[rid]))
            assert got.shape == (len(rec.input_ids), 32)
            # stored in bfloat16: equal to the float32 states within its rounding (2^-8 relative)
            np.testing.assert_allclose(got, want[index][0].numpy(), rtol=2.0**-7, atol=1e-6)
            np.testing.assert_allclose(got, other, rtol=2.0**-7, atol=1e-6)


def test_generate_mode_hidden_rows_of_the_completion_only(tmp_path, tiny_teacher_dir, teacher_model):
    """`--hidden-tokens scored` in generate mode: rows from the first generated token to the last, in
    float16, equal to the full forward's states, for prompts of different lengths in one batch."""
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(6, seed=42, completion=False))
    generate(config(tiny_teacher_dir, prompts, str(tmp_path / "s"), mode="generate", max_new_tokens=9,
                    hidden_layers="-2", hidden_dtype="float16", hidden_tokens="scored", batch_tokens=400))
    records = list(open_store(str(tmp_path / "s")).iter_records(with_hidden=True))
    assert len({rec.score_start for rec in records}) > 1
    for rec in records:
        assert rec.hidden_start == rec.score_start
        with torch.no_grad():
            want = teacher_model(input_ids=torch.from_numpy(rec.input_ids[None].astype(np.int64)),
                                 output_hidden_states=True).hidden_states[1][0, rec.hidden_start :].numpy()
        assert rec.hidden[1].dtype == np.float16 and rec.hidden[1].shape == want.shape
        np.testing.assert_allclose(rec.hidden[1].astype(np.float32), want, rtol=2.0**-10, atol=1e-4)


def test_a_preloaded_model_is_checked_once_per_capture_setup(tmp_path, tiny_teacher_dir, monkeypatch):
    """The load-time self-check runs once per model and setup, not once per job on a long-lived model."""
    from transformers import AutoModelForCausalLM

    from potstill.teacher_gen.hf_backend import HFTeacher

    checks = []
    original = HFTeacher.self_check
    monkeypatch.setattr(HFTeacher, "self_check", lambda self: (checks.append(tuple(self.hidden_layers)), original(self)))
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(3, seed=41))
    for i, layers in enumerate(["", "", "-1", "-1", ""]):
        generate(config(tiny_teacher_dir, prompts, str(tmp_path / f"s{i}"), hidden_layers=layers), preloaded=model)
    assert checks == [(), (2,)]


def test_generate_mode_hidden_rows_when_rows_stop_early(tmp_path, tiny_teacher_dir, teacher_model, monkeypatch):
    """Rows that reach EOS before the batch's last step: the EOS token's own row comes from the step
    after it, the batch's last token's from the extra step; every row equals the full forward's."""
    from collections import Counter

    from potstill.teacher_gen import hf_backend

    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(8, seed=43, completion=False))
    common = dict(mode="generate", max_new_tokens=10, sampling_temperature=1.0, seed=5)
    generate(config(tiny_teacher_dir, prompts, str(tmp_path / "free"), **common))
    free = [r.input_ids[r.score_start :] for r in open_store(str(tmp_path / "free")).iter_records()]
    # The most frequent generated token, made the EOS: most rows now stop at different steps.
    stop = Counter(int(x) for ids in free for x in ids[:-1]).most_common(1)[0][0]
    monkeypatch.setattr(hf_backend, "_eos_ids", lambda tokenizer, model: {stop})
    scored: list[str] = []
    original = hf_backend.HFTeacher.score
    monkeypatch.setattr(hf_backend.HFTeacher, "score", lambda self, jobs: (scored.extend(j.record_id for j in jobs),
                                                                          original(self, jobs))[1])
    generate(config(tiny_teacher_dir, prompts, str(tmp_path / "s"), hidden_layers="1,-1", **common))
    assert scored == ["self-check"]  # captured while decoding
    records = list(open_store(str(tmp_path / "s")).iter_records(with_hidden=True))
    lengths = {len(r.input_ids) - r.score_start for r in records}
    assert len(lengths) > 1 and min(lengths) < 10
    for rec in records:
        with torch.no_grad():
            want = teacher_model(input_ids=torch.from_numpy(rec.input_ids[None].astype(np.int64)),
                                 output_hidden_states=True).hidden_states
        for index in (1, 2):
            np.testing.assert_allclose(decode_hidden(rec.hidden[index], "bfloat16"), want[index][0].numpy(),
                                       rtol=2.0**-7, atol=1e-6)


def _decoded_and_second_forward(tmp_path, teacher_dir, monkeypatch, **settings):
    """The records of one generate-mode run captured while decoding and of the same run scored by a
    second forward over prompt + completion (the reference), by record id; fails unless the first
    really captured while decoding."""
    from potstill.teacher_gen.hf_backend import HFTeacher

    scored: list[str] = []
    original = HFTeacher.score
    monkeypatch.setattr(HFTeacher, "score", lambda self, jobs: (scored.extend(j.record_id for j in jobs),
                                                                 original(self, jobs))[1])
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(8, seed=44, completion=False))
    common = dict(mode="generate", max_new_tokens=12, seed=7, batch_tokens=200, **settings)
    generate(config(teacher_dir, prompts, str(tmp_path / "decoded"), **common))
    assert scored == ["self-check"]
    monkeypatch.setattr(HFTeacher, "capture_while_decoding", False)
    generate(config(teacher_dir, prompts, str(tmp_path / "second"), **common))
    assert len(scored) > 1
    return [{r.id: r for r in open_store(str(tmp_path / name)).iter_records()} for name in ("decoded", "second")]


@pytest.mark.parametrize("settings", [
    pytest.param(dict(targets="sampled", samples=8, sampling_temperature=0.8, top_p=0.9), id="sampled-top_p"),
    pytest.param(dict(targets="hybrid", top_k=4, samples=6, sampler="systematic", codec="none",
                      sampling_temperature=0.0, logprob_dtype="float32"), id="hybrid-greedy"),
    pytest.param(dict(targets="topk", top_k=8, sampling_temperature=1.0, top_p=0.5, logprob_dtype="float16"),
                 id="topk-fp16-top_p"),
])
def test_targets_taken_from_the_decoding_logits_equal_the_second_forward(tmp_path, tiny_teacher_dir, teacher_model,
                                                                         monkeypatch, settings):
    """Every kind's targets captured from the logits `generate` computes, for rows that stop at
    different steps (a large EOS set) in a left-padded batch, equal those of a second forward and
    the direct float32 softmax; the draws are the same draws (each record's own uniforms, row by step)."""
    from potstill.teacher_gen import hf_backend

    monkeypatch.setattr(hf_backend, "_eos_ids", lambda tokenizer, model: set(range(3, 40)))
    decoded, second = _decoded_and_second_forward(tmp_path, tiny_teacher_dir, monkeypatch, **settings)
    assert decoded.keys() == second.keys() and len(decoded) == 8
    assert len({len(r.input_ids) - r.score_start for r in decoded.values()}) > 1  # EOS at different steps
    assert len({r.score_start for r in decoded.values()}) > 1  # prompts of different lengths: left padding
    fp16 = settings.get("logprob_dtype") == "float16"
    for rid, rec in decoded.items():
        other = second[rid]
        assert rec.input_ids.tolist() == other.input_ids.tolist() and rec.score_start == other.score_start
        ref = reference_logprobs(teacher_model, rec.input_ids)[rec.score_start - 1 :]
        targets = rec.input_ids[rec.score_start :]
        np.testing.assert_allclose(rec.token_logprob, ref[np.arange(len(targets)), targets], rtol=0, atol=1e-4)
        np.testing.assert_allclose(rec.token_logprob, other.token_logprob, rtol=0, atol=1e-5)
        if rec.topk_ids is not None:
            k = rec.topk_ids.shape[1]
            top = np.sort(ref, axis=-1)[:, ::-1][:, :k]
            tol = float(np.abs(top).max()) * 2.0**-10 if fp16 else 1e-4
            np.testing.assert_allclose(rec.topk_logprobs.astype(np.float32), top, rtol=0, atol=tol)
            assert_topk_close(rec.topk_ids, rec.topk_logprobs, other.topk_ids, other.topk_logprobs,
                              atol=tol / 8 if fp16 else 1e-5)
            want_tail = reference_log_tail(teacher_model, rec.input_ids, rec.topk_ids, rec.score_start)
            np.testing.assert_allclose(rec.tail_logprob, want_tail, rtol=0, atol=1e-5)
            np.testing.assert_allclose(rec.tail_logprob, other.tail_logprob, rtol=0, atol=1e-5)
        if rec.sampled is not None:
            assert rec.sampled.num_positions == len(targets)
            for name in ("offsets", "ids", "counts"):
                assert getattr(rec.sampled, name).tolist() == getattr(other.sampled, name).tolist(), (rid, name)


def test_a_kind_with_its_own_capture_gets_the_decoding_logits(tmp_path, tiny_teacher_dir, teacher_model, monkeypatch):
    """A registered kind's `capture_chunk` in generate mode gets each step's fp32 logits and tokens:
    the same records as from a second forward, equal to the direct softmax."""
    from test_target_kind_registry import Top1

    from potstill.store.targets import register_kind, unregister_kind

    register_kind(Top1())
    try:
        decoded, second = _decoded_and_second_forward(tmp_path, tiny_teacher_dir, monkeypatch, targets="top1", top_k=1,
                                                      sampling_temperature=0.7)
    finally:
        unregister_kind("top1")
    for rid, rec in decoded.items():
        ref = reference_logprobs(teacher_model, rec.input_ids)[rec.score_start - 1 :]
        targets = rec.input_ids[rec.score_start :]
        np.testing.assert_array_equal(rec.topk_ids[:, 0], ref.argmax(-1))
        np.testing.assert_allclose(rec.topk_logprobs[:, 0], ref.max(-1), rtol=0, atol=1e-4)
        np.testing.assert_allclose(rec.token_logprob, ref[np.arange(len(targets)), targets], rtol=0, atol=1e-4)
        for name in ("topk_logprobs", "token_logprob", "tail_logprob"):
            np.testing.assert_allclose(getattr(rec, name), getattr(second[rid], name), rtol=0, atol=1e-5)
