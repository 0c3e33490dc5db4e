"""The training loader: a torch `IterableDataset` streaming a store's records as collated batches.

**Split.** A record is held out for evaluation when sha256(id) mapped to [0, 1) is below a cut
(`is_held_out`): `eval_fraction`, raised so that at least MIN_EVAL_RECORDS distinct ids fall below
it when the store has enough records to keep 3/4 of them for training (`eval_cut`); the loader never
yields held-out records, `evaluate` uses only them.

**Order** (deterministic in seed and epoch, identical on every rank, no communication):

1. the shards are put in a random order drawn from (seed, epoch);
2. their training rows, in that shard order, form one flat sequence of N samples;
3. the sequence is cut into P = world_size × num_workers equal spans of L = ceil(N / P) samples;
   when P does not divide N the last span wraps around to the start, so P·L − N samples are seen
   twice per epoch (`repeated_per_epoch`, reported) and nothing is dropped;
4. span g = rank × num_workers + worker belongs to that loader worker, which reads it mostly
   sequentially through a bounded shuffle buffer seeded by (seed, epoch, rank, worker).

Each worker's stream runs on through epoch after epoch, cut into batches of `batch_size` records
(a batch may hold the last samples of one epoch and the first of the next). Every rank therefore
yields exactly the same number of batches per epoch, whatever the shard sizes: equal step counts,
no DDP hang. `--epochs E` becomes ceil(E · P·L / world_size / (batch_size · grad_accum)) steps.

**Resume.** The state is the number of batches this rank had consumed at the last optimizer step.
PyTorch's DataLoader takes batches from its workers round-robin (worker 0, 1, …, W−1, 0, …) and
every worker's stream is infinite, so batch c came from worker c mod W. On resume each worker
recomputes its stream (orders are cheap: only indices are shuffled, no data is read) and skips what
was consumed; worker roles are rotated by c mod W so that the loader's first batch is the one the
interrupted run would have taken next.

**Collation** pads right and lists, for every position i whose next token is trained, the student
logit that predicts it (batch b, position i − 1) next to the stored target row i − score_start, in
one of the loader's two shapes (`store.targets.TRAIN_TARGETS`), whose rows the store's kind makes
(`TargetKind.train_rows`): top-k ids / log-probs / log tail (`TopKRows`), or (`targets="sampled"`)
weighted ids (`WeightedRows`: sampled draws with counts / N, or hybrid targets), padded to the
batch's widest position. Packed stores are decoded per record as they are read. Hidden states are
read only when a hidden-state or relation loss needs them.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import itertools
import math
import os
import queue
import shutil
import tempfile
import threading
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from potstill.store import open_store
from potstill.store.errors import StoreError
from potstill.store.fs import is_local, pid_alive
from potstill.store.ids import id_key, id_keys, key_fractions
from potstill.store.reader import ShardReader, Store
from potstill.store.targets import TRAIN_TARGETS, TopKRows, WeightedRows
from potstill.store.targets.hybrid import hybrid_weights  # noqa: F401 (where benches and tests find it)
from potstill.student_train.errors import TrainError

STATE_VERSION = 1
CHECK_AHEAD = 2  # shards a loader process checks ahead of the one it reads (`CheckAhead`)
MAIN_TASK, RATIONALE_TASK = 0, 1


# -- split -------------------------------------------------------------------------------------------
def id_fraction(record_id: str) -> float:
    """sha256 of the id, read as a number in [0, 1): the same on every machine, for every order."""
    return id_key(record_id) / 2.0**64


def is_held_out(record_id: str, cut: float) -> bool:
    """Whether a record is held out at this cut (`eval_cut`; the eval fraction itself when no floor applies)."""
    return id_fraction(record_id) < cut


# Held-out sets smaller than this measure little (one record's tokens); the floor applies only when
# the training records keep at least MIN_TRAIN_SHARE of the store.
MIN_EVAL_RECORDS = 8
MIN_TRAIN_SHARE = 0.75


def eval_cut(keys: np.ndarray | Iterable[str], eval_fraction: float) -> float:
    """The id fraction below which records are held out: `eval_fraction`, or — when that holds out
    fewer than MIN_EVAL_RECORDS distinct ids and the store has at least MIN_EVAL_RECORDS /
    (1 − MIN_TRAIN_SHARE) of them (32) — the cut that holds out the MIN_EVAL_RECORDS ids of smallest
    hash. The raised set contains the fraction's own, and depends only on the set of ids. Takes the
    ids' keys (`potstill.store.ids.id_keys`), or the ids."""
    if eval_fraction <= 0:
        return 0.0
    fractions = key_fractions(keys if isinstance(keys, np.ndarray) else id_keys(keys))
    if len(np.unique(fractions[fractions < eval_fraction])) >= MIN_EVAL_RECORDS:
        return eval_fraction
    distinct = np.unique(fractions)  # only when the floor may apply: few ids, or a tiny fraction
    if len(distinct) * (1 - MIN_TRAIN_SHARE) < MIN_EVAL_RECORDS:
        return eval_fraction
    return float(distinct[MIN_EVAL_RECORDS])  # ids strictly below it: the MIN_EVAL_RECORDS smallest


def held_out_note(records: int, held: int, eval_fraction: float) -> str | None:
    """One line saying why the held-out set is empty or below the minimum (None when it is not)."""
    if held >= MIN_EVAL_RECORDS:
        return None
    if eval_fraction <= 0:
        return "none (--eval-fraction 0)"
    needed = math.ceil(MIN_EVAL_RECORDS / (1 - MIN_TRAIN_SHARE))
    why = (f"store has {records} records, fewer than the {needed} needed to hold out {MIN_EVAL_RECORDS} and keep "
           f"{MIN_TRAIN_SHARE:.0%} for training; --eval-fraction {eval_fraction} holds out {held}")
    return f"none ({why})" if held == 0 else f"only {held} record{'s' if held > 1 else ''} ({why})"


# -- order -------------------------------------------------------------------------------------------
def buffer_shuffle(n: int, buffer_size: int, rng: np.random.Generator) -> np.ndarray:
    """The order in which a bounded shuffle buffer of `buffer_size` emits a stream of n items.

    The classic streaming shuffle: fill the buffer, then for each arriving item emit a random buffer
    slot and put the item there; finally emit the rest in random order. An item moves at most about
    `buffer_size` places early, so reads stay near-sequential. Only indices are shuffled.
    """
    if buffer_size <= 1 or n <= 1:
        return np.arange(n)
    size = min(buffer_size, n)
    buffer = np.arange(size)
    slots = rng.integers(0, size, size=n - size)
    out = np.empty(n, dtype=np.int64)
    for k, slot in enumerate(slots.tolist()):
        out[k] = buffer[slot]
        buffer[slot] = size + k
    out[n - size :] = rng.permutation(buffer)
    return out


