"""The pieces file of a shard (docs/reference/store-format.md §3.1): the CRC-32C of every PIECE_BYTES
piece of its `records.arrow`, so that a reader can check the bytes of the records it reads before it
has hashed the whole file (a training loader's first batch), and `PieceChecks`, which does so.

Piece i is bytes [i·PIECE_BYTES, (i+1)·PIECE_BYTES) of the file, the last one shorter. The whole
file's sha256 in the commit record stays the shard's checksum; the pieces only let a reader check
part of the file first. A reader checks the bytes Arrow parses (the file's framing: magic, schema and
batch metadata, footer) before Arrow parses them, then, per record, the pieces that hold the
record's bytes of every column.
"""

from __future__ import annotations

from collections.abc import Callable

import google_crc32c
import numpy as np
import pyarrow as pa

from potstill.store.columns import numpy_view
from potstill.store.errors import StoreError

PIECES_FILE = "pieces.arrow"
PIECE_BYTES = 1 << 16  # a few records of top-64 targets, tens of sampled ones
_SCHEMA = pa.schema([pa.field("crc32c", pa.uint32(), nullable=False)],
                    metadata={"piece_bytes": str(PIECE_BYTES)})


def crc32c_of(data: memoryview | pa.Buffer | bytes, crc: int = 0) -> int:
    """The CRC-32C of `data`, continuing `crc` (that of the bytes before it)."""
    view = np.frombuffer(data, dtype=np.uint8)
    view.flags.writeable = False  # google_crc32c takes read-only buffers only, and bytes() would copy
    return int(google_crc32c.extend(crc, view))


class PieceCrcs:
    """The CRC-32C of each PIECE_BYTES piece of a byte stream given in parts of any size (a file as
    Arrow's IPC writer hands it over)."""

    def __init__(self) -> None:
        self.crcs: list[int] = []
        self._crc = self._fill = 0

    def update(self, data: memoryview) -> None:
        at = 0
        while at < len(data):
            take = min(len(data) - at, PIECE_BYTES - self._fill)
            self._crc = crc32c_of(data[at : at + take], self._crc)
            self._fill += take
            at += take
            if self._fill == PIECE_BYTES:
                self.crcs.append(self._crc)
                self._crc = self._fill = 0

    def finish(self) -> list[int]:
        if self._fill:
            self.crcs.append(self._crc)
            self._crc = self._fill = 0
        return self.crcs


def piece_crcs(data: memoryview) -> list[int]:
    """The CRC-32C of each piece of a whole file's bytes."""
    crcs = PieceCrcs()
    crcs.update(data)
    return crcs.finish()


def pieces_file_bytes(crcs: list[int]) -> pa.Buffer:
    """The pieces file of a records file whose pieces have these CRC-32Cs."""
    batch = pa.record_batch([pa.array(crcs, pa.uint32())], schema=_SCHEMA)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, _SCHEMA) as writer:
        writer.write_batch(batch)
    return sink.getvalue()


def read_pieces(buffer: pa.Buffer, where: str, size: int) -> np.ndarray:
    """The CRC-32Cs of a pieces file whose own sha256 has been checked, refusing in one line one that
    does not cover a records file of `size` bytes piece for piece."""
    try:
        table = pa.ipc.open_file(buffer).read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise StoreError(f"{where}: unreadable Arrow file ({e})") from None
    if table.schema.names != ["crc32c"] or table.schema.field(0).type != pa.uint32():
        raise StoreError(f"{where}: columns are {table.schema.names}, expected crc32c (uint32)")
    piece_bytes = (table.schema.metadata or {}).get(b"piece_bytes")
    if piece_bytes != str(PIECE_BYTES).encode():
        raise StoreError(f"{where}: pieces of {piece_bytes!r} bytes, expected {PIECE_BYTES}")
    if table.num_rows != -(-size // PIECE_BYTES):
        raise StoreError(f"{where}: {table.num_rows} pieces do not cover records.arrow ({size} bytes) "
                         f"in pieces of {PIECE_BYTES}")
    crcs = table.column(0).combine_chunks()
    if crcs.null_count:
        raise StoreError(f"{where}: crc32c holds nulls")
    return numpy_view(crcs)  # (pyarrow's to_numpy imports pandas: 0.2 s)


def body_bounds(data: pa.Buffer) -> tuple[int, int] | None:
    """(first, last + 1) byte of the record batch's body buffers in an Arrow IPC file's bytes, or None
    when the file holds other than one record batch."""
    reader = pa.ipc.open_file(data)
    if reader.num_record_batches != 1:
        return None
    batch = reader.get_batch(0)
    # (`buffers()` lists a column's buffers and its children's)
    spans = [(b.address, b.address + b.size) for col in batch.columns for b in col.buffers() if b is not None and b.size]
    if not spans:
        return None
    return min(s for s, _ in spans) - data.address, max(e for _, e in spans) - data.address


class PieceChecks:
    """The pieces of one records file checked so far in this process, and the checks of byte ranges of
    it (by address in its memory map, or buffer) against the pieces file."""

    def __init__(self, data: pa.Buffer, crcs: np.ndarray, where: str) -> None:
        self.data, self.crcs, self.where = data, crcs, where
        self.passed = np.zeros(len(crcs), dtype=bool)

    def check(self, first: int, last: int) -> None:
        """Check the pieces holding bytes [first, last) of the file, each once."""
        first, last = max(first, 0), min(last, self.data.size)
        if last <= first:
            return
        view = memoryview(self.data)
        for i in range(first // PIECE_BYTES, (last - 1) // PIECE_BYTES + 1):
            if not self.passed[i]:
                a, b = i * PIECE_BYTES, min((i + 1) * PIECE_BYTES, self.data.size)
                if crc32c_of(view[a:b]) != self.crcs[i]:
                    raise StoreError(f"{self.where}: fails its check (corrupted bytes {a}-{b - 1} of {self.data.size})")
                self.passed[i] = True

    def check_all(self) -> None:
        """Check every piece not checked yet: every byte of the file (a training loader's whole check of
        a shard's records file, a quarter of the CPU of its sha256)."""
        self.check(0, self.data.size)

    def check_framing(self) -> None:
        """Check the bytes Arrow parses before it reads any column: the magic, the schema and record
        batch messages' metadata, the footer (Arrow IPC file format). Each length is read only from
        bytes already checked."""
        size = self.data.size
        self.check(0, 16)  # magic (8), the schema message's continuation marker and metadata length
        schema_end = 16 + self._int32(12)
        self.check(0, schema_end + 8)  # ... and the record batch message's
        self.check(0, schema_end + 8 + self._int32(schema_end + 4))
        self.check(size - 10, size)  # footer length and magic
        self.check(size - 10 - self._int32(size - 10), size)

    def _int32(self, at: int) -> int:
        if at < 0 or at + 4 > self.data.size:
            return 0
        return max(int(np.frombuffer(self.data, np.int32, count=1, offset=at)[0]), 0)

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
