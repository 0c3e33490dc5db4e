"""Property-based tests (hypothesis) of the prompt reader (teacher_gen/prompts.py) on whole files: for any
mix of valid records, arbitrary JSON values, malformed lines, odd Unicode (NULs, astral planes, lone
surrogates), very long strings, huge numbers, deep nesting, blank lines and duplicate ids, `load_prompts`
never raises; every line is one item or one error, by its line number, with a one-line reason; every
valid record comes back exactly once with its text intact; a repeated id is named with the line that
first had it. The same, where cheap, for CSV, JSON and Parquet files. tests/test_fuzz.py covers single
rows and lines; this file covers files. Derandomised: CI runs the same cases every time."""

from __future__ import annotations

import collections
import csv
import json
import os
import tempfile
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from potstill.teacher_gen.config import GenerateConfig
from potstill.teacher_gen.encode import encode_item
from potstill.teacher_gen.errors import GenerateError, InputError
from potstill.teacher_gen.prompts import FieldMap, PromptSet, SourceItem, load_prompts

PROPS = settings(derandomize=True, deadline=None, max_examples=150, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Text a valid record can hold: NULs and other control characters, astral planes, U+2028, BOMs.
sound_text = st.text(st.characters(codec="utf-8"), max_size=30)
prompt_text = sound_text.filter(str.strip) | st.sampled_from(["\x00", "a\x00b", "\ufeffhi", "x\u2028y", "🦊" * 3])
any_text = st.text(st.characters(codec=None, categories=None), max_size=20)  # lone surrogates too
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | any_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["prompt", "messages", "completion", "x"]) | any_text, inner, max_size=3),
    max_leaves=10,
)

# A line of a prompt file: what is on it, and (for the lines whose fate is known) what must come of it.
good = st.tuples(st.just("good"), prompt_text, st.none() | sound_text | st.just("c" * 100_000))
duplicate = st.tuples(st.just("duplicate"), st.integers(0, 1000), prompt_text)
value = st.tuples(st.just("value"), json_values)
malformed = st.tuples(st.just("malformed"), st.binary(max_size=40).filter(lambda b: b"\n" not in b))
hostile = st.tuples(st.just("hostile"), st.sampled_from(["digits", "deep", "deep-meta", "surrogate", "surrogate-key",
                                                         "not-utf8", "empty-id", "bool-id"]), st.integers(1, 6000))
blank = st.tuples(st.just("blank"), st.sampled_from(["", " ", "\t", "\r", "  \r"]))
lines_strategy = st.lists(good | duplicate | value | malformed | hostile | blank, max_size=14)


def _hostile(kind: str, size: int) -> bytes:
    return {
        "digits": b'{"prompt": "a", "n": ' + b"9" * (4300 + size) + b"}",
        "deep": b"[" * (size * 20) + b"]" * (size * 20),
        "deep-meta": b'{"prompt": "a", "m": ' + b"[" * (3000 + size) + b"]" * (3000 + size) + b"}",
        "surrogate": b'{"prompt": "bad \\ud800 text"}',
        "surrogate-key": b'{"prompt": "a", "\\udfff": 1}',
        "not-utf8": b'{"prompt": "caf\xe9"}',
        "empty-id": b'{"id": " ", "prompt": "a"}',
        "bool-id": b'{"id": true, "prompt": "a"}',
    }[kind]


def _render(lines: list[tuple]) -> tuple[bytes, dict[int, tuple], list[int]]:
    """The file's bytes, what each line whose fate is known must give (by line number), and the
    numbers of the lines that are not blank."""
    out, expect, counted, first = [], {}, [], {}
    goods = 0
    for number, (what, *args) in enumerate(lines, start=1):
        if what == "good":
            rid = f"g{goods}"
            goods += 1
            row = {"id": rid, "prompt": args[0]} | ({} if args[1] is None else {"completion": args[1]})
            out.append(json.dumps(row, ensure_ascii=bool(number % 2)).encode("utf-8"))
            expect[number] = ("item", rid, args[0], args[1])
            first[rid] = number
        elif what == "duplicate" and goods:
            rid = f"g{args[0] % goods}"
            out.append(json.dumps({"id": rid, "prompt": args[1]}).encode())
            expect[number] = ("error", rid, f"duplicate id (first seen at line {first[rid]})")
        elif what == "duplicate":  # nothing before it to repeat: a line without an id
            out.append(json.dumps({"prompt": args[1]}).encode())
        elif what == "value":
            v = args[0]
            if isinstance(v, dict):  # an id of its own, not one of the good lines'
                v = {k: x for k, x in v.items() if k != "id"}
            out.append(json.dumps(v).encode())
        elif what == "malformed":
            out.append(args[0])
        elif what == "hostile":
            out.append(_hostile(*args))
            expect[number] = ("error", None, None)
        else:
            out.append(args[0].encode())
        if what != "blank" and out[-1].strip():
            counted.append(number)
    return b"\n".join(out), expect, counted


