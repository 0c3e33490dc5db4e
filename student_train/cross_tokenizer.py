"""Distilling into a student with another tokenizer than the store's teacher (`--cross-tokenizer`).

The store keeps what this needs, with no addition to the format: each record's token ids and the
teacher's tokenizer files (format §2, §7). Everything below runs in the loader's workers, per record.

**Text and byte spans.** A record's ids are cut at the teacher's special tokens into runs of ordinary
tokens. A run's text is the teacher tokenizer's decoding of it; each teacher token covers the bytes
(UTF-8) its own piece adds to that text (`token_spans`). The student tokenizer encodes the same text,
and its tokens get their byte spans the same way. A special token (bos, eos, pad, unk, or an added
token) is zero-width: it becomes the student's token of the same role or the same content, or is
dropped when the student has none.

**Alignment** (`align`). Student token u_i (bytes [c_i, d_i)) *matches* teacher token t_j when both
cover the same non-empty bytes (or are the same special token). Then the two contexts are the same
text (bytes [0, c_i) = [0, a_j)) and the next token is the same string, so the teacher's stored
distribution of t_j is the target of the student's position predicting u_i, carried into the student's
vocabulary through the tokens of identical bytes (`vocabulary_map`); mass on teacher ids with no
student twin goes into the tail bucket. A student token that covers several whole teacher tokens
t_j..t_j′ exactly (a *chunk*) trains on the teacher's probability of that text, Π p(t_l | t_<l) from
the stored token log-probs, against the student's probability of its token (`losses.chunk_kl`, two
buckets: the token and the rest). Every other student token (its span crosses a teacher token's)
takes the teacher row of the teacher token that covers its first byte, trained with ULD
(`losses.uld`), which compares sorted probabilities and needs no vocabulary correspondence. Student
tokens before the teacher's first scored token (the prompt) are context only.
"""

from __future__ import annotations

import functools
import itertools
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from potstill.store import Store, tokenizer_fingerprint
from potstill.store.reader import ShardReader
from potstill.store.targets import TopKRows
from potstill.student_train import data
from potstill.student_train.data import MAIN_TASK, LoaderPlan, Sequence, StoreDataset, record_sequence
from potstill.student_train.errors import ConfigError, TrainError

SPECIAL_ROLES = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")


# -- tokens as bytes ---------------------------------------------------------------------------------
@functools.cache
def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode: the character a byte-level BPE piece uses for each byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars, strict=True)}


def _decoder_kind(tok: Any) -> str:
    try:
        decoder = json.loads(tok.backend_tokenizer.to_str()).get("decoder") or {}
    except AttributeError:  # a slow tokenizer: pieces decoded one by one
        return "other"
    kinds = [d.get("type") for d in decoder.get("decoders", [decoder])]
    return "bytelevel" if "ByteLevel" in kinds else "metaspace" if {"Metaspace", "Replace", "ByteFallback"} & set(kinds) else "other"


