"""The answer split of rationale mode: the default pattern ends an answer at its sentence's end and
never takes the template's placeholder X; `answer_match` picks the first or the last match."""

from __future__ import annotations

import pytest
from common import write_jsonl
from genhelpers import config

from potstill.share import format_info, store_info
from potstill.store import open_store
from potstill.store.errors import PotstillError
from potstill.teacher_gen.errors import GenerateError
from potstill.teacher_gen.rationale import split_rationale
from potstill.teacher_gen.runner import generate


@pytest.mark.parametrize(
    ("text", "last", "first"),
    [
        ("15 + 27 = 42\n\nThe answer is X.", None, None),  # the template repeated: no answer named
        ("So, the answer is 5.\n\nThe answer is X.", "5", "5"),
        ('The answer is 7.\n\nThe final line of the form "The answer is X" is a final line.', "7", "7"),
        ("The answer is 12.\nSo, the answer is 1.\n", "1", "12"),
        ("The answer is 3, because 1 + 2 = 3.", "3", "3"),
        ("the answer is 1,234.", "1,234", "1,234"),
        ("The answer is New York. It is big.", "New York", "New York"),
        ("The answer is Xavier.", "Xavier", "Xavier"),  # a word starting with X is an answer
        ("The answer is: **42**.", "42", "42"),
        ("#### 1.25", "1.25", "1.25"),
    ],
)
def test_default_pattern_last_and_first_match(text: str, last: str | None, first: str | None) -> None:
    assert split_rationale(text)[1] == last
    assert split_rationale(text, match="first")[1] == first


def test_the_rationale_is_the_text_before_the_chosen_match() -> None:
    text = "The answer is 12.\nSo, the answer is 1."
    assert split_rationale(text) == ("The answer is 12.\nSo,", "1")
    assert split_rationale(text, match="first") == ("", "12")


def test_answer_match_is_checked_recorded_and_used(tmp_path, tiny_teacher_dir) -> None:
    rows = [{"id": "a", "prompt": "what is 2 plus 3 ?", "completion": "The answer is 4. No: the answer is 5."},
            {"id": "b", "prompt": "what is 1 plus 1 ?", "completion": "one and one . The answer is X."}]
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), rows)
    with pytest.raises(GenerateError, match="--answer-match must be one of last, first; got 'middle'"):
        generate(config(tiny_teacher_dir, prompts, str(tmp_path / "bad"), rationale=True, answer_match="middle"))
    store = str(tmp_path / "s")
    generate(config(tiny_teacher_dir, prompts, store, rationale=True, answer_match="first"))
    opened = open_store(store)
    assert opened.manifest.generation["answer_match"] == "first"
    answers = {r.id: r.answer for r in opened.iter_records()}
    assert answers == {"a": "4", "b": None}
    assert store_info(opened)["answers"] == {"with_answer": 1, "records": 2, "unreadable_shards": []}


def test_potstill_generate_takes_answer_match_and_store_info_counts_answers(tmp_path, tiny_teacher_dir) -> None:
    from typer.testing import CliRunner

    from potstill.cli.main import app

    rows = [{"id": f"r{i}", "prompt": "what is 2 plus 3 ?", "completion": f"add . The answer is {i}."} for i in range(3)]
    rows.append({"id": "none", "prompt": "hello", "completion": "no answer line here"})
    prompts = write_jsonl(str(tmp_path / "p.jsonl"), rows)
    store = str(tmp_path / "s")
    runner = CliRunner()
    result = runner.invoke(app, ["generate", "--teacher", tiny_teacher_dir, "--prompts", prompts, "--out", store,
                                 "--rationale", "--answer-match", "last", "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["store", "info", store])
    assert result.exit_code == 0, result.output
    assert "answers      3 of 4 records hold an answer (the others: no answer found" in result.output


def test_a_rationale_store_from_before_answer_match_resumes_with_the_last_match_rule(tmp_path, tiny_teacher_dir) -> None:
    import json

    rows = [{"id": f"r{i}", "prompt": f"what is {i} plus 1 ?", "completion": f"The answer is {i + 1}."}
            for i in range(4)]
    store = str(tmp_path / "s")
    generate(config(tiny_teacher_dir, write_jsonl(str(tmp_path / "p2.jsonl"), rows[:2]), store, rationale=True))
    manifest_path = tmp_path / "s" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["generation"]["answer_match"]  # as written before the option existed: always the last match
    del manifest["checksum"]  # (and before manifests carried a checksum)
    manifest_path.write_text(json.dumps(manifest))
    generate(config(tiny_teacher_dir, write_jsonl(str(tmp_path / "p4.jsonl"), rows), store, rationale=True))
    assert sorted(r.id for r in open_store(store).iter_records()) == ["r0", "r1", "r2", "r3"]
    info = store_info(open_store(store))
    assert info["answer_rule"] == {"pattern": manifest["generation"]["answer_pattern"], "match": "last"}
    assert "answer rule  the last match of " in format_info(info)
    with pytest.raises(PotstillError, match='generation.answer_match: store has "last", this run has "first"'):
        generate(config(tiny_teacher_dir, write_jsonl(str(tmp_path / "p4.jsonl"), rows), store, rationale=True,
                        answer_match="first"))
