"""The store manifest (docs/reference/store-format.md §2): what a store holds and who made it."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from potstill.store.errors import FormatVersionError, StoreError

# The manifest's `targets` section is the target kinds' (store/targets); re-exported here.
from potstill.store.targets import LOGPROB_DTYPES, SAMPLERS, TAIL_METHODS, TargetSpec  # noqa: F401

FORMAT_NAME = "potstill-store"
CHECKSUM_KEY = "checksum"  # manifest.json's own checksum (`manifest_checksum`)
FORMAT_VERSION = "1.0"  # what this potstill writes (docs/reference/store-format.md §9)
# What a reader must understand beyond its major version to read a store right (format §9): a store whose
# manifest lists a feature not here is refused. 1.0 knows none and writes none.
KNOWN_FEATURES: frozenset[str] = frozenset()

HIDDEN_DTYPES = ("float16", "bfloat16")


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


def _pre_1_0(what: str, version: Any) -> FormatVersionError:
    return FormatVersionError(f"{what} uses the pre-1.0 format {version} (an experimental layout this potstill no "
                              "longer reads): regenerate it with this potstill")


def check_manifest_version(obj: dict[str, Any], store: str) -> None:
    """Refuse, in one line naming the store, a manifest this potstill cannot read (format §9): one of
    before 1.0 (no `features`), of a newer major version, or listing a feature it does not know."""
    version = obj.get("format_version")
    major, _ = parse_version(version, f"store {store}")
    if "features" not in obj:
        raise _pre_1_0(f"store {store}", version)
    if major > 1:
        raise FormatVersionError(f"store {store} uses format {version}, newer than this potstill "
                                 f"({potstill_version()}) reads (1.x): upgrade potstill")
    if major < 1:
        raise StoreError(f"store {store}: unknown format_version {version!r}")
    features = obj["features"]
    if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
        raise StoreError(f"store {store}: features must be a list of strings, got {features!r}")
    unknown = [f for f in features if f not in KNOWN_FEATURES]
    if unknown:
        raise FormatVersionError(f"store {store} needs the format feature {', '.join(map(repr, unknown))}, which this "
                                 f"potstill ({potstill_version()}) does not know: upgrade potstill")


def check_commit_version(version: Any, where: str) -> None:
    """Refuse, in one line naming it, a commit record that is not of format 1.x: one of 2.x is from before
    1.0 (whose versions ran to 2.4; a newer store's manifest is refused first), a later one is newer."""
    major, _ = parse_version(version, where)
    if major > 2:
        raise FormatVersionError(f"{where} uses format {version}, newer than this potstill ({potstill_version()}) "
                                 "reads (1.x): upgrade potstill")
    if major != 1:
        raise _pre_1_0(where, version)


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


def manifest_checksum(obj: dict[str, Any]) -> str:
    """`"sha256:<hex>"` of a manifest's content less its checksum: the JSON with sorted keys and no
    spaces (format §8). Whitespace and key order do not count; any changed value does."""
    body = {key: value for key, value in obj.items() if key != CHECKSUM_KEY}
    return "sha256:" + hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def check_manifest_checksum(data: bytes, where: str) -> None:
    """Refuse, in one line naming the file, a manifest whose content is not what its checksum says (one
    edited by hand after the store was made). A manifest without one, from before it existed, passes."""
    obj = json.loads(data)
    stated = obj.get(CHECKSUM_KEY)
    if stated is not None and stated != manifest_checksum(obj):
        raise StoreError(f"{where}: fails its checksum (its content was changed after the store was created)")


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
    format_version: str = FORMAT_VERSION
    features: list[str] = field(default_factory=list)  # what a reader must know to read it (format §9)
    created_at: str = field(default_factory=utc_now)
    potstill_version: str = field(default_factory=potstill_version)
    # Where the store came from (format §10), written once with the manifest; optional: a store without
    # it is as valid, and no reader needs it. Never compared between runs (`differences`).
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["targets"] = self.targets.to_dict()
        if not self.provenance:  # a store made without it keeps its manifest as it was
            del out["provenance"]
        return out

    def to_json(self) -> bytes:
        obj = self.to_dict()
        obj[CHECKSUM_KEY] = manifest_checksum(obj)
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
        check_manifest_version(obj, where.removesuffix("/manifest.json"))
        try:
            tok = dict(obj["tokenizer"])
            tok["files"] = [FileEntry(**_known(FileEntry, f)) for f in tok.get("files", [])]
            hidden = dict(obj.get("hidden") or {})
            hidden["layers"] = [HiddenLayer(**_known(HiddenLayer, x)) for x in hidden.get("layers", [])]
            raw_targets = obj["targets"]
            targets = TargetSpec(**_known(TargetSpec, raw_targets))
            missing = sorted(set(targets.to_dict()) - set(raw_targets) - OPTIONAL_TARGET_KEYS)
            if missing:
                raise StoreError(f"targets lack the required key(s) {', '.join(missing)}")
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
                features=list(obj["features"]),
                created_at=str(obj.get("created_at", "")),
                potstill_version=str(obj.get("potstill_version", "")),
                # informative only: a malformed one is left out, never a reason to refuse the store
                provenance=dict(obj["provenance"]) if isinstance(obj.get("provenance"), dict) else {},
            )
        except StoreError as e:
            raise StoreError(f"{where}: {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None

    def differences(self, other: StoreManifest) -> list[str]:
        """What would make records written under `other` (a new run's manifest) inconsistent with this store.

        A store of a newer minor version is one: its optional parts this potstill does not know it
        would not write (format §9). Sampled draws made by another sampler are: one store must not mix
        two samplers. Provenance is not compared: it records the run that created the store (its time,
        its prompt set, its machine-dependent settings), which a later run of the same job differs from.
        """
        diffs = []
        if parse_version(self.format_version, "store") > parse_version(other.format_version, "run"):
            diffs.append(f"format_version: the store is of format {self.format_version}, newer than this potstill "
                         f"writes ({other.format_version}): upgrade potstill to add to it")
        mine, theirs = self.targets.to_dict(), other.targets.to_dict()
        tails = mine.pop("tail_logprob", None), theirs.pop("tail_logprob", None)
        if tails[0] != tails[1]:
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


# Keys of the manifest's `targets` a 1.0 store may leave out: informative ones and the compact codec's
# id order (absent: no listed ids). Every other key `TargetSpec.to_dict` writes is required.
OPTIONAL_TARGET_KEYS = frozenset({"id_order", "logprob_step", "logprob_max_error"})


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
    """Fingerprint a Hugging Face tokenizer (docs/reference/store-format.md §7), without its files.

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