@dataclass
class TokenTable:
    """One tokenizer as this module needs it: the bytes each ordinary id stands for (None for special
    ids), its special ids, and each special id's role or content."""

    pieces: list[bytes | None]
    special: frozenset[int]
    roles: dict[str, int]  # role (bos_token_id, …) -> id
    contents: dict[str, int]  # special token content -> id

    @classmethod
    def of(cls, tok: Any) -> TokenTable:
        vocab = tok.get_vocab()
        size = max(vocab.values()) + 1
        added = {i: t for i, t in tok.added_tokens_decoder.items()}
        special = frozenset(i for i, t in added.items() if t.special) | frozenset(tok.all_special_ids)
        kind, dec = _decoder_kind(tok), _byte_decoder()
        pieces: list[bytes | None] = [None] * size
        for piece, i in vocab.items():
            if i in special:
                continue
            if i in added:
                pieces[i] = added[i].content.encode()
            elif kind == "bytelevel" and all(c in dec for c in piece):
                pieces[i] = bytes(dec[c] for c in piece)
            elif kind == "metaspace" and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                pieces[i] = bytes([int(piece[3:5], 16)])
            elif kind == "metaspace":
                pieces[i] = piece.replace("▁", " ").encode()
            else:
                pieces[i] = tok.decode([i], clean_up_tokenization_spaces=False).encode()
        roles = {r: int(getattr(tok, r)) for r in SPECIAL_ROLES if getattr(tok, r, None) is not None}
        contents = {added[i].content: i for i in special if i in added}
        return cls(pieces, special, roles, contents)

    def special_twin(self, other: TokenTable, i: int) -> int:
        """The id of this tokenizer's special token that plays special `i` of `other`'s role (or has its
        content), −1 when there is none."""
        for role, j in other.roles.items():
            if j == i and role in self.roles:
                return self.roles[role]
        content = next((c for c, j in other.contents.items() if j == i), None)
        return self.contents.get(content, -1) if content is not None else -1


def vocabulary_map(teacher: TokenTable, student: TokenTable) -> np.ndarray:
    """int64 [teacher vocabulary]: the student id whose bytes equal each teacher id's (special ids: the
    student's special token of the same role or content), −1 where the student has none."""
    index: dict[bytes, int] = {}
    for i, piece in enumerate(student.pieces):
        if piece is not None:
            index.setdefault(piece, i)
    out = np.full(len(teacher.pieces), -1, dtype=np.int64)
    for i, piece in enumerate(teacher.pieces):
        if piece is not None:
            out[i] = index.get(piece, -1)
    for i in teacher.special:
        if i < len(out):
            out[i] = student.special_twin(teacher, i)
    return out


def token_spans(tok: Any, table: TokenTable, ids: list[int], text: bytes) -> np.ndarray:
    """[n + 1] byte boundaries of `ids` (ordinary tokens) in `text`: token k covers [b[k], b[k+1]).

    Fast path: the tokens' bytes (`TokenTable.pieces`) concatenated are `text`. Else each boundary is
    the length of the decoded prefix ids[:k], where that decoding is a prefix of `text`; a prefix that
    is not (a token ending inside a character) has no boundary of its own, and the token is merged
    into the next one (an empty span, never matched). Raises TrainError when the tokens do not
    reproduce `text` whole."""
    pieces = [table.pieces[i] if 0 <= i < len(table.pieces) else None for i in ids]
    if all(p is not None for p in pieces):
        lengths = [len(p) for p in pieces]  # type: ignore[arg-type]
        joined = b"".join(pieces)  # type: ignore[arg-type]
        if joined != text and joined[:1] == b" " and joined[1:] == text:  # a decoder that drops the first
            lengths[0] -= 1  # piece's leading space (SentencePiece's Metaspace)
            joined = joined[1:]
        if joined == text:
            return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    bounds = np.zeros(len(ids) + 1, dtype=np.int64)
    last = 0
    for k in range(1, len(ids) + 1):
        prefix = tok.decode(ids[:k], clean_up_tokenization_spaces=False).encode()
        if text.startswith(prefix) and len(prefix) >= last:
            last = len(prefix)
        bounds[k] = last
    if bounds[-1] != len(text):
        raise TrainError(f"tokens {ids[:8]}… do not decode to their text {text[:40]!r}")
    # a boundary that was not reached yet belongs to the next token: move it forward
    return np.minimum.accumulate(bounds[::-1])[::-1]


