"""Hidden states on disk (docs/reference/store-format.md §5): one Zarr v3 array per stored layer per
shard, stored as a single Zarr shard, so one data file (`<layer>/c/0/0`) per layer per shard.

The data file is laid out as zarr's sharding codec writes it: the inner chunks of `chunk_tokens`
rows in order from offset 0, each the raw little-endian bytes of a C-order [chunk_tokens, width]
block followed by its crc32c (4 bytes, little-endian), then the shard index at the end
(offset, nbytes as little-endian uint64 per inner chunk, then the index's own crc32c). potstill
writes and reads that layout directly rather than through zarr: zarr's per-call overhead and whole
chunk decoding cost 10-20x for one record, and its shard writes hold the whole shard (GBs) in memory.
Plain zarr-python reads the same arrays with `zarr.open_array(...)[:]`.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation
from zarr.core.chunk_grids import RegularChunkGrid

from potstill.store.errors import StoreError
from potstill.store.manifest import HiddenLayer
from potstill.store.pieces import crc32c_of
from potstill.store.records import hidden_problem

DATA_KEY = "c/0/0"  # the key of an array's one shard (default chunk key encoding, "/" separator)
CRC = 4  # bytes of a crc32c after each inner chunk and after the index
_EMPTY = 2**64 - 1  # an index entry of an inner chunk that was not written (zarr: fill value only)


def stored_dtype(dtype: str) -> str:
    """The Zarr data type of a layer's array: bfloat16, which Zarr v3 has no core type for, as its bits."""
    return "float16" if dtype == "float16" else "uint16"


def crc32c(data: Any) -> bytes:
    """The crc32c of a buffer as Zarr's crc32c codec stores it: 4 bytes, little-endian."""
    return crc32c_of(data).to_bytes(4, "little")


@dataclass(frozen=True)
class Layout:
    """Where everything lies in one layer's data file, from the row count alone."""

    rows: int
    width: int
    chunk_rows: int
    itemsize: int = 2

    @property
    def row_bytes(self) -> int:
        return self.width * self.itemsize

    @property
    def chunks(self) -> int:
        return math.ceil(self.rows / self.chunk_rows)

    @property
    def chunk_bytes(self) -> int:
        """An inner chunk's data, without its crc32c (the last one full size too, padded with 0s)."""
        return self.chunk_rows * self.row_bytes

    @property
    def stride(self) -> int:
        return self.chunk_bytes + CRC

    @property
    def index_bytes(self) -> int:
        return 16 * self.chunks + CRC

    @property
    def file_bytes(self) -> int:
        return self.chunks * self.stride + self.index_bytes if self.chunks else 0

    def index(self) -> bytes:
        """The shard index of a file holding every inner chunk in order, with its crc32c."""
        table = np.empty((self.chunks, 2), dtype="<u8")
        table[:, 0] = np.arange(self.chunks, dtype=np.uint64) * self.stride
        table[:, 1] = self.stride
        raw = table.tobytes()
        return raw + crc32c(raw)

    def rows_of(self, chunk: int) -> str:
        return f"rows {chunk * self.chunk_rows}-{min(self.rows, (chunk + 1) * self.chunk_rows) - 1}"


