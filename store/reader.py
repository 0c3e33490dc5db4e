"""Opening and reading stores (docs/reference/store-format.md): `create_store`, `open_store`, `Store`,
`ShardReader`. Readers never write to a store."""

from __future__ import annotations

import bisect
import errno
import hashlib
import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa
import zarr

from potstill.store.checks import value_problems
from potstill.store.columns import numpy_view
from potstill.store.commit import CommitRecord, check_writer_id, parse_shard_name, seqs_for_writer
from potstill.store.errors import FormatVersionError, StoreError
from potstill.store.fs import (
    check_relative,
    is_local,
    join,
    listdir_names,
    read_bytes,
    resolve,
    sha256_bytes,
    temp_target,
    unstrip,
    write_bytes,
)
from potstill.store.hidden import DATA_KEY, HiddenArray
from potstill.store.ids import IdIndex, contained, id_keys, ids_problem, read_ids_file, repeated
from potstill.store.manifest import FileEntry, StoreManifest, check_manifest_checksum
from potstill.store.pieces import PieceChecks, body_bounds, read_pieces
from potstill.store.records import ColumnViews, Record, arrow_schema
from potstill.store.writer import ShardWriter

MANIFEST = "manifest.json"
CACHE_ENV = "POTSTILL_CACHE_DIR"
_OPEN_SHARDS = 8  # shards kept open for random access


