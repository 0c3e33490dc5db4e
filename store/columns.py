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


def log_of_mass(tail_mass: np.ndarray) -> np.ndarray:
    """log of a stored tail mass, in float64 rounded once to float32; −inf where the mass is 0."""
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(tail_mass, dtype=np.float64)).astype(np.float32)


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
    if not arrays:
        return np.zeros((0, *tail_shape), dtype=dtype)
    return np.concatenate(arrays)


def bytes_list(parts: list[np.ndarray]) -> pa.Array:
    """One list<uint8> row per record from each record's byte stream."""
    return list_array(concat(parts, np.dtype(np.uint8)), [len(p) for p in parts])


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
