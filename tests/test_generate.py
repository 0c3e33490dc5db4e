"""`potstill generate` end to end on a tiny real teacher: inputs, modes, config, errors, workers."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from common import prompt_rows, write_jsonl
from genhelpers import config, run_cli
from storehelpers import committed_ids

from potstill.store import StoreError, open_store, verify_store
from potstill.teacher_gen.config import GenerateConfig
from potstill.teacher_gen.errors import GenerateError, TooManyInputErrors
from potstill.teacher_gen.rationale import DEFAULT_RATIONALE_TEMPLATE, split_rationale
from potstill.teacher_gen.runner import generate, owner

# -- bad inputs -------------------------------------------------------------------------------
BAD_ROWS = [
    {"id": "ok1", "prompt": "the quick brown fox", "completion": "jumps over"},
    "{not json",  # line 2
    {"id": "empty", "prompt": "   ", "completion": "x"},
    {"id": "int-prompt", "prompt": 12, "completion": "x"},
    {"id": ["list"], "prompt": "a", "completion": "b"},
    {"id": "nothing", "completion": "b"},
    {"id": "ok1", "prompt": "again", "completion": "dup"},
    {"id": "long", "prompt": "the quick brown fox jumps over the lazy dog " * 20, "completion": "the end"},
    ["not", "an", "object"],
    {"id": "bad-msg", "messages": [{"content": "no role"}]},
    {"id": "bad-completion", "prompt": "a teacher", "completion": {"text": "x"}},
    {"id": "no-completion", "prompt": "score what?"},
    {"id": "ok2", "prompt": "students learn", "completion": "from the store", "source": "unit", "n": 3},
]
BAD_REASONS = {
    2: "malformed JSON",
    3: "empty prompt",
    4: "must be a string",
    5: "must be a string or an integer",
    6: "no 'prompt' or 'messages' field",
    7: "duplicate id (first seen at line 1)",
    8: "longer than the teacher's context (64)",
    9: "expected an object",
    10: "messages[0] needs string 'role' and 'content'",
    11: "'completion' must be a string",
    12: "no completion to score",
}


@pytest.mark.slow
def test_every_kind_of_bad_input_is_skipped_and_reported(tmp_path, tiny_teacher_dir):
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), BAD_ROWS)
    store = str(tmp_path / "s")
    result = run_cli(["generate", "--teacher", tiny_teacher_dir, "--prompts", prompts, "--out", store,
                      "--max-length", "64", "--device", "cpu", "--no-progress"])
    assert result.returncode == 0, result.stderr
    assert "wrote 2 records" in result.stdout
    assert f"skipped {len(BAD_REASONS)} bad inputs" in result.stdout
    shown = sorted(BAD_REASONS.items())[:10]  # the summary lists ten, the errors file all of them
    for line, reason in shown:
        assert any(f"line {line}" in out and reason in out for out in result.stdout.splitlines()), (line, reason)
    assert "... and 1 more" in result.stdout
    assert "Traceback" not in result.stderr

    assert sorted(committed_ids(store)) == ["ok1", "ok2"]
    assert verify_store(store).ok
    rec = {r.id: r for r in open_store(store).iter_records()}["ok2"]
    assert rec.meta == {"source": "unit", "n": 3}
    (errors_file,) = os.listdir(os.path.join(store, "errors"))
    with open(os.path.join(store, "errors", errors_file)) as f:
        errors = [json.loads(x) for x in f]
    assert {e["line"]: e["reason"] for e in errors}.keys() == BAD_REASONS.keys()
    for e in errors:
        assert BAD_REASONS[e["line"]] in e["reason"]
    assert {e["id"] for e in errors if e["line"] == 8} == {"long"}


def test_truncate_keeps_a_too_long_record(tmp_path, tiny_teacher_dir):
    rows = [{"id": "long", "prompt": "the quick brown fox", "completion": "jumps over the lazy dog " * 30}]
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), rows)
    summary = generate(config(tiny_teacher_dir, prompts, str(tmp_path / "s"), max_length=48, truncate=True))
    assert summary.records == 1 and not summary.errors
    rec = open_store(str(tmp_path / "s")).record(0)
    assert len(rec.input_ids) == 48 and rec.num_scored == 48 - rec.score_start


@pytest.mark.slow
def test_max_errors_fails_fast_in_one_line(tmp_path, tiny_teacher_dir):
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), BAD_ROWS)
    store = str(tmp_path / "s")
    result = run_cli(["generate", "--teacher", tiny_teacher_dir, "--prompts", prompts, "--out", store,
                      "--max-errors", "2", "--device", "cpu", "--no-progress"])
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: 3 bad inputs, more than --max-errors 2; first: line 2: malformed JSON")
    assert "Traceback" not in result.stderr
    assert not os.path.exists(store)  # it failed before creating anything


def test_max_errors_counts_tokenization_errors_too(tmp_path, tiny_teacher_dir):
    rows = [{"id": f"x{i}", "prompt": "fox", "completion": "dog " * 200} for i in range(3)]
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), rows)
    with pytest.raises(TooManyInputErrors, match="longer than the teacher's context"):
        generate(config(tiny_teacher_dir, prompts, str(tmp_path / "s"), max_errors=1))


# -- input formats and fields -----------------------------------------------------------------
def _write_all_formats(tmp_path, rows):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {"jsonl": write_jsonl(str(tmp_path / "p.jsonl"), rows)}
    paths["json"] = str(tmp_path / "p.json")
    with open(paths["json"], "w") as f:
        json.dump(rows, f)
    paths["json-data"] = str(tmp_path / "p_data.json")
    with open(paths["json-data"], "w") as f:
        json.dump({"data": rows}, f)
    paths["parquet"] = str(tmp_path / "p.parquet")
    pq.write_table(pa.Table.from_pylist(rows), paths["parquet"])
    paths["csv"] = str(tmp_path / "p.csv")
    with open(paths["csv"], "w", newline="") as f:
        import csv

        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    paths["datasets"] = str(tmp_path / "p_ds")
    datasets.Dataset.from_list(rows).save_to_disk(paths["datasets"])
    return paths


def test_all_input_formats_give_the_same_records(tmp_path, tiny_teacher_dir):
    rows = [{"key": f"k{i}" if i % 2 else None, "question": r["prompt"], "answer": r["completion"], "topic": "t"}
            for i, r in enumerate(prompt_rows(5, seed=7))]
    paths = _write_all_formats(tmp_path, rows)
    results = {}
    for fmt, path in paths.items():
        store = str(tmp_path / f"s_{fmt}")
        summary = generate(config(tiny_teacher_dir, path, store, id_field="key", prompt_field="question",
                                  completion_field="answer"))
        assert summary.records == 5 and not summary.errors, (fmt, summary.errors)
        results[fmt] = {r.id: (r.input_ids.tolist(), r.prompt, r.completion, r.meta)
                        for r in open_store(store).iter_records()}
    first = results["jsonl"]
    assert {"k1", "k3"} <= first.keys()
    hashed = [i for i in first if i not in ("k1", "k3")]
    assert len(hashed) == 3 and all(i.startswith("h") for i in hashed)  # stable content ids
    assert first["k1"][3] == {"topic": "t"}
    for fmt, got in results.items():
        assert got == first, fmt


def test_content_ids_are_stable_and_independent_of_order(tmp_path, tiny_teacher_dir):
    rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in prompt_rows(4, seed=8)]
    a = write_jsonl(str(tmp_path / "a.jsonl"), rows)
    b = write_jsonl(str(tmp_path / "b.jsonl"), rows[::-1])
    generate(config(tiny_teacher_dir, a, str(tmp_path / "sa")))
    generate(config(tiny_teacher_dir, b, str(tmp_path / "sb")))
    assert sorted(committed_ids(str(tmp_path / "sa"))) == sorted(committed_ids(str(tmp_path / "sb")))


# -- score mode details -----------------------------------------------------------------------
def test_score_prompt_scores_every_token(tmp_path, tiny_teacher_dir):
    rows = [{"id": "a", "prompt": "the quick brown fox"}, {"id": "b", "prompt": "a teacher", "completion": "writes"}]
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), rows)
    generate(config(tiny_teacher_dir, prompts, str(tmp_path / "s"), score_prompt=True, append_eos=False))
    for rec in open_store(str(tmp_path / "s")).iter_records():
        assert rec.score_start == 1 and rec.num_scored == len(rec.input_ids) - 1


def test_rerun_skips_committed_ids_without_loading_the_model(tmp_path, tiny_teacher_dir):
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(6, seed=9))
    store = str(tmp_path / "s")
    first = generate(config(tiny_teacher_dir, prompts, store, shard_records=4, writer_threads=1))
    assert (first.records, first.shards) == (6, 2)
    assert first.bytes > 0 and first.bytes_per_token > 0
    again = generate(config(tiny_teacher_dir, prompts, store, device="no-such-device"))
    assert (again.records, again.already_done) == (0, 6)  # the bad device was never needed
    assert len(open_store(store)) == 6


def test_cancel_commits_what_was_captured_and_a_rerun_finishes(tmp_path, tiny_teacher_dir):
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(20, seed=10))
    store = str(tmp_path / "s")
    seen = []
    summary = generate(config(tiny_teacher_dir, prompts, store, batch_tokens=40),
                       should_stop=lambda: len(seen) >= 3, on_progress=seen.append)
    # the first report comes before the model loads: the total is known (a job's status shows 0/20, not 0/?)
    assert (seen[0].records, seen[0].total, seen[0].tokens) == (0, 20, 0)
    assert summary.stopped and 0 < summary.records < 20
    assert seen[-1].records == summary.records and seen[-1].total == 20 and seen[-1].tokens > 0
    rest = generate(config(tiny_teacher_dir, prompts, store))
    assert rest.records == 20 - summary.records and rest.already_done == summary.records
    s = open_store(store)
    ids = s.id_index().ids().to_pylist()
    assert sorted(ids) == sorted(f"r{i:04d}" for i in range(20))


def test_a_store_made_with_other_settings_is_refused(tmp_path, tiny_teacher_dir):
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(2, seed=11))
    store = str(tmp_path / "s")
    generate(config(tiny_teacher_dir, prompts, store))
    with pytest.raises(StoreError) as refused:
        generate(config(tiny_teacher_dir, prompts, store, top_k=8))
    # one line naming the differing key with both values, not two JSON objects
    assert str(refused.value) == f"store {store} was created with other settings: targets.k: store has 64, this run has 8"


def test_workers_split_ids_and_errors_deterministically(tmp_path, tiny_teacher_dir):
    rows = [*prompt_rows(16, seed=12), "{broken", {"id": "empty", "prompt": ""}]
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), rows)
    store = str(tmp_path / "s")
    summaries = [generate(config(tiny_teacher_dir, prompts, store, workers=3, worker_index=i)) for i in range(3)]
    s = open_store(store)
    ids = s.id_index().ids().to_pylist()
    assert sorted(ids) == [f"r{i:04d}" for i in range(16)]
    for i, summ in enumerate(summaries):
        mine = {rid for c in s.commits if c.writer_id.startswith(summ.writer_id) for rid in s.shard_ids(c.shard).to_pylist()}
        assert all(owner(rid, 3) == i for rid in mine)
    errors = [str(e) for summ in summaries for e in summ.errors]
    assert sorted(errors) == ["line 17: malformed JSON (Expecting property name enclosed in double quotes at column 2)",
                              "line 18, id 'empty': empty prompt"]
    assert len(os.listdir(os.path.join(store, "errors"))) == sum(1 for x in summaries if x.errors)


def test_torchrun_environment_picks_the_worker(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    cfg = GenerateConfig.build(teacher="t", prompts="p", store="s")
    assert cfg.resolve_workers() == (4, 3)
    assert GenerateConfig.build(teacher="t", prompts="p", store="s", workers=2, worker_index=0).resolve_workers() == (2, 0)
    monkeypatch.setenv("RANK", "7")
    with pytest.raises(GenerateError, match="outside"):
        GenerateConfig.build(teacher="t", prompts="p", store="s")


# -- generate mode ----------------------------------------------------------------------------
def test_generate_mode_structure_and_reproducibility(tmp_path, tiny_teacher_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(5, seed=13, completion=False))
    runs = {}
    for name, batch_tokens in (("a", 4096), ("b", 4096), ("small-batches", 30)):
        store = str(tmp_path / name)
        summary = generate(config(tiny_teacher_dir, prompts, store, mode="generate", max_new_tokens=6,
                                  num_samples=2, seed=5, batch_tokens=batch_tokens))
        assert summary.records == 10
        runs[name] = {r.id: r for r in open_store(store).iter_records()}
    recs = runs["a"]
    assert sorted(recs) == sorted(f"r{i:04d}#{k}" for i in range(5) for k in range(2))
    for rid, rec in recs.items():
        prompt_ids = tok(rec.prompt).input_ids
        assert rec.input_ids[: rec.score_start].tolist() == prompt_ids
        completion = rec.input_ids[rec.score_start :]
        assert 1 <= len(completion) <= 6 and rec.num_scored == len(completion)
        assert rec.sample_index == int(rid.split("#")[1])
        assert rec.generated == tok.decode(completion.tolist(), skip_special_tokens=True)
        assert rec.completion is None and rec.answer is None
    # the same seed gives the same samples, whatever the batching; two samples of a prompt differ
    for rid in recs:
        assert runs["b"][rid].input_ids.tolist() == recs[rid].input_ids.tolist()
        assert runs["small-batches"][rid].input_ids.tolist() == recs[rid].input_ids.tolist()
    assert any(recs[f"r{i:04d}#0"].input_ids.tolist() != recs[f"r{i:04d}#1"].input_ids.tolist() for i in range(5))
    manifest = open_store(str(tmp_path / "a")).manifest
    assert manifest.generation["mode"] == "generate" and manifest.generation["seed"] == 5


@pytest.fixture(scope="module")
def eos_teacher_dir(tmp_path_factory, tiny_teacher_dir):
    """The tiny teacher with its final norm zeroed: every logit is 0, so greedy picks token 0,
    which this copy's tokenizer calls EOS: it stops at once, by itself."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(tmp_path_factory.mktemp("eos_teacher"))
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    model.generation_config.eos_token_id = 0
    model.config.eos_token_id = 0
    model.save_pretrained(path)
    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    tok.eos_token = "<pad>"
    tok.save_pretrained(path)
    return path


