"""The store manifest (docs/store-format.md §2): what a store holds and who made it."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from store.errors import FormatVersionError, StoreError

FORMAT_NAME = "potstill-store"
FORMAT_VERSION = "1.0"
READ_MAJOR = 1  # the newest major version this code reads

LOGPROB_DTYPES = ("float16", "float32")
HIDDEN_DTYPES = ("float16", "bfloat16")
TARGET_KINDS = ("topk",)


def potstill_version() -> str:
    try:
        return metadata.version("potstill")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "0.0.0+source"


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


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
    kind: str = "topk"
    k: int = 64
    logprob_dtype: str = "float16"
    temperature: float = 1.0
    logprobs_from: str = "fp32"

    def __post_init__(self) -> None:
        if self.kind not in TARGET_KINDS:
            raise StoreError(f"unknown target kind {self.kind!r}; expected one of {TARGET_KINDS}")
        if not isinstance(self.k, int) or self.k < 1:
            raise StoreError(f"targets.k must be a positive integer, got {self.k!r}")
        if self.logprob_dtype not in LOGPROB_DTYPES:
            raise StoreError(f"targets.logprob_dtype must be one of {LOGPROB_DTYPES}, got {self.logprob_dtype!r}")


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
    format_version: str = FORMAT_VERSION
    created_at: str = field(default_factory=utc_now)
    potstill_version: str = field(default_factory=potstill_version)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True).encode()

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
        try:
            tok = dict(obj["tokenizer"])
            tok["files"] = [FileEntry(**_known(FileEntry, f)) for f in tok.get("files", [])]
            hidden = dict(obj.get("hidden") or {})
            hidden["layers"] = [HiddenLayer(**_known(HiddenLayer, x)) for x in hidden.get("layers", [])]
            return cls(
                teacher=TeacherInfo(**_known(TeacherInfo, obj["teacher"])),
                tokenizer=TokenizerInfo(**_known(TokenizerInfo, tok)),
                targets=TargetSpec(**_known(TargetSpec, obj.get("targets") or {})),
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
        """What would make records written under `other` inconsistent with this store."""
        diffs = []
        pairs = {
            "teacher.name_or_path": (self.teacher.name_or_path, other.teacher.name_or_path),
            "teacher.config_hash": (self.teacher.config_hash, other.teacher.config_hash),
            "teacher.dtype": (self.teacher.dtype, other.teacher.dtype),
            "tokenizer.fingerprint": (self.tokenizer.fingerprint, other.tokenizer.fingerprint),
            "targets": (dataclasses.asdict(self.targets), dataclasses.asdict(other.targets)),
            "hidden": (dataclasses.asdict(self.hidden), dataclasses.asdict(other.hidden)),
            "rationales": (self.rationales, other.rationales),
            "generation": (self.generation, other.generation),
        }
        for name, (mine, theirs) in pairs.items():
            if _normalise(mine) != _normalise(theirs):
                diffs.append(f"{name}: store has {_short(mine)}, this run has {_short(theirs)}")
        return diffs


def _known(cls: type, obj: Any) -> dict[str, Any]:
    """Keep the keys a dataclass knows: newer minor versions may add keys older readers ignore."""
    if not isinstance(obj, dict):
        raise TypeError(f"expected an object for {cls.__name__}, got {type(obj).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in obj.items() if k in names}


def _normalise(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _short(value: Any) -> str:
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
