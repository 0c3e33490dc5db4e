"""potstill's datastore: the sharded Arrow + Zarr format both phases share (docs/reference/store-format.md).

No model is ever loaded here: the store only moves bytes.
"""

from potstill.store.commit import CommitRecord
from potstill.store.copy import CopyReport, copy_store
from potstill.store.errors import FormatVersionError, PotstillError, StoreError
from potstill.store.manifest import (
    FORMAT_VERSION,
    HiddenLayer,
    HiddenSpec,
    StoreManifest,
    TargetSpec,
    TeacherInfo,
    TokenizerInfo,
    config_hash,
    potstill_version,
    tokenizer_fingerprint,
)
from potstill.store.reader import ShardReader, Store, create_store, decode_hidden, open_store
from potstill.store.records import Record
from potstill.store.verify import VerifyReport, find_leftovers, verify_store
from potstill.store.writer import ShardWriter, new_writer_id

__all__ = [
    "FORMAT_VERSION",
    "CommitRecord",
    "CopyReport",
    "FormatVersionError",
    "HiddenLayer",
    "HiddenSpec",
    "PotstillError",
    "Record",
    "ShardReader",
    "ShardWriter",
    "Store",
    "StoreError",
    "StoreManifest",
    "TargetSpec",
    "TeacherInfo",
    "TokenizerInfo",
    "VerifyReport",
    "config_hash",
    "copy_store",
    "create_store",
    "decode_hidden",
    "find_leftovers",
    "new_writer_id",
    "open_store",
    "potstill_version",
    "tokenizer_fingerprint",
    "verify_store",
]
