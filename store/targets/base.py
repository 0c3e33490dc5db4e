"""What a target kind and a codec are (docs/guides/extending.md): the base classes every kind and codec
module derives from, and the named structures they hand to the loader and the teacher.

A **target kind** (`TargetKind`) is what each scored position of a store carries: which fields of
the manifest's `targets` it uses, its Arrow columns, the checks of their values, the codecs it
allows, the capture it needs from the teacher and the rows it gives the loader. A **codec**
(`Codec`) is how the built-in kinds' parts (the token's log-prob, the top-k with its log tail,
the sampled draws) are laid out in those columns. Both are found by the name the manifest records
(`store.targets.kind_named`, `codec_named`).

Nothing here imports torch: a kind's capture works on tensors the teacher hands in, and imports
torch inside the function when it must.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import numpy as np
import pyarrow as pa

from potstill.store.codec import SampledTargets
from potstill.store.errors import StoreError

# Objects of the modules above this package (which import it), typed loosely here:
StoreManifest = Any  # store.manifest.StoreManifest
Record = Any  # store.records.Record
ColumnViews = Any  # store.records.ColumnViews

LOGPROB_DTYPES = ("float16", "float32")
# How a position's N draws are placed (format §4.2).
SAMPLERS = ("iid", "systematic", "stratified")
# How the `tail_logprob` column (docs/reference/store-format.md §4.4) was computed:
# "direct": logsumexp of the logits outside the top-K minus logsumexp of all of them;
# "complement": log(1 − Σ exp(top-K log-probs)) in float64, when only the top-K are known (vLLM).
TAIL_METHODS = ("direct", "complement")


class TopKRows(NamedTuple):
    """A record's top-k targets, one row per scored position: what `ColumnViews.targets_of` returns
    and what the loader trains bucket KD on."""

    ids: np.ndarray  # [S, K] int32, −1 marks an empty slot
    logprobs: np.ndarray  # [S, K]
    token_logprob: np.ndarray  # [S] float32
    tail_logprob: np.ndarray  # [S] float32: log of the mass outside the top-K


class WeightedRows(NamedTuple):
    """A record's weighted ids, one row per scored position: Σ_u weight_u f(u) estimates the teacher's
    E_p[f] (sampled draws: count / N; hybrid targets: p_v for the top-K, exp(tail) · count / N for
    the draws). `ids` [S, W] int64 padded with −1, `weights` [S, W] float32 padded with 0;
    `lengths` [S]: the columns row s uses (the loader pads a batch to the widest row it trains)."""

    ids: np.ndarray
    weights: np.ndarray
    lengths: np.ndarray


# The two shapes the loader collates (student_train/data.py): a kind offers its records as one or
# both, under these names (`--targets topk|sampled` of `potstill train`).
TRAIN_TARGETS = ("topk", "sampled")


@dataclass(frozen=True)
class CaptureNeeds:
    """What a kind asks of a backend's standard capture (teacher_gen/capture.py `topk_logprobs`):
    the top-`top_k` ids and log-probs with the log tail, and `samples` draws per position, from the
    ids outside the top-K when `draw_from_rest`. A kind with a capture of its own (`capture_chunk`)
    needs none of it."""

    top_k: int = 0
    samples: int = 0
    draw_from_rest: bool = False


class TargetColumns:
    """One record batch's target columns, opened for reading (what `TargetKind.open` returns).

    `tgt_off` [records + 1] are the offsets of each record's scored positions. The accessors raise
    for a part the kind does not hold."""

    tgt_off: np.ndarray

    def token_logprob(self, j: int) -> np.ndarray:
        raise NotImplementedError

    def topk(self, j: int) -> TopKRows:
        raise StoreError("the store holds no top-k targets")

    def sampled(self, j: int) -> SampledTargets:
        raise StoreError("the store holds no sampled targets")

    def sampled_rows(self, j: int) -> WeightedRows:
        """Record j's sampled targets as the loader trains on them: each position's ids, weighted
        count / N. A codec may decode straight into these rows."""
        sampled = self.sampled(j)
        ids, counts = sampled.padded()
        weights = counts / np.maximum(counts.sum(-1, keepdims=True), 1)  # every position's counts sum to N
        return WeightedRows(ids, weights.astype(np.float32), sampled.lengths())

    def record_fields(self, j: int) -> dict[str, Any]:
        """Record j's target fields of `Record` (token_logprob, topk_*, tail_logprob, sampled)."""
        raise NotImplementedError

    def shape_problems(self, views: ColumnViews, manifest: StoreManifest) -> list[str]:
        """verify: the columns against each other and the format's rules (row counts, byte lengths)."""
        return []

    def value_problems(self, views: ColumnViews, manifest: StoreManifest) -> list[str]:
        """verify and checked reads: values no teacher writes, each naming the first record at fault."""
        return []


