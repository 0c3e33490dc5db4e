"""The store manifest (docs/store-format.md §2): what a store holds and who made it."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import hashlib
import json
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from potstill.store.errors import FormatVersionError, StoreError

FORMAT_NAME = "potstill-store"
FORMAT_VERSION = "1.1"  # what a plain top-k, unpacked store is written as (readable by every potstill)
LATEST_FORMAT_VERSION = "2.4"  # sampled / hybrid targets or the packed codecs (docs/store-format.md §4.2, §4.3)
READ_MAJOR = 2  # the newest major version this code reads

LOGPROB_DTYPES = ("float16", "float32")
HIDDEN_DTYPES = ("float16", "bfloat16")
# "hybrid" (format 2.2): the exact top-K plus N draws from the rest. A 2.0 / 2.1 reader refuses it as
# an unknown kind, where reading it as "both" would weight its draws wrongly.
TARGET_KINDS = ("topk", "sampled", "both", "hybrid")
# How a position's N draws are placed (format §4.2); "iid" is what stores before 2.2 hold.
SAMPLERS = ("iid", "systematic", "stratified")
# "compact" (format 2.3): "packed", with the sampled draws' ids gap-coded and counts gamma-coded (§4.3.1).
# A reader before 2.3 refuses it as an unknown codec.
# "compact2" (format 2.4): "packed", with the sampled draws split into head (count ≥ 2) and tail
# (count 1), coded by their place in a frequency order (`id_order`) with a Rice parameter per rank
# bucket (§4.3.2). A reader before 2.4 refuses it as an unknown codec.
CODECS = ("none", "packed", "compact", "compact2")
COMPACT_CODECS = ("compact", "compact2")  # codecs that gap-code sampled draws (no fixed count width)
# How the `tail_logprob` column (format 1.1 / 2.1, docs/store-format.md §4.4) was computed:
# "direct": logsumexp of the logits outside the top-K minus logsumexp of all of them;
# "complement": log(1 − Σ exp(top-K log-probs)) in float64, when only the top-K are known (vLLM).
TAIL_METHODS = ("direct", "complement")


def potstill_version() -> str:
    try:
        return metadata.version("potstill")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "0.0.0+source"


def utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_version(version: Any, where: str) -> tuple[int, int]:
    try:
        major, minor = str(version).split(".")
        return int(major), int(minor)
    except (ValueError, AttributeError):
        raise StoreError(f"{where}: malformed format_version {version!r}") from None


def check_readable(version: Any, where: str) -> None:
    """Refuse a newer major version in one line; accept every older or same-major one."""
    major, _ = parse_version(version, where)
    if major > READ_MAJOR:
        raise FormatVersionError(
            f"{where} uses format {version}, newer than this potstill ({potstill_version()}) reads "
            f"({READ_MAJOR}.x): upgrade potstill"
        )
    if major < 1:
        raise StoreError(f"{where}: unknown format_version {version!r}")


@dataclass
class FileEntry:
    path: str
    bytes: int
    sha256: str


@dataclass
class TeacherInfo:
    name_or_path: str
    revision: str | None = None
    config_hash: str | None = None
    dtype: str = "float32"
    architecture: str | None = None
    num_hidden_layers: int | None = None
    hidden_size: int | None = None
    vocab_size: int | None = None


@dataclass
class TokenizerInfo:
    fingerprint: str
    vocab_size: int
    special_tokens: dict[str, int | None] = field(default_factory=dict)
    files: list[FileEntry] = field(default_factory=list)


@dataclass
class TargetSpec:
    """What each scored position carries (format §2 `targets`, §4).

    `kind` "topk": the top-`k` ids and log-probs plus the tail; "sampled": `samples` draws from
    the teacher's distribution as distinct ids with counts; "both"; "hybrid": the top-`k` ids and
    log-probs, the log tail, and `samples` draws from the teacher's distribution restricted to the
    ids outside the top-k (weights: p_v for the top-k, exp(tail) · count / N for the draws).
    `sampler` says how the draws are placed: "iid", "systematic" or "stratified" (format §4.2);
    stores before 2.2 are "iid". `codec` "none" stores them as
    plain Arrow lists; "packed" bit-packs ids to `id_bits`, counts to `count_bits` and quantises
    log-probs to `logprob_bits` over [`logprob_min`, 0] (`store.codec`). Anything beyond a plain
    top-k, unpacked store needs format 2.x (`required_version`).

    `tail_logprob` says how the stored log tail (the log of the mass outside the top-K) was made,
    "direct" or "complement" (`TAIL_METHODS`); None for a store of format 1.0 / 2.0, which has no
    such column and only the approximate `tail_mass` (and for targets without top-k, which have no
    tail). A store with it is 1.1 / 2.1.
    """

    kind: str = "topk"
    k: int = 64  # 0 when kind is "sampled"
    logprob_dtype: str = "float16"  # codec "none": how top-k log-probs are stored
    temperature: float = 1.0
    logprobs_from: str = "fp32"
    samples: int = 0  # N draws per position (kind "sampled" / "both")
    seed: int | None = None  # the run seed the per-record draws derive from
    sampling: str | None = None  # how the draws were made, in words
    sampler: str = "iid"  # iid, systematic or stratified draws (format 2.2 when not iid)
    codec: str = "none"
    id_bits: int | None = None  # packed: bits per token id, ceil(log2 vocabulary)
    count_bits: int | None = None  # packed, sampled: bits per count, ceil(log2(N + 1))
    logprob_bits: int | None = None  # packed: bits per quantised log-prob
    logprob_min: float | None = None  # packed: log-probs are clamped to [logprob_min, 0]
    tail_logprob: str | None = "direct"  # how the log tail was made; None: format 1.0 / 2.0 (no log tail)
    id_order: list[int] | None = None  # compact2: ids coded first, most frequent first (format §4.3.2)

    def __post_init__(self) -> None:
        if not self.has_topk:
            self.tail_logprob = None  # no top-K, no tail
        if self.tail_logprob is not None and self.tail_logprob not in TAIL_METHODS:
            raise StoreError(f"targets.tail_logprob must be one of {TAIL_METHODS}, got {self.tail_logprob!r}")
        if self.kind not in TARGET_KINDS:
            raise StoreError(f"unknown target kind {self.kind!r}; expected one of {TARGET_KINDS}")
        if self.has_topk and (not isinstance(self.k, int) or self.k < 1):
            raise StoreError(f"targets.k must be a positive integer, got {self.k!r}")
        if not self.has_topk and self.k != 0:
            raise StoreError(f"targets.k must be 0 when targets.kind is {self.kind!r}, got {self.k!r}")
        if self.logprob_dtype not in LOGPROB_DTYPES:
            raise StoreError(f"targets.logprob_dtype must be one of {LOGPROB_DTYPES}, got {self.logprob_dtype!r}")
        if self.has_sampled and (not isinstance(self.samples, int) or not 1 <= self.samples <= 65535):
            raise StoreError(f"targets.samples must be an integer in [1, 65535], got {self.samples!r}")
        if self.sampler not in SAMPLERS:
            raise StoreError(f"targets.sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.codec not in CODECS:
            raise StoreError(f"unknown targets.codec {self.codec!r}; expected one of {CODECS}")
        if self.codec in COMPACT_CODECS and not self.has_sampled:
            raise StoreError(f"targets.codec {self.codec} codes sampled draws; {self.kind} targets use the packed codec")
        if self.packed:
            from potstill.store.codec import MAX_BITS, LogprobQuantizer, bits_for

            if not isinstance(self.id_bits, int) or not 1 <= self.id_bits <= MAX_BITS:
                raise StoreError(f"targets.id_bits must be an integer in [1, {MAX_BITS}], got {self.id_bits!r}")
            if self.codec == "packed" and self.has_sampled and self.count_bits != bits_for(self.samples):
                raise StoreError(f"targets.count_bits must be {bits_for(self.samples)} for N={self.samples}, got {self.count_bits!r}")
            if not isinstance(self.logprob_bits, int) or not isinstance(self.logprob_min, int | float):
                raise StoreError("targets.logprob_bits and targets.logprob_min are required by the packed codec")
            LogprobQuantizer(self.logprob_bits, float(self.logprob_min))  # raises on a bad range
        if self.id_order is not None:
            self._check_id_order()

    def _check_id_order(self) -> None:
        from potstill.store.codec import MAX_ID_ORDER

        order = self.id_order
        if self.codec != "compact2":
            raise StoreError(f"targets.id_order is a compact2 setting; the codec is {self.codec!r}")
        if (not isinstance(order, list) or len(order) > MAX_ID_ORDER
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in order)):
            raise StoreError(f"targets.id_order must be a list of at most {MAX_ID_ORDER} token ids")
        if order and (min(order) < 0 or max(order) >= 1 << int(self.id_bits or 0) or len(set(order)) != len(order)):
            raise StoreError(f"targets.id_order must list distinct token ids in [0, 2^{self.id_bits})")

    @functools.cached_property
    def id_order_map(self) -> Any:
        """The compact2 codec's `store.codec.IdOrder` (None without an id order), built once."""
        from potstill.store.codec import IdOrder

        return IdOrder(self.id_order, vocab=1 << int(self.id_bits or 0)) if self.id_order else None

    @property
    def has_topk(self) -> bool:
        return self.kind in ("topk", "both", "hybrid")

    @property
    def has_sampled(self) -> bool:
        return self.kind in ("sampled", "both", "hybrid")

    @property
    def draws_from_rest(self) -> bool:
        """Hybrid targets: the draws come from the distribution outside the top-K, weighted by the tail."""
        return self.kind == "hybrid"

    @property
    def packed(self) -> bool:
        return self.codec != "none"

    def quantizer(self) -> Any:
        """The packed codec's `store.codec.LogprobQuantizer`."""
        from potstill.store.codec import LogprobQuantizer

        if not self.packed:
            raise StoreError("only packed stores quantise log-probs")
        return LogprobQuantizer(int(self.logprob_bits or 0), float(self.logprob_min or 0.0))

    @property
    def major_version(self) -> int:
        """1 for plain top-k targets without the packed codec, which every 1.x reader reads; else 2."""
        return 1 if self.kind == "topk" and self.codec == "none" else 2

    def required_version(self) -> str:
        """The lowest format version that describes these targets: x.1 when they carry the log
        tail (format §4.4), x.0 when not; 2.2 for hybrid targets or draws that are not i.i.d.; 2.3
        for the compact codec, 2.4 for compact2."""
        if self.codec == "compact2":
            return "2.4"
        if self.codec == "compact":
            return "2.3"
        if self.kind == "hybrid" or (self.has_sampled and self.sampler != "iid"):
            return "2.2"
        return f"{self.major_version}.{0 if self.tail_logprob is None else 1}"

    def to_dict(self) -> dict[str, Any]:
        """The manifest's `targets` object: a 1.x store gets exactly the 1.0 keys (plus `tail_logprob`
        in 1.1); others only the keys their kind and codec use, plus the quantiser's step and error
        bound (informative)."""
        out: dict[str, Any] = {
            "kind": self.kind, "k": self.k, "logprob_dtype": self.logprob_dtype,
            "temperature": self.temperature, "logprobs_from": self.logprobs_from,
        }
        if self.tail_logprob is not None:
            out["tail_logprob"] = self.tail_logprob
        if self.major_version == 1:
            return out
        out["codec"] = self.codec
        if self.has_sampled:
            out.update(samples=self.samples, seed=self.seed, sampling=self.sampling)
            if parse_version(self.required_version(), "targets") >= (2, 2):
                out["sampler"] = self.sampler
        if self.packed:
            q = self.quantizer()
            out.update(id_bits=self.id_bits, logprob_bits=self.logprob_bits, logprob_min=self.logprob_min,
                       logprob_step=q.step, logprob_max_error=q.max_error, tail_mass="recomputed")
            if self.codec == "packed" and self.has_sampled:
                out["count_bits"] = self.count_bits
            if self.id_order:
                out["id_order"] = list(self.id_order)
        return out


