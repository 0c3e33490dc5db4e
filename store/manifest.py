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
FORMAT_VERSION = "1.1"  # what a plain top-k, unpacked store is written as (readable by every potstill)
LATEST_FORMAT_VERSION = "2.4"  # sampled / hybrid targets or the packed codecs (docs/reference/store-format.md §4.2, §4.3)
READ_MAJOR = 2  # the newest major version this code reads

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
