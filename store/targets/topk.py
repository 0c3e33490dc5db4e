"""Target kind "topk" (format §4.1): each scored position's top-`k` ids and log-probs, the log-prob
of the token that follows, and the log tail (the log of the mass outside the top-K, §4.4).
Stored plain or packed; trained with bucket KD (top-K + tail)."""

from __future__ import annotations

from potstill.store.targets.parts import PartsKind


class TopK(PartsKind):
    name = "topk"
    holds_topk = True
    codecs = ("none", "packed")
    train_targets = ("topk",)