def _check_set(prompts: PromptSet, expect: dict[int, tuple], counted: list[int]) -> None:
    seen = collections.Counter([i.line for i in prompts.items] + [e.line for e in prompts.errors])
    assert sorted(seen) == counted and set(seen.values()) <= {1}, (seen, counted)  # each line once
    assert prompts.rows == len(counted) and prompts.valid == len(prompts.items)
    for e in prompts.errors:
        assert isinstance(e.reason, str) and e.reason and "\n" not in e.reason and "\r" not in e.reason, e
    items = {i.line: i for i in prompts.items}
    errors = {e.line: e for e in prompts.errors}
    for number, (fate, rid, *rest) in expect.items():
        if fate == "item":
            item = items[number]
            assert (item.id, item.prompt, item.completion) == (rid, *rest), number
        else:
            assert number in errors, (number, items.get(number))
            if rest[0] is not None:
                assert (errors[number].id, errors[number].reason) == (rid, rest[0])
    for item in prompts.items:  # what the store keeps must be strict JSON and valid UTF-8
        json.dumps([item.id, item.prompt, item.completion, item.messages, item.meta], ensure_ascii=False,
                   allow_nan=False).encode("utf-8")


@settings(PROPS, max_examples=300)
@given(lines_strategy)
@example([("good", "a", None), ("hostile", "digits", 1), ("duplicate", 0, "b"), ("blank", "\r"),
          ("hostile", "deep", 6000), ("good", "\x00", "c" * 100_000), ("malformed", b"{")])
def test_every_line_of_a_jsonl_file_is_one_item_or_one_error(lines) -> None:
    data, expect, counted = _render(lines)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "p.jsonl")
        with open(path, "wb") as f:
            f.write(data)
        _check_set(load_prompts(path, FieldMap()), expect, counted)


@PROPS
@given(lines_strategy)
def test_a_json_list_file_gives_each_element_as_one_item_or_one_error(lines) -> None:
    rows: list[Any] = []
    expect: dict[int, tuple] = {}
    for what, *args in lines:
        if what == "good":
            rows.append({"id": f"g{len(rows)}", "prompt": args[0], "completion": args[1]})
            expect[len(rows)] = ("item", f"g{len(rows) - 1}", args[0], args[1])
        elif what == "value":
            rows.append({k: x for k, x in args[0].items() if k != "id"} if isinstance(args[0], dict) else args[0])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "p.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(rows, f)
        _check_set(load_prompts(path, FieldMap()), expect, list(range(1, len(rows) + 1)))


csv_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=30)


@PROPS
@given(st.lists(st.tuples(csv_text.filter(str.strip) | st.just("long " * 30_000), csv_text, st.booleans()), max_size=10),
       st.sampled_from([("\r\n", csv.QUOTE_MINIMAL), ("\n", csv.QUOTE_ALL)]))