# -- alignment ---------------------------------------------------------------------------------------
@dataclass
class Alignment:
    """One record in the student's tokens, tied to the teacher's.

    `ids` the student's ids; `score_start` its first predicted token; per student token its byte span
    [`starts`, `ends`) and `partner` (the matching teacher token, −1 if none); `chunk_end` (a student
    token that covers whole teacher tokens j..j′, j′ > j, exactly: the row of j′, else −1); `row` per student
    token: the teacher target row (teacher token − teacher score_start) it trains on, −1 for none."""

    ids: np.ndarray
    score_start: int
    starts: np.ndarray
    ends: np.ndarray
    partner: np.ndarray
    row: np.ndarray
    teacher_starts: np.ndarray
    teacher_ends: np.ndarray
    chunk_end: np.ndarray


def align(teacher_tok: Any, teacher: TokenTable, student_tok: Any, student: TokenTable,
          teacher_ids: np.ndarray, score_start: int, record_id: str = "") -> Alignment:
    """The student's tokens of a stored record (teacher ids and score_start), aligned (module doc)."""
    t_ids = [int(i) for i in teacher_ids]
    n = len(t_ids)
    t_start, t_end = np.zeros(n, np.int64), np.zeros(n, np.int64)
    s_ids: list[int] = []
    s_start: list[int] = []
    s_end: list[int] = []
    partner: list[int] = []
    offset, j = 0, 0
    while j < n:
        if t_ids[j] in teacher.special:
            t_start[j] = t_end[j] = offset
            twin = student.special_twin(teacher, t_ids[j])
            if twin >= 0:
                s_ids.append(twin)
                s_start.append(offset)
                s_end.append(offset)
                partner.append(j)
            j += 1
            continue
        k = j
        while k < n and t_ids[k] not in teacher.special:
            k += 1
        run = t_ids[j:k]
        text = teacher_tok.decode(run, clean_up_tokenization_spaces=False)
        raw = text.encode()
        try:
            tb = token_spans(teacher_tok, teacher, run, raw)
            mine = student_tok(text, add_special_tokens=False)["input_ids"]
            sb = token_spans(student_tok, student, mine, raw)
        except TrainError as e:
            raise TrainError(f"record {record_id}: {e} (--cross-tokenizer aligns tokens by the text they cover)") from None
        t_start[j:k], t_end[j:k] = offset + tb[:-1], offset + tb[1:]
        by_span = {(int(a), int(b)): j + q for q, (a, b) in enumerate(itertools.pairwise(tb.tolist())) if b > a}
        for a, b, i in zip(sb[:-1], sb[1:], mine, strict=True):
            s_ids.append(int(i))
            s_start.append(offset + int(a))
            s_end.append(offset + int(b))
            partner.append(by_span.get((int(a), int(b)), -1) if b > a else -1)
        offset += len(raw)
        j = k
    starts, ends = np.array(s_start, np.int64), np.array(s_end, np.int64)
    part = np.array(partner, np.int64)
    m = len(s_ids)
    # The first scored student token: past every token tied to the prompt, starting at or after the
    # teacher's first scored byte.
    first = int(t_start[score_start]) if score_start < n else offset
    prompt_partners = np.flatnonzero((part >= 0) & (part < score_start))
    lo = int(prompt_partners[-1]) + 1 if len(prompt_partners) else 0
    later = np.flatnonzero((np.arange(m) >= lo) & (starts >= first))
    s0 = int(later[0]) if len(later) else m
    # Each student token's teacher row: its partner's; else the teacher token holding its first byte.
    ordinary = np.flatnonzero(t_end > t_start)
    cover = np.searchsorted(t_start[ordinary], starts, side="right") - 1
    holder = np.where(cover >= 0, ordinary[cover.clip(min=0)], -1) if len(ordinary) else np.full(m, -1)
    source = np.where(part >= 0, part, holder)
    row = np.where((np.arange(m) >= s0) & (source >= score_start), source - score_start, -1)
    # A chunk: an unmatched student token that starts where a teacher token starts and ends where a later
    # one ends (the first is its `holder`).
    by_end = {int(t_end[q]): int(q) for q in ordinary}
    last = np.array([by_end.get(int(e), -1) for e in ends], dtype=np.int64)
    chunk = (part < 0) & (ends > starts) & (holder >= 0) & (last > holder)
    chunk &= t_start[holder.clip(min=0)] == starts if n else False
    chunk_end = np.where(chunk & (row >= 0), last - score_start, -1)
    return Alignment(np.array(s_ids, np.int64), max(s0, 1), starts, ends, part, row.astype(np.int64), t_start, t_end,
                     chunk_end)