def create_store(
    url: str,
    manifest: StoreManifest,
    tokenizer_files: str | dict[str, bytes] | None = None,
    *,
    exist_ok: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> Store:
    """Create a store: copy the tokenizer files, then write the manifest, last and once.

    `tokenizer_files` is a folder (e.g. one `tokenizer.save_pretrained` wrote) or a mapping of
    file name to bytes. With `exist_ok`, an existing store is opened instead if its manifest
    describes the same teacher, tokenizer, targets and settings; otherwise creation fails
    naming the differences. Several writers may call this at once.
    """
    fs, root = resolve(url, storage_options)
    problem = location_problem(fs, root)
    if problem is not None:
        raise StoreError(f"{url} {problem}: no store can be created there")
    manifest_path = join(root, MANIFEST)
    if fs.exists(manifest_path):
        if not exist_ok:
            raise StoreError(f"store {url} already exists")
        return _open_compatible(url, manifest, storage_options)
    strays = foreign_entries(fs, root)
    if strays:
        raise StoreError(f"{url} exists and is not a potstill store (it holds {', '.join(strays[:3])}): "
                         "create a store in a new or empty folder")
    files = _tokenizer_payload(tokenizer_files)
    entries = []
    for name, data in sorted(files.items()):
        rel = check_relative(f"tokenizer/{name}", "tokenizer/", "tokenizer files")
        write_bytes(fs, join(root, rel), data)
        entries.append(FileEntry(rel, len(data), sha256_bytes(data)))
    manifest.tokenizer.files = entries
    if is_local(fs):  # a local store always has its commits folder: one missing is damage (`commits_problem`)
        os.makedirs(join(root, "commits"), exist_ok=True)
    try:
        write_bytes(fs, manifest_path, manifest.to_json(), exclusive=True, atomic=True)
    except FileExistsError:  # another writer created it between our check and our write
        if not exist_ok:
            raise StoreError(f"store {url} already exists") from None
        return _open_compatible(url, manifest, storage_options)
    return Store(url, storage_options)


def location_problem(fs: Any, root: str) -> str | None:
    """Why nothing can be a store at `root`, in words to follow its name, or None: a file, a path
    under a file, a symbolic link loop."""
    if not is_local(fs):
        return "is a file, not a folder" if fs.isfile(root) else None
    try:
        if not os.path.isdir(root) and os.path.exists(root):
            return "is a file, not a folder"
        os.stat(root)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        above = os.path.dirname(root)
        while above and not os.path.isfile(above) and above != os.path.dirname(above):
            above = os.path.dirname(above)
        return f"lies under {above}, which is a file"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a loop of symbolic links"
        return f"cannot be read ({e.strerror})"
    return None


def foreign_entries(fs: Any, root: str) -> list[str]:
    """What a folder without a manifest holds that no store's creation leaves (its tokenizer files,
    commits folder, manifest's temporary file): a folder holding any is someone else's."""
    return [n for n in listdir_names(fs, root) if n not in ("tokenizer", "commits") and temp_target(n) != MANIFEST]


def commits_problem(fs: Any, root: str) -> str | None:
    """Damage to the `commits` folder, in words, or None. With no readable commit records every
    shard would look uncommitted, so a store with this damage is read by nobody and cleaned by
    nobody. (A local store is created with its commits folder; an object store has no empty
    folders, so there only a file in its place is told apart.)"""
    path = join(root, "commits")
    if fs.isfile(path):
        return "its commits folder is a file"
    if is_local(fs) and not fs.isdir(path) and listdir_names(fs, join(root, "shards")):
        return "its commits folder is missing while shards/ holds data"
    return None


def _open_compatible(url: str, manifest: StoreManifest, storage_options: dict[str, Any] | None) -> Store:
    store = Store(url, storage_options)
    diffs = store.manifest.differences(manifest)
    if diffs:
        raise StoreError(f"store {url} was created with other settings: " + "; ".join(diffs))
    return store


def _tokenizer_payload(tokenizer_files: str | dict[str, bytes] | None) -> dict[str, bytes]:
    if tokenizer_files is None:
        return {}
    if isinstance(tokenizer_files, dict):
        return {str(k): bytes(v) for k, v in tokenizer_files.items()}
    if not os.path.isdir(tokenizer_files):
        raise StoreError(f"tokenizer folder {tokenizer_files} does not exist")
    out = {}
    for name in sorted(os.listdir(tokenizer_files)):
        full = os.path.join(tokenizer_files, name)
        if os.path.isfile(full):
            with open(full, "rb") as f:
                out[name] = f.read()
    return out


def open_store(url: str, storage_options: dict[str, Any] | None = None, *, strict: bool = True,
               verify_reads: bool = False) -> Store:
    """Open an existing store by local path or fsspec URL (see `Store` for the options)."""
    return Store(url, storage_options, strict=strict, verify_reads=verify_reads)


# Files whose sha256 this process has checked: (path, sha256). A file is hashed once per process,
# before its first use, however often its shard reader is closed and opened again.
_VERIFIED: set[tuple[str, str]] = set()


def _check_digest(data: Any, entry: FileEntry, where: str) -> None:
    """Refuse bytes that are not what the store lists for them (a commit record or the manifest), in
    one line naming the file."""
    view = memoryview(data)
    if view.nbytes != entry.bytes:
        raise StoreError(f"{where}: has {view.nbytes} bytes, the store lists {entry.bytes} (truncated?)")
    if sha256_bytes(view) != entry.sha256:
        raise StoreError(f"{where}: fails its sha256 check (corrupted bytes)")


def cache_dir() -> str:
    """Where potstill keeps what it downloads for reading remote stores (their tokenizers):
    $POTSTILL_CACHE_DIR, else $XDG_CACHE_HOME/potstill, else ~/.cache/potstill."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser(os.path.join("~", ".cache")), "potstill")


def _tokenizer_file(folder: str, entry: FileEntry) -> str:
    """Where a stored tokenizer file (`tokenizer/<name>`) lies in a local copy of the folder."""
    return os.path.join(folder, entry.path.split("/", 1)[1])


def _holds_files(folder: str, entries: list[FileEntry]) -> bool:
    """Whether `folder` holds every tokenizer file of `entries` with its checksum."""
    for entry in entries:
        try:
            with open(_tokenizer_file(folder, entry), "rb") as f:
                _check_digest(f.read(), entry, entry.path)
        except (OSError, StoreError):
            return False
    return True


class Store:
    """A store opened for reading (and for appending through `writer()`).

    Records are numbered globally in the order of committed shards sorted by name, then by row.
    The list of committed shards is read once; `refresh()` picks up shards committed since.
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, *, strict: bool = True,
                 verify_reads: bool = False) -> None:
        self.url = url
        self.strict = strict  # False (verify): collect bad commit records instead of raising
        # True (training, eval): every shard file is checked against its commit record's sha256 once per
        # process before its first use, and a shard's values against the format (`store.checks`).
        self.verify_reads = verify_reads
        self.bad_commits: list[tuple[str, str]] = []  # (shard, why its commit record cannot be read)
        self.storage_options = storage_options
        self.fs, self.root = resolve(url, storage_options)
        problem = location_problem(self.fs, self.root)
        if problem is not None:
            raise StoreError(f"{url} {problem}: not a potstill store")
        manifest_path = join(self.root, MANIFEST)
        try:
            data = read_bytes(self.fs, manifest_path)
        except FileNotFoundError:
            if not self.fs.exists(self.root):
                raise StoreError(f"no such store: {url}") from None
            raise StoreError(f"{url} is not a potstill store (no {MANIFEST})") from None
        except IsADirectoryError:
            raise StoreError(f"{url} is not a potstill store ({MANIFEST} is a folder)") from None
        self.manifest = StoreManifest.from_json(data, f"{url}/{MANIFEST}")
        for entry in self.manifest.tokenizer.files:
            check_relative(entry.path, "tokenizer/", f"{url}/{MANIFEST}")
        check_manifest_checksum(data, f"{url}/{MANIFEST}")
        self._open: OrderedDict[str, ShardReader] = OrderedDict()
        self._checked_elsewhere: set[str] = set()  # `mark_checked`
        self.refresh()

    # -- listing ------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Re-read the commit records (shards other writers committed since opening).

        A commit record is written atomically (format §3), so one that does not parse is damage,
        never a crash: it lands in `bad_commits` and its shard is neither read nor ever deleted.
        A strict store (the default) refuses to open with one; `strict=False` (verify, info,
        training with --skip-bad-shards) opens the rest and reports it.
        """
        commits = []
        self.bad_commits = []
        self.damage = commits_problem(self.fs, self.root)
        if self.damage is not None and self.strict:
            raise StoreError(f"store {self.url} is damaged: {self.damage}; no shard is read or removed until it is "
                             f"restored (`potstill store verify {self.url}` lists what is there)")
        for name in listdir_names(self.fs, join(self.root, "commits")):
            if not name.endswith(".json") or parse_shard_name(name[:-5]) is None:
                continue  # temporary files of atomic writes, strays: never commit records
            commits.append(self._read_commit(name[:-5]))
        self.commits: list[CommitRecord] = [c for c in commits if c is not None]
        self._by_name = {c.shard: c for c in self.commits}
        self._starts = np.cumsum([0] + [c.records for c in self.commits]).tolist()
        self._duplicates: dict[str, list[tuple[int, str]]] | None = None
        self._index: IdIndex | None = None

    def _read_commit(self, shard: str) -> CommitRecord | None:
        where = f"{self.url}/commits/{shard}.json"
        try:
            data = read_bytes(self.fs, join(self.root, "commits", f"{shard}.json"))
        except FileNotFoundError:
            return None
        try:
            return CommitRecord.from_json(data, where, shard)
        except StoreError as e:
            self.bad_commits.append((shard, str(e).split(f"commits/{shard}.json", 1)[-1].lstrip(": ")))  # the reason
            if not self.strict:
                return None
            if isinstance(e, FormatVersionError):
                raise
            raise StoreError(f"{e}; shard {shard} is kept but cannot be read: run `potstill store verify {self.url}`") from None

    # -- ids ----------------------------------------------------------------------------------------
    def shard_ids(self, name: str) -> pa.StringArray:
        """The ids of a committed shard's records, in row order (its ids file, memory-mapped when local)."""
        return self._ids_batch(name).column(0)

    def shard_keys(self, name: str) -> np.ndarray:
        """The keys (`potstill.store.ids.id_key`) of a committed shard's records, in row order."""
        return numpy_view(self._ids_batch(name).column(1))

    def _ids_batch(self, name: str) -> pa.RecordBatch:
        """A shard's ids file, its sha256 checked against the commit record once per process before
        first use: the split, resume and duplicates go by it, so damage must be named, never read."""
        commit = self.commit(name)
        entry = commit.entry(commit.ids_path)
        path, where = self.path(entry.path), f"{self.url}/{entry.path}"
        try:
            if is_local(self.fs):
                buffer = pa.memory_map(path, "r").read_buffer()
            else:
                buffer = pa.py_buffer(read_bytes(self.fs, path))
        except FileNotFoundError:
            raise StoreError(f"{where}: shard file is missing") from None
        if (path, entry.sha256) not in _VERIFIED:
            _check_digest(buffer, entry, where)
            _VERIFIED.add((path, entry.sha256))
        return read_ids_file(buffer, where, commit.records)

    def id_index(self, shards: list[str] | None = None) -> IdIndex:
        """Keys, shard and row of every committed record, in store order, read once (ids only when
        asked for); or of the records of `shards` alone, in that order (reading only their ids files,
        unless every shard's are read already)."""
        if self._index is None and (shards is None or len(set(shards)) == len(self.commits)):
            names = self.shard_names
            self._index = IdIndex.build(names, [self.shard_keys(name) for name in names], self.shard_ids)
        full = self._index
        if shards is None or (full is not None and list(shards) == full.shards):
            return full
        if full is None:
            keys = [self.shard_keys(name) for name in shards]
        else:
            at = {name: i for i, name in enumerate(full.shards)}
            keys = [full.keys[full.starts[at[name]] : full.starts[at[name] + 1]] for name in shards]
        return IdIndex.build(list(shards), keys, self.shard_ids)

    def committed_mask(self, ids: Sequence[str]) -> np.ndarray:
        """Which of `ids` some committed shard holds (resume: what not to write again). Keys find the
        candidates; their ids are compared exactly, so a 64-bit key collision never skips a record."""
        ids = list(ids)
        return contained(ids, id_keys(ids), self.id_index())

    # -- duplicates ---------------------------------------------------------------------------
    def duplicates(self, shards: list[str] | None = None) -> dict[str, list[tuple[int, str]]]:
        """Ids stored more than once among `shards` (default: every committed shard). Ids are unique
        (format §3): readers keep the copy in the shard committed first, by its commit record's
        `created_at`, then shard name (the first row within a shard), and skip the rest. Returns, for
        each shard holding a later copy, [(row, shard of the first copy)] by row."""
        if shards is None and self._duplicates is not None:
            return self._duplicates
        chosen = self.shard_names if shards is None else list(shards)
        # in order of precedence: the shards by commit time, then name; rows in order
        index = self.id_index(sorted(chosen, key=lambda name: (self.commit(name).created_at, name)))
        later, first = repeated(index.keys, index.ids_at)
        found: dict[str, list[tuple[int, str]]] = {}
        order = np.lexsort((index.row[later], index.shard[later]))
        for p, f in zip(later[order].tolist(), first[order].tolist(), strict=True):
            found.setdefault(index.shards[index.shard[p]], []).append((int(index.row[p]), index.shards[index.shard[f]]))
        if shards is None:
            self._duplicates = found
        return found

    def duplicate_rows(self, shard: str) -> set[int]:
        """Rows of a shard that readers skip: ids an earlier commit (or an earlier row) holds."""
        return {row for row, _ in self.duplicates().get(shard, [])}

    @property
    def num_duplicates(self) -> int:
        return sum(len(rows) for rows in self.duplicates().values())

    @property
    def shard_names(self) -> list[str]:
        return [c.shard for c in self.commits]

    @property
    def num_records(self) -> int:
        return self._starts[-1]

    @property
    def num_tokens(self) -> int:
        return sum(c.tokens for c in self.commits)

    @property
    def num_scored_tokens(self) -> int:
        return sum(c.scored_tokens for c in self.commits)

    def __len__(self) -> int:
        return self.num_records

    def commit(self, shard: str) -> CommitRecord:
        commit = self._by_name.get(shard)
        if commit is None:
            raise StoreError(f"{self.url}: no committed shard {shard!r}")
        return commit

    def next_seq(self, writer_id: str) -> int:
        """First unused shard counter for a writer: above its commits and its leftovers."""
        check_writer_id(writer_id)
        names = listdir_names(self.fs, join(self.root, "commits")) + listdir_names(self.fs, join(self.root, "shards"))
        return max(seqs_for_writer(names, writer_id), default=-1) + 1

    # -- reading ------------------------------------------------------------------------------
    def shard(self, name: str, *, checked: bool = False, by_record: bool = False) -> ShardReader:
        """The reader of a committed shard (kept open in a small LRU cache). `checked`: another process
        of the same job has already checked its records file and values (`verify_reads`), so this one
        does not again (a training loader's workers share what they checked; `mark_checked`).
        `by_record`: instead of the whole shard now, each record as it is read (`ShardReader.check_records`),
        while another thread checks the whole (a training loader's first shards)."""
        reader = self._open.get(name)
        if reader is None:
            reader = ShardReader(self, self.commit(name), checked=checked or name in self._checked_elsewhere,
                                 by_record=by_record)
            self._open[name] = reader
            if len(self._open) > _OPEN_SHARDS:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(name)
        return reader

    def mark_checked(self, names: Iterable[str]) -> None:
        """Shards whose records file and values other processes of this job have checked (a training
        run's loader workers, before its final evaluation reads them here): not checked again."""
        self._checked_elsewhere.update(names)

    def locate(self, i: int) -> tuple[str, int]:
        """(shard name, row) of global record i."""
        if not -self.num_records <= i < self.num_records:
            raise IndexError(f"record {i} out of range: {self.url} holds {self.num_records} records")
        i %= max(self.num_records, 1)
        s = bisect.bisect_right(self._starts, i) - 1
        return self.commits[s].shard, i - self._starts[s]

    def record(self, i: int, *, with_hidden: bool = False) -> Record:
        name, row = self.locate(i)
        return self.shard(name).record(row, with_hidden=with_hidden)

    __getitem__ = record

    def hidden(self, i: int, layer: int) -> np.ndarray:
        """Record i's hidden states at a stored layer, as stored (float16, or bfloat16 bits in uint16)."""
        name, row = self.locate(i)
        return self.shard(name).hidden(row, layer)

    def iter_shard(self, name: str, *, with_hidden: bool = False) -> Iterator[Record]:
        reader = ShardReader(self, self.commit(name))
        for row in range(reader.num_records):
            yield reader.record(row, with_hidden=with_hidden)

    def iter_records(self, *, with_hidden: bool = False) -> Iterator[Record]:
        for name in self.shard_names:
            yield from self.iter_shard(name, with_hidden=with_hidden)

    # -- writing ------------------------------------------------------------------------------
    def writer(self, writer_id: str | None = None, **kwargs: Any) -> ShardWriter:
        return ShardWriter(self, writer_id, **kwargs)

    # -- files --------------------------------------------------------------------------------
    def path(self, rel: str) -> str:
        return join(self.root, rel)

    def note_verified(self, entry: FileEntry) -> None:
        """The caller has just found the file of this commit-record entry to match its sha256 (`store
        verify`, for an ids file): this process's readers take it as checked and do not hash it again.
        Not for a records file, whose whole check is more than its sha256 (its pieces file, `ShardReader`)."""
        _VERIFIED.add((self.path(entry.path), entry.sha256))

    @cached_property
    def tokenizer_dir(self) -> str:
        """A local folder holding the stored tokenizer files: the store's own for a local store, else a
        copy in the user's cache (`cache_dir()`), downloaded and checked once per tokenizer and shared
        by every store, run and process that names the same files."""
        entries = sorted(self.manifest.tokenizer.files, key=lambda e: e.path)
        if not entries:
            raise StoreError(f"{self.url}: the store holds no tokenizer files")
        if is_local(self.fs):
            if self.verify_reads:
                self.check_tokenizer_files()
            return join(self.root, "tokenizer")
        key = hashlib.sha256("".join(f"{e.path}\0{e.sha256}\n" for e in entries).encode()).hexdigest()[:32]
        folder = os.path.join(cache_dir(), "tokenizers", key)
        if not _holds_files(folder, entries):
            self._download_tokenizer(entries, folder)
        return folder

    def check_tokenizer_files(self) -> None:
        """Refuse, in one line naming the file, a stored tokenizer file that is missing or is not what
        the manifest lists (bytes, sha256); each file is hashed once per process."""
        for entry in self.manifest.tokenizer.files:
            path = join(self.root, entry.path)
            if (path, entry.sha256) in _VERIFIED:
                continue
            try:
                data = read_bytes(self.fs, path)
            except FileNotFoundError:
                raise StoreError(f"{self.url}/{entry.path}: tokenizer file is missing") from None
            _check_digest(data, entry, f"{self.url}/{entry.path}")
            _VERIFIED.add((path, entry.sha256))

    def _download_tokenizer(self, entries: list[FileEntry], folder: str) -> None:
        """Download and check `entries` into a private folder, then rename it to `folder` (readers never
        see a half-written copy; of two processes racing, the second finds the first's copy)."""
        parent = os.path.dirname(folder)
        try:
            os.makedirs(parent, exist_ok=True)
            staging = tempfile.mkdtemp(prefix=".download-", dir=parent)
        except OSError as e:
            raise StoreError(f"{self.url}: cannot keep its tokenizer in {parent} ({e.strerror}); set "
                             f"${CACHE_ENV} to a folder you can write") from None
        try:
            for entry in entries:
                data = read_bytes(self.fs, join(self.root, entry.path))
                _check_digest(data, entry, f"{self.url}/{entry.path}")
                with open(_tokenizer_file(staging, entry), "wb") as f:
                    f.write(data)
            os.chmod(staging, 0o755)  # mkdtemp makes it private; the cache is an ordinary folder
            if os.path.isdir(folder):  # a damaged or partial copy (its files did not match)
                shutil.rmtree(folder, ignore_errors=True)
            try:
                os.rename(staging, folder)
            except OSError:
                if not _holds_files(folder, entries):  # not another process's good copy
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @cached_property
    def records_schema(self) -> pa.Schema:
        """The schema every shard's records file must have (built once: it costs more than opening a small shard)."""
        return arrow_schema(self.manifest)

    def __repr__(self) -> str:
        return f"Store({self.url!r}, shards={len(self.commits)}, records={self.num_records})"


