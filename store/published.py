"""Reading a published folder (docs/reference/published-layout.md) back as a store.

`potstill store publish` writes a store's records as Parquet with plain columns, for the Hugging Face
Hub. To train from such a folder, `store_from_published` rebuilds the store it came from, once, in
the user's cache: the manifest and tokenizer files as published, one shard per published data file
in the same order, each record re-encoded with the manifest's own codec from its decoded columns
(lossless: ids and counts are integers, float16 and quantised log-probs re-encode to the same
values). The loader then reads a real store with all its checks, resumes from it, and yields the
batches the original store yields. The folder may be local or any fsspec URL, `hf://datasets/…`
(huggingface_hub's file system) included; every file read is checked against `published.json`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from potstill.store.codec import SampledTargets
from potstill.store.errors import StoreError
from potstill.store.fs import join, read_bytes, resolve
from potstill.store.manifest import StoreManifest
from potstill.store.reader import MANIFEST, Store, cache_dir, create_store
from potstill.store.records import Record

LAYOUT = "potstill-published/1"
PUBLISHED_FILE = "published.json"  # the folder's index: its shards and every file's size and sha256
DATA_DIR, HIDDEN_DIR = "data", "hidden"
WRITER_ID = "published"  # the rebuilt store's one writer: its shards sort in the published order
LOCK_SUFFIX = ".lock"  # beside a rebuilt store's cache folder: held while one process rebuilds it


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_published(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether `url` is a published folder (it holds `published.json`), not a store."""
    if url.startswith("hf://"):
        return True  # a Hub dataset repository is only ever a published folder
    fs, root = resolve(url, storage_options)
    return bool(fs.exists(join(root, PUBLISHED_FILE)))


def hub_repo(url: str) -> str | None:
    """`OWNER/NAME` of an `hf://datasets/OWNER/NAME[@REVISION][/…]` URL, None for any other URL."""
    if not url.startswith("hf://"):
        return None
    parts = url.removeprefix("hf://").strip("/").split("/")
    if len(parts) < 3 or parts[0] != "datasets" or not parts[1] or not parts[2]:
        raise StoreError(f"{url}: a Hub dataset is hf://datasets/OWNER/NAME (optionally @REVISION)")
    return f"{parts[1]}/{parts[2].split('@', 1)[0]}"


