"""Training defaults and logs on tiny real models: the held-out set has a floor (or one line says why
there is none), every logged number means what its name says (`epoch` = passes the loader made,
`multitask_fallback` = the share of records used whole, `grad_share/*` = each loss term's share of
the gradient), and each log step prints one readable line."""

from __future__ import annotations

import math
import os
import shutil

import pytest
from common import build_student
from trainhelpers import arithmetic_items, build_teacher_store, copy_teacher

from potstill.store import open_store
from potstill.student_train import TrainConfig, evaluate, train
from potstill.student_train.data import MIN_EVAL_RECORDS, StoreDataset, held_out_rows, id_fraction
from potstill.student_train.trainer import format_log_line


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_teacher_dir, tiny_tokenizer_dir) -> dict:
    """Stores of 20 and 60 records (the teacher deleted after), 4 of the 20 without a rationale."""
    root = tmp_path_factory.mktemp("logs")
    teacher = copy_teacher(tiny_teacher_dir, str(root / "teacher"))
    items = arithmetic_items(20, seed=3)
    for item in items[:4]:  # no rationale or answer found: multitask uses them whole
        item["rationale"] = item["answer"] = None
    small, large = str(root / "s20"), str(root / "s60")
    build_teacher_store(small, teacher, items, shard_records=8)
    build_teacher_store(large, teacher, arithmetic_items(60, seed=4), shard_records=25)
    shutil.rmtree(teacher)
    student = build_student(str(root / "student"), tiny_tokenizer_dir, hidden=16)
    return {"root": root, "s20": small, "s60": large, "student": student}


def _config(stores: dict, store: str, out: str, **overrides) -> TrainConfig:
    base = dict(store=stores[store], student=stores["student"], out=str(stores["root"] / out), lr=1e-2,
                batch_size=4, logging_steps=1, report_to="none", num_workers=0, save_steps=1000,
                eval_max_records=0, eval_max_new_tokens=2)
    base.update(overrides)
    return TrainConfig(**base).validate()


def test_sixty_records_hold_out_at_least_the_floor_at_the_default_fraction(stores: dict) -> None:
    store = open_store(stores["s60"])
    ids = store.id_index().ids().to_pylist()
    assert sum(id_fraction(i) < 0.05 for i in ids) < MIN_EVAL_RECORDS  # the fraction alone holds out too few
    dataset = StoreDataset.open(stores["s60"], batch_size=4, eval_fraction=0.05, num_workers=0)
    info = dataset.describe()
    assert info["eval_records"] == MIN_EVAL_RECORDS and info["train_records"] == 60 - MIN_EVAL_RECORDS
    assert info["eval_note"] is None
    ids_of = {c.shard: store.shard_ids(c.shard).to_pylist() for c in store.commits}
    held = {ids_of[name][row] for name, row in held_out_rows(store, 0.05)}
    smallest = sorted(ids, key=id_fraction)[:MIN_EVAL_RECORDS]  # the floor takes the ids of smallest hash
    assert held == set(smallest)
    trained = {ids_of[dataset.plan.shards[s]][r] for s, rows in enumerate(dataset.plan.train_rows) for r in rows}
    assert not trained & held and len(trained | held) == 60
    report = train(_config(stores, "s60", "s60-run", max_steps=2, eval_fraction=0.05))
    assert report["final_eval"]["records"] == MIN_EVAL_RECORDS and report["final_eval"]["kd_loss"] is not None
    assert evaluate(stores["s60"], report["settings"]["out"], answers=False)["records"] == MIN_EVAL_RECORDS


