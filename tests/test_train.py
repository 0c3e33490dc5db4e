"""`potstill train` / `potstill eval` end to end on a store from a real tiny teacher: the teacher is
deleted before training, a short run lowers the held-out kd_loss, an interrupted run resumes to the
same losses, two real ranks (torchrun, gloo) run the same steps, and mismatched students are refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from common import build_student
from trainhelpers import crash_at, teacherless_setup
from transformers import TrainerCallback

from potstill.student_train import CompatibilityError, ConfigError, TrainConfig, build_config, evaluate, train

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_teacher_dir, tiny_tokenizer_dir) -> dict:
    return teacherless_setup(tmp_path_factory.mktemp("train"), tiny_teacher_dir, tiny_tokenizer_dir, seed=1)


def config(setup: dict, out: str, **overrides) -> TrainConfig:
    base = dict(store=setup["store"], student=setup["student"], out=str(setup["root"] / out), lr=1e-2, batch_size=4,
                logging_steps=1, report_to="none", eval_fraction=0.2, num_workers=0, eval_max_new_tokens=8,
                eval_max_records=8)
    base.update(overrides)
    return TrainConfig(**base).validate()


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def run_cli(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "potstill.cli.main", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_a_short_run_without_the_teacher_lowers_the_held_out_kd_loss(setup: dict, tmp_path) -> None:
    from typer.testing import CliRunner

    from potstill.cli.main import app

    before = evaluate(setup["store"], setup["student"], eval_fraction=0.2, answers=False)
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text("lr: 0.01\nbatch_size: 4\nmax_steps: 25\nhidden_map: {2: 2}\neval_fraction: 0.2\n")
    out = str(setup["root"] / "short")
    result = CliRunner().invoke(app, [
        "train", "--config", str(cfg_file), "--store", setup["store"], "--student", setup["student"], "--out", out,
        "--report-to", "none", "--num-workers", "1", "--save-steps", "100", "--eval-max-records", "4",
    ])
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = read_json(os.path.join(out, "training_report.json"))
    assert report["global_step"] == 25 and report["settings"]["hidden_map"] == "2:2"
    assert report["store"]["teacher"]["name_or_path"].endswith("teacher") and report["loader"]["eval_records"] > 0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "projections.safetensors"):
        assert os.path.isfile(os.path.join(out, name)), name  # 16-wide student, 32-wide teacher: a projection
    assert {"kd", "ce", "hidden"} <= set(report["loss_curve"][0])
    with open(os.path.join(out, "loss_curve.png"), "rb") as f:  # the picture of those losses, beside the student
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    result = CliRunner().invoke(app, ["eval", "--store", setup["store"], "--model", out, "--json", "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    after = json.loads(result.stdout)
    assert after["eval_fraction"] == 0.2 and after["records"] == before["records"] > 0  # same held-out set
    assert after["kd_loss"] < 0.9 * before["kd_loss"]
    assert after["answers_checked"] == after["records"] and 0.0 <= after["answer_accuracy"] <= 1.0
    assert 0.0 <= after["top1_agreement"] <= 1.0 and after["perplexity"] > 1.0


def test_an_interrupted_run_resumes_to_exactly_the_same_losses(setup: dict) -> None:
    settings = dict(max_steps=8, save_steps=3, num_workers=2, hidden_map="1:1,2:2", relation_weight=0.5,
                    shuffle_buffer=4, eval_fraction=0.2, batch_size=6)
    full = train(config(setup, "full", **settings))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config(setup, "crashed", **settings), callbacks=[crash_at(5)])
    resumed = train(config(setup, "crashed", resume=True, **settings))
    assert resumed["resumed_from"].endswith("checkpoint-3")  # 3 batches consumed by 2 workers: roles rotate
    assert full["loader"]["batches_per_rank_per_epoch"] < 8  # the run crosses an epoch boundary
    curve = [{k: v for k, v in e.items() if k != "grad_norm"} for e in resumed["loss_curve"]]
    assert [e["step"] for e in curve] == list(range(1, 9))
    assert curve == [{k: v for k, v in e.items() if k != "grad_norm"} for e in full["loss_curve"]]
    for a, b in zip(resumed["loss_curve"], full["loss_curve"], strict=True):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6)
    with pytest.raises(ConfigError, match="already holds checkpoints"):  # a fresh run must not mix with them
        train(config(setup, "full", **settings))


def test_a_run_opens_the_store_once_and_splits_it_once_in_its_process(setup: dict, monkeypatch) -> None:
    """The loader (reading in this process: no workers) and the final evaluation take the handle and
    the held-out records the run opened and planned at its start."""
    from potstill.store.reader import Store
    from potstill.student_train import data

    opened: list[str] = []
    cuts: list[float] = []
    real_init, real_cut = Store.__init__, data.eval_cut

    def counting_init(self: Store, url: str, *args, **kwargs) -> None:
        opened.append(url)
        real_init(self, url, *args, **kwargs)

    def counting_cut(record_ids, eval_fraction: float) -> float:
        cuts.append(real_cut(record_ids, eval_fraction))
        return cuts[-1]

    monkeypatch.setattr(Store, "__init__", counting_init)
    monkeypatch.setattr(data, "eval_cut", counting_cut)
    out = str(setup["root"] / "once")
    report = train(config(setup, "once", max_steps=2, save_steps=1, eval_max_records=0, num_workers=0))
    assert opened == [setup["store"]] and len(cuts) == 1
    assert report["final_eval"]["records"] == report["loader"]["eval_records"] > 0
    opened.clear()  # `potstill eval` on its own opens and splits the store itself, to the same records
    alone = evaluate(setup["store"], out, answers=False)
    assert opened == [setup["store"]] and alone["records"] == report["final_eval"]["records"]
    assert alone["kd_loss"] == pytest.approx(report["final_eval"]["kd_loss"], rel=1e-5)


def test_a_negative_teacher_layer_counts_from_the_last_as_generate_does(setup: dict) -> None:
    """--hidden-map 1:-1 is 1:2 on this two-layer teacher (the store records absolute layer indices)."""
    settings = dict(max_steps=2, num_workers=0, eval_fraction=0.2, batch_size=4, eval_max_records=0)
    negative = train(config(setup, "neg", hidden_map="1:-1", **settings))
    absolute = train(config(setup, "abs", hidden_map="1:2", **settings))
    assert [e["loss"] for e in negative["loss_curve"]] == [e["loss"] for e in absolute["loss_curve"]]
    assert "hidden" in negative["loss_curve"][0]
    with pytest.raises(ConfigError, match=r"--hidden-map 1:-4: the teacher has hidden_states 0\.\.2"):
        train(config(setup, "far", hidden_map="1:-4", **settings))
    with pytest.raises(ConfigError, match="the student layer index must not be negative"):
        config(setup, "student", hidden_map="-1:2")


class OptimizerGroups(TrainerCallback):
    """Each step's parameter groups as (learning rate, weight decay, whether it holds the output layer)."""

    def __init__(self) -> None:
        self.steps: list[list[tuple[float, float, bool]]] = []

    def on_step_end(self, args, state, control, optimizer=None, model=None, **kwargs):
        head = model.student.get_output_embeddings().weight
        self.steps.append([(g["lr"], g["weight_decay"], any(p is head for p in g["params"]))
                           for g in optimizer.param_groups])


