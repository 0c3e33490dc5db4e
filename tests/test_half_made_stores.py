"""`potstill generate` checks what it can before it writes the first byte, names a differing setting in
one line, and writes nothing on a rerun with nothing to do."""

from __future__ import annotations

import os
import shutil
import sys

import pytest
from common import prompt_rows, write_jsonl
from genhelpers import config, run_cli

from potstill.store import open_store, verify_store
from potstill.teacher_gen.errors import GenerateError
from potstill.teacher_gen.runner import generate


def generate_args(teacher: str, prompts: str, store: str, *extra: str) -> list[str]:
    return ["generate", "--teacher", teacher, "--prompts", prompts, "--out", store, "--device", "cpu",
            "--no-progress", *extra]


def one_error_line(result) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 1 and "Traceback" not in result.stderr and len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def test_a_missing_vllm_writes_nothing_and_a_rerun_with_hf_then_works(tmp_path, tiny_teacher_dir, monkeypatch):
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(3, seed=1))
    store = str(tmp_path / "s")
    with monkeypatch.context() as patched:
        patched.setitem(sys.modules, "vllm", None)  # as if it were not installed (it may be, in the vLLM venv)
        with pytest.raises(GenerateError) as failed:
            generate(config(tiny_teacher_dir, prompts, store, backend="vllm"))
    line = str(failed.value)
    assert "\n" not in line and "--backend vllm" in line and "not installed" in line and "potstill[vllm]" in line
    assert not os.path.exists(store)  # no manifest, no tokenizer left behind

    assert generate(config(tiny_teacher_dir, prompts, store, backend="hf")).records == 3
    assert open_store(store).num_records == 3 and verify_store(store).ok


def test_a_teacher_whose_weights_do_not_load_writes_nothing(tmp_path, tiny_teacher_dir):
    broken = tmp_path / "broken-teacher"
    shutil.copytree(tiny_teacher_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # cut short: the config and tokenizer still read fine
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(2, seed=2))
    store = str(tmp_path / "s")
    with pytest.raises(GenerateError, match="cannot load"):
        generate(config(str(broken), prompts, store))
    assert not os.path.exists(store)


@pytest.mark.slow
def test_a_differing_setting_is_named_in_one_line(tmp_path, tiny_teacher_dir):
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(2, seed=3))
    store = str(tmp_path / "s")
    assert generate(config(tiny_teacher_dir, prompts, store)).records == 2
    before = sorted(os.listdir(store))
    refused = run_cli(generate_args(tiny_teacher_dir, prompts, store, "--targets", "topk", "--no-append-eos", "--top-k", "8"))
    line = one_error_line(refused)
    assert line == (f"error: store {store} was created with other settings: "
                    "targets.k: store has 64, this run has 8; "
                    "generation.append_eos: store has true, this run has false")
    assert sorted(os.listdir(store)) == before and verify_store(store).ok


def test_a_rerun_with_nothing_to_do_writes_no_new_errors_file(tmp_path, tiny_teacher_dir):
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), [*prompt_rows(3, seed=4), "{not json", {"id": "e", "prompt": ""}])
    store = str(tmp_path / "s")
    first = generate(config(tiny_teacher_dir, prompts, store))
    assert (first.records, len(first.errors)) == (3, 2)
    assert len(os.listdir(os.path.join(store, "errors"))) == 1  # the two bad lines, once
    again = generate(config(tiny_teacher_dir, prompts, store))
    assert (again.records, again.already_done, len(again.errors), again.errors_file) == (0, 3, 2, None)
    assert len(os.listdir(os.path.join(store, "errors"))) == 1


def test_a_first_lease_being_written_by_a_live_process_is_not_a_leftover(tmp_path):
    """A writer's first lease goes through a temporary file before any lease of that writer exists: a
    second run cleaning leftovers meanwhile must leave it (else the first run's rename fails). The
    temporary file of a process that has died is a leftover, cleaned."""
    import subprocess

    from storehelpers import build_store

    from potstill.store.verify import clean_leftovers, find_leftovers

    path = str(tmp_path / "s")
    build_store(path)
    store = open_store(path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    writers = os.path.join(path, "writers")
    os.makedirs(writers, exist_ok=True)
    live_tmp = f".g000-1a2b3c4d.run.json.{os.getpid()}-0123abcd.tmp"
    dead_tmp = f".g001-1a2b3c4d.run.json.{dead.pid}-0123abcd.tmp"
    for name in (live_tmp, dead_tmp):
        with open(os.path.join(writers, name), "w") as f:
            f.write("{}")
    found = {left.path: left for left in find_leftovers(store)}
    assert found[f"writers/{live_tmp}"].live and "is running" in found[f"writers/{live_tmp}"].reason
    assert not found[f"writers/{dead_tmp}"].live
    assert clean_leftovers(store, list(found.values())) == [f"writers/{dead_tmp}"]
    assert sorted(os.listdir(writers)) == [live_tmp]
