"""A store's byte figures: the one definition `store info`, the report, the demo and a published
dataset card all print (docs/guides/share.md, "What the byte figures mean").

Every byte of the files a store lists falls in exactly one of four parts, so they sum to `total`:

- **targets**: the Arrow buffers of the target columns (the store's kind's columns: top-K ids and
  log-probs, log tails, the token's log-prob, sampled draws), as each commit record's `field_bytes`
  gives them;
- **hidden**: every file under a shard's `hidden/` (the Zarr arrays and their metadata);
- **sequences**: the rest of each `records.arrow`: ids, texts, token ids, offsets and Arrow framing;
- **overhead**: the manifest, the commit records, the tokenizer files, and each shard's ids and
  pieces files.

"Per token" divides by every stored token (prompt and completion), "per scored token" by the tokens
that carry targets. Read from the manifest and the commit records only: nothing is hashed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from potstill.store.reader import Store

PARTS = ("targets", "hidden", "sequences", "overhead")


@dataclass(frozen=True)
class StoreSizes:
    targets: int
    hidden: int
    sequences: int  # the rest of records.arrow: ids, texts, token ids, offsets, Arrow framing
    overhead: int
    tokenizer: int  # of the overhead: the tokenizer files (a fixed cost, large beside a small store)
    tokens: int
    scored_tokens: int

    @property
    def total(self) -> int:
        return self.targets + self.hidden + self.sequences + self.overhead

    def per_token(self, part: str = "total") -> float | None:
        return _per(getattr(self, part), self.tokens)

    def per_scored_token(self, part: str = "total") -> float | None:
        return _per(getattr(self, part), self.scored_tokens)

    def to_dict(self) -> dict[str, Any]:
        """The figures as `store info --json` prints them under `sizes`."""
        out: dict[str, Any] = {**asdict(self), "total": self.total}
        out["total_per_token"] = self.per_token()
        out["target_bytes_per_scored_token"] = self.per_scored_token("targets")
        out["hidden_bytes_per_token"] = self.per_token("hidden")
        return out

    def describe(self) -> str:
        """One line, the same wherever a store's size is shown."""
        if not self.tokens:
            return f"{self.total:,} bytes in all (no records yet)"
        line = (f"{self.total:,} bytes in all, {_num(self.per_token())} per token; "
                f"targets {self.targets:,} ({_num(self.per_scored_token('targets'))} per scored token)")
        if self.hidden:
            line += f", hidden {self.hidden:,} ({_num(self.per_token('hidden'))} per token)"
        return (line + f", ids, texts and token ids {self.sequences:,}, overhead {self.overhead:,} "
                f"(tokenizer {self.tokenizer:,})")


def store_sizes(store: Store) -> StoreSizes:
    """The byte figures of a store's committed shards (duplicate rows included: they are stored)."""
    m = store.manifest
    target_columns = {f.name for f in m.targets.target_kind.arrow_fields(m.targets)}
    targets = hidden = sequences = overhead = 0
    tokenizer = sum(f.bytes for f in m.tokenizer.files)
    overhead += tokenizer + len(m.to_json())
    for commit in store.commits:
        overhead += len(commit.to_json())
        shard_targets = sum(size for name, size in commit.field_bytes.items() if name in target_columns)
        targets += shard_targets
        for f in commit.files:
            if f.path == commit.arrow_path:
                sequences += f.bytes - shard_targets
            elif f.path.startswith(commit.hidden_path + "/"):
                hidden += f.bytes
            else:
                overhead += f.bytes
    return StoreSizes(targets, hidden, sequences, overhead, tokenizer, store.num_tokens, store.num_scored_tokens)


def _per(total: int, count: int) -> float | None:
    return round(total / count, 3) if count else None


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:,.1f}"