# -- writing ---------------------------------------------------------------------------------------
class HiddenShardWriter:
    """The Zarr group of one shard, its layers' data files streamed as records arrive.

    Rows are buffered until a whole inner chunk is ready, which is appended to its layer's data
    file (with its crc32c) at once, so memory holds at most one chunk per layer however large the
    shard. Each file is hashed on the way, so the commit needs no second read. `finish()` writes
    the last, padded chunk and the index, then zarr writes the metadata (the group's at once, each
    array's once the row count is known). For a remote store the group is staged in a local folder
    and uploaded at commit.
    """

    def __init__(self, layers: list[HiddenLayer], chunk_tokens: int, local_dir: str) -> None:
        self.layers = {layer.index: layer for layer in layers}
        self.chunk = chunk_tokens
        self.local_dir = local_dir
        self.group = zarr.open_group(store=zarr.storage.LocalStore(local_dir), mode="w")
        self.pending: dict[int, list[np.ndarray]] = {index: [] for index in self.layers}
        self.pending_rows = 0
        self.rows = 0
        self._files: dict[int, BinaryIO] = {}
        self._hashes: dict[int, Any] = {index: hashlib.sha256() for index in self.layers}
        self.digests: dict[str, tuple[str, int]] = {}  # file path relative to the group -> (sha256, bytes)

    def add(self, hidden: dict[int, np.ndarray], rows: int) -> None:
        for index, arr in hidden.items():
            self.pending[index].append(arr)
        self.pending_rows += rows
        self.rows += rows
        if self.pending_rows >= self.chunk:
            self._flush(whole_chunks_only=True)

    def _flush(self, whole_chunks_only: bool) -> None:
        take = (self.pending_rows // self.chunk) * self.chunk if whole_chunks_only else self.pending_rows
        if take == 0:
            return
        for index, parts in self.pending.items():
            block = np.concatenate(parts) if len(parts) > 1 else parts[0]
            for start in range(0, take, self.chunk):
                self._write_chunk(self.layers[index], block[start : min(take, start + self.chunk)])
            rest = block[take:]
            self.pending[index] = [rest] if len(rest) else []
        self.pending_rows -= take

    def _write_chunk(self, layer: HiddenLayer, rows: np.ndarray) -> None:
        if len(rows) < self.chunk:
            padded = np.zeros((self.chunk, layer.width), dtype=rows.dtype)  # 0 is the arrays' fill value
            padded[: len(rows)] = rows
            rows = padded
        data = memoryview(np.ascontiguousarray(rows, dtype=rows.dtype.newbyteorder("<"))).cast("B")
        self._append(layer, data)
        self._append(layer, crc32c(data))

    def _append(self, layer: HiddenLayer, data: Any) -> None:
        f = self._files.get(layer.index)
        if f is None:
            path = os.path.join(self.local_dir, layer.array_name, *DATA_KEY.split("/"))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            f = self._files[layer.index] = open(path, "wb")  # noqa: SIM115 (open until finish())
        f.write(data)
        self._hashes[layer.index].update(data)

    def finish(self) -> None:
        """Write the last, partial chunk and each file's index, then the arrays' metadata."""
        self._flush(whole_chunks_only=False)
        for layer in self.layers.values():
            layout = Layout(self.rows, layer.width, self.chunk)
            if layout.chunks:
                self._append(layer, layout.index())
                self._files.pop(layer.index).close()
                rel = f"{layer.array_name}/{DATA_KEY}"
                self.digests[rel] = (self._hashes[layer.index].hexdigest(), layout.file_bytes)
            self.group.create_array(
                layer.array_name,
                shape=(self.rows, layer.width),
                chunks=(self.chunk, layer.width),
                shards=(max(1, layout.chunks) * self.chunk, layer.width),  # one shard: the whole array
                dtype=stored_dtype(layer.dtype),
                serializer=BytesCodec(endian="little"),
                compressors=[Crc32cCodec()],
                fill_value=0,
                chunk_key_encoding={"name": "default", "separator": "/"},
                attributes={"potstill_dtype": layer.dtype, "layer": layer.index, "post_norm": layer.post_norm},
            )

    def close(self) -> None:
        """Close files left open by a shard that is abandoned before `finish()`."""
        for f in self._files.values():
            f.close()
        self._files.clear()

    def files(self) -> list[tuple[str, str]]:
        """(absolute local path, path relative to the group) of every file, sorted."""
        out = []
        for dirpath, _, names in os.walk(self.local_dir):
            for name in names:
                full = os.path.join(dirpath, name)
                out.append((full, os.path.relpath(full, self.local_dir).replace(os.sep, "/")))
        return sorted(out, key=lambda x: x[1])


# -- reading ---------------------------------------------------------------------------------------
def layout_problem(array: Any, chunk_rows: int | None = None) -> str | None:
    """Why a Zarr array is not laid out as format §5 says, in words, or None: v3, 2-D, one shard
    holding the whole array, inner chunks of whole rows (`chunk_rows` of them, when given) with the
    codecs `bytes` (little-endian) and `crc32c`, the index at the end with the same codecs."""
    md = array.metadata
    if getattr(md, "zarr_format", None) != 3 or len(array.shape) != 2:
        return "not a 2-D Zarr v3 array"
    codecs = tuple(md.codecs)
    if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec) or not isinstance(md.chunk_grid, RegularChunkGrid):
        return "not one sharded array"
    sharding = codecs[0]
    rows, width = array.shape
    shard, inner = tuple(md.chunk_grid.chunk_shape), tuple(sharding.chunk_shape)
    plain = (BytesCodec(endian="little"), Crc32cCodec())
    if (inner[1] != width or shard[1] != width or shard[0] < rows or shard[0] % inner[0]
            or tuple(sharding.codecs) != plain or tuple(sharding.index_codecs) != plain
            or sharding.index_location != ShardingCodecIndexLocation.end or md.storage_transformers
            or np.dtype(array.dtype).itemsize != 2):
        return "not laid out as one shard of whole-row chunks with the codecs bytes (little-endian) and crc32c"
    if chunk_rows is not None and inner[0] != chunk_rows:
        return f"inner chunks of {inner[0]} rows, the manifest says {chunk_rows}"
    return None