@dataclass
class LoaderPlan:
    """The split and sizes everything else derives from; identical on every rank."""

    shards: list[str]
    train_rows: list[np.ndarray]  # per shard, the rows training may use (held-out rows and duplicates removed)
    eval_records: int
    world_size: int
    num_workers: int  # DataLoader workers per rank (0 counts as 1: the main process)
    duplicates: int = 0  # rows skipped because an earlier commit holds the same id (format §3)
    eval_cut: float = 0.0  # ids whose hash fraction is below this are held out (`eval_cut`)
    eval_fraction: float = 0.0  # the fraction asked for (`eval_cut` may raise it to a floor)
    # (shard, row) of every held-out record, in shard order: what the final evaluation measures
    held_out: list[tuple[str, int]] = dataclasses.field(default_factory=list)

    @property
    def parts(self) -> int:
        return self.world_size * max(self.num_workers, 1)

    @property
    def num_train(self) -> int:
        return int(sum(len(r) for r in self.train_rows))

    @property
    def span(self) -> int:
        return math.ceil(self.num_train / self.parts)

    @property
    def repeated_per_epoch(self) -> int:
        return self.parts * self.span - self.num_train

    @property
    def samples_per_rank_epoch(self) -> int:
        return self.span * max(self.num_workers, 1)

    def epoch_span(self, seed: int, epoch: int, part: int, shuffle_buffer: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, row) of every sample of span `part` in epoch `epoch`, in reading order."""
        order = np.random.default_rng([seed, epoch]).permutation(len(self.shards))
        counts = np.array([len(self.train_rows[s]) for s in order], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(counts)])
        positions = np.arange(part * self.span, (part + 1) * self.span, dtype=np.int64) % self.num_train
        slot = np.searchsorted(starts, positions, side="right") - 1
        shard_idx = order[slot]
        rows = np.empty(self.span, dtype=np.int64)
        for k in np.unique(slot):
            here = slot == k
            rows[here] = self.train_rows[order[k]][positions[here] - starts[k]]
        rank, worker = divmod(part, max(self.num_workers, 1))
        perm = buffer_shuffle(self.span, shuffle_buffer, np.random.default_rng([seed, epoch, rank, worker, 1]))
        return shard_idx[perm], rows[perm]


def plan_split(
    store: Store, eval_fraction: float, world_size: int, num_workers: int, shards: list[str] | None = None
) -> LoaderPlan:
    """Split every shard's records by id hash. `shards` pins the shard list (resume: the store may
    have grown since the run started); by default every committed shard is used."""
    names = list(shards) if shards is not None else store.shard_names
    committed = set(store.shard_names)
    missing = [name for name in names if name not in committed]
    if missing:
        raise TrainError(f"{store.url}: shard {missing[0]} of this run is no longer in the store (or its commit "
                         "record is damaged)")
    # Duplicates among exactly these shards, so that a store growing since the run started cannot
    # change which copy of an id a resumed run trains on.
    train_rows, held_out, skipped, cut = _split(store, names, store.duplicates(names), eval_fraction)
    plan = LoaderPlan(names, train_rows, len(held_out), world_size, num_workers, skipped, cut, eval_fraction, held_out)
    if plan.num_train == 0:
        raise TrainError(
            f"{store.url}: no training records ({store.num_records} records, {len(held_out)} held out by "
            f"--eval-fraction {eval_fraction})"
        )
    return plan


def held_out_rows(store: Store, eval_fraction: float) -> list[tuple[str, int]]:
    """(shard, row) of every held-out record, in store order (duplicates skipped: the first committed copy counts).
    For a model evaluated on its own (`potstill eval`); a training run takes its plan's `held_out`."""
    return _split(store, store.shard_names, store.duplicates(), eval_fraction)[1]


def _split(store: Store, names: list[str], duplicates: dict[str, list[tuple[int, str]]], eval_fraction: float,
           ) -> tuple[list[np.ndarray], list[tuple[str, int]], int, float]:
    """Per shard of `names`, its training rows; the held-out (shard, row)s; the duplicate rows left out of
    both; the cut. Vectorised on the ids' keys (`Store.id_index`)."""
    index = store.id_index(names)
    cut = eval_cut(index.keys, eval_fraction)
    train_rows, held_out, skipped = [], [], 0
    for s, name in enumerate(names):
        eval_keep = key_fractions(index.keys[index.starts[s] : index.starts[s + 1]]) < cut
        keep = ~eval_keep
        rows = [row for row, _ in duplicates.get(name, [])]
        keep[rows] = eval_keep[rows] = False
        skipped += len(rows)
        train_rows.append(np.flatnonzero(keep))
        held_out += [(name, row) for row in np.flatnonzero(eval_keep).tolist()]
    return train_rows, held_out, skipped, cut


# -- sequences and collation -----------------------------------------------------------------------
@dataclass
class Sequence:
    """One token sequence the student reads, tied to the stored record it came from.

    `ids[:shared]` equals the stored `input_ids[:shared]`: teacher targets and hidden states are
    valid there (they depend only on the tokens up to their position). Position i (predicting
    ids[i]) is trained when score_start ≤ i and (i < shared, with KD; or i ≥ ce_start, CE only).
    Tokens in [shared, ce_start) are read but never predicted (the multitask answer marker).
    """

    record_id: str
    ids: np.ndarray
    score_start: int
    shared: int
    ce_start: int
    task: int
    # The record's KD targets, one row per scored position, in the loader shape trained on: the
    # top-k with the log tail, or weighted ids (the store's kind makes them: `TargetKind.train_rows`).
    targets: TopKRows | WeightedRows | None
    hidden_start: int = 0  # first token with stored hidden states
    reader: ShardReader | None = None  # where the hidden states are read from, at collation
    hidden_offset: int = 0  # the record's first row in the shard's hidden arrays (token_offset)

    def truncate(self, max_length: int) -> Sequence:
        if max_length and len(self.ids) > max_length:
            self.ids = self.ids[:max_length]
            self.shared = min(self.shared, max_length)
        return self

    def trained_positions(self) -> tuple[np.ndarray, np.ndarray]:
        """(i, has_kd) for every trained position: i indexes the predicted token."""
        i = np.arange(self.score_start, len(self.ids))
        has_kd = i < self.shared
        keep = has_kd | (i >= self.ce_start)
        return i[keep], has_kd[keep]


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


