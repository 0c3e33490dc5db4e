"""The units of work that pass between the runner and a backend, and how they are batched."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from potstill.teacher_gen.capture import TopKLogprobs
from potstill.teacher_gen.encode import Encoded


@dataclass
class ScoreJob:
    """One sequence to score: becomes exactly one record."""

    record_id: str
    encoded: Encoded
    input_ids: np.ndarray  # int32 [n]: prompt + completion (given or generated)
    score_start: int
    hidden_start: int
    sample_index: int = 0
    generated_ids: np.ndarray | None = None  # generate mode: the teacher's completion

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class GenRequest:
    """One sample to generate: a prompt, a token budget and the seed of this (record, sample)."""

    record_id: str
    encoded: Encoded
    sample_index: int
    seed: int

    @property
    def prompt_ids(self) -> np.ndarray:
        return self.encoded.prompt_ids

    @property
    def max_new_tokens(self) -> int:
        return self.encoded.max_new_tokens


@dataclass
class Capture:
    """What the teacher produced for one `ScoreJob`: its targets (the standard capture's `TopKLogprobs`,
    or the rows of a kind's own `capture_chunk` by name), the N draws per scored position [S, N] of
    sampled targets, and its hidden states. The store's kind turns them into a record's targets
    (`TargetKind.record_targets`)."""

    targets: TopKLogprobs | Any
    hidden: dict[int, np.ndarray] = field(default_factory=dict)  # stored layer index -> [rows, width]
    draws: np.ndarray | None = None


@dataclass
class Generated:
    """One generated completion: its ids (ending with EOS when the teacher stopped by itself) and,
    when the backend scored it while decoding, the capture of exactly those tokens (targets of the
    completion's tokens, no hidden states); None when the runner must score it afterwards."""

    ids: np.ndarray  # int32 [n]
    capture: Capture | None = None


class Teacher(Protocol):
    """What the runner needs from a backend."""

    def score(self, jobs: list[ScoreJob]) -> Callable[[], list[Capture]]:
        """Start scoring one batch; the returned function waits for and returns its captures.

        Splitting launch from collection lets a GPU backend run batch i+1 while batch i is
        copied to the host and handed to the writer.
        """
        ...

    def generate(self, requests: list[GenRequest], on_tokens: Callable[[int], None] | None = None) -> list[Generated]:
        """One completion per request, scored already when the backend could do it while decoding.
        `on_tokens(n)` is told of n more generated tokens (EOS included, padding after it not) as
        they come, where the backend can (HF: every decoding step), else once at the end."""
        ...

    def score_batches(self, jobs: list[ScoreJob]) -> Iterator[list[ScoreJob]]: ...

    def generate_batches(self, requests: list[GenRequest]) -> Iterator[list[GenRequest]]: ...

    def close(self) -> None: ...


def derive_seed(seed: int, record_id: str, sample_index: int) -> int:
    """A 63-bit seed per (run seed, record, sample): a sample never depends on its batch-mates."""
    digest = hashlib.sha256(f"{seed}\x00{record_id}\x00{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# The manifest's `targets.sampling`: how the draws are made (format §4.2 has the full recipe). A store's
# draws must all come from one sampler, so a run refuses to resume a store whose text differs.
SAMPLING_METHOD = (
    "N independent draws with replacement from softmax(fp32 logits) at temperature 1, by inverse CDF "
    "over the float64 cumulative sum of p = exp(x - logsumexp(x)) computed in float64 (x: the fp32 logits "
    "widened); uniforms from numpy PCG64 seeded per record by target_seed(seed, record id)"
)
_POINTS = {
    "systematic": "N systematic draws (points (j + u_0) / N, j = 0..N-1, one uniform per position)",
    "stratified": "N stratified draws (points (j + u_j) / N, j = 0..N-1, one per stratum)",
}


def sampling_method(sampler: str = "iid", from_rest: bool = False) -> str:
    """The manifest's `targets.sampling` text for a sampler (`teacher_gen.capture.SAMPLERS`); with
    `from_rest` (hybrid targets) the draws come from p with the top-K ids set to 0."""
    text = SAMPLING_METHOD
    if sampler != "iid":
        text = text.replace("N independent draws with replacement", _POINTS[sampler])
    if from_rest:
        text = text.replace("computed in float64", "computed in float64, the top-K ids' p set to 0 (draws from the rest)")
    return text


def target_seed(seed: int, record_id: str) -> int:
    """The seed of a record's sampled-target draws: from the run seed and the record id only, so the
    draws are the same whatever batch the record lands in, after a resume and on any worker."""
    digest = hashlib.sha256(f"targets\x00{seed}\x00{record_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def target_uniforms(seed: int, record_id: str, positions: int, samples: int) -> np.ndarray:
    """[positions, samples] float64 uniforms in [0, 1) for a record's draws (numpy PCG64)."""
    return np.random.default_rng(target_seed(seed, record_id)).random((positions, samples))


def batches_by_tokens(items: list, length: Callable[[object], int], budget: int,
                      key: Callable[[object], object] | None = None) -> Iterator[list]:
    """Group items, longest first, so that rows x longest row stays within `budget` padded tokens.

    Longest first: the largest batch runs first, so running out of memory shows at once. Items
    with different `key`s never share a batch (generation budgets, for instance).
    """
    order = sorted(items, key=lambda x: (key(x) if key else 0, -length(x)))
    batch: list = []
    longest = 0
    for item in order:
        n = length(item)
        same_key = not batch or key is None or key(batch[0]) == key(item)
        if batch and (not same_key or max(longest, n) * (len(batch) + 1) > budget):
            yield batch
            batch, longest = [], 0
        batch.append(item)
        longest = max(longest, n)
    if batch:
        yield batch
