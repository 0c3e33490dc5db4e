"""Shard names and commit records (docs/reference/store-format.md §3)."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any

from potstill.store.errors import StoreError
from potstill.store.fs import check_relative
from potstill.store.ids import IDS_FILE
from potstill.store.manifest import (
    CHECKSUM_KEY,
    FORMAT_VERSION,
    FileEntry,
    check_commit_version,
    manifest_checksum,
    utc_now,
)
from potstill.store.pieces import PIECES_FILE

WRITER_ID_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
SHARD_RE = re.compile(r"^(?P<writer>[A-Za-z0-9_][A-Za-z0-9_.-]{0,63})-(?P<seq>\d{6,})$")


def check_writer_id(writer_id: str) -> str:
    if not isinstance(writer_id, str) or not WRITER_ID_RE.match(writer_id):
        raise StoreError(
            f"invalid writer id {writer_id!r}: use 1-64 of A-Z a-z 0-9 _ . - (not starting with . or -)"
        )
    return writer_id


def shard_name(writer_id: str, seq: int) -> str:
    return f"{writer_id}-{seq:06d}"


def parse_shard_name(name: str) -> tuple[str, int] | None:
    m = SHARD_RE.match(name)
    return (m.group("writer"), int(m.group("seq"))) if m else None


def seqs_for_writer(names: list[str], writer_id: str) -> list[int]:
    """The shard counters of one writer among shard or commit-record names."""
    out = []
    for name in names:
        parsed = parse_shard_name(name.removesuffix(".json"))
        if parsed and parsed[0] == writer_id:
            out.append(parsed[1])
    return out


@dataclass
class CommitRecord:
    shard: str
    writer_id: str
    seq: int
    records: int
    tokens: int
    scored_tokens: int
    hidden_rows: int
    files: list[FileEntry]
    bytes: int
    field_bytes: dict[str, int] = field(default_factory=dict)
    created_at: str = field(default_factory=utc_now)
    format_version: str = FORMAT_VERSION

    def to_json(self) -> bytes:
        obj = dataclasses.asdict(self)
        obj[CHECKSUM_KEY] = manifest_checksum(obj)  # the record's own checksum, as the manifest's (format §3)
        return json.dumps(obj, indent=1).encode()

    def entry(self, path: str) -> FileEntry:
        """The file entry of `path` (one of `files`: records, ids and pieces files are always listed)."""
        return next(f for f in self.files if f.path == path)

    @property
    def arrow_path(self) -> str:
        return f"shards/{self.shard}/records.arrow"

    @property
    def ids_path(self) -> str:
        return f"shards/{self.shard}/{IDS_FILE}"

    @property
    def pieces_path(self) -> str:
        return f"shards/{self.shard}/{PIECES_FILE}"

    @property
    def hidden_path(self) -> str:
        return f"shards/{self.shard}/hidden"

    @classmethod
    def from_json(cls, data: bytes, where: str, expected_shard: str) -> CommitRecord:
        """Parse and validate a commit record; any path that could escape its shard is refused."""
        try:
            obj = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise StoreError(f"{where}: damaged commit record (not JSON)") from None
        if not isinstance(obj, dict):
            raise StoreError(f"{where}: damaged commit record (not a JSON object)")
        check_commit_version(obj.get("format_version"), where)
        try:
            files = [FileEntry(path=f["path"], bytes=int(f["bytes"]), sha256=str(f["sha256"])) for f in obj["files"]]
            rec = cls(
                shard=str(obj["shard"]),
                writer_id=str(obj["writer_id"]),
                seq=int(obj["seq"]),
                records=int(obj["records"]),
                tokens=int(obj["tokens"]),
                scored_tokens=int(obj["scored_tokens"]),
                hidden_rows=int(obj["hidden_rows"]),
                files=files,
                bytes=int(obj["bytes"]),
                field_bytes={str(k): int(v) for k, v in (obj.get("field_bytes") or {}).items()},
                created_at=str(obj.get("created_at", "")),
                format_version=str(obj["format_version"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"{where}: damaged commit record ({type(e).__name__}: {e})") from None
        if rec.shard != expected_shard or parse_shard_name(rec.shard) is None:
            raise StoreError(f"{where}: commit names shard {rec.shard!r}, expected {expected_shard!r}")
        prefix = f"shards/{rec.shard}/"
        for f in rec.files:
            check_relative(f.path, prefix, where)
        listed = {f.path for f in rec.files}
        for path in (rec.arrow_path, rec.ids_path, rec.pieces_path):
            if path not in listed:
                raise StoreError(f"{where}: commit record does not list {path}")
        if obj.get(CHECKSUM_KEY) != manifest_checksum(obj):
            raise StoreError(f"{where}: damaged commit record (fails its checksum: changed after it was written)")
        return rec


def loads_json_object(data: bytes) -> dict[str, Any] | None:
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return obj if isinstance(obj, dict) else None