class ShardReader:
    """One committed shard: zero-copy columns of its Arrow file and lazy access to its Zarr arrays."""

    def __init__(self, store: Store, commit: CommitRecord, *, checked: bool = False, by_record: bool = False,
                 by_pieces: bool = False) -> None:
        """Open a shard's records file; with the store's `verify_reads`, unless `checked` (by another
        process of the same job) or checked before in this process, check it first: its sha256 (with
        `by_pieces`, every piece's CRC-32C against the pieces file instead: the same bytes checked, for
        a quarter of the CPU), then its values (`store.checks`) and ids. `by_record`: check now only
        the bytes Arrow parses and every record's offsets (against the pieces file, `store.pieces`),
        and each record's bytes and values when it is first read (`check_records`)."""
        self.store = store
        self.commit = commit
        self.name = commit.shard
        where = f"{store.url}/{commit.arrow_path}"
        path = store.path(commit.arrow_path)
        self._files = {f.path: f for f in commit.files}
        verify = store.verify_reads and not checked and (path, "values") not in _VERIFIED
        whole = verify and (path, self._files[commit.arrow_path].sha256) not in _VERIFIED
        self._pieces: PieceChecks | None = None  # by record: the pieces checked so far
        self._rows_checked: set[int] = set()
        try:
            if is_local(store.fs):  # zero-copy: columns are views of the page cache
                buffer = pa.memory_map(path, "r").read_buffer()
            else:
                buffer = pa.py_buffer(read_bytes(store.fs, path))
            if whole and by_record:
                self._pieces = self._open_pieces(buffer, where)
            elif whole and by_pieces:
                self._check_by_pieces(buffer, where)
            elif whole:
                # Hashing reads the file once; its pages are then in the cache the columns read from.
                _check_digest(buffer, self._files[commit.arrow_path], where)
                _VERIFIED.add((path, self._files[commit.arrow_path].sha256))
                self._pieces_file()  # unused here, but a checked read passes no damaged file of its shard
            reader = pa.ipc.open_file(buffer)
            batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
            if self._pieces is not None:
                self._check_metadata(buffer, batches, path, where)
        except FileNotFoundError:
            raise StoreError(f"{where}: shard file is missing") from None
        except (pa.ArrowInvalid, OSError) as e:
            raise StoreError(f"{where}: unreadable Arrow file ({e})") from None
        expected = store.records_schema
        got = reader.schema
        if not got.equals(expected):  # (equal, as the writer writes it: no field to look up)
            for f in expected:
                idx = got.get_field_index(f.name)
                if idx < 0 or not got.field(idx).type.equals(f.type):
                    have = "missing" if idx < 0 else str(got.field(idx).type)
                    raise StoreError(f"{where}: column {f.name} is {have}, expected {f.type}")
        if len(batches) == 1:
            batch = batches[0]
        else:  # other writers may split a shard into several batches; join them once
            table = pa.Table.from_batches(batches, schema=got).combine_chunks()
            batch = table.to_batches()[0] if table.num_rows else pa.RecordBatch.from_pylist([], schema=got)
        if batch.num_rows != commit.records:
            raise StoreError(f"{where}: holds {batch.num_rows} records, its commit says {commit.records}")
        try:
            self.views = ColumnViews(batch, store.manifest.targets)
        except (pa.ArrowInvalid, StoreError) as e:
            raise StoreError(f"{where}: {e}") from None
        if verify and self._pieces is None:
            problems = value_problems(self.views, store.manifest)
            if problems:
                raise StoreError(f"{store.url}: shard {self.name}: {problems[0]}")
            problem = ids_problem(store._ids_batch(self.name), self.views.batch.column("id"))
            if problem is not None:  # the split, resume and reports go by the ids file
                raise StoreError(f"{store.url}/{commit.ids_path}: {problem}")
            _VERIFIED.add((path, "values"))
        self._group: Any = None
        self._hidden_arrays: dict[int, HiddenArray] = {}

    def _open_pieces(self, buffer: pa.Buffer, where: str) -> PieceChecks:
        """The pieces file (its sha256 checked against the commit record), and the records file's framing
        checked against it: the bytes Arrow parses before anything else is read."""
        data, pieces_where = self._pieces_file()
        if buffer.size != self._files[self.commit.arrow_path].bytes:
            raise StoreError(f"{where}: has {buffer.size} bytes, the store lists "
                             f"{self._files[self.commit.arrow_path].bytes} (truncated?)")
        pieces = PieceChecks(buffer, read_pieces(pa.py_buffer(data), pieces_where, buffer.size), where)
        pieces.check_framing()
        return pieces

    def _check_by_pieces(self, buffer: pa.Buffer, where: str) -> None:
        """Every byte of the records file against the pieces file (its sha256 checked): what its sha256
        would find, at a quarter of the CPU."""
        self._open_pieces(buffer, where).check_all()

    def _pieces_file(self) -> tuple[bytes, str]:
        """The shard's pieces file, its sha256 checked against the commit record, and its name."""
        entry = self._files[self.commit.pieces_path]
        where = f"{self.store.url}/{entry.path}"
        try:
            data = read_bytes(self.store.fs, self.store.path(entry.path))
        except FileNotFoundError:
            raise StoreError(f"{where}: shard file is missing") from None
        _check_digest(data, entry, where)
        return data, where

    def _check_metadata(self, buffer: pa.Buffer, batches: list[pa.RecordBatch], path: str, where: str) -> None:
        """By record: check every byte outside the record batch's body (what Arrow parsed: the writer's
        head and tail pieces hold it) and every record's offsets; a file of several batches is checked whole."""
        pieces = self._pieces
        assert pieces is not None
        bounds = body_bounds(buffer) if len(batches) == 1 else None
        if bounds is None:
            self._pieces = None
            _check_digest(buffer, self._files[self.commit.arrow_path], where)
            _VERIFIED.add((path, self._files[self.commit.arrow_path].sha256))
            return
        pieces.check(0, bounds[0])
        pieces.check(bounds[1], buffer.size)
        for column in batches[0].columns:
            pieces.check_row_buffers(column)

    def check_records(self, rows: list[int]) -> None:
        """A reader opened `by_record`: check records `rows`' bytes (the pieces holding them) and values,
        and their ids against the ids file, once each, before they are used; nothing otherwise. The
        values of several records are checked together (a check has a fixed cost per call)."""
        if self._pieces is None:
            return
        rows = sorted({row for row in rows if row not in self._rows_checked})
        if not rows:
            return
        store, batch = self.store, self.views.batch
        for row in rows:
            for column in batch.columns:
                self._pieces.check_rows(column, row, row + 1)
        chosen = batch.take(pa.array(rows, pa.int64()))  # (a copy: the views need columns that start at 0)
        try:
            problems = value_problems(ColumnViews(chosen, store.manifest.targets), store.manifest)
        except (pa.ArrowInvalid, StoreError) as e:
            raise StoreError(f"{store.url}/{self.commit.arrow_path}: {e}") from None
        if problems:
            raise StoreError(f"{store.url}: shard {self.name}: {problems[0]}")
        ids = store._ids_batch(self.name)
        listed = ids.column(0).take(pa.array(rows, pa.int64())).to_pylist()
        for row, record_id, listed_id, key in zip(rows, chosen.column("id").to_pylist(), listed,
                                                  id_keys(listed).tolist(), strict=True):
            if listed_id != record_id:
                raise StoreError(f"{store.url}/{self.commit.ids_path}: ids file differs from the records' ids at "
                                 f"row {row} ({listed_id!r}, record {record_id!r})")
            if ids.column(1)[row].as_py() != key:
                raise StoreError(f"{store.url}/{self.commit.ids_path}: ids file's key of id {listed_id!r} (row {row}) "
                                 "is not its id's key")
        self._rows_checked.update(rows)

    @property
    def num_records(self) -> int:
        return self.commit.records

    @cached_property
    def ids(self) -> list[str]:
        if self._pieces is not None:  # by record: the ids file (checked whole) holds them, row for row
            return self.store.shard_ids(self.name).to_pylist()
        return self.views.batch.column("id").to_pylist()

    def record(self, row: int, *, with_hidden: bool = False) -> Record:
        rec = self.views.record(row)
        if with_hidden:
            rec.hidden = {layer.index: self.hidden(row, layer.index) for layer in self.store.manifest.hidden.layers}
        return rec

    def __iter__(self) -> Iterator[Record]:
        for row in range(self.num_records):
            yield self.record(row)

    def hidden_rows(self, row: int) -> tuple[int, int]:
        start = int(self.views.token_offset[row])
        n = int(self.views.tok_off[row + 1] - self.views.tok_off[row])
        return start, start + n - int(self.views.hidden_start[row])

    def hidden(self, row: int, layer: int, out: np.ndarray | None = None) -> np.ndarray:
        """Record `row`'s hidden states at a stored layer, as stored; see `hidden_block` for `out`."""
        a, b = self.hidden_rows(row)
        return self.hidden_block(layer, a, b, out)

    def hidden_block(self, layer: int, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, stop) of a stored layer's array, as stored (float16, or bfloat16 bits in uint16).

        Returns a new array, or fills and returns `out` (C-contiguous, [rows, width], the stored
        dtype), e.g. a slice of a loader's batch tensor, saving a copy.
        """
        return self._hidden_array(layer).read(start, stop, out)

    def check_hidden(self, row: int, layer: int) -> None:
        """With `verify_reads`: check the inner chunks record `row`'s states of `layer` lie in, now."""
        self._hidden_array(layer).check_rows(*self.hidden_rows(row))

    def _hidden_array(self, layer: int) -> HiddenArray:
        array = self._hidden_arrays.get(layer)
        if array is None:
            spec = self.store.manifest.hidden.layer(layer)
            rel = f"{self.commit.hidden_path}/{spec.array_name}"
            where = f"{self.store.url}/{rel}"
            group = self._zarr_group()
            try:
                zarray = group[spec.array_name]
            except Exception as e:  # zarr's own errors for a damaged array (its metadata checked first above)
                raise StoreError(f"{where}: hidden states unreadable ({type(e).__name__}: {e})") from None
            listed = self._files.get(f"{rel}/{DATA_KEY}")
            if listed is None and self.commit.hidden_rows and self.store.verify_reads:
                raise StoreError(f"{where}/{DATA_KEY}: not in its commit record commits/{self.name}.json")
            array = HiddenArray(zarray, self.store.path(rel), where, self.store.fs, is_local(self.store.fs), spec.dtype,
                                listed.bytes if listed is not None else None,
                                _VERIFIED if self.store.verify_reads else None)
            self._hidden_arrays[layer] = array
        return array

    def _verify_metadata(self) -> None:
        """With `verify_reads`: the shard's Zarr metadata files (the group's and each array's
        zarr.json) against the sha256 its commit record lists, once per process, before zarr parses
        them: a damaged one would otherwise be a parser's traceback, or read as good."""
        prefix = self.commit.hidden_path + "/"
        for rel, entry in self._files.items():
            if not (rel.startswith(prefix) and rel.endswith("zarr.json")):
                continue
            path = self.store.path(rel)
            if (path, entry.sha256) in _VERIFIED:
                continue
            where = f"{self.store.url}/{rel}"
            try:
                data = read_bytes(self.store.fs, path)
            except FileNotFoundError:
                raise StoreError(f"{where}: shard file is missing") from None
            _check_digest(data, entry, where)
            _VERIFIED.add((path, entry.sha256))

    def _zarr_group(self) -> Any:
        if self._group is None:
            if self.store.verify_reads:
                self._verify_metadata()
            path = self.store.path(self.commit.hidden_path)
            try:
                if is_local(self.store.fs):
                    zstore: Any = zarr.storage.LocalStore(path, read_only=True)
                else:
                    zstore = zarr.storage.FsspecStore.from_url(
                        unstrip(self.store.fs, path), storage_options=self.store.storage_options, read_only=True
                    )
                self._group = zarr.open_group(store=zstore, mode="r")
            except Exception as e:  # zarr raises many types for a damaged or missing group (its metadata checked first above)
                raise StoreError(f"{self.store.url}/{self.commit.hidden_path}: hidden states unreadable "
                                 f"({type(e).__name__}: {e})") from None
        return self._group


def decode_hidden(arr: np.ndarray, dtype: str) -> np.ndarray:
    """Stored hidden states as float32 (bfloat16 bits widen exactly)."""
    if dtype == "bfloat16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32)