class TargetKind:
    """A target kind: what each scored position of a store carries. Subclass, set the class
    attributes, implement the methods that raise here, then `register_kind(MyKind())`. The built-in
    kinds derive from `store.targets.parts.PartsKind`, which implements them from parts the
    manifest's codec lays out; a kind with columns of its own implements them itself
    (tests/test_target_kind_registry.py).

    A kind fills the `Record` fields it holds: `token_logprob` always; `topk_ids` [S, K],
    `topk_logprobs` [S, K] and `tail_logprob` [S] when `holds_topk`; `sampled` when `holds_sampled`.
    """

    name: ClassVar[str]  # what the manifest's `targets.kind` records
    holds_topk: ClassVar[bool] = False
    holds_sampled: ClassVar[bool] = False
    draws_from_rest: ClassVar[bool] = False  # the draws come from the ids outside the top-K
    codecs: ClassVar[tuple[str, ...]] = ("none",)  # codecs this kind may be stored with
    train_targets: ClassVar[tuple[str, ...]] = ()  # TRAIN_TARGETS it offers the loader, the default first

    @property
    def holds_tail(self) -> bool:
        """Whether the kind stores a log tail (then `targets.tail_logprob` says how it was made)."""
        return self.holds_topk

    # -- manifest: the `targets` fields it uses --------------------------------------------------------
    def check_spec(self, spec: TargetSpec) -> None:
        """Refuse `targets` fields this kind cannot use, in one line naming the field."""

    def manifest_keys(self, spec: TargetSpec) -> dict[str, Any]:
        """The kind's keys of the manifest's `targets` object beyond kind, k, logprob_dtype,
        temperature, logprobs_from, tail_logprob and the codec's."""
        return {}

    # -- columns: writing, reading, checking ------------------------------------------------------
    def arrow_fields(self, spec: TargetSpec) -> list[pa.Field]:
        """The target columns, in column order (format §4)."""
        raise NotImplementedError

    def encode(self, records: list[Record], spec: TargetSpec) -> dict[str, pa.Array]:
        """The target columns of validated records, by name."""
        raise NotImplementedError

    def open(self, batch: pa.RecordBatch, spec: TargetSpec, views: ColumnViews) -> TargetColumns:
        """One record batch's target columns, for reading and checking."""
        raise NotImplementedError

    def validate(self, rec: Record, manifest: StoreManifest, where: str) -> None:
        """Check a record's targets before writing and put them in the stored dtypes, in place;
        refuse a record at fault in one line starting with `where`."""
        raise NotImplementedError

    def nbytes(self, rec: Record) -> int:
        """Approximate bytes a validated record's targets take (for closing shards by size)."""
        total = sum(a.nbytes for a in (rec.token_logprob, rec.topk_ids, rec.topk_logprobs, rec.tail_logprob)
                    if a is not None)
        if rec.sampled is not None:
            total += rec.sampled.ids.nbytes + rec.sampled.counts.nbytes + 4 * rec.sampled.num_positions
        return total

    # -- capture: what the teacher must compute ---------------------------------------------------
    # A kind defines a method
    #     capture_chunk(logits: Tensor [m, V] float32, token_ids: Tensor [m] int64) -> dict[str, Tensor]
    # of per-position tensors, one of them "token_logprob" (the backend checks it against the model's
    # own forward): `logits` are one chunk of the teacher's, widened to float32 with the model's
    # logit transform applied (the HF backend). `record_targets` then gets an object with the
    # record's rows of each as attributes. Or, like the built-in kinds, it leaves capture_chunk None
    # and asks for the standard capture (`capture_needs`).
    capture_chunk: Any = None

    def capture_needs(self, top_k: int, samples: int) -> CaptureNeeds:
        """What the standard capture must make for a run of `--top-k top_k --samples samples`."""
        return CaptureNeeds()

    def record_targets(self, captured: Any, draws: np.ndarray | None) -> dict[str, Any]:
        """`Record` target fields from one record's capture: the standard capture's `TopKLogprobs`
        and its draws [S, N], or the record's rows of `capture_chunk`'s arrays."""
        raise NotImplementedError

    # -- training: the rows the loader collates ---------------------------------------------------
    def default_train_target(self, sampled_loss_ok: bool) -> str:
        """The loader shape `--targets auto` trains on: the sampled one where the loss can use it
        (forward KL at T = 1, which is linear in p) or where there is no other."""
        if "sampled" in self.train_targets and (sampled_loss_ok or "topk" not in self.train_targets):
            return "sampled"
        return self.train_targets[0]

    def train_rows(self, columns: TargetColumns, j: int, target: str) -> TopKRows | WeightedRows:
        """Record j's targets in the loader's shape `target` (one of `train_targets`)."""
        if target == "topk":
            return columns.topk(j)
        return columns.sampled_rows(j)


