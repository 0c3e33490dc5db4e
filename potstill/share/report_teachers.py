"""The "Teachers" section of `potstill store report A B ...`: several teachers' stores over the same
prompts, as `potstill train --store A --store B` joins them (by record id, docs/guides/train.md,
"Several teachers"), side by side.

On the first store's sampled records (the sample of the rest of the page) that every store holds:
per teacher, the entropy and top-1 probability of its targets and how often its most likely token
is the stored next token; per pair of teachers, how often their most likely tokens agree. A position
counts where both teachers scored the same token given the same tokens before it (their sequences
agree up to it), the positions a student trained on both learns their mixture at.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from potstill.share.info import describe_targets
from potstill.store.reader import Store
from potstill.store.records import Record


@dataclass
class TeacherFigures:
    url: str
    teacher: str
    targets: str
    records: int  # distinct records in the store
    shared: int = 0  # of the first store's sampled records, how many this store holds
    entropy: list[np.ndarray] = field(default_factory=list)  # per compared position (nats)
    top1: list[np.ndarray] = field(default_factory=list)
    stored_token: int = 0  # compared positions where the teacher's most likely token is the stored one
    positions: int = 0


@dataclass
class Comparison:
    teachers: list[TeacherFigures]
    records: int  # sampled records every store holds
    agree: np.ndarray  # [T, T] positions where teachers i and j name the same most likely token
    compared: np.ndarray  # [T, T] positions compared for each pair
    prefix_positions: int = 0  # scored positions of the first store's records (shared by all)
    common_positions: int = 0  # of them, where every teacher scored the same token after the same tokens


def _top1(rec: Record, store: Store) -> np.ndarray:
    """Per scored position, the teacher's most likely id (top-k: the first; draws: the most drawn)."""
    if store.manifest.targets.has_topk:
        return np.asarray(rec.topk_ids)[:, 0].astype(np.int64)
    ids, counts = rec.sampled.padded()  # type: ignore[union-attr]
    return np.take_along_axis(ids, counts.argmax(1)[:, None], 1)[:, 0].astype(np.int64)


def _position_stats(rec: Record, store: Store) -> tuple[np.ndarray, np.ndarray]:
    from potstill.share.report import _sampled_position_stats, _topk_position_stats

    if store.manifest.targets.has_topk:
        entropy, top1, _ = _topk_position_stats(rec)
        return entropy, top1
    return _sampled_position_stats(rec, store.manifest.targets.samples)


def _common_prefix(a: Any, b: Any) -> int:
    """How many leading tokens two sequences share."""
    a, b = np.asarray(a), np.asarray(b)
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def _locations(store: Store) -> dict[str, tuple[str, int]]:
    """id -> (shard, row) of the copy every reader keeps (duplicate rows skipped)."""
    index = store.id_index()
    ids = index.ids().to_pylist()
    skip = {name: store.duplicate_rows(name) for name in index.shards}
    out: dict[str, tuple[str, int]] = {}
    for i, record_id in enumerate(ids):
        name, row = index.shards[int(index.shard[i])], int(index.row[i])
        if row not in skip[name]:
            out.setdefault(record_id, (name, row))
    return out


def compare_teachers(stores: list[Store], chosen: dict[str, list[int]]) -> Comparison:
    """The figures of the section, over the first store's records `chosen` ({shard: rows})."""
    figures = [TeacherFigures(s.url, s.manifest.teacher.name_or_path, describe_targets(s.manifest.targets.to_dict()),
                              s.num_records - s.num_duplicates) for s in stores]
    where = [_locations(s) for s in stores[1:]]
    n = len(stores)
    agree, compared = np.zeros((n, n), dtype=np.int64), np.zeros((n, n), dtype=np.int64)
    records = prefix = common = 0
    for shard, rows in chosen.items():
        reader = stores[0].shard(shard)
        for row in rows:
            first = reader.record(row)
            recs: list[Record | None] = [first]
            for store, located in zip(stores[1:], where, strict=True):
                name, r = located.get(first.id, ("", -1))
                recs.append(store.shard(name).record(r) if name else None)
            for fig, rec in zip(figures, recs, strict=True):
                fig.shared += rec is not None
            if any(rec is None for rec in recs):
                continue
            records += 1
            # the positions p (the token at p given those before it) every teacher scored after the same tokens
            start = max(r.score_start for r in recs)  # type: ignore[union-attr]
            stop = min(r.num_tokens for r in recs)  # type: ignore[union-attr]
            shared_prefix = min(_common_prefix(first.input_ids, r.input_ids) for r in recs)  # type: ignore[union-attr]
            stop = min(stop, shared_prefix + 1)
            positions = np.arange(start, max(start, stop))
            prefix += first.num_scored
            common += len(positions)
            tops = []
            for fig, rec, store in zip(figures, recs, stores, strict=True):
                at = positions - rec.score_start
                top = _top1(rec, store)[at]
                tops.append(top)
                entropy, top1 = _position_stats(rec, store)
                fig.entropy.append(entropy[at])
                fig.top1.append(top1[at])
                fig.stored_token += int((top == np.asarray(rec.input_ids)[positions]).sum())
                fig.positions += len(positions)
            for i in range(n):
                for j in range(n):
                    agree[i, j] += int((tops[i] == tops[j]).sum())
                    compared[i, j] += len(positions)
    return Comparison(figures, records, agree, compared, prefix, common)


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0)


