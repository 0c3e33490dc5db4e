"""The pieces file of a shard (docs/reference/store-format.md §3.1): the sha256 of consecutive byte
pieces of its `records.arrow`, so that a reader can check the bytes of the records it reads before
it has hashed the whole file (a training loader's first batch), and `PieceChecks`, which does so.

The pieces tile the file: a head (the bytes before the record batch's first body buffer: magic,
schema, batch metadata), the body in PIECE_BYTES pieces, a tail (the bytes after its last body
buffer: padding, footer). A reader checks the head and tail before Arrow parses them, then, per
record, the pieces that hold the record's bytes of every column.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Callable

import numpy as np
import pyarrow as pa

from potstill.store.errors import StoreError

PIECES_FILE = "pieces.arrow"
PIECE_BYTES = 1 << 16  # body pieces: a few records of top-64 targets, tens of sampled ones
_SCHEMA = pa.schema([pa.field("offset", pa.uint64(), nullable=False),
                     pa.field("sha256", pa.binary(32), nullable=False)])


def body_bounds(data: memoryview | pa.Buffer) -> tuple[int, int] | None:
    """(first, last + 1) byte of the record batch's body buffers in an Arrow IPC file's bytes, or None
    when the file holds other than one record batch (then it is checked only whole)."""
    buffer = data if isinstance(data, pa.Buffer) else pa.py_buffer(data)
    reader = pa.ipc.open_file(buffer)
    if reader.num_record_batches != 1:
        return None
    batch = reader.get_batch(0)
    # (`buffers()` lists a column's buffers and its children's)
    spans = [(b.address, b.address + b.size) for col in batch.columns for b in col.buffers() if b is not None and b.size]
    if not spans:
        return None
    base = buffer.address
    return min(s for s, _ in spans) - base, max(e for _, e in spans) - base


def piece_starts(size: int, body: tuple[int, int] | None) -> list[int]:
    """Where each piece of a file of `size` bytes begins: the head, the body in PIECE_BYTES pieces, the
    tail (one piece, the whole file, when `body` is None)."""
    if body is None:
        return [0]
    first, last = body
    return sorted({0, *range(first, last, PIECE_BYTES), last} - {size})


def pieces_file_bytes(data: memoryview, starts: list[int]) -> pa.Buffer:
    """The pieces file of a records file's bytes cut at `starts`: one row per piece, its first byte
    and the sha256 of its bytes."""
    ends = [*starts[1:], len(data)]
    digests = [hashlib.sha256(data[a:b]).digest() for a, b in zip(starts, ends, strict=True)]
    batch = pa.record_batch([pa.array(starts, pa.uint64()), pa.array(digests, pa.binary(32))], schema=_SCHEMA)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, _SCHEMA) as writer:
        writer.write_batch(batch)
    return sink.getvalue()


def read_pieces(buffer: pa.Buffer, where: str, size: int) -> tuple[np.ndarray, list[bytes]]:
    """(starts, sha256 digests) of a pieces file whose own sha256 has been checked, refusing in one line
    one that does not tile a records file of `size` bytes."""
    try:
        table = pa.ipc.open_file(buffer).read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise StoreError(f"{where}: unreadable Arrow file ({e})") from None
    if not table.schema.equals(_SCHEMA):
        raise StoreError(f"{where}: columns are {table.schema.names}, expected offset (uint64), sha256 (binary 32)")
    starts = table.column("offset").to_numpy().astype(np.int64)
    if not len(starts) or starts[0] != 0 or np.any(np.diff(starts) <= 0) or starts[-1] >= size:
        raise StoreError(f"{where}: its pieces do not tile records.arrow ({size} bytes)")
    return starts, table.column("sha256").to_pylist()


class PieceChecks:
    """The pieces of one records file checked so far in this process, and the checks of byte ranges of
    it (by address in its memory map, or buffer) against the pieces file."""

    def __init__(self, data: pa.Buffer, starts: np.ndarray, digests: list[bytes], where: str) -> None:
        self.data, self.where = data, where
        self.starts: list[int] = starts.tolist()
        self.ends = [*self.starts[1:], data.size]
        self.digests = digests
        self.passed = np.zeros(len(digests), dtype=bool)

    @property
    def head(self) -> int:
        return self.ends[0]

    @property
    def tail(self) -> int:
        return self.starts[-1]

    def check(self, first: int, last: int) -> None:
        """Check the pieces holding bytes [first, last) of the file, each once."""
        if last <= first:
            return
        i = bisect.bisect_right(self.starts, first) - 1
        while i < len(self.starts) and self.starts[i] < last:
            if not self.passed[i]:
                view = memoryview(self.data)[self.starts[i] : self.ends[i]]
                if hashlib.sha256(view).digest() != self.digests[i]:
                    raise StoreError(f"{self.where}: fails its sha256 check (corrupted bytes {self.starts[i]}-"
                                     f"{self.ends[i] - 1} of {self.data.size}, checked before the whole file)")
                self.passed[i] = True
            i += 1

    def check_buffer(self, buffer: pa.Buffer, first: int, last: int) -> None:
        """Check bytes [first, last) of an Arrow buffer lying in the file."""
        at = buffer.address - self.data.address
        self.check(at + first, at + min(last, buffer.size))

    def check_row_buffers(self, array: pa.Array) -> None:
        """Check a column's buffers of one entry per row (validity, offsets, fixed-width values): what
        opening a shard reads of every record (its offsets, `ColumnViews`)."""
        # (validity, then the offsets of a list or string column, or a primitive column's values)
        for buffer in array.buffers()[: 1 if pa.types.is_fixed_size_list(array.type) else 2]:
            if buffer is not None:
                self.check_buffer(buffer, 0, buffer.size)

    def check_rows(self, array: pa.Array, lo: int, hi: int) -> None:
        """Check the bytes rows [lo, hi) of a column use, reading offsets only once their bytes passed."""
        _rows(array, lo, hi, self.check_buffer)


def _rows(array: pa.Array, lo: int, hi: int, check: Callable[[pa.Buffer, int, int], None]) -> None:
    t, buffers = array.type, array.buffers()
    lo, hi = lo + array.offset, hi + array.offset
    if buffers[0] is not None:  # validity bits
        check(buffers[0], lo // 8, (hi + 7) // 8)
    if pa.types.is_fixed_size_list(t):
        _rows(array.values, lo * t.list_size, hi * t.list_size, check)
    elif pa.types.is_list(t) or pa.types.is_string(t) or pa.types.is_binary(t):
        offsets = buffers[1]
        check(offsets, 4 * lo, 4 * (hi + 1))
        bounds = np.frombuffer(offsets, np.int32, count=hi - lo + 1, offset=4 * lo)
        first, last = int(bounds[0]), int(bounds[-1])
        if pa.types.is_list(t):
            _rows(array.values, first, last, check)
        else:
            check(buffers[2], first, last)
    elif (pa.types.is_integer(t) or pa.types.is_floating(t)) and len(buffers) == 2:
        width = t.bit_width // 8
        check(buffers[1], lo * width, hi * width)
    else:  # a type potstill does not write: every byte of the column
        for buffer in buffers:
            if buffer is not None:
                check(buffer, 0, buffer.size)
