"""Target kind "hybrid" (format §4.2): the exact top-K with its log tail, plus N draws from the
teacher's distribution restricted to the ids outside the top-K. The weights p_v for the top-K and
exp(tail) · count / N for the draws give an unbiased estimate of the whole distribution (reading it
as "both" would weight its draws wrongly)."""

from __future__ import annotations

import numpy as np

from potstill.store.codec import SampledTargets
from potstill.store.targets.base import TargetColumns, TopKRows, WeightedRows
from potstill.store.targets.both import Both


class Hybrid(Both):
    name = "hybrid"
    draws_from_rest = True

    def train_rows(self, columns: TargetColumns, j: int, target: str) -> TopKRows | WeightedRows:
        if target == "topk":
            return columns.topk(j)
        top = columns.topk(j)
        sampled = columns.sampled(j)
        ids, weights = hybrid_weights(top.ids, top.logprobs, top.tail_logprob, sampled, np.arange(len(top.ids)))
        return WeightedRows(ids, weights, top.ids.shape[1] + sampled.lengths())


def hybrid_weights(top_ids: np.ndarray, top_logprobs: np.ndarray, tail_logprob: np.ndarray, sampled: SampledTargets,
                   rows: np.ndarray, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The unbiased target of hybrid targets at positions `rows`: ([R, W] int64 ids padded with −1,
    [R, W] float32 weights): the top-K ids with weight p_v = exp(log-prob), then the draws from the
    rest with weight exp(tail) · count / N, so that Σ_v w_v f(v) estimates Σ_v p_v f(v) without bias
    (E[count / N] is p_v / tail for v outside the top-K). W = `width` or K + the most distinct draws.
    The tail is the stored log tail, formed directly (never 1 − Σ top-K), in float64 here."""
    k = top_ids.shape[1]
    got_ids, counts = sampled.padded(rows, None if width is None else width - k)
    n = counts.sum(-1, keepdims=True)
    rest = np.exp(np.asarray(tail_logprob, np.float64))[:, None] * counts / np.maximum(n, 1)
    ids = np.concatenate([np.where(top_ids >= 0, top_ids, -1).astype(np.int64), got_ids], axis=1)
    weights = np.concatenate([np.exp(np.asarray(top_logprobs, np.float64)), rest], axis=1)
    weights[ids < 0] = 0.0
    return ids, weights.astype(np.float32)
