"""`potstill store export`: one row per record, for teams without potstill and for
`datasets.load_dataset("parquet" | "json", ...)`.

A plain export keeps the text and token fields only: no teacher targets, no hidden states.
`with_targets` adds the teacher's targets per scored position, decoded (packed stores unpacked,
log-probs widened to float32) into plain nested lists any Parquet reader understands (Parquet only).
Hidden states are never exported: they stay in the store's Zarr arrays (docs/reference/store-format.md §5).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from potstill.store.errors import StoreError
from potstill.store.fs import is_local
from potstill.store.reader import Store

EXPORT_FIELDS = (
    "id", "prompt", "messages", "completion", "generated", "rationale", "answer", "meta",
    "sample_index", "input_ids", "score_start",
)


# Columns `with_targets` adds, one entry per scored position (row j: the teacher's distribution over
# input_ids[score_start + j]); which of them depends on the store's targets.
TOPK_EXPORT = ("topk_ids", "topk_logprobs", "tail_logprob")
SAMPLED_EXPORT = ("sampled_ids", "sampled_counts")
MANIFEST_KEY = b"potstill.manifest"  # Parquet schema metadata: the store's manifest (teacher, tokenizer, targets)


def export_store(store: Store, to: str, *, batch_rows: int = 4096, with_targets: bool = False) -> int:
    """Write every record's id and text/token fields to a .parquet or .jsonl file; returns the count.
    Each id once: a duplicate of an id committed earlier is left out, as every reader does.

    In Parquet, `messages` and `meta` stay JSON strings (their keys vary); in JSONL they are nested.
    `with_targets` (Parquet only) adds `token_logprob` and, as the store holds them, `topk_ids`,
    `topk_logprobs`, `tail_logprob` and `sampled_ids`, `sampled_counts`, and keeps the store's
    manifest in the file's metadata. The file is written under a temporary name and moved into
    place, so a failed export never leaves a half file where a good one was.
    """
    check_outside_store(store, to)
    kind = "parquet" if to.endswith(".parquet") else "jsonl" if to.endswith(".jsonl") else None
    if kind is None:  # .json too: a JSON-lines file named .json would read as broken JSON elsewhere
        raise StoreError(f"--to {to}: the file name must end in .parquet or .jsonl (one JSON record a line)")
    if with_targets and kind != "parquet":
        raise StoreError(f"--to {to}: teacher targets are exported to Parquet only; name the file .parquet")
    tmp = f"{to}.partial"
    count = 0
    try:
        if kind == "parquet":
            schema = _schema(store, with_targets)
            writer = pq.ParquetWriter(tmp, schema)
            tables = _target_tables(store, min(batch_rows, 256), schema) if with_targets else _tables(store, batch_rows)
            for table in tables:
                writer.write_table(table)
                count += table.num_rows
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


def check_outside_store(store: Store, to: str) -> None:
    """The export never lands inside the store it reads: it would replace the store's own files
    (its manifest, a commit record) or leave a stray file among them."""
    if not is_local(store.fs):
        return
    root = os.path.realpath(store.root)
    target = os.path.realpath(to)
    if target == root or target.startswith(root.rstrip(os.sep) + os.sep):
        raise StoreError(f"--to {to}: is inside the store {store.url}; write the export outside it")


def _tables(store: Store, batch_rows: int) -> Any:
    for name in store.shard_names:
        batch = store.shard(name).views.batch.select(list(EXPORT_FIELDS))
        skip = store.duplicate_rows(name)
        if skip:  # an id committed earlier: the first committed copy is the record (format §3)
            batch = batch.filter(pa.array([row not in skip for row in range(batch.num_rows)]))
        for start in range(0, batch.num_rows, batch_rows):
            yield pa.Table.from_batches([batch.slice(start, batch_rows)])


def _schema(store: Store, with_targets: bool) -> pa.Schema:
    from potstill.store.records import arrow_schema

    full = arrow_schema(store.manifest)
    fields = [full.field(n) for n in EXPORT_FIELDS]
    if not with_targets:
        return pa.schema(fields)
    return pa.schema(fields + target_fields(store.manifest.targets), metadata={MANIFEST_KEY: store.manifest.to_json()})


def target_fields(spec: Any) -> list[pa.Field]:
    """The decoded target columns (`decoded_targets`) of a store whose `targets` are `spec`."""
    nested = pa.list_(pa.list_(pa.int32()))
    fields = [pa.field("token_logprob", pa.list_(pa.float32()), nullable=False)]
    if spec.has_topk:
        fields += [pa.field("topk_ids", nested, nullable=False),
                   pa.field("topk_logprobs", pa.list_(pa.list_(pa.float32())), nullable=False),
                   pa.field("tail_logprob", pa.list_(pa.float32()), nullable=False)]
    if spec.has_sampled:
        fields += [pa.field("sampled_ids", nested, nullable=False),
                   pa.field("sampled_counts", pa.list_(pa.list_(pa.uint16())), nullable=False)]
    return fields


def _nested(rows: list[np.ndarray], inner: list[np.ndarray], dtype: type) -> pa.Array:
    """list<list<dtype>>: per record, per position, the values `inner` splits by its offsets.
    `rows[i]` holds record i's per-position offsets into `inner[i]` (length positions + 1)."""
    values = np.concatenate(inner).astype(dtype) if inner else np.zeros(0, dtype)
    pos_offsets, base = [np.zeros(1, np.int64)], 0
    for offsets, vals in zip(rows, inner, strict=True):
        pos_offsets.append(offsets[1:] - offsets[0] + base)
        base += len(vals)
    positions = np.concatenate(pos_offsets).astype(np.int32)
    rec_offsets = np.concatenate([[0], np.cumsum([len(o) - 1 for o in rows])]).astype(np.int32)
    per_position = pa.ListArray.from_arrays(pa.array(positions), pa.array(values))
    return pa.ListArray.from_arrays(pa.array(rec_offsets), per_position)