def test_the_output_layer_gets_its_own_learning_rate(setup: dict) -> None:
    settings = dict(max_steps=4, save_steps=2, weight_decay=0.1, lr_scheduler="linear", warmup_steps=1)
    seen = OptimizerGroups()
    train(config(setup, "head", head_lr_scale=5.0, **settings), callbacks=[seen])
    for groups in seen.steps:  # the scheduler scales every group alike: the head stays at 5× the others
        (lr, wd, _), (_, no_wd, _), (head_lr, head_wd, holds) = groups
        assert holds and not any(g[2] for g in groups[:2]) and (wd, no_wd, head_wd) == (0.1, 0.0, 0.1)
        assert head_lr == pytest.approx(5.0 * lr)
    assert [g[0][0] for g in seen.steps] == pytest.approx([1e-2 * (4 - s) / 3 for s in range(1, 5)])

    plain = OptimizerGroups()
    train(config(setup, "plain", **settings), callbacks=[plain])
    assert len(plain.steps[0]) == 2 and any(g[2] and g[1] == 0.1 for g in plain.steps[0])  # Trainer's own groups

    # resuming with other groups than the checkpoint's is refused in one line, not a torch traceback
    with pytest.raises(ConfigError, match="optimizer has other parameter groups"):
        train(config(setup, "head", resume=True, max_steps=6, save_steps=2, weight_decay=0.1))


