"""`potstill generate` against hostile input and concurrent runs: every bad line is one skipped line
with its number and reason (never a traceback), impossible settings fail before anything is
written, an empty prompt set is an error, and two runs on overlapping shares of one store never
both write (the second refuses in one line)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from common import HOSTILE_LINES, prompt_rows, write_jsonl
from genhelpers import config, popen_cli, run_cli, run_main

from potstill.store import open_store, verify_store
from potstill.teacher_gen.errors import GenerateError
from potstill.teacher_gen.runner import generate, partitions_overlap


def test_hostile_lines_are_skipped_with_their_number_and_reason(tmp_path, tiny_teacher_dir):
    good = prompt_rows(3, seed=4)
    lines = [good[0]] + [HOSTILE_LINES[n][0] for n in sorted(HOSTILE_LINES)] + [
        '{"id": "nan-meta", "prompt": "the quick brown fox", "completion": "jumps", "score": NaN, "big": Infinity}',
        *good[1:],
    ]
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), lines)
    store = str(tmp_path / "s")
    # (in the test process, through the command's entry point: test_generate.py's bad inputs run as a process)
    result = run_main(["generate", "--teacher", tiny_teacher_dir, "--prompts", prompts, "--out", store,
                       "--device", "cpu", "--no-progress"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    for number, (_, reason) in HOSTILE_LINES.items():
        assert f"line {number}" in result.stdout and reason in result.stdout, (number, result.stdout)
    s = open_store(store)
    assert sorted(s.id_index().ids().to_pylist()) == sorted([r["id"] for r in good] + ["nan-meta"])
    meta = next(r for r in s.iter_records() if r.id == "nan-meta").meta
    assert meta == {"score": "nan", "big": "inf"}  # valid JSON in the store, nothing lost
    assert verify_store(store).ok


@pytest.mark.slow
def test_top_k_larger_than_the_vocabulary_fails_before_anything_is_written(tmp_path, tiny_teacher_dir):
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(2))
    store = str(tmp_path / "s")
    result = run_cli(["generate", "--teacher", tiny_teacher_dir, "--prompts", prompts, "--out", store,
                      "--device", "cpu", "--targets", "topk", "--top-k", "100000000", "--no-progress"])
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 1 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "--top-k 100000000 is larger than" in lines[0] and "vocabulary" in lines[0]
    assert not os.path.exists(store)


@pytest.mark.parametrize("rows,expected", [
    ([], "holds no records"),
    (["{broken", {"id": "x", "prompt": ""}], "has no usable record (2 rows, all skipped; first: line 1"),
])
def test_a_prompt_set_with_nothing_to_write_is_an_error(tmp_path, tiny_teacher_dir, rows, expected):
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), rows)
    store = str(tmp_path / "s")
    with pytest.raises(GenerateError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        generate(config(tiny_teacher_dir, prompts, store))
    assert not os.path.exists(store)  # no empty store left behind


def test_partitions_overlap():
    assert partitions_overlap((1, 0), (2, 1)) and partitions_overlap((2, 0), (4, 2))
    assert not partitions_overlap((2, 0), (2, 1)) and not partitions_overlap((2, 0), (4, 1))
    assert partitions_overlap((3, 1), (2, 0))  # gcd 1: every pair of shares shares ids


HOLD_CLAIM = textwrap.dedent("""
    import sys, time
    from potstill.store import open_store
    from potstill.store.leases import WriterLease
    store = open_store(sys.argv[1])
    WriterLease(store, "other-run.run", extra={"run": {"workers": int(sys.argv[2]), "worker_index": int(sys.argv[3])}}).start()
    print("holding", flush=True)
    time.sleep(120)
