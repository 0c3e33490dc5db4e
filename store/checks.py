"""What a shard's values must satisfy beyond its checksums (docs/store-format.md §8).

A sha256 proves the bytes are the ones the writer committed, not that the writer wrote sound
values. `verify` and the training loader both run these checks, so a NaN log-prob or an id outside
the vocabulary is named with its shard and record instead of turning a student into NaN or being
folded silently into the tail. Vectorised over a whole shard: one pass over its columns.
"""

from __future__ import annotations

import numpy as np

from potstill.store.codec import SampledTargets, check_sampled
from potstill.store.errors import StoreError
from potstill.store.manifest import StoreManifest
from potstill.store.records import (
    ColumnViews,
    input_vocab,
    target_vocab,
    unsound_log_tail,
    unsound_logprobs,
    unsound_tail_mass,
    unsound_topk,
)


def _first_bad_row(offsets: np.ndarray, bad: np.ndarray) -> int:
    """The record (row of the shard) holding the first true entry of a flat per-position mask."""
    return int(np.searchsorted(offsets, int(np.flatnonzero(bad)[0]), side="right") - 1)


def value_problems(views: ColumnViews, manifest: StoreManifest) -> list[str]:
    """Problems with the values of one shard's records, each naming the first record at fault."""
    problems: list[str] = []

    def report(what: str, offsets: np.ndarray, bad: np.ndarray) -> None:
        if bad.any():
            rid = views.text_of("id", _first_bad_row(offsets, bad))
            problems.append(f"record {rid!r}: {what} ({int(bad.sum())} value(s) in the shard)")

    vocab = input_vocab(manifest)
    ids = views.input_ids
    report(f"input_ids outside [0, {vocab})", views.tok_off, (ids < 0) | (ids >= vocab))
    spec = manifest.targets
    if spec.packed:
        return problems + _packed_problems(views, manifest)
    report("token_logprob is NaN or above 0", views.tgt_off, unsound_logprobs(views.token_logprob))
    if spec.has_topk:
        report(f"top-k ids outside [0, {target_vocab(manifest)}) or log-probs NaN, infinite or above 0",
               views.tgt_off, unsound_topk(views.topk_ids, views.topk_logprobs, target_vocab(manifest)))
        report("tail_mass is NaN or outside [0, 1]", views.tgt_off, unsound_tail_mass(views.tail_mass))
        if manifest.targets.tail_logprob:
            report("tail_logprob is NaN or above 0", views.tgt_off, unsound_log_tail(views.tail_logprob))
    if spec.has_sampled:
        s_ids, counts = views.sampled_ids, views.sampled_counts
        entry_rows = views.sampled_pos_off  # entries per position; positions per record below
        bad_entry = (s_ids < 0) | (s_ids >= target_vocab(manifest)) | (counts < 1)
        if bad_entry.any():
            position = int(np.searchsorted(entry_rows, int(np.flatnonzero(bad_entry)[0]), side="right") - 1)
            row = int(np.searchsorted(views.sampled_rec_off, position, side="right") - 1)
            problems.append(f"record {views.text_of('id', row)!r}: sampled ids outside the vocabulary or counts below 1")
        elif len(counts):
            sums = np.add.reduceat(counts.astype(np.int64), entry_rows[:-1]) if len(entry_rows) > 1 else np.zeros(0)
            report(f"sampled counts of a position do not sum to N={spec.samples}", views.sampled_rec_off,
                   sums != spec.samples)
    return problems


def _packed_problems(views: ColumnViews, manifest: StoreManifest) -> list[str]:
    """Packed stores decode record by record; quantised log-probs are finite by construction, so
    what can be wrong is an id beyond the vocabulary (id_bits may hold more) or a sampled layout."""
    spec = manifest.targets
    tv = input_vocab(manifest)
    for j in range(views.num_rows):
        rid = views.text_of("id", j)
        try:
            if spec.has_topk:
                ids = views.targets_of(j)[0]
                if ids.size and (int(ids.max()) >= tv or int(ids.min()) < -1):
                    return [f"record {rid!r}: top-k ids outside [0, {tv})"]
            if spec.has_sampled:
                t: SampledTargets = views.sampled_of(j)
                check_sampled(t, views.num_scored_of(j), spec.samples, tv, f"record {rid!r}")
        except StoreError as e:
            return [str(e)]
    return []