def collate(
    seqs: list[Sequence],
    *,
    k: int,
    pad_id: int,
    student_vocab: int | None = None,
    hidden_layers: tuple[int, ...] = (),
    hidden_widths: dict[int, int] | None = None,
    targets: str = "topk",
) -> dict[str, Any]:
    """Pad sequences (right) and align each trained position with the student logit that predicts it.

    Returns tensors: `input_ids`, `attention_mask` [B, T]; per trained position (N of them):
    `pos_batch`, `pos_index` (the predicting logit), `hard_ids` (the actual next token), `has_kd`,
    `task`; with top-k targets `topk_ids` [N, K] (−1 = empty), `topk_logprobs` [N, K], `tail_logprob`
    [N] (float32, the log of the teacher's mass outside the top-K); with `targets="sampled"` instead `sampled_ids` [N, U] (−1 = empty) and `sampled_probs`
    [N, U] float32 (count / N), U the most distinct ids any position of the batch has; and with
    hidden layers `hidden_mask` [B, T] plus `teacher_hidden_<layer>` [B, T, W] as stored
    (float16/bfloat16), read straight from the store into the padded batch, only for the positions
    a loss uses. Positions without KD carry empty targets (top-k: ids −1, all mass in the tail, log
    tail 0; sampled: no ids). Target ids the student's vocabulary does not have (a teacher with a
    padded embedding matrix) are folded into the tail bucket (top-k, in log space) or dropped (sampled).
    """
    out, trained = _pad_sequences(seqs, pad_id)
    if targets not in COLLATORS:
        raise TrainError(f"--targets must be one of {', '.join(TRAIN_TARGETS)}, got {targets!r}")
    out.update(COLLATORS[targets](seqs, trained, k=k, student_vocab=student_vocab))
    if hidden_layers:
        out.update(_collate_hidden(seqs, out["input_ids"].shape[1], hidden_layers, hidden_widths or {}))
    return out


def _collate_topk(seqs: list[Sequence], trained: list[tuple[np.ndarray, np.ndarray]], *, k: int,
                  student_vocab: int | None) -> dict[str, torch.Tensor]:
    """`collate` for top-k targets (`TopKRows`): each trained position's ids, log-probs and log tail,
    copied once from the stored rows into the batch's arrays (a slice where the rows are consecutive)."""
    lp_dtype = seqs[0].targets.logprobs.dtype if seqs and seqs[0].targets is not None else np.float32
    total = sum(len(i) for i, _ in trained)
    topk_ids = np.empty((total, k), dtype=np.int64)
    topk_lp = np.empty((total, k), dtype=lp_dtype)
    tail_logprob = np.empty(total, dtype=np.float32)
    end = 0
    for seq, (i, kd) in zip(seqs, trained, strict=True):
        start, end = end, end + len(i)
        ids_rows, lp_rows, tail_rows = topk_ids[start:end], topk_lp[start:end], tail_logprob[start:end]
        rows = i[kd] - seq.score_start
        if len(rows) and not isinstance(seq.targets, TopKRows):
            raise TrainError(f"record {seq.record_id}: no top-k targets to train on")
        t: TopKRows = seq.targets  # type: ignore[assignment]
        if len(rows) == len(i) and len(rows) and rows[-1] - rows[0] + 1 == len(rows):  # every position, in order
            ids_rows[...], lp_rows[...], tail_rows[...] = (t.ids[rows[0] : rows[-1] + 1], t.logprobs[rows[0] : rows[-1] + 1],
                                                           t.tail_logprob[rows[0] : rows[-1] + 1])
            continue
        ids_rows.fill(-1)  # positions without KD: no ids, all the mass in the tail (log 1)
        lp_rows.fill(0)
        tail_rows.fill(0)
        if len(rows):
            ids_rows[kd], lp_rows[kd], tail_rows[kd] = t.ids[rows], t.logprobs[rows], t.tail_logprob[rows]
    if student_vocab is not None:
        _fold_unknown_ids(topk_ids, topk_lp, tail_logprob, student_vocab)
    return {"topk_ids": torch.from_numpy(topk_ids), "topk_logprobs": torch.from_numpy(topk_lp),
            "tail_logprob": torch.from_numpy(tail_logprob)}


def _pad_sequences(seqs: list[Sequence], pad_id: int) -> tuple[dict[str, Any], list[tuple[np.ndarray, np.ndarray]]]:
    """The padded token tensors and position lists every target kind shares, and each sequence's
    (trained positions i, has_kd)."""
    longest = max((len(s.ids) for s in seqs), default=1)
    input_ids = np.full((len(seqs), max(longest, 1)), pad_id, dtype=np.int64)
    attention = np.zeros_like(input_ids)
    pos_b, pos_i, hard, has_kd, task, trained = [], [], [], [], [], []
    for b, seq in enumerate(seqs):
        n = len(seq.ids)
        input_ids[b, :n] = seq.ids
        attention[b, :n] = 1
        i, kd = seq.trained_positions()
        trained.append((i, kd))
        pos_b.append(np.full(len(i), b, dtype=np.int64))
        pos_i.append(i - 1)
        hard.append(seq.ids[i].astype(np.int64))
        has_kd.append(kd)
        task.append(np.full(len(i), seq.task, dtype=np.int64))
    out = {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention),
        "pos_batch": torch.from_numpy(_cat(pos_b, np.int64)),
        "pos_index": torch.from_numpy(_cat(pos_i, np.int64)),
        "hard_ids": torch.from_numpy(_cat(hard, np.int64)),
        "has_kd": torch.from_numpy(_cat(has_kd, np.bool_)),
        "task": torch.from_numpy(_cat(task, np.int64)),
        "record_ids": [s.record_id for s in seqs],
    }
    return out, trained


