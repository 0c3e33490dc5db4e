"""Training never eats garbage: the loader checks what it reads (every shard file against its commit
record once per process before first use, ids within the vocabulary, finite log-probs), a bad shard stops the run
in one line naming it (or is skipped and reported with --skip-bad-shards), a non-finite loss or
gradient stops the run before the update without saving a broken student, duplicates are never
trained on twice, and a finished run is never trained past --max-steps."""

from __future__ import annotations

import copy
import glob
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
from common import build_student
from faults import flip_bytes, rewrite_column, rewrite_file, write_commit
from trainhelpers import arithmetic_items, build_teacher_store, teacher_records
from transformers import AutoConfig

from potstill.store import HiddenLayer, open_store
from potstill.student_train import TrainConfig, train
from potstill.student_train.data import plan_split
from potstill.student_train.errors import TrainError

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_teacher_dir, tiny_tokenizer_dir) -> dict:
    root = tmp_path_factory.mktemp("integrity")
    store = str(root / "store")
    build_teacher_store(store, tiny_teacher_dir, arithmetic_items(36, seed=3), shard_records=12, layer_indices=(2,))
    student = build_student(str(root / "student"), tiny_tokenizer_dir, hidden=16)
    return {"root": root, "store": store, "student": student, "teacher": tiny_teacher_dir}


def fresh_store(base: dict, tmp_path) -> str:
    url = str(tmp_path / "store")
    shutil.copytree(base["store"], url)
    return url


def cfg(base: dict, store: str, out: str, **overrides) -> TrainConfig:
    values = dict(store=store, student=base["student"], out=out, lr=1e-2, batch_size=4, max_steps=6,
                  logging_steps=1, report_to="none", eval_fraction=0.0, num_workers=0, save_steps=100)
    values.update(overrides)
    return TrainConfig(**values).validate()


def one_line(message: str) -> str:
    assert "\n" not in message and "Traceback" not in message, message
    return message


def assert_nothing_saved(out: str) -> None:
    assert not os.path.exists(os.path.join(out, "model.safetensors"))
    assert not os.path.exists(os.path.join(out, "training_report.json"))


def set_first(value: float):
    def change(flat: np.ndarray) -> None:
        flat[3] = value
    return change


@pytest.mark.slow
def test_nan_log_probs_stop_training_in_one_line_naming_the_shard(base, tmp_path) -> None:
    """A shard whose checksums hold but whose log-probs are NaN (a buggy producer), read by a loader
    worker process: the CLI stops with exit 1 and one line naming the shard and record."""
    from genhelpers import run_cli

    store = fresh_store(base, tmp_path)
    rewrite_column(store, "t0-000001", "topk_logprobs", set_first(np.nan))
    out = str(tmp_path / "out")
    proc = run_cli(["train", "--store", store, "--student", base["student"], "--out", out, "--max-steps", "9",
                    "--batch-size", "4", "--num-workers", "1", "--report-to", "none", "--eval-fraction", "0"],
                   env=ENV, timeout=300)
    lines = [ln[ln.index("error: "):] for ln in proc.stderr.splitlines() if "error: " in ln]  # (after a progress bar)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-2000:]
    assert "shard t0-000001" in lines[0] and "record 'q" in lines[0] and "NaN" in lines[0], lines[0]
    assert "--skip-bad-shards" in lines[0]
    assert_nothing_saved(out)


def test_skip_bad_shards_trains_without_it_and_reports_it(base, tmp_path) -> None:
    store = fresh_store(base, tmp_path)
    rewrite_column(store, "t0-000001", "topk_logprobs", set_first(np.nan))
    report = train(cfg(base, store, str(tmp_path / "out"), skip_bad_shards=True, max_steps=9))
    assert list(report["skipped_shards"]) == ["t0-000001"] and "NaN" in report["skipped_shards"]["t0-000001"]
    assert report["global_step"] == 9 and all(np.isfinite(e["loss"]) for e in report["loss_curve"])
    from safetensors.numpy import load_file

    weights = load_file(os.path.join(str(tmp_path / "out"), "model.safetensors"))
    assert all(np.isfinite(w).all() for w in weights.values())