class HiddenArray:
    """One stored layer of one shard, read by row ranges straight from its data file.

    The shard index is read once; then a record's rows, which lie in consecutive inner chunks, are
    one ranged read (`preadv` on a local disk, the inner chunks' crc32c going to a scratch buffer;
    one ranged GET on a remote store). With `verified` (training readers), each inner chunk is read
    whole once per process before rows of it are used, and refused unless its crc32c matches and
    its values are finite; the chunk last checked is kept, so its rows are not read twice.
    """

    def __init__(self, array: Any, path: str, where: str, fs: Any, local: bool, dtype: str,
                 listed_bytes: int | None, verified: set | None = None) -> None:
        problem = layout_problem(array)
        if problem is not None:
            raise StoreError(f"{where}: hidden states {problem} (format §5)")
        if sys.byteorder != "little":
            raise StoreError("reading hidden states needs a little-endian machine")
        self.array = array
        self.rows, self.width = array.shape
        self.dtype = np.dtype(array.dtype)
        self.chunk_rows = array.metadata.codecs[0].chunk_shape[0]
        self.layout = Layout(self.rows, self.width, self.chunk_rows, self.dtype.itemsize)
        self.path = f"{path}/{DATA_KEY}"
        self.where = f"{where}/{DATA_KEY}"
        self.fs, self.local, self.potstill_dtype = fs, local, dtype
        self.verified = verified
        self._checked: tuple[int, np.ndarray] | None = None  # (chunk, its rows) as the check read them
        self._file: BinaryIO | None = None
        self.offsets = self._read_index(listed_bytes) if self.layout.chunks else np.zeros(0, dtype=np.uint64)

    def _read_index(self, listed_bytes: int | None) -> np.ndarray:
        """Each inner chunk's offset in the file (`_EMPTY` where it was not written)."""
        layout = self.layout
        try:
            size = os.stat(self.path).st_size if self.local else int(self.fs.size(self.path))
        except FileNotFoundError:
            raise StoreError(f"{self.where}: shard file is missing") from None
        if listed_bytes is not None and size != listed_bytes:
            raise StoreError(f"{self.where}: has {size} bytes, the store lists {listed_bytes} (truncated?)")
        if size < layout.index_bytes:
            raise StoreError(f"{self.where}: has {size} bytes, too few for its index (truncated?)")
        raw = self._read_bytes(size - layout.index_bytes, layout.index_bytes)
        if crc32c(raw[:-CRC]) != raw[-CRC:]:
            raise StoreError(f"{self.where}: its shard index fails its crc32c check (corrupted bytes)")
        table = np.frombuffer(raw[:-CRC], dtype="<u8").reshape(layout.chunks, 2)
        written = table[:, 0] != _EMPTY
        if (np.any(table[written, 1] != layout.stride)
                or np.any(table[written, 0] > size - layout.index_bytes - layout.stride)):
            raise StoreError(f"{self.where}: its shard index does not match format §5 ({layout.chunks} inner "
                             f"chunks of {layout.stride} bytes)")
        return table[:, 0].copy()

    def _read_bytes(self, offset: int, n: int) -> bytes:
        if self.local:
            with open(self.path, "rb") as f:
                f.seek(offset)
                data = f.read(n)
        else:
            data = self.fs.cat_file(self.path, start=offset, end=offset + n)
        if len(data) != n:
            raise StoreError(f"{self.where}: is truncated")
        return data

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        start, stop, _ = slice(start, stop).indices(self.rows)  # clamp like numpy slicing
        stop = max(start, stop)
        if out is None:
            out = np.empty((stop - start, self.width), dtype=self.dtype)
        elif out.shape != (stop - start, self.width) or out.dtype != self.dtype or not out.flags.c_contiguous:
            raise ValueError(
                f"out must be a C-contiguous {self.dtype} array of shape {(stop - start, self.width)}, "
                f"got {out.dtype} {out.shape}"
            )
        self.check_rows(start, stop)
        runs: list[tuple[int, list[memoryview]]] = []  # (file offset, buffers): one read each
        end_of_run = -1
        pos = start
        while pos < stop:
            chunk, first = divmod(pos, self.chunk_rows)
            end = min(stop, (chunk + 1) * self.chunk_rows)
            rows = out[pos - start : end - start]
            pos = end
            if self._checked is not None and self._checked[0] == chunk:  # read (and checked) just now
                rows[...] = self._checked[1][first : first + len(rows)]
                end_of_run = -1
                continue
            base = int(self.offsets[chunk])
            if base == _EMPTY:  # zarr leaves chunks that hold only the fill value unwritten
                rows[...] = 0
                end_of_run = -1
                continue
            offset = base + first * self.layout.row_bytes
            dest = memoryview(rows.reshape(-1).view(np.uint8))
            if end_of_run >= 0 and 0 <= offset - end_of_run <= CRC:  # the next chunk, past the crc32c
                runs[-1][1].extend([memoryview(bytearray(offset - end_of_run)), dest])
            else:
                runs.append((offset, [dest]))
            end_of_run = offset + len(dest)
        for offset, buffers in runs:
            self._read_into(offset, buffers)
        return out

    def _read_into(self, offset: int, buffers: list[memoryview]) -> None:
        total = sum(len(b) for b in buffers)
        if not self.local:
            data = memoryview(self._read_bytes(offset, total))
            for b in buffers:
                b[:], data = data[: len(b)], data[len(b) :]
            return
        if self._file is None:  # kept open: one open per array, not per read (a committed file never changes)
            try:
                self._file = open(self.path, "rb", buffering=0)  # noqa: SIM115 (closed with the array)
            except FileNotFoundError:
                raise StoreError(f"{self.where}: shard file is missing") from None
        fd = self._file.fileno()
        done = 0
        while buffers:
            n = os.preadv(fd, buffers, offset + done)
            if n == 0:
                raise StoreError(f"{self.where}: is truncated")
            done += n
            while buffers and n >= len(buffers[0]):  # drop what is filled, keep reading the rest
                n -= len(buffers.pop(0))
            if n:
                buffers[0] = buffers[0][n:]

    def check_rows(self, start: int, stop: int) -> None:
        """With `verified`: check every inner chunk rows [start, stop) lie in that this process has
        not checked yet, keeping the last one read."""
        if self.verified is None:
            return
        for chunk in range(start // self.chunk_rows, -(-stop // self.chunk_rows)):
            key = (self.path, chunk)
            base = int(self.offsets[chunk])
            if key in self.verified or base == _EMPTY:
                continue
            data = self._read_bytes(base, self.layout.stride)
            problem = chunk_problem(data, self.potstill_dtype)
            if problem is not None:
                raise StoreError(f"{self.where}: inner chunk {chunk} ({self.layout.rows_of(chunk)}) {problem}")
            self.verified.add(key)
            rows = np.frombuffer(data, dtype=self.dtype.newbyteorder("<"), count=self.chunk_rows * self.width)
            self._checked = (chunk, rows.reshape(self.chunk_rows, self.width))


def chunk_problem(data: bytes | memoryview, dtype: str) -> str | None:
    """What is wrong with an encoded inner chunk (its data, then its crc32c), in words, or None."""
    if crc32c(data[:-CRC]) != bytes(data[-CRC:]):
        return "fails its crc32c check (corrupted bytes)"
    problem = hidden_problem(data[:-CRC], dtype)
    return None if problem is None else f"holds {problem}"


# -- verifying -------------------------------------------------------------------------------------
def scan_data_file(read: Callable[[int], bytes], layout: Layout, dtype: str, digest: Any) -> tuple[int, str | None]:
    """Read a layer's data file once from its start, feeding `digest` (a hashlib object); returns the
    bytes read and the first thing wrong inside it (an inner chunk's crc32c or values, the index),
    in words, or None. Inner chunks are read one at a time, so memory stays at one chunk."""
    size, problem = 0, None
    for chunk in range(layout.chunks):
        data = read(layout.stride)
        digest.update(data)
        size += len(data)
        if len(data) < layout.stride:
            return size, problem
        if problem is None and (why := chunk_problem(data, dtype)) is not None:
            problem = f"inner chunk {chunk} ({layout.rows_of(chunk)}) {why}"
    index = read(layout.index_bytes)
    digest.update(index)
    size += len(index)
    if problem is None and len(index) == layout.index_bytes and index != layout.index():
        problem = "its shard index does not match format §5 (inner chunks in order, each followed by its crc32c)"
    while block := read(1 << 20):  # whatever lies beyond the index (the size check names it)
        digest.update(block)
        size += len(block)
    return size, problem