def check_alignment(al: Alignment, teacher: TokenTable, student: TokenTable, teacher_ids: np.ndarray) -> None:
    """Raise AssertionError unless every matched pair covers the same bytes and stands for the same
    string (or the same special token): what an exact target needs."""
    for i in np.flatnonzero(al.partner >= 0):
        j = int(al.partner[i])
        if (al.starts[i], al.ends[i]) != (al.teacher_starts[j], al.teacher_ends[j]):
            raise AssertionError(f"student token {i} spans {al.starts[i]}..{al.ends[i]}, its teacher token {j} "
                                 f"{al.teacher_starts[j]}..{al.teacher_ends[j]}")
        t, s = int(teacher_ids[j]), int(al.ids[i])
        if t in teacher.special:
            if student.special_twin(teacher, t) != s:
                raise AssertionError(f"student token {i} is not the twin of teacher special token {t}")
        elif teacher.pieces[t] != student.pieces[s]:
            raise AssertionError(f"student token {i} ({student.pieces[s]!r}) and teacher token {j} "
                                 f"({teacher.pieces[t]!r}) differ")


# -- targets -----------------------------------------------------------------------------------------
@dataclass
class CrossRows:
    """Per student position from its score_start: `matched` (exact target), `has_target`; the exact
    target in student ids (`topk`: ids −1 where not matched); `chunk_logprob`, at a chunk, the teacher's
    log-probability of the teacher tokens it covers in turn (the sum of their stored token log-probs;
    −inf elsewhere); the teacher's own row for ULD (`uld_logprobs` its top-K log-probs, `uld_tail` its
    log tail) at the other positions."""

    matched: np.ndarray
    has_target: np.ndarray
    topk: TopKRows
    uld_logprobs: np.ndarray
    uld_tail: np.ndarray
    chunk_logprob: np.ndarray


def project_rows(rows: TopKRows, take: np.ndarray, vmap: np.ndarray) -> TopKRows:
    """Teacher rows `take` with their ids carried into the student's vocabulary by `vmap`; entries with
    no student twin are folded into the tail (log-space sum in float64, as `data._fold_unknown_ids`)."""
    ids = rows.ids[take].astype(np.int64)
    mapped = np.where(ids >= 0, vmap[ids.clip(min=0)], -1)
    lost = (ids >= 0) & (mapped < 0)
    lp = rows.logprobs[take].astype(np.float32)
    tail = rows.tail_logprob[take].astype(np.float32)
    if lost.any():
        terms = np.concatenate([tail[:, None].astype(np.float64), np.where(lost, lp.astype(np.float64), -np.inf)], axis=1)
        tail = np.minimum(np.logaddexp.reduce(terms, axis=1), 0.0).astype(np.float32)
        lp = np.where(lost, -np.inf, lp).astype(np.float32)
    return TopKRows(np.where(lost, -1, mapped), lp, rows.token_logprob[take], tail)


