"""Target kind "sampled" (format §4.2): N draws per scored position from the teacher's distribution
at T = 1, kept as distinct ids with counts, plus the log-prob of the token that follows. counts / N
is an unbiased estimate of the teacher's distribution; trained with forward KL at T = 1."""

from __future__ import annotations

from potstill.store.targets.parts import PartsKind


class Sampled(PartsKind):
    name = "sampled"
    holds_sampled = True
    codecs = ("none", "packed", "compact")
    train_targets = ("sampled",)