@pytest.mark.parametrize("column,value,what", [
    ("topk_ids", 10**6, "top-k ids outside"),
    ("topk_ids", -7, "top-k ids outside"),
    ("token_logprob", np.inf, "token_logprob"),
    ("tail_mass", 1.5, "tail_mass"),
    ("input_ids", 10**6, "input_ids outside"),
])
def test_values_no_teacher_writes_stop_training(base, tmp_path, column, value, what) -> None:
    """Ids beyond the vocabulary were folded into the tail silently: now they stop the run."""
    store = fresh_store(base, tmp_path)
    rewrite_column(store, "t0-000002", column, set_first(value))
    with pytest.raises(TrainError) as err:
        train(cfg(base, store, str(tmp_path / "out"), max_steps=12))
    assert "shard t0-000002" in one_line(str(err.value)) and what in str(err.value)
    assert_nothing_saved(str(tmp_path / "out"))


def _first_position(k: int, change):
    """Edit the K slots of the shard's first scored position (a [K] view of the flat values)."""
    def edit(flat: np.ndarray) -> None:
        change(flat[:k])
    return edit


def _too_much_mass(lp: np.ndarray) -> None:
    lp[:] = np.log(7.9 / len(lp))  # a distribution of mass 7.9 (checksums re-made: a buggy producer)


def _same_id(ids: np.ndarray) -> None:
    ids[:] = ids[0]


def _ascending(lp: np.ndarray) -> None:
    lp[:] = lp[::-1].copy()


@pytest.mark.parametrize("column,change,what", [
    ("topk_logprobs", _too_much_mass, "tail probabilities sum to 8."),  # 7.9 and the tail
    ("topk_ids", _same_id, "a top-k id is in two slots"),
    ("topk_logprobs", _ascending, "not in descending order"),
])
def test_impossible_top_k_fails_verify_and_stops_training(base, tmp_path, column, change, what) -> None:
    """Sound numbers that no distribution has: verify names the record, training refuses in one line."""
    from potstill.store import verify_store

    store = fresh_store(base, tmp_path)
    k = open_store(store).manifest.targets.k
    first_id = open_store(store).shard_ids("t0-000002")[0].as_py()
    rewrite_column(store, "t0-000002", column, _first_position(k, change))
    problems = [str(p) for p in verify_store(store).problems]
    assert len(problems) == 1 and "shard t0-000002" in problems[0], problems
    assert f"record {first_id!r}" in problems[0] and what in problems[0], problems
    with pytest.raises(TrainError) as err:
        train(cfg(base, store, str(tmp_path / "out"), max_steps=12))
    assert "shard t0-000002" in one_line(str(err.value)) and what in str(err.value)
    assert_nothing_saved(str(tmp_path / "out"))


def test_flipped_bytes_in_a_zarr_chunk_stop_training(base, tmp_path) -> None:
    """8 flipped bytes in a hidden-state chunk showed only as one loss spike; now each inner chunk's
    crc32c is checked before its first use."""
    store = fresh_store(base, tmp_path)
    chunk = sorted(glob.glob(os.path.join(store, "shards", "t0-000000", "hidden", "layer_2", "c", "*", "0")))[0]
    flip_bytes(chunk, count=8, seed=1)
    with pytest.raises(TrainError) as err:
        train(cfg(base, store, str(tmp_path / "out"), hidden_map="2:2", max_steps=12))
    message = one_line(str(err.value))
    assert "shards/t0-000000/hidden/layer_2/c/0/0" in message and "crc32c" in message
    assert_nothing_saved(str(tmp_path / "out"))


def test_non_finite_hidden_states_stop_training_and_fail_verify(base, tmp_path) -> None:
    """A chunk holding inf (bfloat16 0x7F80) whose checksum matches: a teacher that overflowed."""
    from potstill.store import verify_store

    store = fresh_store(base, tmp_path)
    chunk = sorted(glob.glob(os.path.join(store, "shards", "t0-000001", "hidden", "layer_2", "c", "*", "0")))[0]
    rel = os.path.relpath(chunk, store).replace(os.sep, "/")

    def infinity(data: bytearray) -> None:
        data[64:66] = (0x7F80).to_bytes(2, "little")

    rewrite_file(store, rel, infinity)
    problems = [str(p) for p in verify_store(store).problems]
    assert len(problems) == 1 and problems[0].startswith(f"shard t0-000001: file {rel}: inner chunk 0 (rows 0-")
    assert problems[0].endswith("holds 1 non-finite value(s) (inf or NaN)")
    with pytest.raises(TrainError) as err:
        train(cfg(base, store, str(tmp_path / "out"), hidden_map="2:2", max_steps=12))
    assert rel in one_line(str(err.value)) and "non-finite" in str(err.value)


