"""Reading a prompt set: JSONL, JSON, Parquet, CSV or a saved `datasets` folder.

Every row becomes a `SourceItem` or an `InputError` (line/row number, id when known, reason).
A bad row never stops the run; only a file that cannot be read at all raises `GenerateError`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from potstill.teacher_gen.errors import GenerateError, InputError, TooManyInputErrors

FORMATS = ("jsonl", "json", "parquet", "csv", "datasets")
# A text of more than this many UTF-8 bytes per token of the context cannot fit it, so it is refused by
# its length before a tokenizer sees it (tokenizing 10 MB takes gigabytes). Generous on purpose: text
# averages about 4 bytes a token, and even long whitespace or code tokens rarely pass 16 bytes.
MAX_BYTES_PER_TOKEN = 32
CSV_FIELD_LIMIT = 2**31 - 1  # the most a CSV cell may hold (the csv module's own limit is 128 KiB)


@dataclass
class SourceItem:
    """One valid input row, fields already mapped to their potstill names."""

    id: str
    line: int
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    completion: str | None = None
    meta: dict[str, Any] | None = None


@dataclass
class FieldMap:
    id: str = "id"
    prompt: str = "prompt"
    messages: str = "messages"
    completion: str = "completion"

    @property
    def known(self) -> set[str]:
        return {self.id, self.prompt, self.messages, self.completion}


@dataclass
class PromptSet:
    items: list[SourceItem] = field(default_factory=list)
    errors: list[InputError] = field(default_factory=list)
    rows: int = 0  # rows read, good and bad, of every worker
    valid: int = 0  # rows that parsed into an item, of every worker
    per_share: dict[int, int] = field(default_factory=dict)  # valid rows by `share_of` (when given), every worker's


def detect_format(path: str) -> str:
    if os.path.isdir(path):
        return "datasets"
    lower = path.lower()
    for suffix, fmt in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "json"), (".parquet", "parquet"),
                        (".pq", "parquet"), (".csv", "csv")):
        if lower.endswith(suffix):
            return fmt
    raise GenerateError(f"prompt file {path}: unknown format; use .jsonl, .json, .parquet, .csv or a datasets folder")


def text_limit(max_length: int | None) -> int | None:
    """The most UTF-8 bytes of text that can still fit `max_length` tokens; None when unbounded."""
    return None if max_length is None else max_length * MAX_BYTES_PER_TOKEN


def utf8_length(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


# -- raw rows ---------------------------------------------------------------------------------
RawRow = tuple[int, Any, str | None]  # (line or row number, the row, a parse error)


def iter_rows(path: str) -> Iterator[RawRow]:
    """(line/row number, row object, parse error or None) for every row of a prompt source."""
    if not os.path.exists(path):
        raise GenerateError(f"prompt file {path} does not exist")
    if not os.path.isdir(path) and not os.path.isfile(path):
        raise GenerateError(f"prompt file {path} is not a regular file (a FIFO, device or socket cannot be read "
                            "as a prompt set)")
    fmt = detect_format(path)
    if fmt == "jsonl":
        yield from _jsonl_rows(path)
    elif fmt == "json":
        yield from _json_rows(path)
    elif fmt == "parquet":
        yield from _parquet_rows(path)
    elif fmt == "csv":
        yield from _csv_rows(path)
    else:
        yield from _datasets_rows(path)


def parse_json(raw: bytes | str) -> Any:
    """json.loads, with every way a hostile line can fail turned into a `ValueError` with a short reason:
    malformed JSON or UTF-8, an integer of more than 4,300 digits, nesting deeper than the parser's
    recursion limit."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed JSON ({e.msg} at column {e.colno})") from None
    except UnicodeDecodeError:
        raise ValueError("not valid UTF-8") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except ValueError as e:  # int() of more than sys.get_int_max_str_digits() digits
        reason = "a number with too many digits" if "digits" in str(e) else "malformed JSON"
        raise ValueError(reason) from None