def _collate_weighted(seqs: list[Sequence], trained: list[tuple[np.ndarray, np.ndarray]], *, k: int,
                      student_vocab: int | None) -> dict[str, torch.Tensor]:
    """`collate` for weighted ids (`WeightedRows`: sampled or hybrid targets): each trained position's
    ids and weights, padded to the widest trained position of the batch."""
    rows_per_seq = []
    for seq, (i, kd) in zip(seqs, trained, strict=True):
        if kd.any() and not isinstance(seq.targets, WeightedRows):
            raise TrainError(f"record {seq.record_id}: no sampled targets to train on")
        rows_per_seq.append(i[kd] - seq.score_start)
    width = max((int(s.targets.lengths[r].max(initial=0)) for s, r in zip(seqs, rows_per_seq, strict=True)  # type: ignore[union-attr]
                 if len(r)), default=1)
    ids_parts, prob_parts = [], []
    for seq, (i, kd), rows in zip(seqs, trained, rows_per_seq, strict=True):
        ids = np.full((len(i), width), -1, dtype=np.int64)
        probs = np.zeros((len(i), width), dtype=np.float32)
        if len(rows):
            t: WeightedRows = seq.targets  # type: ignore[assignment]
            m = min(width, t.ids.shape[1])  # columns past a row's length are padding
            ids[kd, :m], probs[kd, :m] = t.ids[rows, :m], t.weights[rows, :m]
        ids_parts.append(ids)
        prob_parts.append(probs)
    ids = np.concatenate(ids_parts) if ids_parts else np.zeros((0, width), np.int64)
    probs = np.concatenate(prob_parts) if prob_parts else np.zeros((0, width), np.float32)
    if student_vocab is not None:
        unknown = ids >= student_vocab
        ids[unknown], probs[unknown] = -1, 0.0
    return {"sampled_ids": torch.from_numpy(ids), "sampled_probs": torch.from_numpy(probs)}


# How each loader shape (`store.targets.TRAIN_TARGETS`) is collated, and which batch key holds the
# teacher's ids in order of weight (the first: its most likely token, or most frequent draw).
COLLATORS = {"topk": _collate_topk, "sampled": _collate_weighted}
TEACHER_IDS = {"topk": "topk_ids", "sampled": "sampled_ids"}


def _cat(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)


def _fold_unknown_ids(ids: np.ndarray, lp: np.ndarray, tail_logprob: np.ndarray, vocab: int) -> None:
    """Move top-K entries with ids ≥ `vocab` into the tail, in place: log tail ← log(tail + Σ p of
    those ids), summed in log space in float64 (exact to one float32 rounding), then the slot is emptied."""
    unknown = ids >= vocab
    if not unknown.any():
        return
    rows = np.flatnonzero(unknown.any(-1))
    terms = np.where(unknown[rows], lp[rows].astype(np.float64), -np.inf)
    terms = np.concatenate([tail_logprob[rows, None].astype(np.float64), terms], axis=-1)
    tail_logprob[rows] = np.minimum(np.logaddexp.reduce(terms, axis=-1), 0.0)
    ids[unknown] = -1
    lp[unknown] = -np.inf


def _collate_hidden(seqs: list[Sequence], length: int, layers: tuple[int, ...], widths: dict[int, int]) -> dict[str, Any]:
    """Teacher hidden states at tokens [hidden_start, shared): where the sequence is the stored one."""
    spans = [(s.hidden_start, max(s.hidden_start, min(s.shared, len(s.ids)))) for s in seqs]
    mask = np.zeros((len(seqs), length), dtype=bool)
    for b, (lo, hi) in enumerate(spans):
        mask[b, lo:hi] = True
    out: dict[str, Any] = {"hidden_mask": torch.from_numpy(mask)}
    for layer in layers:
        reader = next(s.reader for s in seqs if s.reader is not None)
        bf16 = reader.store.manifest.hidden.layer(layer).dtype == "bfloat16"
        tensor = _batch_tensor((len(seqs), length, widths[layer]), torch.int16 if bf16 else torch.float16)
        padded = tensor.numpy().view(np.uint16) if bf16 else tensor.numpy()
        for b, (seq, (lo, hi)) in enumerate(zip(seqs, spans, strict=True)):
            padded[b, :lo] = 0  # masked positions must still be finite: zero them
            padded[b, hi:] = 0
            if hi > lo and seq.reader is not None:
                seq.reader.hidden_block(layer, seq.hidden_offset, seq.hidden_offset + hi - lo, out=padded[b, lo:hi])
        out[f"teacher_hidden_{layer}"] = tensor.view(torch.bfloat16) if bf16 else tensor
    return out