def store_from_published(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """The local path of the store `url` (a published folder) was made from, rebuilt in the cache
    (`cache_dir()/published/<sha256 of published.json>`) the first time it is asked for, by one process:
    the others that ask for it meanwhile (a torchrun job's ranks) wait for the finished copy."""
    hub_repo(url)  # refuses a malformed hf:// URL in one line
    fs, root = resolve(url, storage_options)
    try:
        index_bytes = read_bytes(fs, join(root, PUBLISHED_FILE))
    except FileNotFoundError:
        raise StoreError(f"{url}: no {PUBLISHED_FILE}: not a folder `potstill store publish` wrote") from None
    except OSError as e:  # the Hub or a bucket out of reach (offline, no login, no such repository)
        raise StoreError(f"{url}: cannot be read ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    try:
        index = json.loads(index_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError):
        index = None
    layout = index.get("layout") if isinstance(index, dict) else None
    if layout != LAYOUT:
        raise StoreError(f"{url}/{PUBLISHED_FILE}: not a {LAYOUT} index (layout {layout!r})")
    folder = os.path.join(cache_dir(), "published", hashlib.sha256(index_bytes).hexdigest()[:32])
    store_path = os.path.join(folder, "store")
    if os.path.isdir(store_path):
        return store_path
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    # One rebuild per machine: the other processes that ask for it meanwhile (the ranks of a torchrun job)
    # wait here for the finished copy. A builder that dies frees the lock, and the next one rebuilds.
    with open(f"{folder}{LOCK_SUFFIX}", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isdir(store_path):
            return store_path
        _remove_dead_builds(folder)
        building = f"{folder}.building-{os.getpid()}"
        shutil.rmtree(building, ignore_errors=True)
        os.makedirs(building)
        try:
            _rebuild(fs, root, url, index, os.path.join(building, "store"))
            try:
                os.rename(building, folder)
            except OSError:
                if not os.path.isdir(store_path):  # not a finished copy of a process the lock did not hold off
                    raise
        finally:
            shutil.rmtree(building, ignore_errors=True)
    return store_path


def _remove_dead_builds(folder: str) -> None:
    """What a rebuild of `folder` killed part-way left (`<folder>.building-<pid>` of a process that is gone)."""
    parent, name = os.path.split(folder)
    for entry in os.listdir(parent) if os.path.isdir(parent) else []:
        pid = entry.removeprefix(f"{name}.building-")
        if pid != entry and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _read_checked(fs: Any, root: str, url: str, index: dict[str, Any], rel: str) -> bytes:
    entry = index["files"].get(rel)
    if entry is None:
        raise StoreError(f"{url}/{PUBLISHED_FILE}: does not list {rel}")
    try:
        data = read_bytes(fs, join(root, rel))
    except FileNotFoundError:
        raise StoreError(f"{url}/{rel}: missing") from None
    if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise StoreError(f"{url}/{rel}: fails its sha256 check against {PUBLISHED_FILE}")
    return data


def _rebuild(fs: Any, root: str, url: str, index: dict[str, Any], path: str) -> None:
    manifest_bytes = _read_checked(fs, root, url, index, MANIFEST)
    manifest = StoreManifest.from_json(manifest_bytes, f"{url}/{MANIFEST}")
    tokenizer = {e.path.split("/", 1)[1]: _read_checked(fs, root, url, index, e.path) for e in manifest.tokenizer.files}
    create_store(path, manifest, tokenizer)
    # The store's own manifest, byte for byte (keys this potstill does not model, provenance among them,
    # included): the tokenizer files it lists are the ones just written, checked against the same sha256.
    with open(os.path.join(path, MANIFEST), "wb") as f:
        f.write(manifest_bytes)
    store = Store(path)
    with store.writer(WRITER_ID, shard_records=1 << 30, shard_bytes=1 << 62) as writer:
        for shard in index["shards"]:
            if not shard["records"]:
                continue
            table = pq.read_table(pa.BufferReader(_read_checked(fs, root, url, index, shard["data"])))
            hidden = {}
            if shard.get("hidden"):
                hidden = _hidden_of(pq.read_table(pa.BufferReader(_read_checked(fs, root, url, index, shard["hidden"]))),
                                    manifest)
            for rec in records_of(table, manifest):
                rec.hidden = hidden.get(rec.id, {})
                writer.write(rec)
            writer.commit()


def records_of(table: pa.Table, manifest: StoreManifest) -> list[Record]:
    """The records of a published data file, their targets as decoded (the writer re-encodes them)."""
    spec = manifest.targets
    cols = {name: table.column(name).combine_chunks() for name in table.column_names}
    plain = {name: cols[name].to_pylist() for name in ("id", "prompt", "completion", "generated", "rationale", "answer",
                                                      "sample_index", "score_start", "hidden_start", "messages", "meta")}
    input_ids = _lists(cols["input_ids"])
    token_lp = _lists(cols["token_logprob"])
    topk = (_nested(cols["topk_ids"]), _nested(cols["topk_logprobs"]), _lists(cols["tail_logprob"])) if spec.has_topk else None
    sampled = (_nested(cols["sampled_ids"]), _nested(cols["sampled_counts"])) if spec.has_sampled else None
    out = []
    for r, rid in enumerate(plain["id"]):
        rec = Record(id=rid, input_ids=input_ids(r), score_start=plain["score_start"][r], token_logprob=token_lp(r),
                     prompt=plain["prompt"][r], completion=plain["completion"][r], generated=plain["generated"][r],
                     rationale=plain["rationale"][r], answer=plain["answer"][r], sample_index=plain["sample_index"][r],
                     hidden_start=plain["hidden_start"][r], messages=_json_value(plain["messages"][r]),
                     meta=_json_value(plain["meta"][r]))
        if topk is not None:
            (ids, _), (lps, _), tails = topk[0](r), topk[1](r), topk[2](r)
            rec.topk_ids = ids.reshape(-1, spec.k)
            rec.topk_logprobs = lps.reshape(-1, spec.k)
            rec.tail_logprob = tails
        if sampled is not None:
            ids, offsets = sampled[0](r)
            counts, _ = sampled[1](r)
            rec.sampled = SampledTargets(offsets.astype(np.int64), ids.astype(np.int32), counts.astype(np.uint16))
        out.append(rec)
    return out


def _lists(column: pa.ListArray) -> Any:
    """Row r of a list column as a numpy array."""
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy(zero_copy_only=False)
    return lambda r: values[offsets[r] : offsets[r + 1]]


def _nested(column: pa.ListArray) -> Any:
    """Row r of a list<list> column: its values, flat, and the offsets of its positions from 0."""
    rows = column.offsets.to_numpy()
    inner = column.values
    positions = inner.offsets.to_numpy()
    values = inner.values.to_numpy(zero_copy_only=False)

    def row(r: int) -> tuple[np.ndarray, np.ndarray]:
        offsets = positions[rows[r] : rows[r + 1] + 1]
        return values[offsets[0] : offsets[-1]], offsets - offsets[0]

    return row


def _json_value(value: Any) -> Any:
    """A `messages` or `meta` value as the JSON it was: a JSON string where the folder kept strings;
    else a nested value, whose structs have every key any record has, null where this record had
    none, so null keys are dropped."""
    return json.loads(value) if isinstance(value, str) else _without_nulls(value)


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _hidden_of(table: pa.Table, manifest: StoreManifest) -> dict[str, dict[int, np.ndarray]]:
    """{record id: {layer: states in the stored dtype}} of a published hidden file (float32 narrows
    exactly back: the values were float16 or bfloat16)."""
    dtypes = {layer.index: layer.dtype for layer in manifest.hidden.layers}
    widths = {layer.index: layer.width for layer in manifest.hidden.layers}
    states = table.column("states").combine_chunks()
    rows = states.offsets.to_numpy()
    positions = states.values.offsets.to_numpy()
    values = states.values.values.to_numpy(zero_copy_only=False)
    out: dict[str, dict[int, np.ndarray]] = {}
    for r, (rid, layer) in enumerate(zip(table.column("id").to_pylist(), table.column("layer").to_pylist(), strict=True)):
        a, b = positions[rows[r]], positions[rows[r + 1]]
        block = np.ascontiguousarray(values[a:b], dtype=np.float32).reshape(rows[r + 1] - rows[r], widths[layer])
        if dtypes[layer] == "bfloat16":
            stored = (block.view(np.uint32) >> 16).astype(np.uint16)
        else:
            stored = block.astype(np.float16)
        out.setdefault(rid, {})[layer] = stored
    return out