@dataclass
class HiddenLayer:
    index: int
    width: int
    dtype: str = "bfloat16"
    post_norm: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.index, int) or self.index < 0:
            raise StoreError(f"hidden layer index must be a non-negative integer, got {self.index!r}")
        if not isinstance(self.width, int) or self.width < 1:
            raise StoreError(f"hidden layer {self.index}: width must be a positive integer, got {self.width!r}")
        if self.dtype not in HIDDEN_DTYPES:
            raise StoreError(f"hidden layer {self.index}: dtype must be one of {HIDDEN_DTYPES}, got {self.dtype!r}")

    @property
    def array_name(self) -> str:
        return f"layer_{self.index}"


@dataclass
class HiddenSpec:
    layers: list[HiddenLayer] = field(default_factory=list)
    chunk_tokens: int = 1024

    def layer(self, index: int) -> HiddenLayer:
        for layer in self.layers:
            if layer.index == index:
                return layer
        stored = [layer.index for layer in self.layers] or "none"
        raise StoreError(f"hidden layer {index} is not in this store (stored layers: {stored})")


@dataclass
class StoreManifest:
    teacher: TeacherInfo
    tokenizer: TokenizerInfo
    targets: TargetSpec = field(default_factory=TargetSpec)
    hidden: HiddenSpec = field(default_factory=HiddenSpec)
    rationales: bool = False
    generation: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT_NAME
    format_version: str = "1.0"  # raised to what the targets need (__post_init__)
    created_at: str = field(default_factory=utc_now)
    potstill_version: str = field(default_factory=potstill_version)

    def __post_init__(self) -> None:
        # A store carries the lowest version that describes it (its targets decide, format §9).
        need = self.targets.required_version()
        if parse_version(self.format_version, "manifest") < parse_version(need, "manifest"):
            self.format_version = need

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["targets"] = self.targets.to_dict()
        return out

    def to_json(self) -> bytes:
        obj = self.to_dict()
        order = obj["targets"].get("id_order")
        if not order:
            return json.dumps(obj, indent=2, sort_keys=True).encode()
        # Up to 4,096 ids: one line, not one line per id, so that the manifest stays readable.
        obj["targets"]["id_order"] = "@"
        text = json.dumps(obj, indent=2, sort_keys=True)
        at = text.index('"id_order": "@"', text.index('"targets": {'))
        one_line = json.dumps(order, separators=(",", ":"))
        return (text[:at] + f'"id_order": {one_line}' + text[at + len('"id_order": "@"'):]).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> StoreManifest:
        try:
            obj = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StoreError(f"{where}: not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
        return cls.from_dict(obj, where)

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> StoreManifest:
        if not isinstance(obj, dict) or obj.get("format") != FORMAT_NAME:
            raise StoreError(f"{where}: not a potstill store manifest")
        check_readable(obj.get("format_version"), where)
        version = str(obj.get("format_version"))
        try:
            tok = dict(obj["tokenizer"])
            tok["files"] = [FileEntry(**_known(FileEntry, f)) for f in tok.get("files", [])]
            hidden = dict(obj.get("hidden") or {})
            hidden["layers"] = [HiddenLayer(**_known(HiddenLayer, x)) for x in hidden.get("layers", [])]
            # A manifest without `tail_logprob` is a 1.0 / 2.0 store: no log tail (not the default).
            targets = TargetSpec(**{"tail_logprob": None, **_known(TargetSpec, obj.get("targets") or {})})
            if parse_version(version, where) < parse_version(targets.required_version(), where):
                what = f"kind {targets.kind!r} with codec {targets.codec!r}"
                if targets.tail_logprob is not None:
                    what += " and a log tail"
                raise StoreError(
                    f"targets of {what} need format {targets.required_version()}, but the manifest says {version}"
                )
            return cls(
                teacher=TeacherInfo(**_known(TeacherInfo, obj["teacher"])),
                tokenizer=TokenizerInfo(**_known(TokenizerInfo, tok)),
                targets=targets,
                hidden=HiddenSpec(**_known(HiddenSpec, hidden)),
                rationales=bool(obj.get("rationales", False)),
                generation=dict(obj.get("generation") or {}),
                extra=dict(obj.get("extra") or {}),
                format=obj["format"],
                format_version=str(obj["format_version"]),
                created_at=str(obj.get("created_at", "")),
                potstill_version=str(obj.get("potstill_version", "")),
            )
        except StoreError as e:
            raise StoreError(f"{where}: {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None

    def differences(self, other: StoreManifest) -> list[str]:
        """What would make records written under `other` (a new run's manifest) inconsistent with this store.

        A store of an older minor format (1.0 / 2.0, no log tail) is not a difference: the run keeps
        writing that store's format, since its writer follows the store's own manifest. Sampled
        draws made by another sampler are: one store must not mix two samplers.
        """
        diffs = []
        mine, theirs = self.targets.to_dict(), other.targets.to_dict()
        tails = mine.pop("tail_logprob", None), theirs.pop("tail_logprob", None)
        if tails[0] is not None and tails[0] != tails[1]:
            diffs.append(f"targets.tail_logprob: the store's tails are {tails[0]!r}, this run's would be {tails[1]!r}")
        # The store's id order is its own choice (from the first run's prompts): a run writes in it.
        mine.pop("id_order", None), theirs.pop("id_order", None)
        sampling = mine.pop("sampling", None), theirs.pop("sampling", None)
        if sampling[0] != sampling[1]:
            diffs.append(
                f"targets.sampling: the store's draws were made by another sampler ({sampling[0]!r}) than this "
                f"potstill's ({sampling[1]!r}); draws of two samplers must not share a store: write to a new store"
            )
        generation = dict(self.generation)
        if generation.get("rationale") and "answer_match" not in generation:
            generation["answer_match"] = "last"  # the only rule before --answer-match existed
        pairs = {
            "teacher.name_or_path": (self.teacher.name_or_path, other.teacher.name_or_path),
            "teacher.config_hash": (self.teacher.config_hash, other.teacher.config_hash),
            "teacher.dtype": (self.teacher.dtype, other.teacher.dtype),
            "tokenizer.fingerprint": (self.tokenizer.fingerprint, other.tokenizer.fingerprint),
            "targets": (mine, theirs),
            "hidden": (dataclasses.asdict(self.hidden), dataclasses.asdict(other.hidden)),
            "rationales": (self.rationales, other.rationales),
            "generation": (generation, other.generation),
        }
        for name, (mine, theirs) in pairs.items():
            for key, old, new in _leaf_differences(name, _normalise(mine), _normalise(theirs)):
                diffs.append(f"{key}: store has {_short(old)}, this run has {_short(new)}")
        return diffs


_ABSENT = object()


def _leaf_differences(name: str, old: Any, new: Any) -> list[tuple[str, Any, Any]]:
    """The differing keys of two JSON values, by dotted name (`generation.backend`), not whole objects."""
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new)):
            found += _leaf_differences(f"{name}.{key}", old.get(key, _ABSENT), new.get(key, _ABSENT))
        return found
    if old == new:
        return []
    return [(name, "(not set)" if old is _ABSENT else old, "(not set)" if new is _ABSENT else new)]


