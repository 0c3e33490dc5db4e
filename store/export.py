"""`potstill store export`: one row per record, for teams without potstill and for
`datasets.load_dataset("parquet" | "json", ...)`."""

from __future__ import annotations

import json
import os
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from store.errors import StoreError
from store.reader import Store

EXPORT_FIELDS = (
    "id", "prompt", "messages", "completion", "generated", "rationale", "answer", "meta",
    "sample_index", "input_ids", "score_start",
)


def export_store(store: Store, to: str, *, batch_rows: int = 4096) -> int:
    """Write every record's id and text/token fields to a .parquet or .jsonl file; returns the count.
    Each id once: a duplicate of an id committed earlier is left out, as every reader does.

    In Parquet, `messages` and `meta` stay JSON strings (their keys vary); in JSONL they are nested.
    The file is written under a temporary name and moved into place, so a failed export never
    leaves a half file where a good one was.
    """
    kind = "parquet" if to.endswith(".parquet") else "jsonl" if to.endswith((".jsonl", ".json")) else None
    if kind is None:
        raise StoreError(f"--to {to}: the file name must end in .parquet or .jsonl")
    tmp = f"{to}.partial"
    count = 0
    try:
        if kind == "parquet":
            writer = None
            for table in _tables(store, batch_rows):
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table)
                count += table.num_rows
            if writer is None:  # empty store: still a valid, empty file
                writer = pq.ParquetWriter(tmp, _empty_schema(store))
            writer.close()
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                for table in _tables(store, batch_rows):
                    for row in table.to_pylist():
                        for key in ("messages", "meta"):
                            if row[key] is not None:
                                row[key] = json.loads(row[key])
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")
                        count += 1
        os.replace(tmp, to)
    except OSError as e:
        raise StoreError(f"cannot write {to}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return count


def _tables(store: Store, batch_rows: int) -> Any:
    for name in store.shard_names:
        batch = store.shard(name).views.batch.select(list(EXPORT_FIELDS))
        skip = store.duplicate_rows(name)
        if skip:  # an id committed earlier: the first committed copy is the record (format §3)
            batch = batch.filter(pa.array([row not in skip for row in range(batch.num_rows)]))
        for start in range(0, batch.num_rows, batch_rows):
            yield pa.Table.from_batches([batch.slice(start, batch_rows)])


def _empty_schema(store: Store) -> pa.Schema:
    from store.records import arrow_schema

    full = arrow_schema(store.manifest)
    return pa.schema([full.field(n) for n in EXPORT_FIELDS])