def test_generated_eos_is_kept_and_scored(tmp_path, eos_teacher_dir):
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(3, seed=14, completion=False))
    generate(config(eos_teacher_dir, prompts, str(tmp_path / "s"), mode="generate", sampling_temperature=0,
                    max_new_tokens=5))
    for rec in open_store(str(tmp_path / "s")).iter_records():
        assert rec.input_ids[rec.score_start :].tolist() == [0]  # EOS, then nothing
        assert rec.num_scored == 1 and rec.generated == ""
        np.testing.assert_allclose(rec.token_logprob, np.log(1 / 384), rtol=1e-4)  # uniform: all logits 0


def test_generation_longer_than_context_needs_truncate(tmp_path, tiny_teacher_dir):
    rows = [{"id": "a", "prompt": "the quick brown fox jumps over the lazy dog"}]
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), rows)
    with pytest.raises(GenerateError, match=r"nothing was written .* exceeds the teacher's context \(20\)"):
        generate(config(tiny_teacher_dir, prompts, str(tmp_path / "s1"), mode="generate", max_new_tokens=40,
                        max_length=20))
    assert not os.path.exists(str(tmp_path / "s1"))
    kept = generate(config(tiny_teacher_dir, prompts, str(tmp_path / "s2"), mode="generate",
                           max_new_tokens=40, max_length=20, truncate=True))
    assert kept.records == 1
    assert len(open_store(str(tmp_path / "s2")).record(0).input_ids) <= 20