def _flat_lists(parts: list[np.ndarray], dtype: type) -> pa.Array:
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in parts])]).astype(np.int32)
    values = np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def _target_tables(store: Store, batch_rows: int, schema: pa.Schema) -> Any:
    """The export columns plus the decoded targets, `batch_rows` records at a time."""
    for name in store.shard_names:
        views = store.shard(name).views
        skip = store.duplicate_rows(name)
        rows = [row for row in range(views.num_rows) if row not in skip]
        for start in range(0, len(rows), batch_rows):
            chunk = rows[start : start + batch_rows]
            base = views.batch.select(list(EXPORT_FIELDS)).take(pa.array(chunk, pa.int64()))
            columns: dict[str, pa.Array] = {n: base.column(n) for n in EXPORT_FIELDS}
            columns.update(decoded_targets(views, chunk, store.manifest.targets))
            yield pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)


def decoded_targets(views: Any, rows: list[int], spec: Any) -> dict[str, pa.Array]:
    """Records `rows` of a shard's `ColumnViews`: their targets decoded whatever the codec, one list
    entry per scored position (`token_logprob`; `topk_ids`, `topk_logprobs`, `tail_logprob`;
    `sampled_ids`, `sampled_counts`, as the store's targets hold them)."""
    token_lp, ids, lps, tails, s_off, s_ids, s_counts = [], [], [], [], [], [], []
    for row in rows:
        if spec.has_topk:
            topk_ids, topk_lp, tok, tail = views.targets_of(row)
            ids.append(np.asarray(topk_ids).reshape(-1))
            lps.append(np.asarray(topk_lp, dtype=np.float32).reshape(-1))
            tails.append(np.asarray(tail, dtype=np.float32))
            token_lp.append(np.asarray(tok, dtype=np.float32))
        else:
            token_lp.append(np.asarray(views.token_logprob_of(row), dtype=np.float32))
        if spec.has_sampled:
            sampled = views.sampled_of(row)
            s_off.append(np.asarray(sampled.offsets, dtype=np.int64))
            s_ids.append(np.asarray(sampled.ids))
            s_counts.append(np.asarray(sampled.counts))
    columns = {"token_logprob": _flat_lists(token_lp, np.float32)}
    if spec.has_topk:
        k_offsets = [np.arange(0, len(t) * spec.k + 1, spec.k, dtype=np.int64) for t in token_lp]
        columns["topk_ids"] = _nested(k_offsets, ids, np.int32)
        columns["topk_logprobs"] = _nested(k_offsets, lps, np.float32)
        columns["tail_logprob"] = _flat_lists(tails, np.float32)
    if spec.has_sampled:
        columns["sampled_ids"] = _nested(s_off, s_ids, np.int32)
        columns["sampled_counts"] = _nested(s_off, s_counts, np.uint16)
    return columns