@pytest.mark.slow
def test_two_torchrun_ranks_run_the_same_steps_over_uneven_shards(setup: dict) -> None:
    out = str(setup["root"] / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "potstill.cli.main",
           "train", "--store", setup["store"], "--student", setup["student"], "--out", out, "--epochs", "1",
           "--batch-size", "3", "--grad-accum", "2", "--num-workers", "1", "--save-steps", "1000",
           "--report-to", "none", "--eval-fraction", "0.2", "--eval-max-records", "2", "--logging-steps", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = read_json(os.path.join(out, "training_report.json"))
    assert report["world_size"] == 2 and report["loader"]["world_size"] == 2
    steps = report["global_step"]
    assert steps == report["max_steps"] > 1
    final = os.path.join(out, f"checkpoint-{steps}")  # the Trainer saves at the end of training
    consumed = [read_json(os.path.join(final, f"loader_state_rank{r}.json"))["batches_consumed"]
                for r in (0, 1)]
    assert consumed == [steps * 2, steps * 2]  # both ranks trained on the same number of micro-batches


@pytest.mark.slow
def test_a_student_with_another_tokenizer_is_refused_in_one_line(setup: dict, tmp_path) -> None:
    from common import CORPUS, build_tokenizer

    other = str(tmp_path / "other-student")
    tok_dir = str(tmp_path / "other-tokenizer")
    build_tokenizer(tok_dir, corpus=[line[::-1] for line in CORPUS])  # same size, other merges
    build_student(other, tok_dir, hidden=16)
    proc = run_cli("train", "--store", setup["store"], "--student", other, "--out", str(tmp_path / "out"),
                   "--max-steps", "1", "--report-to", "none")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: student tokenizer") and "does not match the store's tokenizer" in lines[-1]
    assert "token strings differ" in lines[-1] and "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "out" / "config.json")


def test_a_student_vocabulary_smaller_than_the_store_is_refused(setup: dict, tmp_path) -> None:
    from common import build_llama

    small = str(tmp_path / "small")
    build_llama(small, 100, hidden=16, layers=1, heads=2, tokenizer_dir=setup["tokenizer"])
    with pytest.raises(CompatibilityError, match=r"student has 100 output logits but the store's tokenizer has \d+ tokens"):
        train(config(setup, "small-out", student=small, max_steps=1))


def test_multitask_trains_an_answer_task_and_a_rationale_task(setup: dict) -> None:
    report = train(config(setup, "multitask", max_steps=2, rationale_mode="multitask", rationale_weight=0.5,
                          eval_fraction=0.2, alpha=0.5))
    entry = report["loss_curve"][0]
    assert entry["multitask_fallback"] == 0.0  # every record's rationale was found
    assert entry["loss"] == pytest.approx(entry["answer_task"] + 0.5 * entry["rationale_task"], rel=1e-5)


def test_every_setting_has_a_train_flag() -> None:
    import dataclasses

    import typer.main

    from potstill.cli.main import app

    command = next(c for c in typer.main.get_command(app).commands.values() if c.name == "train")
    options = {p.name for p in command.params}
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= options


def test_settings_come_from_defaults_then_file_then_flags(tmp_path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('store = "s"\nstudent = "m"\nout = "o"\nlr = 0.5\nloss = "jsd"\nmax-steps = 7\n')
    cfg = build_config(str(path), {"lr": 0.25, "batch_size": None})
    assert (cfg.lr, cfg.loss, cfg.max_steps, cfg.batch_size) == (0.25, "jsd", 7, TrainConfig().batch_size)
    path.write_text('store = "s"\nlearning_rate = 1\n')
    with pytest.raises(ConfigError, match="unknown setting 'learning_rate'"):
        build_config(str(path))
    with pytest.raises(ConfigError, match="--loss must be one of"):
        build_config(None, {"store": "s", "student": "m", "out": "o", "loss": "kl"})
    with pytest.raises(ConfigError, match="--hidden-map entry"):
        build_config(None, {"store": "s", "student": "m", "out": "o", "hidden_map": "4-8"})



def test_answers_are_extracted_like_generation_does_and_compared_loosely() -> None:
    from potstill.student_train.evaluation import extract_answer, normalise_answer

    assert extract_answer("3 + 4 is 7. the answer is 3? No, The answer is 7.") == "7"  # the last match
    assert extract_answer("so #### 1,234") == "1,234" and extract_answer("Final Answer: **42**.") == "42"
    assert extract_answer("no answer here") is None
    assert extract_answer("A: 9 and A: 10", r"A: (\d+)") == "10"  # a store's own pattern, first group
    assert normalise_answer("1,234.") == normalise_answer(" 1234 ") and normalise_answer("$5") == "5"


def test_a_finished_run_resumed_prunes_what_its_kill_left(setup: dict) -> None:
    """A job killed after its last checkpoint's trainer state was written, before the Trainer removed
    the checkpoints beyond --save-total-limit: the rerun has nothing to train, and removes them."""
    settings = dict(max_steps=6, save_steps=2, save_total_limit=2, num_workers=0)
    train(config(setup, "pruned", **settings))
    out = str(setup["root"] / "pruned")
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-4", "checkpoint-6"]
    shutil.copytree(os.path.join(out, "checkpoint-4"), os.path.join(out, "checkpoint-2"))  # not yet rotated away
    os.makedirs(os.path.join(out, "checkpoint-5"))  # cut short: no trainer state
    report = train(config(setup, "pruned", resume=True, **settings))
    assert report["resumed_from"].endswith("checkpoint-6") and report["global_step"] == 6
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-4", "checkpoint-6"]