# -- rationales -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "rationale", "answer"),
    [
        ("12 + 35: add the ones, then the tens. The answer is 47.", "12 + 35: add the ones, then the tens.", "47"),
        ("first 2+2=4\n#### 4", "first 2+2=4", "4"),
        ("The answer is 3? No. Recount: the answer is **5**.\n", "The answer is 3? No. Recount:", "5"),
        ("no conclusion here", "no conclusion here", None),
        ("Final answer: x = 2", "", "x = 2"),
    ],
)
def test_split_rationale(text, rationale, answer):
    assert split_rationale(text) == (rationale, answer)


def test_custom_answer_pattern():
    assert split_rationale("so ANSWER[7] done", r"ANSWER\[(\d+)\]") == ("so", "7")
    assert split_rationale("so ANSWER done", r"ANSWER") == ("so", "ANSWER")


def test_rationale_mode_templates_the_prompt_and_splits_the_output(tmp_path, tiny_teacher_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    rows = [{"id": "q", "prompt": "what is 12 plus 35 ?", "completion": "add the tens . The answer is 47."}]
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), rows)
    generate(config(tiny_teacher_dir, prompts, str(tmp_path / "s"), rationale=True))
    store = open_store(str(tmp_path / "s"))
    rec = store.record(0)
    assert store.manifest.rationales is True
    assert (rec.rationale, rec.answer) == ("add the tens .", "47")
    templated = DEFAULT_RATIONALE_TEMPLATE.replace("{prompt}", "what is 12 plus 35 ?")
    assert rec.input_ids[: rec.score_start].tolist() == tok(templated).input_ids
    assert rec.prompt == "what is 12 plus 35 ?"  # the source prompt, not the template

    gen_store = str(tmp_path / "g")
    generate(config(tiny_teacher_dir, prompts, gen_store, rationale=True, mode="generate", max_new_tokens=5))
    rec = open_store(gen_store).record(0)
    assert rec.generated is not None and rec.rationale == rec.generated.strip() and rec.answer is None


