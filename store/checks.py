"""What a shard's values must satisfy beyond its checksums (docs/reference/store-format.md §8).

A sha256 proves the bytes are the ones the writer committed, not that the writer wrote sound
values. `verify` and the training loader both run these checks, so a NaN log-prob or an id outside
the vocabulary is named with its shard and record instead of turning a student into NaN or being
folded silently into the tail. Vectorised over a whole shard: one pass over its columns.
"""

from __future__ import annotations

import numpy as np

from potstill.store.columns import input_vocab
from potstill.store.manifest import StoreManifest
from potstill.store.records import ColumnViews


def value_problems(views: ColumnViews, manifest: StoreManifest) -> list[str]:
    """Problems with the values of one shard's records, each naming the first record at fault: the
    tokens here, the targets by the store's kind (`TargetColumns.value_problems`)."""
    vocab = input_vocab(manifest)
    bad = (views.input_ids < 0) | (views.input_ids >= vocab)
    problems = []
    if bad.any():
        row = int(np.searchsorted(views.tok_off, int(np.flatnonzero(bad)[0]), side="right") - 1)
        problems.append(f"record {views.text_of('id', row)!r}: input_ids outside [0, {vocab}) "
                        f"({int(bad.sum())} value(s) in the shard)")
    return problems + views.columns.value_problems(views, manifest)