def _batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor; in a DataLoader worker it is allocated in shared memory, as torch's own
    default_collate does, so that handing the batch to the training process copies nothing (hidden
    states are most of a batch's bytes: 100 MB for 8 × 1024 tokens × 3 layers of width 2048)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    elem = torch.empty(0, dtype=dtype)
    return elem.new(elem._typed_storage()._new_shared(math.prod(shape))).view(shape)


def shared_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """In a DataLoader worker: the batch with its tensors copied into one block of shared memory, as
    views of it; elsewhere the batch itself. torch hands each tensor storage to the training process
    through a shared-memory file of its own, a file descriptor sent and mapped per tensor: for a
    batch's ten or so tensors about 3 ms of CPU between the worker and the training process, more
    than making the batch (bench/loader_speed.py). One block is one descriptor. Tensors already in
    shared memory (hidden states, `_batch_tensor`) and empty ones stay as they are."""
    if get_worker_info() is None:
        return batch
    moved = {key: value for key, value in batch.items()
             if isinstance(value, torch.Tensor) and value.numel() and not value.is_shared()}
    if not moved:
        return batch
    offsets, total = {}, 0
    for key, tensor in moved.items():
        offsets[key] = total
        total += -(-tensor.nbytes // 64) * 64  # (aligned for every dtype's views)
    block = _batch_tensor((total,), torch.uint8)
    out = dict(batch)
    for key, tensor in moved.items():
        at = offsets[key]
        view = block[at : at + tensor.nbytes].view(tensor.dtype).view(tensor.shape)
        view.copy_(tensor)
        out[key] = view
    return out


# -- multitask (distilling step-by-step) -------------------------------------------------------------
def split_rationale(tokenizer: Any, ids: np.ndarray, completion_start: int, rationale: str | None) -> int | None:
    """Token index where the rationale ends in a stored sequence, or None when it cannot be found.

    The completion is taken to start at `completion_start` (the record's score_start: true for
    generated records whose prompt was not scored). The rationale ends at the first j such that the
    decoded completion ids[completion_start:j] (special tokens skipped, leading space stripped) is at
    least as long as the stripped rationale text; that decoded text must start with the rationale.
    Found by bisection (decoding is monotone in j for byte-level tokenizers).
    """
    if rationale is None:
        return None
    target = rationale.strip()
    if not target:
        return completion_start

    def text(j: int) -> str:
        return tokenizer.decode(ids[completion_start:j].tolist(), skip_special_tokens=True).lstrip()

    lo, hi = completion_start, len(ids)
    if len(text(hi)) < len(target):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if len(text(mid)) >= len(target):
            hi = mid
        else:
            lo = mid + 1
    return lo if text(lo).startswith(target) else None


def multitask_sequences(whole: Sequence, rationale_end: int, marker_ids: np.ndarray) -> list[Sequence]:
    """The two tasks of distilling step-by-step (Hsieh et al. 2023) from one stored record.

    - rationale task: prompt → rationale = the stored ids up to the rationale's end. Every token is
      the teacher's own sequence, so every scored position keeps its KD target (and hidden states).
    - answer task: prompt → answer = stored prompt + `marker_ids` + the stored answer tokens (the
      teacher's ids after the rationale). Its prompt is shared with the stored sequence; the marker
      is read, never predicted; the answer tokens follow a context the teacher never saw, so they
      are trained with cross-entropy only.
    The completion starts at score_start (see `split_rationale`).
    """
    ids, c0 = whole.ids, whole.score_start
    answer_ids = np.concatenate([ids[:c0], marker_ids.astype(ids.dtype), ids[rationale_end:]])
    answer = dataclasses.replace(
        whole, record_id=f"{whole.record_id}#answer", ids=answer_ids, shared=common_prefix(answer_ids, ids),
        ce_start=c0 + len(marker_ids), task=MAIN_TASK,
    )
    if rationale_end <= c0:  # an empty rationale: nothing to learn in the rationale task
        return [answer]
    rationale = dataclasses.replace(
        whole, record_id=f"{whole.record_id}#rationale", ids=ids[:rationale_end], shared=rationale_end, task=RATIONALE_TASK
    )
    return [answer, rationale]


def record_sequence(reader: ShardReader, row: int, targets: str = "topk") -> Sequence:
    """A stored record as one plain sequence: every scored position trained, with its KD targets in
    the loader shape `targets` (made by the store's kind; a packed store decodes here)."""
    views = reader.views
    ids = views.input_ids_of(row)
    s = int(views.score_start[row])
    rows = views.kind.train_rows(views.columns, row, targets)
    return Sequence(reader.ids[row], ids, s, len(ids), s, MAIN_TASK, rows,
                    int(views.hidden_start[row]), reader, int(views.token_offset[row]))


def check_targets(store: Store, targets: str) -> None:
    """Refuse, in one line, training on a loader shape the store's kind does not offer."""
    spec = store.manifest.targets
    if targets not in TRAIN_TARGETS:
        raise TrainError(f"--targets must be one of {', '.join(TRAIN_TARGETS)}, got {targets!r}")
    offered = spec.target_kind.train_targets
    if targets not in offered:
        raise TrainError(f"--targets {targets}: store {store.url} holds only {' and '.join(offered)} targets "
                         f"(manifest targets.kind={spec.kind!r})")


# -- the dataset -------------------------------------------------------------------------------------
LOCK_PREFIX = "potstill-checked-shards-"  # + the owner's pid, "-", a random part: the lock file of a single-process job


class CheckedShards:
    """Which of a plan's shards have passed their check (`verify_reads`: the records file's sha256 and
    the values), so that each is checked once per job, by the first process to read it.

    The worker processes of one loader (forked or spawned) share flags in memory. The ranks of a job
    on one node share a folder (`folder`, `job_checks_folder`): one verdict file per shard, written by
    the process that checked it, empty when the shard passed, else the line naming what is wrong, so
    every rank refuses a bad shard with the same line (or skips it) without checking it again. Two
    processes meeting an unchecked shard at once take turns (a byte-range lock per shard on one lock
    file): the second finds the verdict."""

    def __init__(self, shards: list[str], folder: str | None = None) -> None:
        self.shards = shards
        self.flags = torch.zeros(len(shards), dtype=torch.bool).share_memory_()
        self.folder = folder
        if folder is None:
            remove_dead_loaders_locks(tempfile.gettempdir())
            fd, self.lock_path = tempfile.mkstemp(prefix=f"{LOCK_PREFIX}{os.getpid()}-")
            os.close(fd)
            weakref.finalize(self, _remove_owned, self.lock_path, os.getpid())
        else:
            os.makedirs(folder, exist_ok=True)
            self.lock_path = os.path.join(folder, "lock")
            os.close(os.open(self.lock_path, os.O_CREAT | os.O_RDWR, 0o600))
        self._fd: tuple[int, int] | None = None  # (pid, descriptor): locks belong to the process holding them

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fd": None}

    def passed(self, index: int) -> bool:
        """Whether shard `index` has passed its check in this job; raises what is wrong with it when
        its check failed (in any process of the job on this node)."""
        if self.flags[index]:
            return True
        verdict = self._verdict(index)
        if verdict is None:
            return False
        if verdict:
            raise StoreError(verdict)
        self.flags[index] = True
        return True

    def check(self, index: int, run: Callable[[], None]) -> None:
        """Check shard `index` with `run` (raises a `StoreError` naming what is wrong) unless this job
        has a verdict on it; record the verdict for the job's other processes."""
        if self.passed(index):
            return
        with self._claim(index):  # another process checking it now: wait for its verdict
            if self.passed(index):
                return
            try:
                run()
            except StoreError as e:
                self._record(index, str(e))
                raise
            self._record(index, "")
            self.flags[index] = True

    def all_passed(self) -> list[str]:
        """The shards that passed their check in this job so far (on this node)."""
        passed = set(np.flatnonzero(self.flags.numpy()).tolist())
        if self.folder is not None:
            with contextlib.suppress(FileNotFoundError):  # (the job's folder is gone: only this rank's)
                names = {name for name in os.listdir(self.folder) if name.endswith(".verdict")
                         and os.path.getsize(os.path.join(self.folder, name)) == 0}  # (an empty verdict: passed)
                passed |= {i for i, shard in enumerate(self.shards) if f"{shard}.verdict" in names}
        return [self.shards[i] for i in sorted(passed)]

    def _verdict(self, index: int) -> str | None:
        if self.folder is None:
            return None
        try:
            with open(os.path.join(self.folder, f"{self.shards[index]}.verdict"), encoding="utf-8") as f:
                return f.read()
        except FileNotFoundError:  # not checked yet (or the job's folder is gone: it has ended)
            return None

    def refuse(self, index: int, why: str) -> None:
        """Shard `index` failed a check of some of its records (a first batch's, `CheckAhead`): the
        job's other processes refuse it with this line, unless it already has a verdict."""
        self._record(index, why)

    def _record(self, index: int, verdict: str) -> None:
        """Write the shard's verdict unless it has one: the first stands, so every rank gives one line."""
        if self.folder is None:
            return
        path = os.path.join(self.folder, f"{self.shards[index]}.verdict")
        temp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        with contextlib.suppress(FileNotFoundError):  # (the job has ended: nobody reads it)
            with open(temp, "w", encoding="utf-8") as f:
                f.write(verdict)
            with contextlib.suppress(FileExistsError):
                os.link(temp, path)  # whole or not at all, and never over another verdict
            os.remove(temp)

    @contextlib.contextmanager
    def _claim(self, index: int) -> Iterator[None]:
        if self._fd is None or self._fd[0] != os.getpid():
            try:
                self._fd = (os.getpid(), os.open(self.lock_path, os.O_RDWR))
            except FileNotFoundError:  # the job's folder is gone (it has ended): check without taking turns
                yield
                return
        fd = self._fd[1]
        fcntl.lockf(fd, fcntl.LOCK_EX, 1, index)
        try:
            yield
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN, 1, index)


def job_checks_folder() -> str | None:
    """Where the ranks of this process's torch.distributed job share their shards' verdicts
    (`CheckedShards`): a folder in each node's temporary directory, named by an id rank 0 draws and
    sends to every rank, so each node checks each shard once. None outside a job of several ranks.
    Every rank must call it (a collective)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    box = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return os.path.join(tempfile.gettempdir(), f"potstill-checks-{box[0]}")


def end_job_checks(folder: str | None) -> None:
    """Once every rank of the job has trained (a barrier: no rank reads a verdict after it), remove
    its verdicts folder. Every rank must call it."""
    if folder is None:
        return
    import torch.distributed as dist

    dist.barrier()
    shutil.rmtree(folder, ignore_errors=True)


class CheckAhead:
    """One process's checks of the shards it reads, run in a background thread, one shard at a time, up
    to CHECK_AHEAD shards ahead of the one being read. `upcoming` lists the shards in the order the
    process first reads them (`StoreDataset._samples` extends it epoch by epoch). The process's first
    batch does not wait for them: its records are checked alone (`ShardReader.check_records`), and the
    thread starts once it is made (`start`). From then on the reading of a shard waits for its whole
    check, as checking record by record until that check is done costs about three times as much per
    record, on top of the whole check (bench/loader_speed.py); a shard that fails is refused (`use`)."""

    def __init__(self, store: Store, shards: list[str], checked: CheckedShards) -> None:
        self.pid = os.getpid()
        self.store, self.shards, self.checked = store, shards, checked
        self.upcoming: collections.deque[int] = collections.deque()
        self._pending: dict[int, concurrent.futures.Future[None]] = {}
        self._current = -1  # the shard being read
        self._queue: queue.SimpleQueue[tuple[int, concurrent.futures.Future[None]]] = queue.SimpleQueue()
        # The thread starts checking once the process has made its first batch (`start`): checked
        # alongside, the reading of that batch would wait for the GIL behind it.
        self._started = threading.Event()
        # A daemon thread: a loader worker told to stop exits at once, not after the checks queued ahead.
        threading.Thread(target=self._run, name="potstill-check", daemon=True).start()

    def start(self) -> None:
        """Let the thread check the shards queued (the process has made its first batch)."""
        self._started.set()

    def use(self, index: int) -> bool:
        """Whether shard `index`, about to be read, has passed its whole check: before the first batch
        is made (`start`), at once (False: its records must be checked as they are read), after it
        once the check is done (it is waited for); raises what is wrong with the shard once its check
        has failed. On reaching a new shard, check it and the next ones ahead."""
        if index != self._current:
            self._current = index
            passed = self.checked.passed(index)  # (raises what another process of the job found wrong with it)
            if not passed and index not in self._pending:  # (listed before the ones after it)
                self._pending[index] = self._submit(index)
            self._schedule()
        if self.checked.flags[index]:
            return True
        future = self._pending.get(index)
        if future is None:  # (defensive: every unflagged shard this process reached has its check queued)
            future = self._pending[index] = self._submit(index)
        if not future.done() and not self._started.is_set():
            return False
        future.result()  # waits; raises what the check found: the shard is refused at every read from now on
        del self._pending[index]
        return True

    def _submit(self, index: int) -> concurrent.futures.Future[None]:
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._queue.put((index, future))
        return future

    def _run(self) -> None:
        self._started.wait()
        while True:
            index, future = self._queue.get()
            future.set_running_or_notify_cancel()
            try:
                self._check(index)
            except BaseException as e:  # handed to the reader that reads this shard next
                future.set_exception(e)
            else:
                future.set_result(None)

    def _schedule(self) -> None:
        # (a shard found bad is not read again, so its finished check may stay here)
        while sum(not f.done() for f in self._pending.values()) < CHECK_AHEAD and self.upcoming:
            index = self.upcoming.popleft()
            if not self.checked.flags[index] and index not in self._pending:
                self._pending[index] = self._submit(index)

    def _check(self, index: int) -> None:
        def check() -> None:
            # (raises naming what is wrong; the records file's bytes by its pieces, §3.1)
            ShardReader(self.store, self.store.commit(self.shards[index]), by_pieces=True)

        self.checked.check(index, check)


def remove_dead_loaders_locks(folder: str) -> None:
    """Remove the lock files (`CheckedShards`) of loaders whose process is gone: a process killed before
    its exit could remove its own. Each name holds its owner's pid; a live owner's file stays, and so
    does one named otherwise. A file removed under a worker that still holds it open keeps its locks;
    a worker opening it later checks without taking turns (`CheckedShards._claim`)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        owner = name[len(LOCK_PREFIX):].split("-", 1)[0] if name.startswith(LOCK_PREFIX) else ""
        if owner.isdigit() and not pid_alive(int(owner)):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, name))