class Codec:
    """A codec: subclass (store/targets/codecs.py holds the built-in ones), override what differs,
    then `register_codec(MyCodec())`."""

    name: ClassVar[str]
    packed: ClassVar[bool] = True  # log-probs are quantised (`TargetSpec.quantizer`)
    sampled_only: ClassVar[bool] = False  # codes sampled draws only (no fixed count width)
    uses_id_order: ClassVar[bool] = False

    def check_spec(self, spec: TargetSpec, kind: TargetKind) -> None:
        if spec.id_order is not None and not self.uses_id_order:
            raise StoreError(f"targets.id_order is a setting of the compact codec; the codec is {spec.codec!r}")

    def manifest_keys(self, spec: TargetSpec, kind: TargetKind) -> dict[str, Any]:
        return {}

    def count_bits(self, samples: int) -> int | None:
        """`targets.count_bits` of sampled targets of N = `samples` draws: None where counts have no
        fixed width (unpacked, or coded by value)."""
        return None

    def fields(self, spec: TargetSpec, kind: TargetKind) -> list[pa.Field]:
        raise NotImplementedError

    def encode(self, records: list[Record], spec: TargetSpec, kind: TargetKind) -> dict[str, pa.Array]:
        raise NotImplementedError

    def open(self, batch: pa.RecordBatch, spec: TargetSpec, kind: TargetKind, views: ColumnViews) -> TargetColumns:
        raise NotImplementedError


# -- the registries ----------------------------------------------------------------------------------
# By name: what this potstill reads and writes (a test takes one out to act as an older reader).
KINDS: dict[str, TargetKind] = {}
CODECS: dict[str, Codec] = {}


def register_kind(kind: TargetKind) -> TargetKind:
    """Make `kind` findable by its name; a name registers once (another kind of that name is refused)."""
    known = KINDS.get(kind.name)
    if known is not None and type(known) is not type(kind):
        raise StoreError(f"target kind {kind.name!r} is already registered ({type(known).__name__})")
    KINDS[kind.name] = kind
    return kind


def unregister_kind(name: str) -> None:
    KINDS.pop(name, None)


def kind_named(name: str) -> TargetKind:
    kind = KINDS.get(name)
    if kind is None:
        raise StoreError(f"unknown target kind {name!r}; expected one of {kind_names()}")
    return kind


def kind_names() -> tuple[str, ...]:
    return tuple(KINDS)


def register_codec(codec: Codec) -> Codec:
    CODECS[codec.name] = codec
    return codec


def codec_named(name: str) -> Codec:
    codec = CODECS.get(name)
    if codec is None:
        raise StoreError(f"unknown targets.codec {name!r}; expected one of {codec_names()}")
    return codec


def codec_names() -> tuple[str, ...]:
    return tuple(CODECS)


