"""Arrow and numpy helpers of the store's columns (docs/reference/store-format.md §4): list columns built from
flat arrays and read back as zero-copy views, the tail's two forms, and the value checks that
the writer, `verify` and the loader share. Below the target kinds and the records that use them.

`manifest` arguments are `store.manifest.StoreManifest`s (typed loosely: that module is above this one).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from potstill.store.errors import StoreError


def mass_of_log(tail_logprob: np.ndarray) -> np.ndarray:
    """exp of a log tail, in float64 rounded once to float32 (how the `tail_mass` column is derived)."""
    return np.exp(np.asarray(tail_logprob, dtype=np.float64)).astype(np.float32)


# Log-probs are ≤ 0; the rounding of a log-softmax may leave a value a hair above 0.
LOGPROB_SLACK = 1e-3


def unsound_logprobs(lp: np.ndarray) -> np.ndarray:
    """Mask of log-probs that no distribution has: NaN, +inf, or above 0 (−inf is a probability of 0)."""
    lp = np.asarray(lp, dtype=np.float32)
    return np.isnan(lp) | (lp > LOGPROB_SLACK)


# Rows of top-k targets checked at a time: the temporaries of a block stay in the CPU's cache (a whole
# shard's would be hundreds of MB of fresh memory per check, several times slower).
CHECK_BLOCK = 8192


def _by_blocks(rows: int, check: Any) -> np.ndarray:
    """[rows] mask: `check(lo, hi)` of every block of CHECK_BLOCK rows, joined."""
    return np.concatenate([check(lo, min(lo + CHECK_BLOCK, rows)) for lo in range(0, rows, CHECK_BLOCK)] or
                          [np.zeros(0, dtype=bool)])


def unsound_topk(ids: np.ndarray, lp: np.ndarray, vocab: int) -> np.ndarray:
    """[S] mask of top-k rows with an id outside [0, vocab) (−1 marks an empty slot) or a log-prob
    that is not a finite value ≤ 0 where the slot holds an id, and not −inf where it is empty."""

    def check(lo: int, hi: int) -> np.ndarray:
        block_ids = ids[lo:hi]
        block_lp = np.asarray(lp[lo:hi], dtype=np.float32)  # exact for float16, whose arithmetic numpy emulates slowly
        # ids in [-1, vocab) are exactly those with id + 1 in [0, vocab + 1) as unsigned numbers
        bad = block_ids.astype(np.uint32) + np.uint32(1) >= np.uint32(vocab + 1)
        # an empty slot must hold −inf; one with an id a value ≤ 0 (up to the slack), not −inf; NaN nowhere
        bad |= (block_ids == -1) != (block_lp == -np.inf)
        bad |= ~(block_lp <= LOGPROB_SLACK)
        return _any_rows(bad)

    return _by_blocks(len(ids), check)


def _any_rows(mask: np.ndarray) -> np.ndarray:
    """mask.any(-1), eight bytes at a time where the rows allow it."""
    if mask.ndim == 2 and mask.shape[1] % 8 == 0 and mask.flags.c_contiguous:
        return mask.view(np.uint64).any(-1)
    return mask.any(-1)


def _largest_float16_at_most(x: float) -> int:
    f = np.float16(x)
    if float(f) > x:
        f = np.nextafter(f, np.float16(-np.inf))
    return int(np.array(f).view(np.int16))


_F16_SLACK_BITS = _largest_float16_at_most(float(np.float32(LOGPROB_SLACK)))


def surely_sound_topk(ids: np.ndarray, lp: np.ndarray, vocab: int) -> bool:
    """True only where `unsound_topk` flags no row, in a few whole-array reductions (the writer's fast
    path): every id in [0, vocab) (no empty slot) and every log-prob finite and ≤ the slack. float16
    log-probs are checked on their bits, which order like the values among non-negative ones. False
    means only that the full check must decide."""
    if ids.size == 0:
        return True
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        return False
    if lp.dtype == np.float16:
        bits = lp.view(np.int16)
        return int((bits & 0x7FFF).max()) < 0x7C00 and int(bits.max()) <= _F16_SLACK_BITS
    return bool(np.isfinite(lp).all()) and float(lp.max()) <= LOGPROB_SLACK


# What a float32 log-softmax's own rounding may add to a distribution's total mass, over a top-K and tail.
MASS_SLACK = 1e-4


def impossible_topk(ids: np.ndarray, lp: np.ndarray, lp_error: np.ndarray | float, tail_logprob: np.ndarray,
                    clipped: float | None = None, rel_error: float = 0.0) -> list[tuple[str, np.ndarray]]:
    """[S] masks of top-k rows that no distribution has (format §4), each with what is wrong: an id
    in two slots, log-probs rising (the top-K is by descending probability), or more mass than 1.

    `lp_error` + |lp| · `rel_error` bounds how far a stored log-prob may lie above the true one
    (float16's rounding: `float_rounding_unit`, the quantiser's), so the mass checked,
    Σ exp(lp − that) + the tail's, is a lower bound of the true one. `clipped`: the quantiser's
    floor; a slot there may hold any smaller value, so it adds nothing to that bound."""
    tail = np.asarray(tail_logprob, dtype=np.float64)
    per_row = isinstance(lp_error, np.ndarray) and lp_error.ndim > 0

    def check(lo: int, hi: int) -> np.ndarray:  # [rows, 3]: repeated, rising, too much
        lp32 = np.asarray(lp[lo:hi], dtype=np.float32)  # exact for float16 and float32 log-probs
        err = lp_error[lo:hi] if per_row else lp_error  # type: ignore[index]
        ordered = np.sort(ids[lo:hi], axis=-1)
        out = np.zeros((hi - lo, 3), dtype=bool)
        out[:, 0] = ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any(-1)
        with np.errstate(invalid="ignore", over="ignore"):
            out[:, 1] = (lp32[:, 1:] > lp32[:, :-1]).any(-1)
            # The mass in float32 first: at or above the float64 bound up to far less than half the
            # slack, so only the rows it puts above 1 + MASS_SLACK / 2 need the float64 bound.
            low = lp32 * np.float32(1 + rel_error)  # lp − |lp| · rel_error where lp ≤ 0, more above
            if per_row or err:
                low -= np.asarray(err, dtype=np.float32)
            if clipped is not None:
                low[lp32 <= clipped] = -np.inf
            t = tail[lo:hi]
            screen = np.exp(low, out=low).sum(-1) + np.exp(t.astype(np.float32))
            rows = np.flatnonzero(screen > 1 + MASS_SLACK / 2)
            if len(rows):
                lp64 = lp32[rows].astype(np.float64)
                e = (err[rows] if per_row else err) + np.abs(lp64) * rel_error
                low64 = lp64 - e if clipped is None else np.where(lp64 <= clipped, -np.inf, lp64 - e)
                out[rows, 2] = np.exp(low64).sum(-1) + np.exp(t[rows] - np.abs(t[rows]) * 2.0**-24) > 1 + MASS_SLACK
        return out

    blocks = [check(lo, min(lo + CHECK_BLOCK, len(tail))) for lo in range(0, len(tail), CHECK_BLOCK)]
    masks = np.concatenate(blocks) if blocks else np.zeros((0, 3), dtype=bool)
    too_much = masks[:, 2]
    stored = np.exp(np.asarray(lp[too_much], dtype=np.float64)).sum(-1) + np.exp(tail[too_much])
    worst = float(stored.max()) if stored.size else 0.0
    return [("a top-k id is in two slots of one position", masks[:, 0]),
            ("top-k log-probs are not in descending order", masks[:, 1]),
            (f"top-k and tail probabilities sum to {worst:.4g} (more than 1 beyond their rounding)", too_much)]


def float_rounding_unit(dtype: np.dtype) -> float:
    """How far a stored float16 / float32 log-prob may lie from the value it rounds, relative to it (half an ulp)."""
    return 2.0**-11 if dtype == np.float16 else 2.0**-24


def float_rounding(lp: np.ndarray) -> np.ndarray:
    """How far a stored float16 / float32 log-prob may lie from the value it rounds (half an ulp)."""
    with np.errstate(invalid="ignore"):
        return np.abs(lp.astype(np.float64)) * float_rounding_unit(lp.dtype)


def unsound_tail_mass(tail: np.ndarray) -> np.ndarray:
    return ~((tail >= 0) & (tail <= 1))  # NaN too


def unsound_log_tail(tail_logprob: np.ndarray) -> np.ndarray:
    return ~(np.asarray(tail_logprob) <= 0)  # NaN too; −inf (an empty tail) is a log-probability


def input_vocab(manifest: Any) -> int:
    """Token ids a sequence may hold: the teacher may generate ids of a padded embedding matrix."""
    return max(manifest.teacher.vocab_size or 0, manifest.tokenizer.vocab_size, 1)


def target_vocab(manifest: Any) -> int:
    """Ids a target may hold: below 2**id_bits in a packed store, else below the larger of the
    teacher's and the tokenizer's vocabulary (a teacher may pad its embedding matrix)."""
    if manifest.targets.packed:
        return 1 << int(manifest.targets.id_bits or 0)
    return max(manifest.teacher.vocab_size or 0, manifest.tokenizer.vocab_size, 1)


def first_bad_row(offsets: np.ndarray, bad: np.ndarray) -> int:
    """The record (row of the shard) holding the first true entry of a flat per-position mask."""
    return int(np.searchsorted(offsets, int(np.flatnonzero(bad)[0]), side="right") - 1)


def list_array(values: np.ndarray, lengths: list[int], inner: int | None = None) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = pa.array(values.reshape(-1))
    if inner is not None:
        flat = pa.FixedSizeListArray.from_arrays(flat, inner)
    return pa.ListArray.from_arrays(pa.array(offsets), flat)


def offsets_array(lengths: list[int] | np.ndarray) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.array(offsets)


def concat(arrays: list[np.ndarray], dtype: np.dtype, tail_shape: tuple[int, ...] = ()) -> np.ndarray:
    """The arrays end to end (a column's values), in memory from Arrow's pool: a shard's columns are
    allocated again for every shard, and the pool keeps its pages where numpy's allocator hands
    large blocks back to the system and then pays a page fault for every 4 KB of the next one."""
    if not arrays:
        return np.zeros((0, *tail_shape), dtype=dtype)
    kind = np.result_type(*arrays)
    shape = (sum(len(a) for a in arrays), *arrays[0].shape[1:])
    out = np.frombuffer(pa.allocate_buffer(int(np.prod(shape)) * kind.itemsize), dtype=kind).reshape(shape)
    return np.concatenate(arrays, out=out)


def bytes_column(data: np.ndarray, offsets: np.ndarray) -> pa.Array:
    """One list<uint8> row per record from the records' byte streams laid end to end (record r's is
    data[offsets[r]:offsets[r + 1]])."""
    return pa.ListArray.from_arrays(pa.array(np.asarray(offsets, dtype=np.int32)), pa.array(data))


def numpy_view(arr: pa.Array) -> np.ndarray:
    """A zero-copy numpy view of a primitive Arrow array without nulls. pyarrow's own `to_numpy`
    imports pandas on its first call, 0.5 s in every loader process before its first batch."""
    if arr.null_count:
        raise StoreError(f"a {arr.type} column has nulls")
    dtype = np.dtype(_NUMPY_TYPES[arr.type.id])
    return np.frombuffer(arr.buffers()[1], dtype=dtype, count=len(arr), offset=arr.offset * dtype.itemsize)


_NUMPY_TYPES = {pa.type_for_alias(name).id: name for name in
                ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32", "float64")}


def flat(batch: pa.RecordBatch, name: str, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, values) of a list column as zero-copy numpy views; `width`: values are
    fixed_size_list rows, returned as [rows, width]."""
    col = batch.column(name)
    if col.offset != 0 or col.null_count:
        raise StoreError(f"column {name} is sliced or has nulls")
    offsets = numpy_view(col.offsets)
    values = col.values
    if width is not None:
        values = values.values
    arr = numpy_view(values)
    if width is not None:
        arr = arr.reshape(-1, width)
    return offsets, arr