def open_regular(path: str) -> io.BufferedReader:
    """`path` opened for reading, refused when it is not a regular file. Opened without blocking and
    checked on the open descriptor, so a file swapped for a FIFO after `iter_rows` looked cannot hang
    the reader in open()."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise GenerateError(f"prompt file {path} is not a regular file (a FIFO, device or socket cannot be "
                                "read as a prompt set)")
        os.set_blocking(fd, True)
        return open(fd, "rb", closefd=True)
    except BaseException:
        os.close(fd)
        raise


def _jsonl_rows(path: str) -> Iterator[RawRow]:
    with open_regular(path) as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield number, parse_json(raw), None
            except ValueError as e:
                yield number, None, str(e)


def _json_rows(path: str) -> Iterator[RawRow]:
    try:
        with open_regular(path) as f:
            data = parse_json(f.read())
    except ValueError as e:
        raise GenerateError(f"prompt file {path}: not usable as JSON ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise GenerateError(f"prompt file {path}: expected a JSON list of records or {{\"data\": [...]}}")
    for number, row in enumerate(data, start=1):
        yield number, row, None


def _parquet_rows(path: str) -> Iterator[RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    def unreadable(e: Exception, where: str = "") -> GenerateError:
        detail = " ".join(str(e).split())  # Arrow's messages span lines
        return GenerateError(f"prompt file {path}: unreadable Parquet{where} ({type(e).__name__}: {detail})")

    # A damaged file can fail anywhere: its footer when opened, a page or a string's UTF-8 when read.
    damaged = (pa.ArrowException, OSError, UnicodeDecodeError)
    with open_regular(path) as f:
        try:
            pf = pq.ParquetFile(f)
        except damaged as e:
            raise unreadable(e) from None
        number = 0
        batches = pf.iter_batches(batch_size=4096)
        while True:
            try:
                batch = next(batches, None)
                rows = [] if batch is None else batch.to_pylist()
            except damaged as e:
                raise unreadable(e, f" after row {number}") from None
            if batch is None:
                return
            for row in rows:
                number += 1
                yield number, row, None


def _csv_rows(path: str) -> Iterator[RawRow]:
    # The csv module refuses cells over 128 KiB by default; a long document is a prompt like any other
    # (too long for the teacher's context is decided later, by its length, as for JSONL).
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    with io.TextIOWrapper(open_regular(path), newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.DictReader(f)
        try:
            for row in reader:
                # CSV has no nulls: an empty cell means "absent"; extra cells land under the None key.
                extra = row.pop(None, None)  # type: ignore[call-overload]
                if extra:
                    yield reader.line_num, None, f"row has {len(extra)} more cells than the header"
                    continue
                yield reader.line_num, {k: (None if v == "" else v) for k, v in row.items()}, None
        except csv.Error as e:
            raise GenerateError(f"prompt file {path}: unreadable CSV at line {reader.line_num} ({e})") from None


def _datasets_rows(path: str) -> Iterator[RawRow]:
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise GenerateError(f"prompt folder {path}: not a saved datasets folder ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if "train" in ds:
            ds = ds["train"]
        elif len(splits) == 1:
            ds = ds[splits[0]]
        else:
            raise GenerateError(f"prompt folder {path}: several splits {splits}; save one split (or 'train')")
    for number, row in enumerate(ds, start=1):
        yield number, row, None


# -- validation -------------------------------------------------------------------------------
def content_id(prompt: str | None, messages: Any, completion: str | None) -> str:
    """A stable id for a row without one: a hash of what the teacher will see."""
    payload = json.dumps({"prompt": prompt, "messages": messages, "completion": completion}, sort_keys=True,
                         ensure_ascii=False, default=str)
    return "h" + hashlib.sha256(payload.encode()).hexdigest()[:20]


def _check_messages(value: Any) -> tuple[list[dict[str, Any]] | None, str | None]:
    if isinstance(value, str):  # CSV / Parquet columns often hold the chat as a JSON string
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None, "messages is a string that is not a JSON list"
    if not isinstance(value, list):
        return None, f"messages must be a list of {{role, content}} objects, got {type(value).__name__}"
    if not value:
        return None, "messages is empty"
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            return None, f"messages[{i}] must be an object, got {type(msg).__name__}"
        if not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"), str):
            return None, f"messages[{i}] needs string 'role' and 'content'"
        out.append({k: v for k, v in msg.items() if v is not None})
    return out, None


def _json_safe(value: Any) -> Any:
    """Source fields stored in `meta` must survive JSON and any JSON reader: dates, bytes and numpy
    scalars become text, and so do NaN and infinities (which strict JSON has no literal for)."""

    def finite(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return str(x)
        if isinstance(x, dict):
            return {k: finite(v) for k, v in x.items()}
        if isinstance(x, list):
            return [finite(v) for v in x]
        return x

    return finite(json.loads(json.dumps(value, ensure_ascii=False, default=str)))


def lone_surrogate(value: Any) -> str | None:
    """The first string in a row that is not valid Unicode (a lone UTF-16 surrogate such as "\\ud800",
    which JSON can spell but UTF-8 cannot hold), shown escaped; None when every string is sound.
    Iterative, so that no nesting depth can exhaust the stack."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as e:
                return item[e.start : e.end].encode("unicode_escape").decode("ascii")
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return None