def cross_sequence(al: Alignment, rows: TopKRows, vmap: np.ndarray, record_id: str) -> Sequence:
    """The student's sequence of an aligned record, with its `CrossRows`."""
    row = al.row[al.score_start :]
    has = row >= 0
    matched = has & (al.partner[al.score_start :] >= 0)
    take = row.clip(min=0)
    if len(rows.ids) == 0:  # nothing scored: every position without a target
        has[:] = matched[:] = False
        k = rows.ids.shape[1] if rows.ids.ndim == 2 else 1
        rows = TopKRows(np.full((1, k), -1, np.int32), np.full((1, k), -np.inf, np.float32),
                        np.zeros(1, np.float32), np.zeros(1, np.float32))
        take = np.zeros_like(take)
    exact = project_rows(rows, take, vmap)
    exact = TopKRows(np.where(matched[:, None], exact.ids, -1), np.where(matched[:, None], exact.logprobs, 0.0),
                     exact.token_logprob, np.where(matched, exact.tail_logprob, 0.0).astype(np.float32))
    end = al.chunk_end[al.score_start :]  # the chunk's last teacher row
    chunk = has & ~matched & (end >= 0)
    cumulative = np.concatenate([[0.0], np.cumsum(rows.token_logprob.astype(np.float64))])
    chain = cumulative[np.where(chunk, end + 1, 0)] - cumulative[np.where(chunk, take, 0)]
    chunk_lp = np.where(chunk, np.minimum(chain, 0.0), -np.inf).astype(np.float32)
    other = has & ~matched & ~chunk
    uld_lp = np.where(other[:, None] & (rows.ids[take] >= 0), rows.logprobs[take].astype(np.float32), -np.inf)
    uld_tail = np.where(other, rows.tail_logprob[take], -np.inf).astype(np.float32)
    targets = CrossRows(matched, has, exact, uld_lp.astype(np.float32), uld_tail, chunk_lp)
    n = len(al.ids)
    return Sequence(record_id, al.ids, al.score_start, n, al.score_start, MAIN_TASK, targets)  # type: ignore[arg-type]


def collate_cross(seqs: list[Sequence], trained: list[tuple[np.ndarray, np.ndarray]], *, k: int,
                  student_vocab: int | None) -> dict[str, torch.Tensor]:
    """`data.collate` for cross-tokenizer targets: the exact targets as top-k rows (in student ids), the
    chunks' log-probabilities, the ULD rows, `matched`, and `has_kd` restricted to positions with a
    teacher row."""
    parts: dict[str, list[np.ndarray]] = {n: [] for n in ("ids", "lp", "tail", "uld", "uld_tail", "chunk", "matched",
                                                           "has")}
    for seq, (i, kd) in zip(seqs, trained, strict=True):
        t: CrossRows = seq.targets  # type: ignore[assignment]
        r = i - seq.score_start
        parts["ids"].append(t.topk.ids[r])
        parts["lp"].append(t.topk.logprobs[r])
        parts["tail"].append(t.topk.tail_logprob[r])
        parts["uld"].append(t.uld_logprobs[r])
        parts["uld_tail"].append(t.uld_tail[r])
        parts["chunk"].append(t.chunk_logprob[r])
        parts["matched"].append(t.matched[r] & kd)
        parts["has"].append(t.has_target[r] & kd)
    ids = np.concatenate(parts["ids"]).astype(np.int64) if parts["ids"] else np.zeros((0, k), np.int64)
    lp = np.concatenate(parts["lp"]).astype(np.float32) if parts["lp"] else np.zeros((0, k), np.float32)
    tail = np.concatenate(parts["tail"]).astype(np.float32) if parts["tail"] else np.zeros(0, np.float32)
    if student_vocab is not None:
        data._fold_unknown_ids(ids, lp, tail, student_vocab)
    cat = np.concatenate
    return {
        "topk_ids": torch.from_numpy(ids), "topk_logprobs": torch.from_numpy(lp), "tail_logprob": torch.from_numpy(tail),
        "uld_logprobs": torch.from_numpy(cat(parts["uld"]).astype(np.float32) if parts["uld"] else np.zeros((0, k), np.float32)),
        "uld_tail": torch.from_numpy(cat(parts["uld_tail"]).astype(np.float32) if parts["uld_tail"] else np.zeros(0, np.float32)),
        "chunk_logprob": torch.from_numpy(cat(parts["chunk"]).astype(np.float32) if parts["chunk"] else np.zeros(0, np.float32)),
        "matched": torch.from_numpy(cat(parts["matched"]) if parts["matched"] else np.zeros(0, bool)),
        "has_kd": torch.from_numpy(cat(parts["has"]) if parts["has"] else np.zeros(0, bool)),
    }


