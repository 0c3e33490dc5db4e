"""Target kind "both": the top-k targets of "topk" and, independently, the N draws of "sampled"
from the whole distribution. Trains either way (`--targets topk|sampled`)."""

from __future__ import annotations

from potstill.store.targets.sampled import Sampled


class Both(Sampled):
    name = "both"
    holds_topk = True
    train_targets = ("topk", "sampled")