def _known(cls: type, obj: Any) -> dict[str, Any]:
    """Keep the keys a dataclass knows: newer minor versions may add keys older readers ignore."""
    if not isinstance(obj, dict):
        raise TypeError(f"expected an object for {cls.__name__}, got {type(obj).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in obj.items() if k in names}


def _normalise(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _short(value: Any) -> str:
    if value == "(not set)":
        return value
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 120 else text[:117] + "..."


def tokenizer_fingerprint(tokenizer: Any) -> TokenizerInfo:
    """Fingerprint a Hugging Face tokenizer (docs/store-format.md §7), without its files.

    Duck-typed so that `store/` never imports transformers: needs `get_vocab()`, the
    `*_token_id` attributes and, when present, `added_tokens_decoder`.
    """
    vocab = tokenizer.get_vocab()
    special = {
        name: getattr(tokenizer, name, None)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")
    }
    added = []
    for idx, tok in sorted((getattr(tokenizer, "added_tokens_decoder", None) or {}).items()):
        added.append([str(getattr(tok, "content", tok)), int(idx), bool(getattr(tok, "special", False))])
    payload = {
        "vocab": sorted(([str(t), int(i)] for t, i in vocab.items()), key=lambda x: (x[1], x[0])),
        "special_ids": special,
        "added": added,
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return TokenizerInfo(fingerprint=f"sha256:{digest}", vocab_size=len(vocab), special_tokens=special)


def config_hash(config: dict[str, Any]) -> str:
    """Hash of a model config (its config.json content), for the teacher's identity."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()
