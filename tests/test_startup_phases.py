"""`generate` and `train` name each start-up phase on stderr as it begins, each line completed with
its duration; the progress counts tokens with a rate; `--no-progress` prints none of it. Real
subprocesses on a tiny model (order and presence are checked, never timings)."""

from __future__ import annotations

import json
import re

import pytest
from common import prompt_rows, write_jsonl
from genhelpers import run_cli

PHASE = re.compile(r"^(?P<name>[a-z][a-z ,+()-]*) \.\.\. (?P<seconds>\d+\.\d) s$")


def phase_lines(stderr: str) -> list[str]:
    """The phase names in the order printed; every phase line must be complete (name, then duration),
    or else be broken by another writer's line (a note) and written again whole right after it."""
    names, broken = [], None
    for line in stderr.splitlines():
        if " ... " in line and not line.startswith("generate:"):
            m = PHASE.match(line.split("\r")[0])
            if m is None and broken is None:
                broken = line.split(" ... ")[0]  # must come again whole, once the other writer's line ends
                continue
            assert m, f"not a complete phase line: {line!r}"
            assert broken in (None, m["name"]), f"phase {broken!r} was broken and never written again whole"
            names.append(m["name"])
            broken = None
    assert broken is None, f"phase {broken!r} was broken and never written again whole"
    return names


@pytest.mark.slow
def test_generate_names_its_start_up_phases_in_order_then_counts_tokens(tmp_path, tiny_teacher_dir):
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(6, seed=31, completion=False))
    store = str(tmp_path / "s")
    args = ["generate", "--teacher", tiny_teacher_dir, "--prompts", prompts, "--out", store, "--device", "cpu",
            "--mode", "generate", "--max-new-tokens", "12", "--sampling-temperature", "1.0"]
    result = run_cli([*args, "--json"])
    assert result.returncode == 0, result.stderr[-3000:]
    names = phase_lines(result.stderr)
    assert names == ["import torch, transformers", "resolve teacher", "tokenizer", "read prompts", "skip committed, tokenize",
                     "load teacher", "create store", "warm-up (first step)"], result.stderr
    assert result.stderr.startswith("import torch, transformers ... ")  # the very first thing the command writes
    bar = result.stderr.split("warm-up (first step) ... ", 1)[1]
    assert re.search(r"generate: .*tok/s", bar) and "6/6 records" in bar, bar  # tokens, their rate, records
    summary = json.loads(result.stdout)  # stdout holds the summary alone
    assert list(summary["phases"]) == names and all(s >= 0 for s in summary["phases"].values())

    more = write_jsonl(str(tmp_path / "q.jsonl"), prompt_rows(9, seed=31, completion=False))  # 6 old + 3 new
    again = run_cli(["generate", "--teacher", tiny_teacher_dir, "--prompts", more, "--out", store,
                     "--device", "cpu", "--mode", "generate", "--max-new-tokens", "12", "--sampling-temperature", "1.0"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert phase_lines(again.stderr)[-2:] == ["load teacher", "warm-up (first step)"]  # the store existed
    assert re.search(r"^start-up: import torch, transformers \d+\.\d s, resolve teacher \d+\.\d s, ", again.stdout, re.M)
    assert "already in the store: 6 records" in again.stdout

    quiet = run_cli([*args[:4], write_jsonl(str(tmp_path / "r.jsonl"), prompt_rows(2, seed=32, completion=False)),
                     *args[5:6], str(tmp_path / "quiet"), *args[7:], "--no-progress"])
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr


@pytest.mark.slow
def test_a_failing_phase_ends_its_line_before_the_error(tmp_path, tiny_teacher_dir):
    result = run_cli(["generate", "--teacher", tiny_teacher_dir, "--prompts", str(tmp_path / "missing.jsonl"),
                      "--out", str(tmp_path / "s"), "--device", "cpu"])
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert re.match(r"^read prompts \.\.\. failed after \d+\.\d s$", lines[-2]), result.stderr
    assert lines[-1].startswith("error: ")


@pytest.mark.slow
def test_train_names_its_start_up_phases_in_order_and_reports_them(tmp_path, tiny_teacher_dir, tiny_tokenizer_dir):
    from common import build_student
    from genhelpers import config

    from potstill.teacher_gen.runner import generate

    store = str(tmp_path / "s")
    generate(config(tiny_teacher_dir, write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(8, seed=33)), store))
    student = build_student(str(tmp_path / "student"), tiny_tokenizer_dir)
    out = str(tmp_path / "o")
    result = run_cli(["train", "--store", store, "--student", student, "--out", out, "--max-steps", "2",
                      "--report-to", "none", "--num-workers", "0", "--eval-fraction", "0"])
    assert result.returncode == 0, result.stderr[-3000:]
    names = phase_lines(result.stderr)
    assert names == ["import torch, transformers", "open store", "load student", "first step"], result.stderr
    assert result.stderr.startswith("import torch, transformers ... ")
    first_step = result.stderr.index("first step ... ")
    assert "step 1/2" not in result.stderr[:first_step]  # the bar and the log lines come after the start-up
    with open(f"{out}/training_report.json") as f:
        assert list(json.load(f)["phases"]) == names
    assert re.search(r"^start-up: import torch, transformers \d+\.\d s, open store \d+\.\d s, ", result.stdout, re.M)