def render_teachers(comparison: Comparison, figure: Any, png: Any) -> list[str]:
    """The section's HTML: a table per teacher, the agreement of each pair, one plot."""
    c = comparison
    share = f"{c.common_positions / c.prefix_positions:.1%}" if c.prefix_positions else "-"
    parts = [
        "<h2>Teachers</h2>",
        f"<p>{len(c.teachers)} stores over the same prompts, joined by record id as <code>potstill train --store A "
        "--store B</code> joins them (the first store is the one whose records were sampled). "
        f"<b>{c.records:,}</b> sampled records are in every store; on them, {c.common_positions:,} of "
        f"{c.prefix_positions:,} scored positions ({share}) were scored by every teacher after the same tokens: "
        "the positions where a student learns the teachers' mixture, and the ones compared below.</p>",
        "<table><tr><th>store</th><th>teacher</th><th>targets</th><th>records</th><th>sampled records it holds</th>"
        "<th>median entropy (nats)</th><th>median top-1 probability</th><th>top-1 = the stored token</th></tr>",
    ]
    for fig in c.teachers:
        entropy, top1 = _cat(fig.entropy), _cat(fig.top1)
        median = (lambda v: f"{np.median(v):.4g}" if len(v) else "-")  # noqa: E731
        hit = f"{fig.stored_token / fig.positions:.1%}" if fig.positions else "-"
        parts.append(f"<tr><td>{_e(fig.url)}</td><td>{_e(fig.teacher)}</td><td>{_e(fig.targets)}</td>"
                     f"<td class='num'>{fig.records:,}</td><td class='num'>{fig.shared:,}</td>"
                     f"<td class='num'>{median(entropy)}</td><td class='num'>{median(top1)}</td><td class='num'>{hit}</td></tr>")
    parts.append("</table><table><tr><th>top-1 agreement</th>"
                 + "".join(f"<th>{i + 1}</th>" for i in range(len(c.teachers))) + "</tr>")
    for i, fig in enumerate(c.teachers):
        cells = "".join(f"<td class='num'>{c.agree[i, j] / c.compared[i, j]:.1%}</td>" if c.compared[i, j] else "<td>-</td>"
                        for j in range(len(c.teachers)))
        parts.append(f"<tr><th>{i + 1}: {_e(fig.url)}</th>{cells}</tr>")
    parts.append("</table><p class='muted'>How often two teachers' most likely tokens are the same, over the compared "
                 "positions. Where they differ, a student trained on both learns a mixture that is split between them.</p>")
    if any(f.entropy for f in c.teachers):
        fig = figure(9.6, 3.2)
        a, b = fig.subplots(1, 2)
        for f in c.teachers:
            label = f.teacher if len({t.teacher for t in c.teachers}) == len(c.teachers) else f.url
            a.hist(_cat(f.entropy), bins=40, histtype="step", linewidth=1.2, label=label)
            b.hist(_cat(f.top1), bins=np.linspace(0, 1, 41), histtype="step", linewidth=1.2, label=label)
        a.set_xlabel("teacher entropy (nats)")
        b.set_xlabel("top-1 probability")
        for ax in (a, b):
            ax.set_ylabel("positions")
            ax.grid(alpha=0.3)
            ax.legend(loc="best", fontsize=8)
        parts.append(f"<figure><img alt='Teachers' src='data:image/png;base64,{png(fig)}'><figcaption><b>Teachers.</b> "
                     "Entropy and top-1 probability of each teacher's targets on the compared positions. A teacher "
                     "sure where another is not is one a mixture leans on there.</figcaption></figure>")
    return parts
