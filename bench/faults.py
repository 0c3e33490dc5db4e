"""Damage done to stores on purpose, as a hostile user or a failing disk would: flipped bytes, and
shards rewritten with bad values *and* matching checksums (a buggy producer, not a bad disk)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable

import numpy as np
import pyarrow as pa


def flip_bytes(path: str, count: int = 1, seed: int = 0) -> None:
    """XOR `count` distinct bytes of a file (past any header) with 0xFF."""
    size = os.path.getsize(path)
    rng = np.random.default_rng(seed)
    positions = rng.choice(np.arange(size // 4, size), size=count, replace=False)
    with open(path, "r+b") as f:
        for pos in sorted(int(p) for p in positions):
            f.seek(pos)
            b = f.read(1)
            f.seek(pos)
            f.write(bytes([b[0] ^ 0xFF]))


def rewrite_column(store_url: str, shard: str, column: str, change: Callable[[np.ndarray], None]) -> None:
    """Change the flat values of one list column of a shard in place (`change` edits a writable copy),
    then write the Arrow file back and update its size and sha256 in the commit record, so that the
    shard's checksums hold and only its values are wrong."""
    path = os.path.join(store_url, "shards", shard, "records.arrow")
    with pa.memory_map(path) as source:
        batch = pa.ipc.open_file(source).get_batch(0)
    col = batch.column(column)
    values = col.values
    while isinstance(values.type, pa.ListType | pa.FixedSizeListType):
        values = values.values
    flat = values.to_numpy(zero_copy_only=False).copy()
    change(flat)
    rebuilt = pa.array(flat, type=values.type)
    # rebuild the nesting from the inside out
    levels = []
    node = col
    while isinstance(node.type, pa.ListType | pa.FixedSizeListType):
        levels.append(node)
        node = node.values
    for level in reversed(levels):
        if isinstance(level.type, pa.FixedSizeListType):
            rebuilt = pa.FixedSizeListArray.from_arrays(rebuilt, level.type.list_size)
        else:
            rebuilt = pa.ListArray.from_arrays(level.offsets, rebuilt)
    columns = [rebuilt if name == column else batch.column(name) for name in batch.schema.names]
    new = pa.record_batch(columns, schema=batch.schema)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, new.schema) as writer:
        writer.write_batch(new)
    data = sink.getvalue().to_pybytes()
    with open(path, "wb") as f:
        f.write(data)
    commit_path = os.path.join(store_url, "commits", f"{shard}.json")
    with open(commit_path) as f:
        commit = json.load(f)
    changed = {f"shards/{shard}/records.arrow": data, **_repieced(store_url, shard, data)}
    for entry in commit["files"]:
        if entry["path"] in changed:
            entry["bytes"], entry["sha256"] = len(changed[entry["path"]]), hashlib.sha256(changed[entry["path"]]).hexdigest()
    commit["bytes"] = sum(e["bytes"] for e in commit["files"])
    write_commit(commit_path, commit)


def write_commit(path: str, commit: dict) -> None:
    """A commit record as a writer writes it, with its own checksum (format §3)."""
    from potstill.store.manifest import CHECKSUM_KEY, manifest_checksum

    commit[CHECKSUM_KEY] = manifest_checksum(commit)
    with open(path, "w") as f:
        json.dump(commit, f, indent=1)


def _repieced(store_url: str, shard: str, records: bytes) -> dict[str, bytes]:
    """A rewritten records file's pieces file (format §3.1), written: {its path: its bytes}."""
    from potstill.store.pieces import PIECES_FILE, piece_crcs, pieces_file_bytes

    rel = f"shards/{shard}/{PIECES_FILE}"
    data = pieces_file_bytes(piece_crcs(memoryview(records)))
    with open(os.path.join(store_url, *rel.split("/")), "wb") as f:
        f.write(data.to_pybytes())
    return {rel: data.to_pybytes()}


def _reseal_hidden(store_url: str, rel: str, data: bytearray) -> None:
    """A hidden-state data file's inner chunks carry their own crc32c (format §5): recompute each."""
    from potstill.store.hidden import CRC, crc32c

    with open(os.path.join(store_url, "manifest.json")) as f:
        hidden = json.load(f)["hidden"]
    width = next(layer["width"] for layer in hidden["layers"] if f"layer_{layer['index']}" == rel.split("/")[3])
    stride = hidden["chunk_tokens"] * width * 2 + CRC
    for start in range(0, (len(data) - CRC) // (stride + 16) * stride, stride):
        data[start + stride - CRC : start + stride] = crc32c(bytes(data[start : start + stride - CRC]))


def rewrite_file(store_url: str, rel: str, change: Callable[[bytearray], None]) -> None:
    """Change a shard file's bytes in place (`change` edits them) and update its size and sha256 in
    its commit record: the checksums hold, only the content is wrong."""
    path = os.path.join(store_url, *rel.split("/"))
    with open(path, "rb") as f:
        data = bytearray(f.read())
    change(data)
    if "/hidden/layer_" in rel and rel.endswith("/c/0/0"):
        _reseal_hidden(store_url, rel, data)
    with open(path, "wb") as f:
        f.write(data)
    shard = rel.split("/")[1]
    commit_path = os.path.join(store_url, "commits", f"{shard}.json")
    with open(commit_path) as f:
        commit = json.load(f)
    changed = {rel: bytes(data), **(_repieced(store_url, shard, bytes(data)) if rel.endswith("/records.arrow") else {})}
    for entry in commit["files"]:
        if entry["path"] in changed:
            entry["bytes"], entry["sha256"] = len(changed[entry["path"]]), hashlib.sha256(changed[entry["path"]]).hexdigest()
    commit["bytes"] = sum(e["bytes"] for e in commit["files"])
    write_commit(commit_path, commit)