# found: a cell over the csv module's 128 KiB limit stopped the reader with a traceback (_csv.Error)
@example(rows=[("p" * 131_073, "", False), ("q", "c", False)], dialect=("\r\n", csv.QUOTE_MINIMAL))
def test_csv_rows_come_back_exactly_and_rows_with_extra_cells_are_errors(rows, dialect) -> None:
    """Quotes, commas, line breaks and \\r inside cells; CSV has no null, so an empty completion is none."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "p.csv")
        with open(path, "w", encoding="utf-8", newline="") as f:
            # a bare \r in a cell is quoted: unquoted, every CSV reader takes it for a line end
            writer = csv.writer(f, lineterminator=dialect[0], quoting=dialect[1])
            writer.writerow(["id", "prompt", "completion"])
            for i, (prompt, completion, extra) in enumerate(rows):
                writer.writerow([f"g{i}", prompt, completion] + (["surplus"] if extra else []))
        prompts = load_prompts(path, FieldMap())
    assert prompts.rows == len(rows) and len(prompts.items) + len(prompts.errors) == len(rows)
    want = [(f"g{i}", p, c or None) for i, (p, c, extra) in enumerate(rows) if not extra]
    assert [(i.id, i.prompt, i.completion) for i in prompts.items] == want
    assert all(e.reason == "row has 1 more cells than the header" for e in prompts.errors)
    assert len(prompts.errors) == sum(extra for *_, extra in rows)
    lines = [i.line for i in prompts.items] + [e.line for e in prompts.errors]
    assert len(set(lines)) == len(lines)  # a row's line: where it ends, one per row


@PROPS
@given(st.lists(st.tuples(prompt_text | st.none(), st.none() | sound_text, st.none() | st.integers(-(2**63), 2**63 - 1)), max_size=10))
def test_parquet_rows_come_back_exactly_or_are_named_by_row(rows) -> None:
    table = pa.table({"id": pa.array([f"g{i}" for i in range(len(rows))], pa.string()),
                      "prompt": pa.array([p for p, _, _ in rows], pa.string()),
                      "completion": pa.array([c for _, c, _ in rows], pa.string()),
                      "n": pa.array([n for *_, n in rows], pa.int64())})
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "p.parquet")
        pq.write_table(table, path)
        prompts = load_prompts(path, FieldMap())
    expect = {i + 1: ("item", f"g{i}", p, c) if p is not None and p.strip() else ("error", f"g{i}", None)
              for i, (p, c, _) in enumerate(rows)}
    _check_set(prompts, expect, list(range(1, len(rows) + 1)))
    for item in prompts.items:
        assert item.meta == {"n": rows[item.line - 1][2]}


# -- from a record to the teacher's tokens (teacher_gen/encode.py) ----------------------------------
roles = st.sampled_from(["user", "assistant", "system", "tool", ""])
messages = st.lists(st.fixed_dictionaries({"role": roles, "content": sound_text}), min_size=1, max_size=4)


@st.composite
def encode_case(draw: st.DrawFn) -> tuple[SourceItem, GenerateConfig, int | None]:
    chat = draw(st.booleans())
    item = SourceItem(id="r", line=3, prompt=None if chat else draw(prompt_text | st.just("word " * 2000)),
                      messages=draw(messages) if chat else None, completion=draw(st.none() | sound_text | st.just("x " * 3000)))
    config = GenerateConfig(teacher="t", prompts="p", store="s", mode=draw(st.sampled_from(["score", "generate"])),
                            truncate=draw(st.booleans()), score_prompt=draw(st.booleans()), append_eos=draw(st.booleans()),
                            rationale=draw(st.booleans()), max_new_tokens=draw(st.integers(1, 40)))
    return item, config, draw(st.none() | st.integers(2, 64))


@settings(PROPS, max_examples=150)
@given(case=encode_case())
def test_any_record_encodes_within_the_context_or_gets_a_one_line_reason(tiny_tokenizer, case) -> None:
    item, config, max_length = case
    got = encode_item(item, tiny_tokenizer, config, max_length)
    if isinstance(got, InputError):
        assert got.line == 3 and got.id == "r" and got.reason and "\n" not in got.reason, got
        return
    assert got.item is item and got.prompt_ids.dtype == np.int32 and len(got.prompt_ids) >= 1
    if config.mode == "generate":
        assert got.completion_ids is None and got.max_new_tokens >= 1
        assert max_length is None or len(got.prompt_ids) + got.max_new_tokens <= max_length
        assert got.truncated == (got.max_new_tokens < config.max_new_tokens) and (config.truncate or not got.truncated)
    else:
        assert got.completion_ids is not None
        total = len(got.prompt_ids) + len(got.completion_ids)
        assert max_length is None or total <= max_length
        assert len(got.completion_ids) >= 1 or config.score_prompt
        assert config.truncate or not got.truncated
        if not got.truncated and item.completion is not None and item.completion.strip() and not config.rationale:
            # the completion is the record's own text, token for token
            eos = 1 if config.append_eos else 0
            assert tiny_tokenizer.decode(got.completion_ids[: len(got.completion_ids) - eos]) == item.completion


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def _parquet_bytes() -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"id": [f"g{i}" for i in range(20)], "prompt": [f"p {i} " * 5 for i in range(20)]}), sink)
    return sink.getvalue().to_pybytes()


PARQUET = _parquet_bytes()


@settings(PROPS, max_examples=200)
@given(st.sampled_from(["json", "csv", "parquet"]), st.binary(max_size=200) | st.just(b"") | st.tuples(
    st.integers(0, len(PARQUET) - 1), st.binary(min_size=1, max_size=4), st.booleans()).map(
    lambda d: PARQUET[: d[0]] + d[1] + (PARQUET[d[0] + len(d[1]):] if d[2] else b"")))
# found: a damaged page or string raised ArrowInvalid, OSError (a multi-line message) or UnicodeDecodeError while
# the rows were read, not one GenerateError line
@example(fmt="parquet", data=PARQUET[:75] + b"\x80" + PARQUET[76:])
@example(fmt="parquet", data=PARQUET[:14] + b"\x00" + PARQUET[15:])
@example(fmt="parquet", data=PARQUET[:4] + b"\x00" + PARQUET[5:])
def test_a_damaged_file_of_any_format_loads_or_fails_in_one_line(fmt, data) -> None:
    """Arbitrary bytes, and a Parquet file with bytes overwritten or cut off: rows, or one `GenerateError` line."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"p.{fmt}")
        with open(path, "wb") as f:
            f.write(data)
        try:
            prompts = load_prompts(path, FieldMap())
        except GenerateError as e:
            assert str(e) and "\n" not in str(e), str(e)
            return
    assert len(prompts.items) + len(prompts.errors) == prompts.rows
    assert all(e.reason and "\n" not in e.reason for e in prompts.errors)