""")


@pytest.mark.parametrize("theirs,mine,refused", [
    ((1, 0), (1, 0), True),   # the same command twice
    ((1, 0), (2, 1), True),   # another --workers count: shares overlap
    ((2, 0), (2, 1), False),  # disjoint shares of one job: both run
])
@pytest.mark.slow
def test_a_live_run_on_an_overlapping_share_makes_a_second_run_refuse(tmp_path, tiny_teacher_dir, theirs, mine,
                                                                        refused):
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(12, seed=6))
    store = str(tmp_path / "s")
    generate(config(tiny_teacher_dir, prompts, store, max_length=None, workers=2, worker_index=1, top_k=4))
    holder = subprocess.Popen([sys.executable, "-c", HOLD_CLAIM, store, *map(str, theirs)], stdout=subprocess.PIPE,
                              text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        assert holder.stdout.readline().strip() == "holding"
        run = run_cli if theirs == mine else run_main  # (the command as a process once)
        result = run(["generate", "--teacher", tiny_teacher_dir, "--prompts", prompts, "--out", store,
                          "--device", "cpu", "--targets", "topk", "--top-k", "4", "--no-progress", "--workers", str(mine[0]),
                          "--worker-index", str(mine[1])])
    finally:
        holder.kill()
        holder.wait()
    if refused:
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert result.returncode == 1 and len(lines) == 1, result.stderr
        assert "another potstill generate run" in lines[0] and "writers/other-run.run.json" in lines[0]
    else:
        assert result.returncode == 0, result.stderr
    ids = open_store(store).id_index().ids().to_pylist()
    assert len(ids) == len(set(ids))
    assert [n for n in os.listdir(os.path.join(store, "writers")) if "other-run" not in n] == []  # our claim is gone


def test_a_run_that_fills_the_store_while_another_loads_its_teacher_is_not_written_twice(tmp_path, tiny_teacher_dir):
    """The interleaving two runs started at once can take: both find no store, the faster one
    creates and fills it (and ends) while the slower one is still loading its teacher. The slower
    one must read what was committed after its claim and write nothing twice."""
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(10, seed=8))
    store = str(tmp_path / "s")
    cfg = config(tiny_teacher_dir, prompts, store, max_length=None, top_k=4, shard_records=3)
    first: list = []

    def other_run_finishes_first(progress) -> None:  # called once the total is known, before the teacher loads
        if not first:
            first.append(generate(cfg))

    late = generate(cfg, on_progress=other_run_finishes_first)
    assert first[0].records == 10
    assert late.records == 0 and late.already_done == 10 and late.shards == 0
    ids = open_store(store).id_index().ids().to_pylist()
    assert len(ids) == len(set(ids)) == 10
    assert verify_store(store).ok


@pytest.mark.slow
def test_two_identical_runs_started_at_once_never_write_a_record_twice(tmp_path, tiny_teacher_dir):
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(80, seed=7))
    store = str(tmp_path / "s")
    args = ["generate", "--teacher", tiny_teacher_dir, "--prompts", prompts, "--out", store, "--device", "cpu",
            "--no-progress", "--shard-records", "4", "--batch-tokens", "64"]
    procs = [popen_cli(args), popen_cli(args)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0 or (p.returncode == 1 and "another potstill generate run" in err), err[-2000:]
    rerun = run_cli(args)  # whatever happened, one more run completes the store
    assert rerun.returncode == 0, rerun.stderr
    s = open_store(store)
    ids = s.id_index().ids().to_pylist()
    assert len(ids) == len(set(ids)) == 80
    report = verify_store(store)
    assert report.ok and report.duplicates == 0 and not report.leftovers


@pytest.mark.slow
def test_a_fifo_prompt_set_is_refused_in_one_line_without_opening_it(tmp_path, tiny_teacher_dir):
    fifo = str(tmp_path / "pipe.jsonl")
    os.mkfifo(fifo)  # nobody writes to it: opening it for reading would block forever
    result = run_cli(["generate", "--teacher", tiny_teacher_dir, "--prompts", fifo, "--out", str(tmp_path / "s"),
                      "--device", "cpu", "--no-progress"], timeout=120)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].endswith(f"prompt file {fifo} is not a regular file (a FIFO, device or socket cannot be read "
                             "as a prompt set)")
    assert not os.path.exists(tmp_path / "s")


@pytest.mark.parametrize("pattern,reason", [
    ("(", "is not a valid regular expression (missing ), unterminated subpattern at position 0)"),
    ("(?P<x>a)(b)", "has 2 groups and none named 'answer': name the answer's group (?P<answer>...)"),
])
def test_a_bad_answer_pattern_is_refused_before_any_model_loads(tmp_path, pattern, reason):
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(2))
    run = run_cli if pattern == "(" else run_main  # (the command as a process once)
    result = run(["generate", "--teacher", str(tmp_path / "no-such-teacher"), "--prompts", prompts,
                      "--out", str(tmp_path / "s"), "--rationale", "--answer-pattern", pattern, "--no-progress"])
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].endswith(f"--answer-pattern {pattern!r} {reason}"), lines[0]


@pytest.mark.slow
def test_a_huge_prompt_is_skipped_by_its_length_before_it_is_tokenized(tmp_path, tiny_teacher_dir):
    """A 10 MB one-line prompt used to be tokenized (gigabytes of memory) before being skipped as too long:
    its byte length alone rules it out, and it is reported by line like any other bad line."""
    good = prompt_rows(2, seed=9)
    huge = {"id": "huge", "prompt": "tok " * (10 * 2**20 // 4), "completion": " done"}
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), [good[0], huge, good[1]])
    store = str(tmp_path / "s")
    script = textwrap.dedent("""
        import resource, sys
        from potstill.cli.main import main
        sys.argv = ["potstill", *sys.argv[1:]]
        try:
            main()
        finally:
            print(f"MAXRSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", file=sys.stderr)
    """)
    result = subprocess.run([sys.executable, "-c", script, "generate", "--teacher", tiny_teacher_dir, "--prompts",
                             prompts, "--out", store, "--device", "cpu", "--no-progress", "--max-length", "64"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("line 2, id 'huge': too long: 10,485,760 bytes of text cannot fit the teacher's context of 64 tokens "
            "(at most 2,048 bytes); skipped without tokenizing") in result.stdout, result.stdout
    maxrss_mib = int(result.stderr.split("MAXRSS ")[1].split()[0]) / 1024
    assert maxrss_mib < 1500, maxrss_mib  # the tokenizer's copy of 10 MB of text would take gigabytes
    assert sorted(open_store(store).id_index().ids().to_pylist()) == sorted(r["id"] for r in good)


def test_a_huge_completion_is_cut_before_tokenizing_with_truncate_and_skipped_without(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    from potstill.teacher_gen.config import GenerateConfig
    from potstill.teacher_gen.encode import Encoded, encode_item
    from potstill.teacher_gen.prompts import SourceItem

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    item = SourceItem(id="big", line=7, prompt="the quick brown fox", completion=" jumps" * 100_000)
    base = {"teacher": "t", "prompts": "p.jsonl", "store": "s"}
    skipped = encode_item(item, tokenizer, GenerateConfig.build(**base), 64)
    assert not isinstance(skipped, Encoded) and (skipped.line, skipped.id) == (7, "big")
    assert skipped.reason == ("too long: 600,000 bytes of completion cannot fit the teacher's context of 64 tokens "
                              "(at most 2,048 bytes); skipped without tokenizing")
    cut = encode_item(item, tokenizer, GenerateConfig.build(**base, truncate=True), 64)
    assert isinstance(cut, Encoded) and cut.truncated
    assert len(cut.prompt_ids) + len(cut.completion_ids) == 64
    assert cut.completion_text == item.completion  # the record keeps its text; only the tokens are cut
    scored_prompt = SourceItem(id="p", line=8, prompt="the quick brown fox " * 50_000)
    whole = encode_item(scored_prompt, tokenizer, GenerateConfig.build(**base, truncate=True, score_prompt=True), 64)
    assert isinstance(whole, Encoded) and whole.truncated and len(whole.prompt_ids) == 64
