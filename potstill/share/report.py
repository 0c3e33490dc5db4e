"""`potstill store report`: one self-contained HTML page about what a store holds.

The page is what a team reads before training on a store someone else made: who made it, what each
position carries, and plots of the teacher's targets (entropy, top-1 probability, tail mass), the
sequence and completion lengths, the sampled ids, the hidden-state norms per layer, the answers of
rationale records, and a few examples. Records are read through the public reader with verified
reads (every shard file read is checked against its commit record's sha256 and its values against
the format first), never unpickled. A big store is summarised from a seeded random sample of its
records, which the page says. Given several stores (teachers over the same prompts), the page is the
first's with a Teachers section comparing them (share/report_teachers.py).

The HTML holds everything: inline CSS, the plots as PNG data URIs, no script and no external URL,
so it can be mailed, shared or opened offline.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from potstill.settings import check_settings, setting
from potstill.share.info import describe_targets, provenance_rows, store_info
from potstill.share.report_teachers import Comparison, compare_teachers, render_teachers
from potstill.store.errors import StoreError
from potstill.store.fs import resolve, write_bytes
from potstill.store.reader import Store, decode_hidden, open_store
from potstill.store.records import Record
from potstill.teacher_gen.rationale import DEFAULT_ANSWER_PATTERN, split_rationale


@dataclass
class ReportConfig:
    """Settings of `potstill store report`: each field is its flag, help and default."""

    out: str = setting("report.html", help="The HTML file to write (self-contained: plots inline).")
    max_records: int = setting(1000, help="Records read for the statistics; a bigger store is sampled at random (seeded).")
    max_hidden_tokens: int = setting(20000, help="Tokens per layer whose hidden-state norms are computed.")
    examples: int = setting(3, help="Example records shown (rationales when the store has them).")
    reference_field: str = setting("", shown_default="meta.answer, else the prompt file's completion", help=(
        "The prompt file's field holding a reference answer: a key of a record's meta (generation keeps "
        "every field it does not use there), or completion: the completion a --mode generate store keeps "
        "beside the teacher's own text."))
    seed: int = setting(0, help="Seed of the record sample.")
    example_chars: int = setting(1200, help="Longer example texts are cut on the page (and marked so).")

    def validate(self) -> ReportConfig:
        check_settings(self, StoreError)
        for flag, value, least in (("--max-records", self.max_records, 1), ("--examples", self.examples, 0),
                                   ("--max-hidden-tokens", self.max_hidden_tokens, 0),
                                   ("--example-chars", self.example_chars, 1)):
            if value < least:
                raise StoreError(f"{flag} must be at least {least}, got {value}")
        return self


@dataclass
class StoreStats:
    """What the page shows, computed from the sampled records (float64 throughout)."""

    info: dict[str, Any]
    records_total: int
    records_read: int
    sampled: bool
    seed: int
    shards_read: int
    seq_lengths: np.ndarray
    scored_lengths: np.ndarray
    prompt_lengths: np.ndarray
    # per scored position
    entropy: np.ndarray | None = None  # nats; top-K + tail bucket, or the sampled estimate
    entropy_source: str = ""
    top1: np.ndarray | None = None
    top1_source: str = ""
    tail_mass: np.ndarray | None = None
    token_logprob: np.ndarray | None = None
    position_index: np.ndarray | None = None  # position of each entry within its record's scored tokens
    distinct_ids: np.ndarray | None = None
    samples: int = 0
    hidden_norms: dict[int, np.ndarray] = field(default_factory=dict)
    hidden_nonfinite: dict[int, int] = field(default_factory=dict)
    # rationales
    rationale_records: int = 0
    with_answer: int = 0
    with_reference: int = 0
    answers_correct: int = 0
    reference_field: str = ""
    examples: list[dict[str, str | None]] = field(default_factory=list)


def collect_stats(store: Store, config: ReportConfig) -> StoreStats:
    """Read (a seeded sample of) the store's records and compute the page's statistics."""
    config.validate()  # built in code too, not only from flags
    manifest = store.manifest
    spec = manifest.targets
    info = store_info(store)
    chosen = _choose_rows(store, config.max_records, config.seed)
    total = store.num_records - store.num_duplicates
    seq, scored, prompt = [], [], []
    entropy, top1, tail, token_lp, position, distinct = [], [], [], [], [], []
    norms: dict[int, list[np.ndarray]] = {layer.index: [] for layer in manifest.hidden.layers}
    nonfinite = {layer.index: 0 for layer in manifest.hidden.layers}
    hidden_tokens = {layer.index: 0 for layer in manifest.hidden.layers}
    pattern = _answer_pattern(manifest.generation)
    stats = StoreStats(info=info, records_total=total, records_read=0,
                       sampled=sum(len(rows) for rows in chosen.values()) < total, seed=config.seed,
                       shards_read=len(chosen), seq_lengths=np.zeros(0), scored_lengths=np.zeros(0),
                       prompt_lengths=np.zeros(0), samples=spec.samples, reference_field=config.reference_field)
    for shard_name, rows in chosen.items():
        reader = store.shard(shard_name)
        for row in rows:
            rec = reader.record(row)
            stats.records_read += 1
            seq.append(rec.num_tokens)
            scored.append(rec.num_scored)
            prompt.append(rec.score_start)
            s = rec.num_scored
            if s:
                position.append(np.arange(s))
                token_lp.append(np.asarray(rec.token_logprob, dtype=np.float64))
            if spec.has_topk and s:
                h, p1, m = _topk_position_stats(rec)
                entropy.append(h)
                top1.append(p1)
                tail.append(m)
            elif spec.has_sampled and s:
                h, p1 = _sampled_position_stats(rec, spec.samples)
                entropy.append(h)
                top1.append(p1)
            if spec.has_sampled and s:
                distinct.append(rec.sampled.lengths().astype(np.float64))  # type: ignore[union-attr]
            for layer in manifest.hidden.layers:
                budget = config.max_hidden_tokens - hidden_tokens[layer.index]
                if budget <= 0 or rec.hidden_rows == 0:
                    continue
                first, stop = reader.hidden_rows(row)  # only the rows the budget allows are read
                stored = reader.hidden_block(layer.index, first, min(stop, first + budget))
                states = decode_hidden(stored, layer.dtype)
                finite = np.isfinite(states).all(axis=1)
                nonfinite[layer.index] += int((~finite).sum())
                kept = states[finite]
                norms[layer.index].append(np.sqrt(np.einsum("ij,ij->i", kept, kept, dtype=np.float64)))
                hidden_tokens[layer.index] += len(states)
            _count_answer(stats, rec, config, pattern)
            if len(stats.examples) < config.examples and (rec.rationale is not None or not manifest.rationales):
                stats.examples.append(_example(rec, config, pattern))
    stats.seq_lengths = np.asarray(seq, dtype=np.float64)
    stats.scored_lengths = np.asarray(scored, dtype=np.float64)
    stats.prompt_lengths = np.asarray(prompt, dtype=np.float64)
    cat = _concat
    if token_lp:
        stats.token_logprob = cat(token_lp)
        stats.position_index = cat(position)
    if entropy:
        stats.entropy, stats.top1 = cat(entropy), cat(top1)
        if spec.has_topk:
            stats.entropy_source = f"top-{spec.k} buckets plus the tail as one bucket (a lower bound of the full entropy)"
            stats.top1_source = "probability of the teacher's most likely token"
        else:
            stats.entropy_source = (f"plug-in estimate from the {spec.samples} draws per position "
                                    "(biased low: unseen tokens count as 0)")
            stats.top1_source = f"share of the {spec.samples} draws taken by the most drawn token (an estimate)"
    if tail:
        stats.tail_mass = cat(tail)
    if distinct:
        stats.distinct_ids = cat(distinct)
    stats.hidden_norms = {k: cat(v) if v else np.zeros(0) for k, v in norms.items()}
    stats.hidden_nonfinite = nonfinite
    return stats


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0)


def _choose_rows(store: Store, max_records: int, seed: int) -> dict[str, list[int]]:
    """{shard: rows} of the records to read, in store order: all of them, or a seeded uniform sample
    of `max_records` global record numbers. Duplicate rows, which every reader skips, are left out
    (a sample of a store holding some may come out a little smaller)."""
    total = store.num_records
    if total > max_records:
        picked = np.sort(np.random.default_rng(seed).choice(total, size=max_records, replace=False)).tolist()
    else:
        picked = range(total)
    chosen: dict[str, list[int]] = {}
    skip: dict[str, set[int]] = {}
    for i in picked:
        name, row = store.locate(int(i))
        if name not in skip:
            skip[name] = store.duplicate_rows(name)
        if row not in skip[name]:
            chosen.setdefault(name, []).append(row)
    return chosen


def _topk_position_stats(rec: Record) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per scored position: entropy over the K + 1 buckets (renormalised, since fp16 or quantised
    log-probs need not sum to exactly 1 with the tail), top-1 probability, tail mass."""
    lp = np.asarray(rec.topk_logprobs, dtype=np.float64)
    lp = np.where(np.asarray(rec.topk_ids) < 0, -np.inf, lp)  # padded slots (K > vocabulary) are empty
    log_tail = np.asarray(rec.tail_logprob, dtype=np.float64)[:, None]
    buckets = np.concatenate([lp, log_tail], axis=1)
    top = np.max(buckets, axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    log_z = top + np.log(np.exp(buckets - top).sum(axis=1, keepdims=True))
    log_p = buckets - log_z
    p = np.exp(log_p)
    with np.errstate(invalid="ignore"):
        entropy = -np.where(p > 0, p * log_p, 0.0).sum(axis=1)
    return entropy, np.exp(lp.max(axis=1)), np.exp(log_tail[:, 0])


def _sampled_position_stats(rec: Record, samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Per scored position from the draws alone: plug-in entropy of counts / N, share of the top id."""
    sampled = rec.sampled
    assert sampled is not None
    _, counts = sampled.padded()
    p = counts.astype(np.float64) / max(samples, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    return entropy, p.max(axis=1, initial=0.0)


# -- answers -------------------------------------------------------------------------------------------
def _answer_pattern(generation: dict[str, Any]) -> str:
    pattern = generation.get("answer_pattern")
    return pattern if isinstance(pattern, str) and pattern else DEFAULT_ANSWER_PATTERN


def reference_name(field: str) -> str:
    """Where the page says the reference answers came from."""
    if not field:
        return "meta.answer or the prompt file's completion"
    return "the prompt file's completion" if field == "completion" else f"meta.{field}"


def _reference(rec: Record, config: ReportConfig, pattern: str) -> str | None:
    """The record's reference answer: `meta[reference_field]` (a field of the prompt file that
    generation kept), or the prompt file's completion that a generate-mode record keeps beside the
    teacher's text (by default when meta has no `answer`: a store made with the default field names);
    read with the store's answer pattern when it holds a worked solution ("… #### 72"), else as it is."""
    meta = rec.meta or {}
    field = config.reference_field or "answer"
    value = meta.get(field)
    if value is None and config.reference_field in ("", "completion") and rec.generated is not None:
        value = rec.completion  # in score mode the completion is the teacher's scored text, no reference
    if value is None or isinstance(value, (dict, list)):
        return None
    text = str(value).strip()
    if not text:
        return None
    try:
        _, found = split_rationale(text, pattern)
    except re.error:
        found = None
    return found or text


def normalise_answer(answer: str) -> str:
    """The comparison `potstill eval` makes: case, spaces, thousands commas, $ and a final period ignored."""
    return re.sub(r"[\s,$]", "", answer).rstrip(".").casefold()


def _count_answer(stats: StoreStats, rec: Record, config: ReportConfig, pattern: str) -> None:
    if rec.rationale is None and rec.answer is None:
        return
    stats.rationale_records += 1
    stats.with_answer += rec.answer is not None
    reference = _reference(rec, config, pattern)
    if reference is None:
        return
    stats.with_reference += 1
    stats.answers_correct += rec.answer is not None and normalise_answer(rec.answer) == normalise_answer(reference)


def _example(rec: Record, config: ReportConfig, pattern: str) -> dict[str, str | None]:
    prompt = rec.prompt
    if prompt is None and rec.messages:
        prompt = "\n".join(f"[{m.get('role', '?')}] {m.get('content', '')}" for m in rec.messages)
    return {
        "id": rec.id,
        "prompt": prompt,
        "rationale": rec.rationale,
        "answer": rec.answer,
        "reference": _reference(rec, config, pattern),
        "completion": rec.generated if rec.generated is not None else rec.completion,
    }


# -- plots ---------------------------------------------------------------------------------------------
def _figure(width: float = 6.4, height: float = 3.2) -> Any:
    from matplotlib.figure import Figure  # the Agg canvas, no pyplot state, no display needed

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _hist(ax: Any, values: np.ndarray, xlabel: str, *, bins: int | np.ndarray = 50, log_y: bool = False) -> None:
    ax.hist(values, bins=bins, color="#3b6ea5", edgecolor="white", linewidth=0.3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)


def _by_position(ax: Any, position: np.ndarray, values: np.ndarray, ylabel: str, max_positions: int = 512) -> None:
    """Mean (and 10–90 % band) of a per-position value against the position within the completion."""
    keep = position < max_positions
    pos, val = position[keep].astype(np.int64), values[keep]
    if len(pos) == 0:
        return
    n = int(pos.max()) + 1
    counts = np.bincount(pos, minlength=n)
    means = np.bincount(pos, weights=val, minlength=n) / np.maximum(counts, 1)
    xs = np.flatnonzero(counts)
    ax.plot(xs, means[xs], color="#c0504d", linewidth=1.2, label="mean")
    order = np.argsort(pos, kind="stable")
    groups = np.split(val[order], np.cumsum(counts)[:-1])
    lo = np.array([np.quantile(g, 0.1) for g in groups if len(g)])
    hi = np.array([np.quantile(g, 0.9) for g in groups if len(g)])
    ax.fill_between(xs, lo, hi, color="#c0504d", alpha=0.15, label="10–90 %")
    ax.set_xlabel("position in the scored tokens")
    ax.set_ylabel(ylabel)
    _legend_outside(ax)
    ax.grid(alpha=0.3)


def _legend_outside(ax: Any) -> None:
    """The legend right of the axes, where it covers nothing drawn (constrained layout makes room)."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=8)


def render_plots(stats: StoreStats) -> list[tuple[str, str, str]]:
    """[(title, caption, base64 PNG)] for every plot the data allows."""
    return [(title, caption, _png(fig)) for title, caption, fig in report_figures(stats)]


def report_figures(stats: StoreStats) -> list[tuple[str, str, Any]]:
    """[(title, caption, matplotlib figure)] for every plot the data allows."""
    plots: list[tuple[str, str, Any]] = []
    n_pos = 0 if stats.token_logprob is None else len(stats.token_logprob)
    if stats.entropy is not None and stats.position_index is not None and len(stats.entropy):
        fig = _figure(9.6, 3.2)
        a, b = fig.subplots(1, 2)
        _hist(a, stats.entropy, "teacher entropy (nats)")
        _by_position(b, stats.position_index, stats.entropy, "entropy (nats)")
        plots.append(("Teacher entropy per position",
                      f"{n_pos:,} scored positions; entropy from the {stats.entropy_source}. Near 0: the teacher "
                      "is sure (little to learn beyond the token); high: spread-out targets, where KD carries most "
                      "information. Right: by position within the scored tokens.", fig))
    if stats.top1 is not None and stats.position_index is not None and len(stats.top1):
        fig = _figure(9.6, 3.2)
        a, b = fig.subplots(1, 2)
        _hist(a, stats.top1, "top-1 probability", bins=np.linspace(0, 1, 51))
        _by_position(b, stats.position_index, stats.top1, "top-1 probability")
        plots.append(("Top-1 probability per position",
                      f"The {stats.top1_source}. A store whose mass sits near 1 everywhere teaches about as much as "
                      "its tokens alone.", fig))
    if stats.tail_mass is not None and len(stats.tail_mass):
        k = stats.info["targets"].get("k")
        fig = _figure()
        ax = fig.subplots()
        with np.errstate(divide="ignore"):
            log_tail = np.log10(stats.tail_mass)
        zero = int(np.sum(~np.isfinite(log_tail)))
        shown = log_tail[np.isfinite(log_tail)]
        if len(shown):
            _hist(ax, np.maximum(shown, -12.0), "log10 of the tail mass (values below 1e-12 drawn at -12)")
        median = float(np.median(stats.tail_mass))
        plots.append(("Tail mass per position",
                      f"The teacher's probability outside the stored top-{k}: median {median:.3g}; "
                      f"{np.mean(stats.tail_mass > 0.1):.1%} of positions leave more than 10 % outside the top-K"
                      + (f"; {zero:,} positions have a tail of exactly 0 (not drawn)" if zero else "")
                      + ". Large tails mean K is small for this teacher and data.", fig))
    if len(stats.seq_lengths):
        fig = _figure(9.6, 3.2)
        a, b = fig.subplots(1, 2)
        _hist(a, stats.seq_lengths, "tokens per record (prompt + completion)", bins=40)
        _hist(b, stats.scored_lengths, "scored tokens per record (the completion)", bins=40)
        plots.append(("Sequence and completion lengths",
                      f"{stats.records_read:,} records: median {np.median(stats.seq_lengths):.0f} tokens, of which "
                      f"{np.median(stats.scored_lengths):.0f} scored (the completion, plus the prompt when it was "
                      f"scored too); longest {stats.seq_lengths.max():.0f}. "
                      f"{int(np.sum(stats.scored_lengths == 0)):,} records have no scored token.", fig))
    if stats.distinct_ids is not None and len(stats.distinct_ids):
        fig = _figure()
        ax = fig.subplots()
        top = int(stats.distinct_ids.max())
        _hist(ax, stats.distinct_ids, f"distinct ids among the {stats.samples} draws", bins=np.arange(0.5, top + 1.5))
        plots.append(("Sampled distinct ids per position",
                      f"Mean {stats.distinct_ids.mean():.2f} distinct ids per position out of {stats.samples} draws. "
                      "1: the teacher is sure; close to N: a flat distribution, whose estimate is noisy.",
                      fig))
    layers = [k for k, v in stats.hidden_norms.items() if len(v)]
    if layers:
        fig = _figure(max(4.0, 1.2 * len(layers) + 2.5), 3.4)
        ax = fig.subplots()
        ax.boxplot([stats.hidden_norms[k] for k in layers], whis=(1, 99), showfliers=False)
        ax.set_xticks(range(1, len(layers) + 1), [str(k) for k in layers])
        ax.set_xlabel("stored teacher layer (hidden_states index)")
        ax.set_ylabel("L2 norm per token")
        ax.grid(alpha=0.3)
        plots.append(("Hidden-state norms per layer",
                      "Box: quartiles and median; whiskers: 1st and 99th percentiles of the per-token L2 norm. "
                      "Norms grow with depth in most transformers; a layer far off its neighbours, or a huge "
                      "spread, is worth a look before matching it with MSE.", fig))
    if stats.with_reference:
        fig = _figure(6.4, 2.6)
        ax = fig.subplots()
        wrong = stats.with_reference - stats.answers_correct
        ax.barh(["teacher"], [stats.answers_correct], color="#4f8f4f", label="matches the reference")
        ax.barh(["teacher"], [wrong], left=[stats.answers_correct], color="#c0504d", label="differs / missing")
        ax.set_xlabel("records with a reference answer")
        ax.set_ylabel("model")
        _legend_outside(ax)
        plots.append(("Answer accuracy",
                      f"The teacher's extracted answer equals the reference in {stats.answers_correct:,} of "
                      f"{stats.with_reference:,} records ({stats.answers_correct / stats.with_reference:.1%}).",
                      fig))
    for title, _, fig in plots:  # the picture names itself when saved or shared apart from the page
        fig.suptitle(title, fontsize=11)
    return plots


# -- the page ------------------------------------------------------------------------------------------
_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1000px;
       color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; } td, th { padding: 0.25em 0.8em; border-bottom: 1px solid #eee;
       text-align: left; vertical-align: top; } th { background: #f5f5f5; } td.num { text-align: right; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.92em; color: #444; } .note { background: #fff8e1; padding: 0.6em 0.9em; border-left: 4px solid #f0b400; }
.bad { background: #fdecea; padding: 0.6em 0.9em; border-left: 4px solid #c0392b; }
pre { white-space: pre-wrap; word-break: break-word; background: #f7f7f7; padding: 0.6em; margin: 0.3em 0; font-size: 0.9em; }
.example { border: 1px solid #ddd; padding: 0.5em 1em; margin: 1em 0; border-radius: 4px; }
.muted { color: #666; font-size: 0.9em; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _cut(text: str | None, limit: int) -> str:
    if text is None:
        return "<span class='muted'>(none)</span>"
    if len(text) > limit:
        return _e(text[:limit]) + f"<span class='muted'> … ({len(text) - limit:,} more characters)</span>"
    return _e(text)


def _quantiles(values: np.ndarray) -> str:
    if not len(values):
        return "<td class='num'>-</td>" * 4
    q = np.quantile(values, [0.1, 0.5, 0.9])
    return "".join(f"<td class='num'>{x:.4g}</td>" for x in (*q, values.mean()))


def render_html(stats: StoreStats, config: ReportConfig, teachers: Comparison | None = None) -> str:
    info = stats.info
    t = info["teacher"]
    rows = [
        ("store", info["store"]),
        ("format", f"{info['format_version']} (written by potstill {info['potstill_version']}, {info['created_at']})"),
        ("teacher", f"{t['name_or_path']} (" + ", ".join(
            str(x) for x in (t.get("architecture"), t.get("dtype"), t.get("vocab_size") and f"vocabulary {t['vocab_size']}") if x
        ) + ")"),
        ("tokenizer", f"{info['tokenizer']['fingerprint']} (vocabulary {info['tokenizer']['vocab_size']})"),
        ("targets", describe_targets(info["targets"])),
        *([("tail", info["tail"])] if info.get("tail") else []),
        ("hidden states", ", ".join(f"layer {x['index']} [{x['width']}] {x['dtype']}" + (" (after the final norm)" if x.get("post_norm") else "")
                                     for x in info["hidden_layers"]) or "none"),
        ("rationales", "yes" if info["rationales"] else "no"),
        ("shards / records", f"{info['shards']:,} / {info['records']:,}"
         + (f" ({info['duplicates']:,} duplicate rows, skipped by every reader)" if info["duplicates"] else "")),
        ("tokens", f"{info['tokens']:,} ({info['scored_tokens']:,} scored)"),
        ("bytes", info["sizes_line"]),
        *provenance_rows(info),  # where it came from, how complete its job is (format §10)
    ]
    parts = [
        "<!DOCTYPE html>",
        "<html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>potstill store report: {_e(os.path.basename(info['store'].rstrip('/')) or info['store'])}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Store report: {_e(os.path.basename(info['store'].rstrip('/')) or info['store'])}</h1>",
        "<p class='muted'>Written by <code>potstill store report</code>. Every shard file read for it was checked "
        "against the sha256 in its commit record, and its values against the format, before use; "
        "<code>potstill store verify</code> checks every file of the store.</p>",
        "<h2>What the store holds</h2><table>",
        *(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows),
        "</table>",
    ]
    if info["problems"]:
        parts.append("<div class='bad'><b>Problems:</b><ul>" + "".join(f"<li>{_e(p)}</li>" for p in info["problems"]) + "</ul></div>")
    if stats.records_read == 0:
        parts.append("<p class='note'>The store holds no committed records yet: nothing to plot.</p>")
    else:
        scope = (f"a random sample of <b>{stats.records_read:,}</b> of the {stats.records_total:,} records "
                 f"(seed {stats.seed}; <code>--max-records</code> reads more)" if stats.sampled
                 else f"all <b>{stats.records_read:,}</b> records")
        parts.append(f"<p class='note'>The statistics and plots below are computed from {scope}, "
                     f"in {stats.shards_read:,} shard(s).</p>")
        parts.append("<h2>Summary</h2><table><tr><th>per scored position</th><th>10 %</th><th>median</th><th>90 %</th><th>mean</th></tr>")
        for label, values in (("teacher entropy (nats)", stats.entropy), ("top-1 probability", stats.top1),
                              ("tail mass", stats.tail_mass),
                              ("teacher log-prob of the stored token", stats.token_logprob),
                              ("sampled distinct ids", stats.distinct_ids)):
            if values is not None and len(values):
                parts.append(f"<tr><th>{_e(label)}</th>{_quantiles(values)}</tr>")
        parts.append("<tr><th>per record</th><th>10 %</th><th>median</th><th>90 %</th><th>mean</th></tr>")
        for label, values in (("tokens", stats.seq_lengths), ("prompt tokens (not scored)", stats.prompt_lengths),
                              ("scored tokens", stats.scored_lengths)):
            parts.append(f"<tr><th>{_e(label)}</th>{_quantiles(values)}</tr>")
        parts.append("</table>")
        if stats.hidden_norms:
            parts.append("<table><tr><th>hidden layer</th><th>tokens measured</th><th>median L2 norm</th>"
                         "<th>1 %</th><th>99 %</th><th>non-finite tokens</th></tr>")
            for layer, v in stats.hidden_norms.items():
                q = np.quantile(v, [0.5, 0.01, 0.99]) if len(v) else [math.nan] * 3
                parts.append(f"<tr><td>{layer}</td><td class='num'>{len(v):,}</td>"
                             + "".join(f"<td class='num'>{x:.4g}</td>" for x in q)
                             + f"<td class='num'>{stats.hidden_nonfinite.get(layer, 0)}</td></tr>")
            parts.append(f"</table><p class='muted'>Norms of at most {config.max_hidden_tokens:,} tokens per layer.</p>")
        if stats.rationale_records:
            parts.append("<h2>Answers</h2><table>")
            parts.append(f"<tr><th>records with a rationale or answer</th><td class='num'>{stats.rationale_records:,}</td></tr>")
            parts.append(f"<tr><th>… with an extracted answer</th><td class='num'>{stats.with_answer:,} "
                         f"({stats.with_answer / stats.rationale_records:.1%})</td></tr>")
            if stats.with_reference:
                parts.append(f"<tr><th>… with a reference answer ({_e(reference_name(stats.reference_field))})</th>"
                             f"<td class='num'>{stats.with_reference:,}</td></tr>")
                parts.append(f"<tr><th>teacher's answer equals the reference</th><td class='num'>{stats.answers_correct:,} "
                             f"({stats.answers_correct / stats.with_reference:.1%})</td></tr>")
            parts.append("</table>")
            if not stats.with_reference:
                parts.append(f"<p class='muted'>No record keeps a reference answer in {_e(reference_name(stats.reference_field))}, "
                             "so the teacher's accuracy cannot be measured here; <code>--reference-field NAME</code> "
                             "names the prompt file's field that holds it.</p>")
        if teachers is not None:  # several teachers' stores (share/report_teachers.py)
            parts.extend(render_teachers(teachers, _figure, _png))
        plots = render_plots(stats)
        if plots:
            parts.append("<h2>Plots</h2>")
        for title, caption, data in plots:
            parts.append(f"<figure><img alt='{_e(title)}' src='data:image/png;base64,{data}'>"
                         f"<figcaption><b>{_e(title)}.</b> {_e(caption)}</figcaption></figure>")
        if stats.examples:
            parts.append("<h2>Examples</h2>")
            for ex in stats.examples:
                block = [f"<div class='example'><p><b>record</b> <code>{_e(ex['id'])}</code></p>",
                         f"<p><b>prompt</b></p><pre>{_cut(ex['prompt'], config.example_chars)}</pre>"]
                if ex["rationale"] is not None or ex["answer"] is not None:
                    block.append(f"<p><b>rationale</b></p><pre>{_cut(ex['rationale'], config.example_chars)}</pre>")
                    block.append(f"<p><b>extracted answer</b>: <code>{_cut(ex['answer'], 200)}</code>"
                                 + (f" &nbsp; <b>reference</b>: <code>{_cut(ex['reference'], 200)}</code>" if ex["reference"] is not None else "")
                                 + "</p>")
                else:
                    block.append(f"<p><b>completion</b></p><pre>{_cut(ex['completion'], config.example_chars)}</pre>")
                block.append("</div>")
                parts.append("".join(block))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(url: str | list[str], out: str | None = None, config: ReportConfig | None = None,
                 storage_options: dict[str, Any] | None = None) -> StoreStats:
    """Read the store (verified reads) and write the page to `out` (default `config.out`), atomically.
    Several stores (teachers over the same prompts): the page is the first's, with a Teachers section."""
    config = config or ReportConfig()
    out = out or config.out
    urls = [url] if isinstance(url, str) else list(url)
    stores = [open_store(u, storage_options, verify_reads=True) for u in urls]
    stats = collect_stats(stores[0], config)
    teachers = compare_teachers(stores, _choose_rows(stores[0], config.max_records, config.seed)) if len(stores) > 1 else None
    page = render_html(stats, config, teachers)
    try:  # atomic: an existing page is replaced whole or kept
        fs, path = resolve(os.path.abspath(out))
        write_bytes(fs, path, page.encode("utf-8"), atomic=True)
    except OSError as e:
        raise StoreError(f"cannot write {out}: {e.strerror or e}") from None
    return stats