def test_twenty_records_hold_out_none_and_one_line_says_why(stores: dict, capsys) -> None:
    from typer.testing import CliRunner

    from potstill.cli.main import app

    dataset = StoreDataset.open(stores["s20"], batch_size=4, eval_fraction=0.05, num_workers=0)
    info = dataset.describe()
    assert (info["train_records"], info["eval_records"]) == (20, 0)
    assert info["eval_note"].startswith("none (store has 20 records, fewer than the 32 needed to hold out 8")
    out = str(stores["root"] / "s20-cli")
    result = CliRunner().invoke(app, [
        "train", "--store", stores["s20"], "--student", stores["student"], "--out", out, "--max-steps", "1",
        "--report-to", "none", "--num-workers", "0", "--eval-max-records", "0",
    ])
    assert result.exit_code == 0, result.output + repr(result.exception)
    held_lines = [line for line in result.output.splitlines() if line.startswith("held-out:")]
    assert held_lines == ["held-out: none (store has 20 records, fewer than the 32 needed to hold out 8 and keep "
                          "75% for training; --eval-fraction 0.05 holds out 0)"], result.output
    result = CliRunner().invoke(app, ["eval", "--store", stores["s20"], "--student", out, "--no-answers"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "no held-out records" in result.output and "store has 20 records, fewer than the 32" in result.output


def test_epoch_is_the_passes_the_loader_made_and_fallback_the_share_of_records_used_whole(stores: dict) -> None:
    # 20 records, none held out, batches of 4: 5 batches per epoch; 10 steps are 2 passes over the store.
    report = train(_config(stores, "s20", "multitask", max_steps=10, eval_fraction=0.0, logging_steps=5,
                           rationale_mode="multitask"))
    curve = report["loss_curve"]
    assert [e["step"] for e in curve] == [5, 10]
    assert [e["epoch"] for e in curve] == pytest.approx([1.0, 2.0])
    # each pass of 5 batches reads each of the 4 records without a rationale once: 4 / 20 records used whole
    assert [e["multitask_fallback"] for e in curve] == pytest.approx([0.2, 0.2])


def test_a_term_a_thousand_times_larger_dominates_the_gradient_share(stores: dict) -> None:
    """At step 1 both runs have the same weights and batch, so the hidden term's gradient is exactly
    1000 times larger in the second: the odds hidden : kd of the shares grow 1000-fold."""
    def first_share(weight: float, out: str) -> dict:
        report = train(_config(stores, "s60", out, max_steps=1, hidden_map="2:2", hidden_loss="mse",
                               hidden_weight=weight, eval_fraction=0.0))
        entry = report["loss_curve"][0]
        assert entry["grad_share/kd"] + entry["grad_share/hidden"] == pytest.approx(1.0)
        return entry

    low, high = first_share(0.01, "share-low"), first_share(10.0, "share-high")
    odds = [e["grad_share/hidden"] / e["grad_share/kd"] for e in (low, high)]
    assert odds[1] / odds[0] == pytest.approx(1000.0, rel=1e-3)
    assert high["grad_share/hidden"] > 0.9 and low["hidden"] == pytest.approx(high["hidden"], rel=1e-6)


@pytest.mark.slow
def test_each_log_step_prints_one_readable_line(stores: dict) -> None:
    import subprocess
    import sys

    out = str(stores["root"] / "lines")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "potstill.cli.main", "train", "--store", stores["s20"], "--student", stores["student"],
         "--out", out, "--max-steps", "4", "--logging-steps", "2", "--hidden-map", "2:2", "--report-to", "none",
         "--num-workers", "0", "--eval-fraction", "0", "--batch-size", "4"],
        capture_output=True, text=True, env=env, timeout=240,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line.strip() for line in result.stderr.replace("\r", "\n").splitlines() if line.strip().startswith("step ")]
    assert [line.split()[1] for line in lines] == ["2/4", "4/4", "4/4"], result.stderr[-2000:]  # the last: the run's end
    for line in lines[:2]:
        words = line.split()
        values = dict(zip(words[2::2], words[3::2], strict=False))
        assert {"loss", "kd", "ce", "hidden", "lr", "grad_norm", "epoch"} <= set(values), line
        assert values["epoch"] in ("0.4", "0.8") and "grad_share " in line and " kd " in line.split("grad_share")[1] and "{" not in line
    assert "{'loss'" not in result.stderr and "held-out: none (--eval-fraction 0)" in result.stdout


def test_format_log_line() -> None:
    line = format_log_line({"loss": 3.2104, "kd": 3.1, "learning_rate": 0.0004, "grad_norm": 1.2, "epoch": 2.6,
                            "grad_share/kd": 0.931, "grad_share/hidden": 0.069, "hidden": 0.11, "total_flos": 1.0},
                           40, 200)
    assert line == ("step 40/200  loss 3.21  kd 3.1  hidden 0.11  lr 4.0e-04  grad_norm 1.2  epoch 2.6  "
                    "grad_share hidden 0.07 kd 0.93")
    assert math.isclose(0.931 + 0.069, 1.0)


def test_standardized_mse_matches_its_definition_and_ignores_scale_and_offset() -> None:
    import torch

    from potstill.student_train import losses

    g = torch.Generator().manual_seed(11)
    s = torch.randn(6, 16, generator=g, dtype=torch.float64).requires_grad_()
    t = torch.randn(6, 16, generator=g, dtype=torch.float64)
    t[:, 3] *= 3000.0  # a massive activation, as in real LLMs' middle layers

    def standardized(x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean(-1, keepdim=True)
        return centred / torch.sqrt((centred**2).mean(-1, keepdim=True) + 1e-6)

    ref = ((standardized(s) - standardized(t)) ** 2).mean(-1)
    got = losses.hidden_standardized_mse(s, t)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), s)[0], torch.autograd.grad(ref.sum(), s)[0])
    pearson = torch.stack([torch.corrcoef(torch.stack([a, b]))[0, 1] for a, b in zip(s.detach(), t, strict=True)])
    torch.testing.assert_close(got.detach(), 2 * (1 - pearson), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses.hidden_standardized_mse(s, 50.0 * t + 7.0), got)  # scale and offset: none
    assert losses.hidden_mse(s, 50.0 * t).mean() > 1e6 * losses.hidden_standardized_mse(s, 50.0 * t).mean()