# -- configuration ----------------------------------------------------------------------------
def test_config_file_and_flags(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("teacher: t\nprompts: p.jsonl\nstore: s\ntop-k: 16\nhidden_layers: [4, -1]\nrationale: true\n")
    cfg = GenerateConfig.build(str(yaml_file), top_k=8)
    assert (cfg.top_k, cfg.hidden_layers, cfg.rationale, cfg.mode) == (8, [4, -1], True, "score")
    toml_file = tmp_path / "c.toml"
    toml_file.write_text('[generate]\nteacher = "t"\nprompts = "p"\nstore = "s"\nhidden_layers = "0,2"\n')
    assert GenerateConfig.build(str(toml_file)).hidden_layers == [0, 2]
    (tmp_path / "bad.yaml").write_text("teacher: t\ntop_kk: 3\n")
    with pytest.raises(GenerateError, match="unknown setting 'top_kk'"):
        GenerateConfig.build(str(tmp_path / "bad.yaml"))
    with pytest.raises(GenerateError, match="--top-k: expected int"):
        GenerateConfig.build(teacher="t", prompts="p", store="s", top_k="many")
    with pytest.raises(GenerateError, match="--mode must be one of score, generate"):
        GenerateConfig.build(teacher="t", prompts="p", store="s", mode="sing")
    with pytest.raises(GenerateError, match="--prompts is required"):
        GenerateConfig.build(teacher="t", store="s")


def test_data_settings_exclude_per_worker_settings():
    a = GenerateConfig.build(teacher="t", prompts="p", store="s", workers=2, worker_index=0, batch_tokens=100)
    b = GenerateConfig.build(teacher="t", prompts="other", store="s", workers=2, worker_index=1, device="cpu")
    assert a.data_settings("tmpl") == b.data_settings("tmpl")
    assert a.data_settings("tmpl") != GenerateConfig.build(teacher="t", prompts="p", store="s",
                                                           score_prompt=True).data_settings("tmpl")


def test_hidden_layer_out_of_range_is_refused(tmp_path, tiny_teacher_dir):
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(1))
    with pytest.raises(GenerateError, match="indices run from -3 to 2"):
        generate(config(tiny_teacher_dir, prompts, str(tmp_path / "s"), hidden_layers="3"))


