"""What a generate run records about where its store came from (format §10, `potstill.store.provenance`).

- `store_provenance`: the manifest's `provenance`, built once by the run that creates the store: the
  teacher as named (hub id and resolved revision, or its local files' sizes and times, and with
  `--hash-teacher` their sha256), tokenizer and chat-template hashes, the prompt set, every setting,
  `--license` and the teacher's own licence.
- `start_run_record` / `finish_run_record`: the run's own file, `runs/<writer>.<start>.json`, written
  when it starts and rewritten when it ends. Any executor that runs generate calls these two.

Nothing here reads the environment, and settings and command lines are recorded with secrets removed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import struct
import sys
from typing import Any

from potstill.store import Store, StoreManifest
from potstill.store.manifest import potstill_version, utc_now
from potstill.store.provenance import (
    RunFile,
    end_run,
    new_run,
    prompt_fingerprint,
    redact,
    redact_settings,
)
from potstill.teacher_gen.config import GenerateConfig
from potstill.teacher_gen.gguf import file_sha256, is_gguf, metadata_string, pretrained_source
from potstill.teacher_gen.prompts import PromptSet


def prompt_set_info(config: GenerateConfig, prompts: PromptSet, workers: int) -> dict[str, Any]:
    """The prompt set as a run read it: fingerprint, valid prompts (every worker's), samples per prompt,
    and valid prompts per `--workers` share (what each share must write)."""
    return {
        "fingerprint": prompt_fingerprint(config.prompts),
        "count": prompts.valid,
        "num_samples": config.num_samples,
        "per_share": [prompts.per_share.get(i, 0) for i in range(workers)],
    }


def store_provenance(config: GenerateConfig, manifest: StoreManifest, prompts: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest's `provenance` for a store this run creates."""
    return {
        "teacher": teacher_identity(config),
        "tokenizer_sha256": manifest.tokenizer.fingerprint,
        "chat_template_sha256": manifest.generation.get("chat_template_sha256"),
        "prompts": None if prompts is None else {k: prompts[k] for k in ("fingerprint", "count", "num_samples")},
        "settings": redact_settings(config.to_dict()),
        "license": config.license,
        "teacher_license": teacher_license(config.teacher, config.revision),
        "potstill_version": potstill_version(),
        "created": utc_now(),
    }


def teacher_identity(config: GenerateConfig) -> dict[str, Any]:
    """{name, revision, sha256, files}: a hub teacher by its id and the commit its files came from; a local
    .gguf file or folder by its files' names, sizes and modification times (`files`), which loading it
    reads anyway, and with `--hash-teacher` also by the sha256 of its bytes (a folder: of its files'
    paths and sha256s), one more read of the whole model."""
    name = config.teacher
    if os.path.isfile(name) or os.path.isdir(name):
        source, gguf = pretrained_source(name)
        files = [{"path": n, "bytes": size, "mtime_ns": mtime} for n, size, mtime in local_stamp(source, gguf.get("gguf_file"))]
        digest = None
        if config.hash_teacher:
            digest = _file_digest(os.path.abspath(name), *_stamp(name)) if os.path.isfile(name) else folder_sha256(name)
        return {"name": name, "revision": None, "sha256": digest, "files": files}
    return {"name": redact(name), "revision": hub_revision(name, config.revision) or config.revision, "sha256": None,
            "files": None}


def local_stamp(source: str, file: str | None) -> tuple[tuple[str, int, int], ...]:
    """(name, size, mtime_ns) of a local model's files: `file` in folder `source`, else the entries of
    folder `source`; none for a hub name. A changed model changes it without a read of its bytes."""
    paths = [os.path.join(source, file)] if file else (
        [os.path.join(source, n) for n in sorted(os.listdir(source))] if os.path.isdir(source) else [])
    stamp = []
    for path in paths:
        with contextlib.suppress(OSError):
            st = os.stat(path)
            stamp.append((os.path.basename(path), st.st_size, st.st_mtime_ns))
    return tuple(stamp)


def _stamp(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=1024)
def _file_digest(path: str, size: int, mtime: int) -> str:
    """A file's sha256, once per (path, size, mtime): a GGUF teacher's is also its identity's (config hash)."""
    return "sha256:" + file_sha256(path)


def folder_sha256(folder: str) -> str:
    """`sha256:<hex>` over every file of a model folder, in order of relative path: `path sha256` lines."""
    lines = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for f in sorted(files):
            full = os.path.join(root, f)
            rel = os.path.relpath(full, folder).replace(os.sep, "/")
            lines.append(f"{rel} {_file_digest(os.path.abspath(full), *_stamp(full))}\n")
    return "sha256:" + hashlib.sha256("".join(lines).encode()).hexdigest()


def hub_revision(name: str, revision: str | None) -> str | None:
    """The commit a hub teacher's cached files are from (its snapshot folder's name), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(name, "config.json", revision=revision or None)
    except Exception:  # not a hub id, no cache: the revision stays as given
        return None
    found = re.search(r"[/\\]snapshots[/\\]([0-9a-f]{40})[/\\]", path) if isinstance(path, str) else None
    return found.group(1) if found else None


def teacher_license(teacher: str, revision: str | None = None) -> str | None:
    """The teacher's own licence: `license:` of its model card's YAML front matter (README.md in its folder
    or the hub cache), or a GGUF file's `general.license`; None when it states none."""
    if is_gguf(teacher) and os.path.isfile(teacher):
        return _gguf_license(teacher)
    card = os.path.join(teacher, "README.md") if os.path.isdir(teacher) else None
    if card is None:
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(teacher, "README.md", revision=revision or None)
            card = found if isinstance(found, str) else None
        except Exception:
            card = None
    return card_license(card) if card and os.path.isfile(card) else None


def card_license(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read(1 << 20)
    except OSError:
        return None
    if not text.startswith("---"):
        return None
    end = text.find("\n---", 3)
    if end < 0:
        return None
    try:
        import yaml

        meta = yaml.safe_load(text[3:end])
    except Exception:  # a malformed card states no licence we can read
        return None
    value = meta.get("license") if isinstance(meta, dict) else None
    if value == "other" and isinstance(meta.get("license_name"), str):
        value = f"other ({meta['license_name']})"
    if isinstance(value, list):
        value = ", ".join(map(str, value))
    return str(value) if value else None


def _gguf_license(path: str) -> str | None:
    try:
        return metadata_string(path, "general.license")
    except (OSError, ValueError, struct.error):  # a file that is not GGUF, or cut short: no licence to show
        return None


# -- the run's own file ------------------------------------------------------------------------------------
def start_run_record(store: Store, config: GenerateConfig, *, writer_id: str, workers: int, worker_index: int,
                     prompts: dict[str, Any] | None = None, command: list[str] | None = None,
                     **facts: Any) -> RunFile | None:
    """Write the record of a run that starts on `store` (`command`: this process's command line when
    None; `facts`: `skipped`, `already_done` when known); returns it for `finish_run_record`. A store
    that cannot take it gets a warning, not an error: the run's records matter more than its record."""
    run = new_run(store.fs, writer_id, workers, worker_index, sys.argv if command is None else command,
                  config.to_dict())
    run.body.update(prompts=prompts, **facts)
    return run if _write(run, store) else None


def update_run_record(run: RunFile | None, store: Store, **facts: Any) -> None:
    """Record more of what a run knows (`skipped`, `already_done`) while it runs."""
    if run is not None:
        run.body.update(facts)
        _write(run, store)


def finish_run_record(run: RunFile | None, store: Store | None, state: str, *, records: int,
                      error: BaseException | str | None = None, **facts: Any) -> None:
    """Rewrite a run's record as ended: `state` complete, stopped or failed, with the records it wrote
    (and `facts` such as `already_done`)."""
    if run is None or store is None:
        return
    run.body.update(facts)
    end_run(run, state, records=records, error=None if error is None else str(error) or type(error).__name__)
    _write(run, store)


def _write(run: RunFile, store: Store) -> bool:
    try:
        run.write(store.root)
        return True
    except OSError as e:
        print(f"warning: could not write {run.path} in {store.url}: {e}", file=sys.stderr)
        return False