data.COLLATORS["cross"] = collate_cross
data.TEACHER_IDS["cross"] = "topk_ids"


# -- the loader --------------------------------------------------------------------------------------
class CrossTokenizer:
    """The two tokenizers of a run and their vocabulary map; loaded lazily in each loader process."""

    def __init__(self, store: Store, student_dir: str) -> None:
        self.teacher_dir, self.student_dir = store.tokenizer_dir, student_dir
        self._loaded: tuple[Any, TokenTable, Any, TokenTable, np.ndarray] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_loaded": None}

    @property
    def loaded(self) -> tuple[Any, TokenTable, Any, TokenTable, np.ndarray]:
        if self._loaded is None:
            from transformers import AutoTokenizer

            t, s = AutoTokenizer.from_pretrained(self.teacher_dir), AutoTokenizer.from_pretrained(self.student_dir)
            tt, st = TokenTable.of(t), TokenTable.of(s)
            self._loaded = (t, tt, s, st, vocabulary_map(tt, st))
        return self._loaded

    def sequence(self, whole: Sequence) -> Sequence:
        t, tt, s, st, vmap = self.loaded
        al = align(t, tt, s, st, whole.ids, whole.score_start, whole.record_id)
        return cross_sequence(al, whole.targets, vmap, whole.record_id)  # type: ignore[arg-type]


class CrossTokenizerDataset(StoreDataset):
    """`StoreDataset` yielding the student's own tokens of each record, with cross-tokenizer targets."""

    def __init__(self, store: Store, plan: LoaderPlan, cross: CrossTokenizer, student_fingerprint: str,
                 **settings: Any) -> None:
        super().__init__(store, plan, **{**settings, "targets": "topk"})
        self.cross, self.student_fingerprint = cross, student_fingerprint
        self.targets = "cross"  # how batches are collated (the store's top-k rows, read as "topk")

    def record(self, reader: ShardReader, shard_idx: int, row: int) -> Sequence:
        return self.cross.sequence(record_sequence(reader, row, "topk"))

    def collate_records(self, samples: list[tuple[int, int]]) -> dict[str, Any]:
        batch = super().collate_records(samples)
        if "has_kd" in batch:  # the share of target positions with an exact (matched) target
            batch["cross_matched"] = batch["matched"].float().sum() / batch["has_kd"].float().sum().clamp(min=1)
        return batch

    def _order_spec(self) -> dict[str, Any]:
        return {**super()._order_spec(), "cross_tokenizer": self.student_fingerprint}


def check_cross_settings(config: Any, stores: list[Store]) -> None:
    """Refuse, in one line, what --cross-tokenizer does not combine with."""
    refusals = [
        (len(stores) > 1, "several --store values (teachers of one student must share one tokenizer)"),
        (bool(config.hidden_map), "--hidden-map (the teacher's hidden states are per teacher token)"),
        (config.rationale_mode != "plain", "--rationale-mode multitask"),
        (config.targets == "sampled", "--targets sampled (only top-k targets carry a distribution to align)"),
    ]
    for bad, what in refusals:
        if bad:
            raise ConfigError(f"--cross-tokenizer does not combine with {what}")
    if "topk" not in stores[0].manifest.targets.target_kind.train_targets:
        raise ConfigError(f"--cross-tokenizer: store {stores[0].url} holds no top-k targets "
                          f"(manifest targets.kind={stores[0].manifest.targets.kind!r})")


def student_fingerprint(tokenizer: Any) -> str:
    return tokenizer_fingerprint(tokenizer).fingerprint