def parse_row(number: int, row: Any, fields: FieldMap) -> SourceItem | InputError:
    """Validate one row and map its fields; the reason names the first thing wrong. Never raises:
    whatever a row holds, it becomes an item or an `InputError`."""
    if not isinstance(row, dict):
        return InputError(number, None, f"expected an object with a prompt, got {type(row).__name__}")
    bad = lone_surrogate(row)
    if bad is not None:
        return InputError(number, None, f"holds a lone surrogate ({bad}), which is not valid Unicode")
    try:
        return _parse_row(number, row, fields)
    except RecursionError:
        return InputError(number, None, "nested too deeply")


def _parse_row(number: int, row: dict[str, Any], fields: FieldMap) -> SourceItem | InputError:
    raw_id = row.get(fields.id)
    if raw_id is None:
        rid = None
    elif isinstance(raw_id, bool) or not isinstance(raw_id, str | int):
        return InputError(number, None, f"field {fields.id!r} must be a string or an integer, got {type(raw_id).__name__}")
    else:
        rid = str(raw_id)
        if not rid.strip():
            return InputError(number, None, f"field {fields.id!r} is empty")

    prompt = row.get(fields.prompt)
    messages_raw = row.get(fields.messages)
    completion = row.get(fields.completion)
    if prompt is not None and not isinstance(prompt, str):
        return InputError(number, rid, f"field {fields.prompt!r} must be a string, got {type(prompt).__name__}")
    if completion is not None and not isinstance(completion, str):
        return InputError(number, rid, f"field {fields.completion!r} must be a string, got {type(completion).__name__}")
    messages = None
    if messages_raw is not None:
        messages, problem = _check_messages(messages_raw)
        if problem:
            return InputError(number, rid, problem)
    elif prompt is None:
        return InputError(number, rid, f"no {fields.prompt!r} or {fields.messages!r} field")
    elif not prompt.strip():
        return InputError(number, rid, "empty prompt")

    if rid is None:
        rid = content_id(prompt, messages, completion)
    meta = {k: v for k, v in row.items() if k not in fields.known}
    return SourceItem(
        id=rid,
        line=number,
        prompt=prompt,
        messages=messages,
        completion=completion,
        meta=_json_safe(meta) if meta else None,
    )


def load_prompts(
    path: str,
    fields: FieldMap,
    *,
    owns: Callable[[str], bool] = lambda key: True,
    max_errors: int | None = None,
    forbid_in_id: str | None = None,
    share_of: Callable[[str], int] | None = None,
) -> PromptSet:
    """Read every row; keep the valid ones and the errors this worker `owns` (by id, else line).
    `share_of` (an id's worker): the valid rows of every worker are counted by it, in `per_share`.

    Duplicate ids are checked over the whole file (whoever owns the row): the first one wins.
    Raises `TooManyInputErrors` as soon as this worker has more than `max_errors` errors.
    """
    out = PromptSet()
    first_line: dict[str, int] = {}

    def reject(err: InputError) -> None:
        if owns(err.key):
            out.errors.append(err)
            if max_errors is not None and len(out.errors) > max_errors:
                raise TooManyInputErrors(out.errors, max_errors)

    for number, row, problem in iter_rows(path):
        out.rows += 1
        if problem is not None:
            reject(InputError(number, None, problem))
            continue
        parsed = parse_row(number, row, fields)
        if isinstance(parsed, InputError):
            reject(parsed)
            continue
        if forbid_in_id and forbid_in_id in parsed.id:
            reject(InputError(number, parsed.id, f"id contains {forbid_in_id!r}, which numbers the samples of --num-samples"))
            continue
        if parsed.id in first_line:
            reject(InputError(number, parsed.id, f"duplicate id (first seen at line {first_line[parsed.id]})"))
            continue
        first_line[parsed.id] = number
        out.valid += 1
        if share_of is not None:
            share = share_of(parsed.id)
            out.per_share[share] = out.per_share.get(share, 0) + 1
        if owns(parsed.id):
            out.items.append(parsed)
    return out
