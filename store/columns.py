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


def unsound_topk(ids: np.ndarray, lp: np.ndarray, vocab: int) -> np.ndarray:
    """[S] mask of top-k rows with an id outside [0, vocab) (−1 marks an empty slot) or a log-prob
    that is not a finite value ≤ 0 where the slot holds an id, and not −inf where it is empty."""
    lp = np.asarray(lp, dtype=np.float32)
    empty = ids == -1
    bad_ids = (ids < -1) | (ids >= vocab)
    bad_lp = np.where(empty, ~np.isneginf(lp), ~np.isfinite(lp) | (lp > LOGPROB_SLACK))
    return (bad_ids | bad_lp).any(-1)


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
                    clipped: float | None = None) -> list[tuple[str, np.ndarray]]:
    """[S] masks of top-k rows that no distribution has (format §4), each with what is wrong: an id
    in two slots, log-probs rising (the top-K is by descending probability), or more mass than 1.

    `lp_error` bounds how far a stored log-prob may lie above the true one (float16's or the
    quantiser's rounding), so the mass checked, Σ exp(lp − lp_error) + the tail's, is a lower bound of
    the true one. `clipped`: the quantiser's floor; a slot there may hold any smaller value, so it
    adds nothing to that bound."""
    lp = np.asarray(lp, dtype=np.float64)
    tail = np.asarray(tail_logprob, dtype=np.float64)
    ordered = np.sort(ids, axis=-1)
    repeated = ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any(-1)
    with np.errstate(invalid="ignore", over="ignore"):
        rising = (lp[:, 1:] > lp[:, :-1]).any(-1)
        low = lp - lp_error if clipped is None else np.where(lp <= clipped, -np.inf, lp - lp_error)
        too_much = np.exp(low).sum(-1) + np.exp(tail - np.abs(tail) * 2.0**-24) > 1 + MASS_SLACK
    stored = np.exp(lp[too_much]).sum(-1) + np.exp(tail[too_much])
    worst = float(stored.max()) if stored.size else 0.0
    return [("a top-k id is in two slots of one position", repeated),
            ("top-k log-probs are not in descending order", rising),
            (f"top-k and tail probabilities sum to {worst:.4g} (more than 1 beyond their rounding)", too_much)]


def float_rounding(lp: np.ndarray) -> np.ndarray:
    """How far a stored float16 / float32 log-prob may lie from the value it rounds (half an ulp)."""
    unit = 2.0**-11 if lp.dtype == np.float16 else 2.0**-24
    with np.errstate(invalid="ignore"):
        return np.abs(lp.astype(np.float64)) * unit


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


def bytes_list(parts: list[np.ndarray]) -> pa.Array:
    """One list<uint8> row per record from each record's byte stream."""
    return list_array(concat(parts, np.dtype(np.uint8)), [len(p) for p in parts])


def flat(batch: pa.RecordBatch, name: str, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, values) of a list column as zero-copy numpy views; `width`: values are
    fixed_size_list rows, returned as [rows, width]."""
    col = batch.column(name)
    if col.offset != 0 or col.null_count:
        raise StoreError(f"column {name} is sliced or has nulls")
    offsets = col.offsets.to_numpy(zero_copy_only=True)
    values = col.values
    if width is not None:
        values = values.values
    arr = values.to_numpy(zero_copy_only=True)
    if width is not None:
        arr = arr.reshape(-1, width)
    return offsets, arr