def test_flipped_byte_in_records_arrow_stops_training(base, tmp_path) -> None:
    store = fresh_store(base, tmp_path)
    flip_bytes(os.path.join(store, "shards", "t0-000001", "records.arrow"), count=1, seed=2)
    with pytest.raises(TrainError) as err:
        train(cfg(base, store, str(tmp_path / "out"), max_steps=12))
    # (found by the pieces of the first batch's records, or the whole file's against its pieces file)
    assert "shards/t0-000001/records.arrow: fails its check (corrupted bytes " in one_line(str(err.value))


def test_a_damaged_commit_record_stops_training_unless_skipped(base, tmp_path) -> None:
    from potstill.store import StoreError

    store = fresh_store(base, tmp_path)
    with open(os.path.join(store, "commits", "t0-000002.json"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(StoreError, match="t0-000002.json: damaged commit record"):
        train(cfg(base, store, str(tmp_path / "a")))
    report = train(cfg(base, store, str(tmp_path / "b"), skip_bad_shards=True))
    assert list(report["skipped_shards"]) == ["t0-000002"] and report["loader"]["shards"] == 2


def test_a_student_with_nan_weights_is_refused(base, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    from potstill.student_train import CompatibilityError

    student = str(tmp_path / "student")
    shutil.copytree(base["student"], student)
    path = os.path.join(student, "model.safetensors")
    weights = load_file(path)
    weights["model.norm.weight"][3] = float("nan")
    save_file(weights, path, metadata={"format": "pt"})
    with pytest.raises(CompatibilityError, match=r"weight student.model.norm.weight holds NaN|weight model.norm.weight holds NaN"):
        train(cfg(base, base["store"], str(tmp_path / "out"), student=student))


def test_a_non_finite_loss_stops_before_the_update_and_saves_nothing(base, tmp_path) -> None:
    """A student whose logits overflow (finite weights, inf logits) must not be trained and saved as a success."""
    from safetensors.torch import load_file, save_file

    student = str(tmp_path / "student")
    shutil.copytree(base["student"], student)
    path = os.path.join(student, "model.safetensors")
    weights = load_file(path)
    head = weights["lm_head.weight"].double()
    weights["lm_head.weight"] = (head * (3e38 / head.abs().max())).float()  # finite, but logits overflow
    save_file(weights, path, metadata={"format": "pt"})
    out = str(tmp_path / "out")
    with pytest.raises(TrainError) as err:
        train(cfg(base, base["store"], out, student=student))
    message = one_line(str(err.value))
    assert message.startswith("step 1: the loss or a gradient is not finite") and "records 'q" in message, message
    assert "nothing saved" in message
    assert_nothing_saved(out)


def test_divergence_after_a_checkpoint_stops_and_names_the_sound_checkpoint(base, tmp_path) -> None:
    out = str(tmp_path / "out")
    with pytest.raises(TrainError) as err:  # a learning rate no model survives: fp32 overflows within steps
        train(cfg(base, base["store"], out, lr=1e30, max_grad_norm=0.0, save_steps=1, max_steps=40))
    message = one_line(str(err.value))
    step = int(message.split(":")[0].split()[1])
    assert step > 1 and f"checkpoint-{step - 1}" in message, message
    assert_nothing_saved(out)
    # every saved checkpoint holds finite weights: nothing after the bad step was written
    from safetensors.numpy import load_file

    for folder in glob.glob(os.path.join(out, "checkpoint-*")):
        assert all(np.isfinite(w).all() for w in load_file(os.path.join(folder, "model.safetensors")).values())


def test_resume_of_a_finished_run_does_not_train_past_max_steps(base, tmp_path) -> None:
    out = str(tmp_path / "out")
    first = train(cfg(base, base["store"], out, max_steps=6, save_steps=3))
    assert first["global_step"] == 6
    again = train(cfg(base, base["store"], out, max_steps=6, save_steps=3, resume=True))
    assert again["global_step"] == 6 and again["resumed_from"].endswith("checkpoint-6")
    assert sorted(os.listdir(out)).count("checkpoint-7") == 0


def test_duplicate_records_are_trained_on_once(base, tmp_path) -> None:
    """Two runs wrote the same records: training uses the first committed copy of each id."""
    store_url = fresh_store(base, tmp_path)
    store = open_store(store_url)
    layers = [HiddenLayer(2, AutoConfig.from_pretrained(base["teacher"]).hidden_size, "bfloat16")]
    again = teacher_records(base["teacher"], arithmetic_items(36, seed=3)[:10], 8, layers)
    with store.writer("t1") as w:  # a second writer commits 10 of the same ids later
        w.write_many(copy.deepcopy(again))
    report = train(cfg(base, store_url, str(tmp_path / "out"), max_steps=2))
    assert report["loader"]["train_records"] == 36 and report["loader"]["duplicates_skipped"] == 10
    with open(os.path.join(str(tmp_path / "out"), "training_report.json")) as f:
        assert json.load(f)["loader"]["duplicates_skipped"] == 10


def test_eval_checks_what_it_reads(base, tmp_path) -> None:
    from potstill.store import StoreError
    from potstill.student_train import evaluate

    store = fresh_store(base, tmp_path)
    flip_bytes(os.path.join(store, "shards", "t0-000000", "records.arrow"), count=1, seed=4)
    with pytest.raises(StoreError, match=r"shards/t0-000000/records.arrow: fails its sha256 check"):
        evaluate(store, base["student"], eval_fraction=0.5, answers=False)


@pytest.mark.slow
def test_skip_bad_shards_leaves_the_skipped_shard_out_of_the_final_evaluation(base, tmp_path) -> None:
    """The final evaluation read the shard training had skipped and the run failed with no report."""
    from genhelpers import run_cli

    store = fresh_store(base, tmp_path)
    rewrite_column(store, "t0-000001", "topk_logprobs", set_first(np.nan))
    held = [row for shard, row in plan_split(open_store(store), 0.25, 1, 0).held_out if shard == "t0-000001"]
    assert held, "the damaged shard must hold held-out records for this test to mean anything"
    out = str(tmp_path / "out")
    proc = run_cli(["train", "--store", store, "--student", base["student"], "--out", out, "--max-steps", "9",
                    "--batch-size", "4", "--num-workers", "0", "--report-to", "none", "--eval-fraction", "0.25",
                    "--eval-max-new-tokens", "2", "--skip-bad-shards"], env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(os.path.join(out, "training_report.json")) as f:
        report = json.load(f)
    assert list(report["skipped_shards"]) == ["t0-000001"]
    final = report["final_eval"]
    assert final["skipped_shards"] == ["t0-000001"] and final["records_left_out"] == len(held)
    assert final["records"] > 0 and np.isfinite(final["kd_loss"])


def test_a_tampered_store_tokenizer_file_is_refused_in_one_line(base, tmp_path) -> None:
    """verify catches an edited tokenizer file; train used to load it (or never look) and exit 0."""
    from potstill.store import StoreError

    store = fresh_store(base, tmp_path)
    entry = sorted(open_store(store).manifest.tokenizer.files, key=lambda e: e.path)[0]
    flip_bytes(os.path.join(store, entry.path), count=1, seed=5)  # same size, other bytes
    with pytest.raises(StoreError) as err:
        train(cfg(base, store, str(tmp_path / "out"), max_steps=2))
    assert entry.path in one_line(str(err.value)) and "sha256" in str(err.value)
    assert_nothing_saved(str(tmp_path / "out"))


def test_ids_files_that_disagree_with_the_shard_are_refused_in_one_line(base, tmp_path) -> None:
    """verify compares a shard's ids file with its id column; so does train (the ids file's checksum
    is made to match, as a faulty writer would leave it)."""
    from potstill.store import StoreError
    from potstill.store.ids import ids_file_bytes

    store = fresh_store(base, tmp_path)
    ids = open_store(store).shard_ids("t0-000001").to_pylist()
    ids[0], ids[1] = ids[1], ids[0]
    data = ids_file_bytes(ids).to_pybytes()
    with open(os.path.join(store, "shards", "t0-000001", "ids.arrow"), "wb") as f:
        f.write(data)
    path = os.path.join(store, "commits", "t0-000001.json")
    with open(path) as f:
        record = json.load(f)
    for entry in record["files"]:
        if entry["path"].endswith("/ids.arrow"):
            entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    write_commit(path, record)  # resealed, as a buggy writer would
    with pytest.raises(TrainError) as err:
        train(cfg(base, store, str(tmp_path / "out"), max_steps=9))
    message = one_line(str(err.value))
    assert "t0-000001/ids.arrow" in message and "ids file differs from the records' ids at row 0" in message, message
    assert_nothing_saved(str(tmp_path / "out"))
    report = train(cfg(base, store, str(tmp_path / "skip"), max_steps=9, skip_bad_shards=True))
    assert list(report["skipped_shards"]) == ["t0-000001"]
    with pytest.raises(StoreError, match="t0-000001"):
        open_store(store, verify_reads=True).shard("t0-000001")


def two_checkpoints(base: dict, tmp_path) -> str:
    out = str(tmp_path / "out")
    train(cfg(base, base["store"], out, max_steps=2, save_steps=1))
    assert os.path.isdir(os.path.join(out, "checkpoint-2"))
    return out


def test_a_checkpoint_with_nan_weights_is_not_called_sound(base, tmp_path) -> None:
    """After a non-finite loss the message named the last checkpoint sound without looking at it."""
    from safetensors.torch import load_file, save_file

    out = two_checkpoints(base, tmp_path)
    path = os.path.join(out, "checkpoint-2", "model.safetensors")
    weights = load_file(path)
    weights["model.norm.weight"][:] = float("nan")
    save_file(weights, path, metadata={"format": "pt"})
    with pytest.raises(TrainError) as err:
        train(cfg(base, base["store"], out, max_steps=4, save_steps=1, resume=True))
    message = one_line(str(err.value))
    assert message.startswith("step 3: the loss or a gradient is not finite"), message
    assert "sound" not in message and "checkpoint-2" in message and "model.norm.weight" in message, message


def test_a_sound_checkpoint_is_said_to_hold_finite_weights(base, tmp_path) -> None:
    out = str(tmp_path / "out")
    with pytest.raises(TrainError) as err:
        train(cfg(base, base["store"], out, lr=1e30, max_grad_norm=0.0, save_steps=1, max_steps=40))
    step = int(one_line(str(err.value)).split(":")[0].split()[1])
    assert f"checkpoint-{step - 1}) holds finite weights" in str(err.value), str(err.value)


def test_resume_without_the_optimizer_state_is_refused_in_one_line(base, tmp_path) -> None:
    from potstill.student_train import ConfigError

    out = two_checkpoints(base, tmp_path)
    os.remove(os.path.join(out, "checkpoint-2", "optimizer.pt"))
    with pytest.raises(ConfigError) as err:
        train(cfg(base, base["store"], out, max_steps=4, save_steps=1, resume=True))
    assert "checkpoint-2/optimizer.pt" in one_line(str(err.value)) and "missing" in str(err.value)
    assert not os.path.exists(os.path.join(out, "checkpoint-3"))


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "scheduler.pt"])
def test_resume_from_a_truncated_checkpoint_file_is_refused_in_one_line(base, tmp_path, name) -> None:
    from potstill.student_train import ConfigError

    out = two_checkpoints(base, tmp_path)
    path = os.path.join(out, "checkpoint-2", name)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(ConfigError) as err:
        train(cfg(base, base["store"], out, max_steps=4, save_steps=1, resume=True))
    assert f"checkpoint-2/{name}" in one_line(str(err.value)) and "damaged" in str(err.value), str(err.value)
    assert not os.path.exists(os.path.join(out, "checkpoint-3"))


@pytest.mark.slow
@pytest.mark.parametrize("where", ["under-a-file", "proc"])
def test_an_unwritable_out_is_refused_before_any_model_loads(base, tmp_path, where) -> None:
    """train --out where nothing can be written failed only when the Trainer first saved."""
    from genhelpers import run_cli, run_main

    if where == "under-a-file":
        (tmp_path / "a-file").write_text("x")
        out = str(tmp_path / "a-file" / "out")
    else:
        out = "/proc/potstill-out"  # not writable, even by root
    args = ["train", "--store", base["store"], "--student", base["student"], "--out", out, "--max-steps", "1",
            "--report-to", "none"]
    # (the command as a process once; the other case through its entry point in the test process)
    proc = run_cli(args, env=ENV, timeout=300) if where == "under-a-file" else run_main(args)
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr[-2000:]
    assert f"--out {out}" in errors[0] and "write" in errors[0], errors[0]
    assert "Loading weights" not in proc.stderr, proc.stderr[-2000:]  # refused before the student loaded