def test_remote_code_is_refused_unless_allowed(tmp_path, tiny_tokenizer_dir):
    import shutil

    teacher = tmp_path / "custom"
    shutil.copytree(tiny_tokenizer_dir, teacher)
    (teacher / "config.json").write_text(json.dumps({
        "model_type": "potstill-custom", "auto_map": {"AutoConfig": "configuration_custom.CustomConfig"}}))
    (teacher / "configuration_custom.py").write_text(
        "raise SystemExit('remote code ran')\n")  # would kill the test run if it were executed
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(1))
    with pytest.raises(GenerateError, match="custom code .* Pass --trust-remote-code"):
        generate(config(str(teacher), prompts, str(tmp_path / "s")))


def test_writer_failure_stops_the_run_and_commits_nothing(tmp_path):
    from common import TOKENIZER_FILES, make_manifest

    from potstill.store import create_store
    from potstill.teacher_gen.writer import BackgroundWriter

    store = create_store(str(tmp_path / "s"), make_manifest(), TOKENIZER_FILES)

    def build(job, capture):
        raise OSError("disk full")

    writer = BackgroundWriter(store, "w1", build, shard_records=10, shard_bytes=1 << 20, max_batches=1)
    with pytest.raises(GenerateError, match="writing to store .* failed: disk full"):
        for _ in range(50):
            writer.put([(None, None)])
    with pytest.raises(GenerateError, match="disk full"):
        writer.close()
    assert open_store(str(tmp_path / "s")).num_records == 0
    assert not os.listdir(os.path.join(str(tmp_path / "s"), "writers"))  # lease released


def test_the_tokenizer_is_loaded_once_per_process_until_its_files_change(tmp_path, tiny_tokenizer_dir):
    import shutil

    from potstill.teacher_gen.runner import load_tokenizer

    folder = str(tmp_path / "tok")
    shutil.copytree(tiny_tokenizer_dir, folder)
    cfg = GenerateConfig(teacher=folder, prompts="p", store="s")
    first = load_tokenizer(cfg)
    assert load_tokenizer(cfg) is first  # a long-lived process (serve) does not parse it per job
    path = os.path.join(folder, "tokenizer_config.json")
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 1_000_000))
    assert load_tokenizer(cfg) is not first  # changed files are read again