def _remove_owned(path: str, owner: int) -> None:
    if os.getpid() == owner:  # not from a forked worker's exit
        with contextlib.suppress(OSError):
            os.remove(path)


class StoreDataset(IterableDataset):
    """Batches of a store for one rank: an infinite, deterministic, resumable stream (module doc)."""

    def __init__(
        self,
        store: Store,
        plan: LoaderPlan,
        *,
        batch_size: int,
        seed: int = 42,
        shuffle_buffer: int = 1024,
        rank: int = 0,
        hidden_layers: tuple[int, ...] = (),
        max_length: int = 0,
        student_vocab: int | None = None,
        pad_id: int = 0,
        rationale_mode: str = "plain",
        answer_marker_ids: tuple[int, ...] = (),
        targets: str = "topk",
        skip_bad_shards: bool = False,
        checks_folder: str | None = None,
    ) -> None:
        """Batches of `store` in the order `plan` fixes (`plan_split` of this store). The store handle
        is used as is in this process; shards are read through it with its `verify_reads`, each checked
        once per job: by one of this loader's processes, or with `checks_folder` (`job_checks_folder`)
        by one process of all the job's ranks on this node."""
        if not 0 <= rank < plan.world_size:
            raise TrainError(f"rank {rank} outside world size {plan.world_size}")
        check_targets(store, targets)
        self.skip_bad_shards = skip_bad_shards
        # Shards left out, with why: damaged commit records now; shards whose files or values fail
        # their checks as each loader process first reads them (reported in the batch that found them).
        self.bad_shards: dict[str, str] = {shard: f"commit record: {why}" for shard, why in store.bad_commits}
        self.targets = targets
        self.manifest = store.manifest
        self.plan = plan
        self.batch_size, self.seed, self.shuffle_buffer = batch_size, seed, shuffle_buffer
        self.eval_fraction, self.rank = plan.eval_fraction, rank
        self.hidden_layers = tuple(hidden_layers)
        for layer in self.hidden_layers:
            self.manifest.hidden.layer(layer)  # raises naming the stored layers
        self.hidden_widths = {layer.index: layer.width for layer in self.manifest.hidden.layers}
        self.max_length, self.student_vocab, self.pad_id = max_length, student_vocab, pad_id
        self.rationale_mode, self.answer_marker_ids = rationale_mode, np.array(answer_marker_ids, dtype=np.int32)
        self.batches_consumed = 0  # by this rank, at the last optimizer step (set by load_state_dict)
        self._store: Store | None = store
        self._store_pid = os.getpid()
        self._checked = CheckedShards(plan.shards, checks_folder)
        self._reopen = (store.url, store.storage_options, store.strict, store.verify_reads)
        self._tokenizer: Any = None
        self._fallbacks = 0  # multitask: records of the current batch used whole (logged as their share)
        self._ahead: CheckAhead | None = None  # this process's checks of the shards it reads next
        if plan.num_workers:
            self._load_kernels()

    def _load_kernels(self) -> None:
        """Check and read one record here, before the DataLoader forks its workers: the compiled checks
        and decoders it runs (store.kernels) take numba about 0.5 s of CPU to load in a process, which
        forked workers then inherit instead of each loading them before its first batch. What it finds
        wrong is left to the workers to report (in their batches, or skipped). Local stores only: a
        remote shard would be downloaded whole for it."""
        shard = next((s for s, rows in enumerate(self.plan.train_rows) if len(rows)), None)
        if shard is None or self.plan.shards[shard] in self.bad_shards or not is_local(self.store.fs):
            return
        store, row = self.store, int(self.plan.train_rows[shard][0])
        with contextlib.suppress(StoreError):
            # (not the store's cached reader: the workers open their own, and this one checks one record)
            reader = ShardReader(store, store.commit(self.plan.shards[shard]), by_record=True)
            reader.check_records([row])
            record_sequence(reader, row, self.targets)

    @classmethod
    def open(
        cls,
        store_url: str,
        *,
        batch_size: int,
        eval_fraction: float = 0.05,
        world_size: int = 1,
        num_workers: int = 0,
        shards: list[str] | None = None,
        storage_options: dict[str, Any] | None = None,
        skip_bad_shards: bool = False,
        verify_reads: bool = True,
        targets: str = "topk",
        **settings: Any,
    ) -> StoreDataset:
        """Open a store and plan its split in one go, for a loader used on its own (benchmarks, tests);
        a training run opens and plans once itself and hands both over. `verify_reads` off only to
        measure what the checks cost (bench/train_step.py); `settings` are the constructor's."""
        store = open_store(store_url, storage_options, strict=not skip_bad_shards, verify_reads=verify_reads)
        check_targets(store, targets)
        plan = plan_split(store, eval_fraction, world_size, num_workers, shards)
        return cls(store, plan, batch_size=batch_size, skip_bad_shards=skip_bad_shards, targets=targets, **settings)

    def __getstate__(self) -> dict[str, Any]:
        # A spawned loader worker gets a pickled copy: it opens its own store handle (`store`).
        return {**self.__dict__, "_store": None, "_tokenizer": None, "_ahead": None}

    # -- sizes ------------------------------------------------------------------------------------
    @property
    def batches_per_epoch(self) -> float:
        """Batches one rank takes per epoch (fractional: batches run across epoch boundaries)."""
        return self.plan.samples_per_rank_epoch / self.batch_size

    def steps_for_epochs(self, epochs: float, grad_accum: int) -> int:
        return max(1, math.ceil(epochs * self.batches_per_epoch / grad_accum))

    def describe(self) -> dict[str, Any]:
        p = self.plan
        return {
            "shards": len(p.shards),
            "train_records": p.num_train,
            "eval_records": p.eval_records,
            "world_size": p.world_size,
            "num_workers": p.num_workers,
            "samples_per_rank_per_epoch": p.samples_per_rank_epoch,
            "repeated_per_epoch": p.repeated_per_epoch,
            "duplicates_skipped": p.duplicates,
            "batches_per_rank_per_epoch": self.batches_per_epoch,
            "eval_note": held_out_note(p.num_train + p.eval_records, p.eval_records, self.eval_fraction),
        }

    # -- resume -----------------------------------------------------------------------------------
    def _order_spec(self) -> dict[str, Any]:
        """Everything that fixes the sample order; a resume must match it exactly."""
        return {
            "seed": self.seed,
            "batch_size": self.batch_size,
            "shuffle_buffer": self.shuffle_buffer,
            "eval_fraction": self.eval_fraction,
            "world_size": self.plan.world_size,
            "num_workers": self.plan.num_workers,
            "rationale_mode": self.rationale_mode,
            "shards": self.plan.shards,
        }

    def state_dict(self, batches_consumed: int | None = None) -> dict[str, Any]:
        consumed = self.batches_consumed if batches_consumed is None else batches_consumed
        return {"version": STATE_VERSION, "rank": self.rank, "batches_consumed": consumed, **self._order_spec()}

    def load_state_dict(self, state: dict[str, Any], where: str = "loader state") -> None:
        if state.get("version") != STATE_VERSION:
            raise TrainError(f"{where}: unknown loader state version {state.get('version')!r}")
        for key, mine in self._order_spec().items():
            if state.get(key) != mine:
                theirs = state.get(key)
                if key == "shards":
                    mine, theirs = f"{len(mine)} shards", f"{len(theirs or [])} shards"
                raise TrainError(
                    f"{where}: the run was started with {key}={theirs}, now {key}={mine}; "
                    "an exact resume needs the same value"
                )
        self.batches_consumed = int(state["batches_consumed"])

    # -- iteration --------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != max(self.plan.num_workers, 1):
            raise TrainError(
                f"StoreDataset was planned for {self.plan.num_workers} workers but runs in {workers}: "
                "pass the same num_workers to the dataset and the DataLoader"
            )
        rotation = self.batches_consumed % workers
        role = (worker + rotation) % workers  # the worker whose stream this one continues
        start = self.batches_consumed // workers + (1 if role < rotation else 0)
        return self.batches(role, start)

    def batches(self, worker: int, start_batch: int = 0) -> Iterator[dict[str, Any]]:
        """The infinite batch stream of this rank's worker `worker`, from batch `start_batch`."""
        samples = self._samples(self.rank * max(self.plan.num_workers, 1) + worker, start_batch * self.batch_size)
        while True:
            chunk = list(itertools.islice(samples, self.batch_size))
            yield shared_batch(self.collate_records(chunk))
            if self.store.verify_reads:
                self.check_ahead.start()  # (the whole checks wait for the first batch: `CheckAhead`)

    def _samples(self, part: int, start: int) -> Iterator[tuple[int, int]]:
        epoch, offset = divmod(start, self.plan.span)
        while True:
            shard_idx, rows = self.plan.epoch_span(self.seed, epoch, part, self.shuffle_buffer)
            if self.store.verify_reads:  # the shards in the order this stream first reads them
                _, first = np.unique(shard_idx[offset:], return_index=True)
                self.check_ahead.upcoming.extend(shard_idx[offset:][np.sort(first)].tolist())
            yield from zip(shard_idx[offset:].tolist(), rows[offset:].tolist(), strict=True)
            epoch, offset = epoch + 1, 0

    # -- reading ----------------------------------------------------------------------------------
    @property
    def store(self) -> Store:
        """The store handle of this process: the one handed over in the process that built the dataset,
        reopened from its URL (same options) in a loader worker. Memory maps, open zarr arrays and
        fsspec file objects are not safe to share across fork or pickle. A shard's records file and
        values are checked once per job before their first use (`verify_reads`, `_shard`)."""
        if self._store is None or self._store_pid != os.getpid():
            url, options, strict, verify_reads = self._reopen
            self._store = open_store(url, options, strict=strict, verify_reads=verify_reads)
            self._store_pid = os.getpid()
        return self._store

    def checked_shards(self) -> list[str]:
        """The plan's shards that have passed their check so far, by this loader's processes or (with a
        `checks_folder`) another rank's on this node (`Store.mark_checked`)."""
        return self._checked.all_passed()

    @property
    def check_ahead(self) -> CheckAhead:
        """This process's checks of the shards it reads (`verify_reads`), run in a background thread
        ahead of the reading."""
        if self._ahead is None or self._ahead.pid != os.getpid():
            self._ahead = CheckAhead(self.store, self.plan.shards, self._checked)
        return self._ahead

    def _shard(self, shard_idx: int, rows: list[int]) -> ShardReader:
        """The reader of a shard whose records `rows` are about to be read, those records checked: by
        their shard's whole check, or, in the process's first batch, on their own (`CheckAhead`)."""
        name = self.plan.shards[shard_idx]
        if not self.store.verify_reads or self.check_ahead.use(shard_idx):  # (raises what is wrong with the shard)
            return self.store.shard(name, checked=True)
        try:
            reader = self.store.shard(name, by_record=True)
            reader.check_records(rows)
        except StoreError as e:
            self._checked.refuse(shard_idx, str(e))
            raise
        return reader

    def read_sequences(self, shard_idx: int, row: int, batch_rows: list[int] | None = None) -> list[Sequence]:
        """The sequences of one record; `batch_rows`: the rows of its shard the batch reads, checked
        together when their shard's whole check is not done."""
        reader = self._shard(shard_idx, batch_rows or [row])
        whole = self.record(reader, shard_idx, row)
        for layer in self.hidden_layers:  # the chunk files this record's states lie in: checked before use
            reader.check_hidden(row, layer)
        if self.rationale_mode == "multitask":
            views = reader.views
            end = split_rationale(self.tokenizer, whole.ids, whole.score_start, views.text_of("rationale", row))
            if end is not None and views.text_of("answer", row) is not None:
                seqs = multitask_sequences(whole, end, self.answer_marker_ids)
                return [seq.truncate(self.max_length) for seq in seqs]
            self._fallbacks += 1  # no rationale/answer found: the record is used whole, as the main task
        return [whole.truncate(self.max_length)]

    def record(self, reader: ShardReader, shard_idx: int, row: int) -> Sequence:
        """A stored record as one sequence with its targets (several teachers: mixed, student_train/teachers.py)."""
        return record_sequence(reader, row, self.targets)

    @property
    def target_width(self) -> int:
        """Columns of a batch's top-k targets: the store's K (several teachers: their union's)."""
        return self.manifest.targets.k

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.store.tokenizer_dir)
        return self._tokenizer

    def collate_records(self, samples: list[tuple[int, int]]) -> dict[str, Any]:
        """One batch of the given samples. A sample of a shard that fails its checks makes the batch an
        `{"error": ...}` (the trainer stops with that line), or with `skip_bad_shards` is left out and
        the shard reported once in `skipped_shards`; a batch left with nothing is `{"empty": True}`."""
        self._fallbacks = 0
        seqs: list[Sequence] = []
        found: dict[str, str] = {}
        records = 0
        rows: dict[int, list[int]] = collections.defaultdict(list)
        for shard_idx, row in samples:
            rows[shard_idx].append(row)
        for shard_idx, row in samples:
            name = self.plan.shards[shard_idx]
            if name in self.bad_shards:
                continue
            try:
                seqs += self.read_sequences(shard_idx, row, rows[shard_idx])
                records += 1
            except StoreError as e:
                if not self.skip_bad_shards:
                    return {"error": f"{e} (--skip-bad-shards trains on without such shards)"}
                self.bad_shards[name] = found[name] = str(e)
        if not seqs:
            return {"empty": True, "skipped_shards": found}
        batch = collate(
            seqs,
            k=self.target_width,
            pad_id=self.pad_id,
            student_vocab=self.student_vocab,
            hidden_layers=self.hidden_layers,
            hidden_widths=self.hidden_widths,
            targets=self.targets,
        )
        if self.rationale_mode == "multitask":  # the share of records used whole: no rationale or answer found in them
            batch["multitask_fallback"] = torch.tensor(self._fallbacks / records)
        if found:
            batch["skipped_shards"] = found
        return batch