# -- the manifest's `targets` -------------------------------------------------------------------------
@dataclass
class TargetSpec:
    """The manifest's `targets` section (format §2, §4): what each scored position carries.

    One flat record of every field any kind or codec uses, as the manifest stores it; which fields
    apply, their checks and the keys written back are the kind's (`target_kind`, found by `kind`)
    and the codec's (`codec_impl`, found by `codec`). The built-in kinds: "topk", the top-`k` ids
    and log-probs plus the log tail; "sampled", `samples` draws from the teacher's distribution as
    distinct ids with counts, placed by `sampler` ("iid", "systematic" or "stratified", §4.2);
    "both"; "hybrid", the top-`k`, the log tail and `samples` draws from the ids outside the top-k.
    Codecs: "none" (plain Arrow lists), "packed" (ids in `id_bits`, counts in `count_bits`,
    log-probs quantised to `logprob_bits` over [`logprob_min`, 0]), "compact" (sampled draws coded
    by their place in the order `id_order`).

    `tail_logprob` says how the stored log tail (the log of the mass outside the top-K) was made,
    "direct" or "complement" (`TAIL_METHODS`); None for kinds without a tail.
    """

    kind: str = "topk"
    k: int = 64  # 0 when kind is "sampled"
    logprob_dtype: str = "float16"  # codec "none": how top-k log-probs are stored
    temperature: float = 1.0
    logprobs_from: str = "fp32"
    samples: int = 0  # N draws per position (kind "sampled" / "both")
    seed: int | None = None  # the run seed the per-record draws derive from
    sampling: str | None = None  # how the draws were made, in words
    sampler: str = "iid"  # iid, systematic or stratified draws
    codec: str = "none"
    id_bits: int | None = None  # packed: bits per token id, ceil(log2 vocabulary)
    count_bits: int | None = None  # packed, sampled: bits per count, ceil(log2(N + 1))
    logprob_bits: int | None = None  # packed: bits per quantised log-prob
    logprob_min: float | None = None  # packed: log-probs are clamped to [logprob_min, 0]
    tail_logprob: str | None = "direct"  # how the log tail was made; None for kinds without one
    id_order: list[int] | None = None  # compact: ids coded first, most frequent first (format §4.3.2)

    def __post_init__(self) -> None:
        kind = self.target_kind  # raises on an unknown kind
        if not kind.holds_tail:
            self.tail_logprob = None  # no top-K, no tail
        elif self.tail_logprob not in TAIL_METHODS:
            raise StoreError(f"targets.tail_logprob must be one of {TAIL_METHODS}, got {self.tail_logprob!r}")
        kind.check_spec(self)
        if self.logprob_dtype not in LOGPROB_DTYPES:
            raise StoreError(f"targets.logprob_dtype must be one of {LOGPROB_DTYPES}, got {self.logprob_dtype!r}")
        if self.sampler not in SAMPLERS:
            raise StoreError(f"targets.sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        codec = self.codec_impl  # raises on an unknown codec
        if self.codec not in kind.codecs:
            if codec.sampled_only:
                raise StoreError(f"targets.codec {self.codec} codes sampled draws; {self.kind} targets use the packed codec")
            raise StoreError(f"targets.codec {self.codec} cannot store {self.kind} targets (they take: {', '.join(kind.codecs)})")
        codec.check_spec(self, kind)

    @property
    def target_kind(self) -> TargetKind:
        """The registered kind (store/targets) that reads, writes and checks these targets."""
        return kind_named(self.kind)

    @property
    def codec_impl(self) -> Codec:
        """The registered codec (store/targets/codecs.py) that lays out these targets' columns."""
        return codec_named(self.codec)

    @functools.cached_property
    def id_order_map(self) -> Any:
        """The compact codec's `store.codec.IdOrder` (None without an id order), built once."""
        from potstill.store.codec import IdOrder

        return IdOrder(self.id_order, vocab=1 << int(self.id_bits or 0)) if self.id_order else None

    @property
    def has_topk(self) -> bool:
        return self.target_kind.holds_topk

    @property
    def has_sampled(self) -> bool:
        return self.target_kind.holds_sampled

    @property
    def draws_from_rest(self) -> bool:
        """Hybrid targets: the draws come from the distribution outside the top-K, weighted by the tail."""
        return self.target_kind.draws_from_rest

    @property
    def packed(self) -> bool:
        return self.codec_impl.packed

    def quantizer(self) -> Any:
        """The packed codec's `store.codec.LogprobQuantizer`."""
        from potstill.store.codec import LogprobQuantizer

        if not self.packed:
            raise StoreError("only packed stores quantise log-probs")
        return LogprobQuantizer(int(self.logprob_bits or 0), float(self.logprob_min or 0.0))

    def to_dict(self) -> dict[str, Any]:
        """The manifest's `targets` object: the keys every kind has, then only the keys the kind and
        its codec use (the packed codecs add the quantiser's step and error bound, informative)."""
        out: dict[str, Any] = {
            "kind": self.kind, "k": self.k, "logprob_dtype": self.logprob_dtype,
            "temperature": self.temperature, "logprobs_from": self.logprobs_from, "codec": self.codec,
        }
        if self.tail_logprob is not None:
            out["tail_logprob"] = self.tail_logprob
        kind = self.target_kind
        out.update(kind.manifest_keys(self))
        out.update(self.codec_impl.manifest_keys(self, kind))
        return out