# -- evaluation --------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_cross(store: Store, plan: LoaderPlan, model: Any, tokenizer: Any, cross: CrossTokenizer, *,
                   max_records: int = 0, batch_size: int = 8, max_new_tokens: int = 128,
                   answers: bool = True) -> dict[str, Any]:
    """The held-out records of `plan` in the student's tokens: the cross-tokenizer KD loss, top-1
    agreement on matched positions, perplexity of the student's tokens, answer accuracy (the prompt
    text in the student's tokens, greedy)."""
    import math

    from potstill.student_train.evaluation import DEFAULT_ANSWER_PATTERN, extract_answer, normalise_answer
    from potstill.student_train.objective import Objective, cross_kd

    rows = list(plan.held_out)[: max_records or None]
    result: dict[str, Any] = {"store": store.url, "eval_fraction": plan.eval_fraction, "records": len(rows),
                              "cross_tokenizer": True}
    if not rows:
        result.update(scored_tokens=0, kd_loss=None, top1_agreement=None, perplexity=None, answer_accuracy=None)
        return result
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    vocab = int(model.get_output_embeddings().weight.shape[0])
    kd_sum = ce_sum = 0.0
    kd_n = tokens = top1 = matched_n = 0
    for start in range(0, len(rows), batch_size):
        seqs = [cross.sequence(record_sequence(store.shard(name), row, "topk")) for name, row in rows[start : start + batch_size]]
        batch = data.collate(seqs, k=store.manifest.targets.k, pad_id=pad_id, student_vocab=vocab, targets="cross")
        batch = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        logits = logits[batch["pos_batch"], batch["pos_index"]].float()
        lse = torch.logsumexp(logits, dim=-1)
        kd = cross_kd(logits, batch, Objective(targets="cross"), lse)
        has, matched = batch["has_kd"], batch["matched"]
        kd_sum += kd[has].sum().item()
        kd_n += int(has.sum())
        ce_sum += (lse - logits.gather(-1, batch["hard_ids"][:, None]).squeeze(-1)).sum().item()
        tokens += len(lse)
        top1 += (logits.argmax(-1) == batch["topk_ids"][:, 0])[matched].sum().item()
        matched_n += int(matched.sum())
    result.update(kd_target="cross", scored_tokens=tokens, kd_loss=kd_sum / kd_n if kd_n else None,
                  matched_share=matched_n / kd_n if kd_n else None,
                  top1_agreement=top1 / matched_n if matched_n else None, perplexity=math.exp(ce_sum / tokens))
    if answers:
        pattern = store.manifest.generation.get("answer_pattern")
        pattern = pattern if isinstance(pattern, str) and pattern else DEFAULT_ANSWER_PATTERN
        match = "first" if store.manifest.generation.get("answer_match") == "first" else "last"
        checked = correct = 0
        gen_pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        for name, row in rows:
            views = store.shard(name).views
            expected = views.text_of("answer", row)
            if expected is None:
                continue
            whole = record_sequence(store.shard(name), row, "topk")
            al = align(*cross.loaded[:4], whole.ids, whole.score_start, whole.record_id)
            prompt = torch.tensor(al.ids[: al.score_start], dtype=torch.long, device=dev)[None]
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=gen_pad)
            found = extract_answer(tokenizer.decode(out[0, prompt.shape[1] :].tolist(), skip_special_tokens=True),
                                   pattern, match)
            checked += 1
            correct += int(found is not None and normalise_answer(found) == normalise_answer(expected))
        result.update(answer_accuracy=correct / checked if checked else None, answers_checked=checked,
                      answers_correct=correct)
    model.train(was_training)
    return result


__all__ = ["Alignment", "CrossRows", "CrossTokenizer", "CrossTokenizerDataset", "TokenTable", "align", "check_alignment",
           "check_cross_settings", "collate_cross", "cross_sequence", "evaluate_cross", "project_rows", "token_spans",
           "vocabulary_map"]
