"""`potstill store publish`: a store as a folder laid out as a Hugging Face Hub dataset repository,
readable without potstill (docs/reference/published-layout.md).

The folder holds Parquet files of the records with their targets decoded into plain columns (config
`default`), the hidden states as a second config (`hidden`), the store's manifest and tokenizer files
as they are, `published.json` (every file's size and sha256, and which Parquet file holds which
shard) and a README.md dataset card made from the manifest. `potstill train --store FOLDER` reads
it back into exactly the records of the store (`potstill.store.published`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from potstill.share.export import EXPORT_FIELDS, decoded_targets, target_fields
from potstill.share.info import describe_tail, describe_targets
from potstill.store.errors import StoreError
from potstill.store.fs import read_bytes
from potstill.store.published import DATA_DIR, HIDDEN_DIR, LAYOUT, PUBLISHED_FILE, sha256_file
from potstill.store.reader import MANIFEST, Store, decode_hidden, open_store
from potstill.store.sizes import store_sizes

ROW_GROUP = 256  # records per Parquet row group: what a streaming reader fetches at a time
LICENSE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+-]{0,63}$")  # the Hub's licence ids (the card's YAML holds it bare)
JSON_FIELDS = ("messages", "meta")  # JSON strings in the store, nested columns when published


def publish_store(store: Store, out: str, *, license: str | None = None, repo_id: str | None = None) -> dict[str, Any]:
    """Write the published folder of `store` to `out` (a new or empty folder); returns what
    `published.json` holds. A store without a licence (`--license`, else the manifest's
    provenance) is refused before anything is written."""
    if not store.verify_reads:  # the card says every file read was checked: make it so
        store = open_store(store.url, store.storage_options, verify_reads=True)
    raw = json.loads(read_bytes(store.fs, store.path(MANIFEST)))
    provenance = raw.get("provenance") if isinstance(raw.get("provenance"), dict) else {}
    license = license or provenance.get("license")
    if not license:
        raise StoreError(f"{store.url} names no licence (its manifest has no provenance.license): pass "
                         "--license ID, e.g. --license apache-2.0, for the dataset card")
    if not LICENSE_ID.match(license):
        raise StoreError(f"licence {license!r}: give a licence id such as apache-2.0, mit, cc-by-4.0 or other")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise StoreError(f"{out} exists and is not an empty folder: publish into a new folder")
    if os.path.realpath(out).startswith(os.path.realpath(store.root).rstrip(os.sep) + os.sep):
        raise StoreError(f"{out} is inside the store {store.url}: publish outside it")
    tmp = out.rstrip(os.sep) + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)  # what an interrupted publish left
    os.makedirs(os.path.join(tmp, DATA_DIR))
    try:
        index = _write(store, tmp, raw, provenance, license, repo_id)
        if os.path.isdir(out):
            os.rmdir(out)
        os.replace(tmp, out)
    except OSError as e:
        raise StoreError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return index


def _write(store: Store, root: str, raw: dict[str, Any], provenance: dict[str, Any], license: str,
           repo_id: str | None) -> dict[str, Any]:
    m = store.manifest
    with open(os.path.join(root, MANIFEST), "wb") as f:
        f.write(read_bytes(store.fs, store.path(MANIFEST)))  # byte for byte: its checksum still holds
    for entry in m.tokenizer.files:
        os.makedirs(os.path.join(root, os.path.dirname(entry.path)), exist_ok=True)
        with open(os.path.join(root, entry.path), "wb") as f:
            f.write(read_bytes(store.fs, store.path(entry.path)))
    nested = {name: _nested_type(store, name) for name in JSON_FIELDS}
    schema = record_schema(store, nested)
    shards = []
    for name in store.shard_names:
        reader = store.shard(name)
        skip = store.duplicate_rows(name)
        rows = [row for row in range(reader.num_records) if row not in skip]
        data = f"{DATA_DIR}/{name}.parquet"
        with pq.ParquetWriter(os.path.join(root, data), schema) as writer:
            for start in range(0, len(rows), ROW_GROUP):
                writer.write_table(_records_table(reader, rows[start : start + ROW_GROUP], schema, nested))
        entry: dict[str, Any] = {"shard": name, "records": len(rows), "data": data}
        if m.hidden.layers:
            os.makedirs(os.path.join(root, HIDDEN_DIR), exist_ok=True)
            entry["hidden"] = f"{HIDDEN_DIR}/{name}.parquet"
            _write_hidden(reader, rows, os.path.join(root, entry["hidden"]))
        shards.append(entry)
    files = {}
    for folder, _, names in os.walk(root):
        for fname in sorted(names):
            rel = os.path.relpath(os.path.join(folder, fname), root).replace(os.sep, "/")
            files[rel] = {"bytes": os.path.getsize(os.path.join(root, rel)), "sha256": sha256_file(os.path.join(root, rel))}
    index = {"layout": LAYOUT, "license": license, "shards": shards, "nested": {k: v is not None for k, v in nested.items()},
             "files": dict(sorted(files.items()))}
    with open(os.path.join(root, PUBLISHED_FILE), "w") as f:
        json.dump(index, f, indent=1)
    with open(os.path.join(root, "README.md"), "w", encoding="utf-8") as f:
        f.write(dataset_card(store, raw, provenance, index, repo_id))
    return index


def record_schema(store: Store, nested: dict[str, pa.DataType | None]) -> pa.Schema:
    from potstill.store.records import arrow_schema

    full = arrow_schema(store.manifest)
    fields = []
    for name in (*EXPORT_FIELDS, "hidden_start"):
        field = full.field(name)
        fields.append(pa.field(name, nested[name]) if nested.get(name) is not None else field)
    return pa.schema(fields + target_fields(store.manifest.targets))


def _nested_type(store: Store, name: str) -> pa.DataType | None:
    """The Arrow type every record's `name` JSON takes (None: keep the JSON strings, when their
    values do not share one type, e.g. a key holding a number in one record and text in another)."""
    values: list[Any] = []
    for shard in store.shard_names:
        values += [None if v is None else json.loads(v) for v in store.shard(shard).views.batch.column(name).to_pylist()]
    try:
        kind = pa.array(values).type
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return None
    return None if _has_empty_struct(kind) else kind  # Parquet cannot store a struct of no fields


def _has_empty_struct(kind: pa.DataType) -> bool:
    if pa.types.is_struct(kind):
        return kind.num_fields == 0 or any(_has_empty_struct(kind.field(i).type) for i in range(kind.num_fields))
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return _has_empty_struct(kind.value_type)
    return False


def _records_table(reader: Any, rows: list[int], schema: pa.Schema, nested: dict[str, pa.DataType | None]) -> pa.Table:
    views = reader.views
    base = views.batch.select([*EXPORT_FIELDS, "hidden_start"]).take(pa.array(rows, pa.int64()))
    columns: dict[str, pa.Array] = {name: base.column(name) for name in base.schema.names}
    for name, kind in nested.items():
        if kind is not None:
            columns[name] = pa.array([None if v is None else json.loads(v) for v in columns[name].to_pylist()], kind)
    columns.update(decoded_targets(views, rows, reader.store.manifest.targets))
    return pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)


HIDDEN_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("layer", pa.int32(), nullable=False),
    pa.field("hidden_start", pa.int32(), nullable=False),
    pa.field("states", pa.list_(pa.list_(pa.float32())), nullable=False),
])


def _write_hidden(reader: Any, rows: list[int], path: str) -> None:
    """One row per (record, stored layer): its states for input_ids[hidden_start:], widened to float32
    (exact for float16 and bfloat16)."""
    layers = reader.store.manifest.hidden.layers
    with pq.ParquetWriter(path, HIDDEN_SCHEMA) as writer:
        for start in range(0, len(rows), ROW_GROUP):
            ids, layer_col, starts, states = [], [], [], []
            for row in rows[start : start + ROW_GROUP]:
                for layer in layers:
                    ids.append(reader.ids[row])
                    layer_col.append(layer.index)
                    starts.append(int(reader.views.hidden_start[row]))
                    states.append(decode_hidden(reader.hidden(row, layer.index), layer.dtype))
            writer.write_table(pa.Table.from_arrays(
                [pa.array(ids, pa.string()), pa.array(layer_col, pa.int32()), pa.array(starts, pa.int32()),
                 _matrices(states)], schema=HIDDEN_SCHEMA))


def _matrices(arrays: list[np.ndarray]) -> pa.Array:
    """list<list<float32>> of 2-D float32 arrays."""
    rows = np.concatenate([[0], np.cumsum([a.shape[0] for a in arrays])]).astype(np.int32)
    widths = [np.full(a.shape[0], a.shape[1], np.int64) for a in arrays]
    inner = np.concatenate([[0], np.cumsum(np.concatenate(widths) if widths else [])]).astype(np.int32)
    values = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0, np.float32)
    per_row = pa.ListArray.from_arrays(pa.array(inner), pa.array(values.astype(np.float32)))
    return pa.ListArray.from_arrays(pa.array(rows), per_row)


# -- the dataset card ------------------------------------------------------------------------------
def dataset_card(store: Store, raw: dict[str, Any], provenance: dict[str, Any], index: dict[str, Any],
                 repo_id: str | None) -> str:
    m = store.manifest
    t = m.targets.to_dict()
    sizes = store_sizes(store)
    records = sum(s["records"] for s in index["shards"])
    published = sum(f["bytes"] for f in index["files"].values())
    configs = ["configs:", "- config_name: default", "  default: true", "  data_files:", "  - split: train",
               f"    path: {DATA_DIR}/*.parquet"]
    if m.hidden.layers:
        configs += ["- config_name: hidden", "  data_files:", "  - split: train", f"    path: {HIDDEN_DIR}/*.parquet"]
    teacher = provenance.get("teacher") if isinstance(provenance.get("teacher"), dict) else {}
    name = m.teacher.name_or_path
    lines = [
        "---",
        f"license: {index['license']}",
        "tags:", "- knowledge-distillation", "- potstill",
        f"pretty_name: {json.dumps(f'Teacher targets of {name}')}",  # a JSON string is YAML, whatever the name holds
        *configs,
        "---",
        "",
        f"# Teacher targets of {name}",
        "",
        f"{records:,} sequences with the per-token targets of the teacher `{name}`, written by "
        f"potstill {m.potstill_version} for offline knowledge "
        "distillation: a student learns from these columns without running the teacher. "
        "Nothing here needs potstill to read: the records and targets are plain Parquet columns.",
        "",
        "## Provenance",
        "",
        f"- teacher: `{name}` ({m.teacher.architecture or 'architecture not recorded'}, {m.teacher.dtype}, "
        f"config {m.teacher.config_hash})"
        + (f", revision `{teacher.get('revision')}`" if teacher.get("revision") else "")
        + (f", weights sha256 `{teacher.get('sha256')}`" if teacher.get("sha256") else ""),
        f"- teacher licence: {provenance.get('teacher_license') or 'not recorded'}",
        f"- tokenizer: fingerprint `{m.tokenizer.fingerprint}`, vocabulary {m.tokenizer.vocab_size} "
        "(its files are in `tokenizer/`)",
        f"- store created {m.created_at} (format {m.format_version})",
    ]
    prompts = provenance.get("prompts") if isinstance(provenance.get("prompts"), dict) else None
    if prompts:
        lines.append(f"- prompts: {prompts.get('count')} (fingerprint `{prompts.get('fingerprint')}`), "
                     f"{prompts.get('num_samples')} sample(s) each")
    if not provenance:
        lines.append("- the store's manifest records no further provenance")
    lines += [f"- this dataset's licence: {index['license']}", "",
              "`manifest.json` is the store's manifest as written (teacher, tokenizer, targets, settings"
              + (", provenance" if provenance else "") + ").", ""]
    lines += _targets_section(m, t)
    lines += _columns_section(m, index)
    lines += [
        "## Sizes",
        "",
        f"- {records:,} records, {sizes.tokens:,} tokens, {sizes.scored_tokens:,} of them scored (carrying targets)",
        f"- the store: {sizes.describe()}",
        f"- this folder: {published:,} bytes in {len(index['files']) + 2} files"
        + (f", {published / sizes.tokens:,.1f} per token" if sizes.tokens else ""),
        "",
        "## How it was verified",
        "",
        "Every shard was read with potstill's checks (each file against the sha256 in its commit record, "
        "every value against the format) as it was converted. `published.json` lists the size and sha256 of "
        "every file here but itself and this card: `sha256sum` any of them to check a download.",
        "",
        "## Use it without potstill",
        "",
        "```python",
        *loss_snippet(store, repo_id),
        "```",
        "",
        "## Train with potstill",
        "",
        "`potstill train --store FOLDER` (or `--store hf://datasets/OWNER/NAME`) reads this folder back "
        "into exactly the records of the store, and trains on the same batches the store gives.",
        "",
    ]
    return "\n".join(lines)


def _targets_section(m: Any, t: dict[str, Any]) -> list[str]:
    lines = ["## Targets", "", describe_targets(t) + ".", ""]
    tail = describe_tail(t)
    if tail:
        lines += [f"The log tail is {tail}.", ""]
    lines += [f"Teacher temperature {t['temperature']}; log-probs computed in {t['logprobs_from']}. "
              "Entry j of every per-position column describes the teacher's distribution over "
              "`input_ids[score_start + j]` given the tokens before it.", ""]
    if m.hidden.layers:
        lines += ["Hidden states (config `hidden`): " + ", ".join(
            f"layer {x.index} (width {x.width}, stored as {x.dtype})" for x in m.hidden.layers) + ".", ""]
    return lines


def _columns_section(m: Any, index: dict[str, Any]) -> list[str]:
    spec = m.targets
    cols = [
        ("id", "string", "the record's id, unique"),
        ("prompt", "string", "the prompt text"),
        ("messages", "list of {role, content, ...}" if index["nested"]["messages"] else "JSON string",
         "the chat messages of the prompt, when it was a chat"),
        ("completion", "string", "the completion the targets describe"),
        ("generated", "string", "text the teacher generated (generation runs)"),
        ("rationale", "string", "the reasoning part of the completion (rationale stores)"),
        ("answer", "string", "the final answer extracted from the completion (rationale stores)"),
        ("meta", "struct" if index["nested"]["meta"] else "JSON string",
         "the prompt file's other fields, as given"),
        ("sample_index", "int32", "which of the prompt's samples this is"),
        ("input_ids", "list<int32>", "the token ids of prompt and completion"),
        ("score_start", "int32", "the first position with targets; entry j of the target columns is position score_start + j"),
        ("hidden_start", "int32", "the first position with hidden states (config `hidden`)"),
        ("token_logprob", "list<float32>", "the teacher's log-prob of the token actually at each scored position"),
    ]
    if spec.has_topk:
        cols += [("topk_ids", "list<list<int32>>", f"the teacher's {spec.k} most likely ids per position, most likely first; -1: an empty slot"),
                 ("topk_logprobs", "list<list<float32>>", "their log-probs"),
                 ("tail_logprob", "list<float32>", "log of the teacher's mass outside the top-K (-inf: none)")]
    if spec.has_sampled:
        rest = " from the ids outside the top-K" if spec.draws_from_rest else ""
        cols += [("sampled_ids", "list<list<int32>>", f"the distinct ids of {spec.samples} draws{rest} per position"),
                 ("sampled_counts", "list<list<uint16>>", f"how often each was drawn (they sum to {spec.samples})")]
    lines = ["## Columns", "", "Config `default` (one row per record, `data/*.parquet`, one file per store shard):", "",
             "| column | type | meaning |", "|---|---|---|"]
    lines += [f"| `{n}` | {k} | {meaning} |" for n, k, meaning in cols]
    if m.hidden.layers:
        lines += ["", "Config `hidden` (`hidden/*.parquet`, one row per record and layer):", "",
                  "| column | type | meaning |", "|---|---|---|",
                  "| `id` | string | the record's id |", "| `layer` | int32 | the teacher layer |",
                  "| `hidden_start` | int32 | row i of `states` is position hidden_start + i |",
                  "| `states` | list<list<float32>> | the hidden states, [positions, width], widened exactly from the stored dtype |"]
    if spec.has_sampled:
        weight = ("p = exp(tail_logprob) · count / N for the drawn ids, exp(topk_logprobs) for the top-K"
                  if spec.draws_from_rest else "count / N")
        lines += ["", f"Sampled targets as weights: each drawn id's weight is {weight}; the weights of a position "
                  "estimate the teacher's distribution without bias."]
    return [*lines, ""]


def loss_snippet(store: Store, repo_id: str | None) -> list[str]:
    """A few lines of plain torch and `datasets` that turn one record's columns into a distillation loss
    against a stand-in student (random logits); the card shows them and a test runs them."""
    from potstill.store.columns import input_vocab

    spec = store.manifest.targets
    vocab = max(input_vocab(store.manifest), int(store.manifest.teacher.vocab_size or 0))
    lines = [
        "import datasets, torch",
        "",
        f'REPO = "{repo_id or "OWNER/NAME"}"  # or the path of this folder',
        'row = next(iter(datasets.load_dataset(REPO, split="train", streaming=True)))',
        "ids, s = torch.tensor(row[\"input_ids\"]), row[\"score_start\"]",
        f"logits = torch.randn(len(ids), {vocab})  # your student's logits for ids, [positions, vocabulary]",
        "q = torch.log_softmax(logits[s - 1 : len(ids) - 1], -1)  # the student's log-probs of each scored position",
        "loss = torch.zeros(())",
    ]
    if spec.has_topk and not spec.has_sampled:
        lines += [
            "top, lp = torch.tensor(row[\"topk_ids\"]), torch.tensor(row[\"topk_logprobs\"])",
            "tail = torch.tensor(row[\"tail_logprob\"])",
            "ok = top >= 0  # -1: an empty slot",
            "q_top = q.gather(-1, top.clamp(min=0))",
            "q_tail = torch.log1p(-(q_top.exp() * ok).sum(-1).clamp(max=1 - 1e-6))",
            "# forward KL over the K buckets and the tail as one bucket",
            "kl = torch.where(ok, lp.exp() * (lp - q_top), 0).sum(-1)",
            "kl = kl + torch.where(tail > -torch.inf, tail.exp() * (tail - q_tail), 0)",
            "loss = kl.mean()",
        ]
    if spec.has_sampled:
        lines += [
            "def weighted(i, c):  # one position's draws as (ids, weights summing to 1)",
            "    c = torch.tensor(c, dtype=torch.float32)",
            "    return torch.tensor(i), c / c.sum()",
            "for j, (i, c) in enumerate(zip(row[\"sampled_ids\"], row[\"sampled_counts\"])):",
            "    i, w = weighted(i, c)",
        ]
        if spec.has_topk and spec.draws_from_rest:
            lines += [
                "    top, lp = torch.tensor(row[\"topk_ids\"][j]), torch.tensor(row[\"topk_logprobs\"][j])",
                "    ok = top >= 0",
                "    w = w * torch.tensor(row[\"tail_logprob\"][j]).exp()  # the draws share the mass outside the top-K",
                "    i, w = torch.cat([top[ok], i]), torch.cat([lp[ok].exp(), w])",
            ]
        lines += ["    loss = loss - (w * q[j, i]).sum() / len(q)  # cross-entropy against the teacher's estimate"]
    lines += ["print(float(loss))"]
    return lines


# -- the Hub ---------------------------------------------------------------------------------------
def check_repo_id(repo_id: str) -> str:
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts) or any(c.isspace() for c in repo_id):
        raise StoreError(f"--push {repo_id}: a Hub dataset repository is named OWNER/NAME")
    return repo_id


def push_folder(folder: str, repo_id: str) -> str:
    """Upload a published folder to the Hub dataset repository `repo_id` (created private when missing)
    through huggingface_hub; a rerun resumes an interrupted upload. Returns the dataset's URL."""
    check_repo_id(repo_id)
    by_hand = f"upload it yourself with `hf upload {repo_id} {folder} --repo-type dataset`"
    try:
        from huggingface_hub import HfApi, constants, get_token
    except ImportError:
        raise StoreError(f"--push needs huggingface_hub (pip install huggingface_hub); the folder {folder} is written: "
                         f"{by_hand}") from None
    if constants.HF_HUB_OFFLINE:
        raise StoreError(f"--push {repo_id}: the Hugging Face Hub is offline here (HF_HUB_OFFLINE is set); the folder "
                         f"{folder} is written: {by_hand} where the Hub can be reached")
    if not get_token():
        raise StoreError(f"--push {repo_id}: not logged in to the Hugging Face Hub (run `hf auth login` or set HF_TOKEN); "
                         f"the folder {folder} is written: push again, or {by_hand}")
    api = HfApi()
    try:
        url = api.create_repo(repo_id, repo_type="dataset", private=True, exist_ok=True)
        # huggingface_hub 0.x-1.x: upload_large_folder resumes; from 2.0 upload_folder commits a large folder
        # in parts and resumes on its own (upload_large_folder is gone).
        upload_large = getattr(api, "upload_large_folder", None)
        if upload_large is not None:
            upload_large(repo_id=repo_id, folder_path=folder, repo_type="dataset")
        else:
            api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="dataset",
                              commit_message="potstill store publish")
    except Exception as e:  # the Hub client raises many kinds (HTTP, network, auth): each is one line here
        raise StoreError(f"--push {repo_id}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; the folder "
                         f"{folder} is written: rerun to resume, or {by_hand}") from None
    return str(url)
