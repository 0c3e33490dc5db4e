"""Target kinds and codecs, found by the names a store's manifest records (docs/guides/extending.md).

    kind_named("hybrid")      -> the `TargetKind` that reads, writes, checks and captures hybrid targets
    codec_named("compact")    -> the `Codec` that lays out its parts

A kind or codec is one module: a subclass of `TargetKind` / `Codec` registered here under its name
(`register_kind`, `register_codec`). The built-in ones register below; a kind defined elsewhere
registers itself before a store of its kind is written or read.
"""

from __future__ import annotations

from potstill.store.targets.base import (
    CODECS,
    KINDS,
    LOGPROB_DTYPES,
    SAMPLERS,
    TAIL_METHODS,
    TRAIN_TARGETS,
    CaptureNeeds,
    Codec,
    TargetColumns,
    TargetKind,
    TargetSpec,
    TopKRows,
    WeightedRows,
    codec_named,
    codec_names,
    kind_named,
    kind_names,
    register_codec,
    register_kind,
    unregister_kind,
)


def _register_builtins() -> None:
    from potstill.store.targets.both import Both
    from potstill.store.targets.codecs import CompactCodec, PackedCodec, PlainCodec
    from potstill.store.targets.hybrid import Hybrid
    from potstill.store.targets.sampled import Sampled
    from potstill.store.targets.topk import TopK

    for kind in (TopK(), Sampled(), Both(), Hybrid()):
        register_kind(kind)
    for codec in (PlainCodec(), PackedCodec(), CompactCodec()):
        register_codec(codec)


_register_builtins()

__all__ = [
    "CODECS", "KINDS", "LOGPROB_DTYPES", "SAMPLERS", "TAIL_METHODS", "TRAIN_TARGETS", "CaptureNeeds", "Codec",
    "TargetColumns", "TargetKind", "TargetSpec", "TopKRows", "WeightedRows",
    "codec_named", "codec_names", "kind_named", "kind_names", "register_codec", "register_kind", "unregister_kind",
]
