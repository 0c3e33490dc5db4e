"""Several teachers in one student: stores made over the same prompts, joined by record id, their
targets mixed into one per position (docs/guides/train.md, "Several teachers").

**Roles.** The *primary* store (`--hidden-from`, default the first `--store`) fixes what the student
reads: its token sequences, its split and order (`data.plan_split`), its rationales and hidden
states. Every other store adds its targets to the primary's records by id.

**Joining.** A record is trained when every store holds its id (the first committed copy, as in one
store); the records some stores lack are left out and counted (`Teachers.describe`). Ids are matched
on their 64-bit keys, then compared as strings. Stores that share no training id are refused.

**Which teachers take part at a position.** Teacher t's target at position i (the distribution of
token i given the tokens before it) belongs to the student's sequence when t's stored tokens equal
the primary's up to i (their common prefix) and t scored position i. There the teachers that take
part are mixed with their weights renormalised over them; the primary always takes part. Positions
with fewer than all teachers are counted (`teachers_partial` in the training log): generated
completions that differ between teachers, or a record whose prompt differs.

**Mixing** (`mix_topk`, `mix_weighted`), p = Σ_t w_t p_t:

- weighted ids (sampled draws, hybrid targets): the union of every teacher's weighted ids with
  weights w_t · weight_t (count / N for draws). Each teacher's weights are unbiased for p_t, so the
  mixture is unbiased for p, and forward KL at T = 1 (the only loss trained on draws) is linear in
  it: exact in expectation.
- top-k: the buckets are the union U of the teachers' top-k ids plus one tail bucket (every id
  outside U). Bucket v ∈ U gets Σ_{t: v ∈ topk_t} w_t p_t(v); the tail gets Σ_t w_t m_t, each
  teacher's stored tail mass m_t. A teacher's mass on an id another teacher names but it does not
  (inside its own tail) therefore stays in the tail bucket instead of on that id: the mixed buckets
  are exact when the teachers' top-k sets are equal or hold all of their mass, and otherwise move at
  most Σ_t w_t · min(m_t, |U \\ topk_t| · min_v p_t(v ∈ topk_t)) of mass from U to the tail
  (measured in tests/test_multi_teacher.py). Temperature applies to the mixed buckets, as to one
  teacher's: p_T ∝ p^{1/T} per bucket.
- one sampled and one top-k teacher: refused (`resolve_targets`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch

from potstill.store import Store, open_store
from potstill.store.reader import ShardReader
from potstill.store.targets import TopKRows, WeightedRows
from potstill.student_train.data import (
    LoaderPlan,
    Sequence,
    StoreDataset,
    check_targets,
    common_prefix,
    record_sequence,
)
from potstill.student_train.errors import ConfigError, TrainError


# -- opening and checking ---------------------------------------------------------------------------
def same_store(a: str, b: str) -> bool:
    """Whether two --store values name one store (a local path however spelled; a URL as written)."""
    local = ("://" not in a or a.startswith("file://")) and ("://" not in b or b.startswith("file://"))
    if local:
        return os.path.realpath(a.removeprefix("file://").rstrip("/")) == os.path.realpath(b.removeprefix("file://").rstrip("/"))
    return a.rstrip("/") == b.rstrip("/")


def order_stores(urls: list[str], weights: list[float], hidden_from: str) -> tuple[list[str], list[float]]:
    """The stores with the primary (`hidden_from`, default the first) first; a store given twice refused."""
    for i, a in enumerate(urls):
        for b in urls[:i]:
            if same_store(a, b):
                raise ConfigError(f"--store {a} is given twice (as {b}): give each teacher's store once, "
                                  "and its share with --teacher-weights")
    first = next((i for i, u in enumerate(urls) if hidden_from and same_store(u, hidden_from)), 0)
    order = [first] + [i for i in range(len(urls)) if i != first]
    return [urls[i] for i in order], [weights[i] for i in order]


def check_same_tokenizer(stores: list[Store]) -> None:
    primary = stores[0]
    for store in stores[1:]:
        if store.manifest.tokenizer.fingerprint != primary.manifest.tokenizer.fingerprint:
            raise ConfigError(f"stores {primary.url} and {store.url} were made with different tokenizers: teachers "
                              "of one student must share one (--cross-tokenizer distils from one store at a time)")


def resolve_targets(config_targets: str, stores: list[Store], sampled_ok: bool) -> str:
    """The loader shape every store trains on: --targets when given (each store must hold it); with
    auto, each store's own default when they agree, else top-k when every store holds it; a sampled
    teacher with a top-k-only one is refused."""
    if config_targets != "auto":
        for store in stores:
            check_targets(store, config_targets)
        return config_targets
    defaults = [s.manifest.targets.target_kind.default_train_target(sampled_ok) for s in stores]
    if len(set(defaults)) == 1:
        return defaults[0]
    if all("topk" in s.manifest.targets.target_kind.train_targets for s in stores):
        return "topk"
    kinds = ", ".join(f"{s.url} ({s.manifest.targets.kind})" for s in stores)
    raise ConfigError(f"stores {kinds} hold targets that do not mix: sampled draws and top-k targets cannot be "
                      "mixed into one distribution; train on stores that share a target kind")


# -- joining by id -------------------------------------------------------------------------------------
@dataclasses.dataclass
class Partner:
    """One store besides the primary: where each primary record's id lies in it."""

    url: str
    weight: float
    shards: list[str]  # its shards joined (pinned on resume, like the primary's)
    shard: np.ndarray  # int32, per position of its id index: the shard index
    row: np.ndarray  # int32, per position: the row
    at: dict[str, np.ndarray]  # primary shard -> per row, the position in this store's index (−1: absent)
    missing: int = 0  # primary records (training or held out) whose id this store lacks
    extra: int = 0  # this store's records whose id the primary lacks


def join(primary: Store, plan: LoaderPlan, other: Store, weight: float, shards: list[str] | None = None) -> Partner:
    """Match every record of the plan's shards of `primary` with the first committed copy of its id in `other`."""
    names = list(shards) if shards is not None else other.shard_names
    index_p, index_o = primary.id_index(plan.shards), other.id_index(names)
    usable = np.ones(len(index_o), dtype=bool)  # the first committed copy of each id only
    for name, rows in other.duplicates(names).items():
        s = names.index(name)
        usable[index_o.starts[s] + np.array([r for r, _ in rows], dtype=np.int64)] = False
    candidates = np.flatnonzero(usable)
    order = candidates[np.argsort(index_o.keys[candidates], kind="stable")]
    ranked = index_o.keys[order]
    position = np.full(len(index_p), -1, dtype=np.int64)
    if len(ranked):
        slot = np.searchsorted(ranked, index_p.keys).clip(max=len(ranked) - 1)
        hit = np.flatnonzero(ranked[slot] == index_p.keys)
        # equal keys: the ids themselves compared (a 64-bit collision is no match)
        same = pc.equal(index_p.ids_at(hit), index_o.ids_at(order[slot[hit]])).to_numpy(zero_copy_only=False)
        position[hit[same]] = order[slot[hit[same]]]
    at = {name: position[index_p.starts[s] : index_p.starts[s + 1]] for s, name in enumerate(plan.shards)}
    matched = position[position >= 0]
    return Partner(other.url, weight, names, index_o.shard, index_o.row, at,
                   missing=len(position) - len(matched), extra=int(usable.sum()) - len(np.unique(matched)))


def joined_plan(plan: LoaderPlan, partners: list[Partner]) -> LoaderPlan:
    """`plan` with only the records every store holds, training and held out."""
    def everywhere(name: str) -> np.ndarray:
        ok = np.ones(len(next(iter(partners)).at[name]), dtype=bool)
        for p in partners:
            ok &= p.at[name] >= 0
        return ok

    present = {name: everywhere(name) for name in plan.shards}
    train_rows = [rows[present[name][rows]] for name, rows in zip(plan.shards, plan.train_rows, strict=True)]
    held_out = [(name, row) for name, row in plan.held_out if present[name][row]]
    return dataclasses.replace(plan, train_rows=train_rows, held_out=held_out, eval_records=len(held_out))


# -- mixing --------------------------------------------------------------------------------------------
def merge_rows(ids: np.ndarray, weights: np.ndarray, width: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row, the distinct ids ≥ 0 of `ids` [S, C] with their `weights` summed (float64), in order of
    weight, largest first (ties: smaller id first). Returns (ids [S, W] −1 padded, weights [S, W] 0
    padded, lengths [S]); W = `width`, else the most distinct ids a row has. Compiled (`_merge_kernel`);
    `merge_rows_numpy` is the same in numpy, its reference in the tests."""
    rows, cols = ids.shape
    out_ids = np.full((rows, max(cols, 1)), -1, dtype=np.int64)
    out_w = np.zeros((rows, max(cols, 1)), dtype=np.float64)
    lengths = np.zeros(rows, dtype=np.int64)
    _merge_kernel()(np.ascontiguousarray(ids, dtype=np.int64), np.ascontiguousarray(weights, dtype=np.float64),
                    out_ids, out_w, lengths)
    wide = max(int(lengths.max(initial=0)) if width is None else width, 1)
    if wide > out_ids.shape[1]:
        out_ids = np.pad(out_ids, ((0, 0), (0, wide - out_ids.shape[1])), constant_values=-1)
        out_w = np.pad(out_w, ((0, 0), (0, wide - out_w.shape[1])))
    return out_ids[:, :wide], out_w[:, :wide], lengths


@functools.cache
def _merge_kernel() -> Any:
    """The row merge of `merge_rows`, compiled on first use (numba, cached on disk like store/kernels.py):
    a few hundred entries per row, sorted by id, runs summed, then sorted by weight."""
    import numba

    @numba.njit(cache=True, nogil=True)
    def merge(ids: np.ndarray, weights: np.ndarray, out_ids: np.ndarray, out_w: np.ndarray, lengths: np.ndarray) -> None:
        rows, cols = ids.shape
        keys = np.empty(cols, dtype=np.int64)
        mass = np.empty(cols, dtype=np.float64)
        run_ids = np.empty(cols, dtype=np.int64)
        run_w = np.empty(cols, dtype=np.float64)
        for r in range(rows):
            n = 0
            for c in range(cols):
                if ids[r, c] >= 0 and weights[r, c] > 0:
                    keys[n] = ids[r, c]
                    mass[n] = weights[r, c]
                    n += 1
            order = np.argsort(keys[:n], kind="mergesort")
            m = 0
            for j in range(n):
                i = order[j]
                if m > 0 and run_ids[m - 1] == keys[i]:
                    run_w[m - 1] += mass[i]
                else:
                    run_ids[m] = keys[i]
                    run_w[m] = mass[i]
                    m += 1
            by_weight = np.argsort(-run_w[:m], kind="mergesort")  # ties keep the smaller id first
            for j in range(m):
                out_ids[r, j] = run_ids[by_weight[j]]
                out_w[r, j] = run_w[by_weight[j]]
            lengths[r] = m

    return merge


def merge_rows_numpy(ids: np.ndarray, weights: np.ndarray, width: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`merge_rows` in numpy (its reference): sorts within rows only."""
    rows, cols = ids.shape
    valid = (ids >= 0) & (weights > 0)
    empty = np.iinfo(np.int64).max  # sorts after every id
    key = np.where(valid, ids, empty).astype(np.int64)
    order = np.argsort(key, axis=1, kind="stable")
    key = np.take_along_axis(key, order, 1)
    mass = np.take_along_axis(np.where(valid, weights, 0.0).astype(np.float64), order, 1)
    starts = np.ones((rows, cols), dtype=bool)
    starts[:, 1:] = key[:, 1:] != key[:, :-1]
    flat = np.flatnonzero(starts)  # every row's first column starts a run, so no run spans two rows
    sums = np.add.reduceat(mass.reshape(-1), flat) if len(flat) else np.zeros(0)
    run_ids, run_row = key.reshape(-1)[flat], flat // max(cols, 1)
    run_col = (np.cumsum(starts, axis=1) - 1).reshape(-1)[flat]
    real = run_ids != empty
    dense_ids = np.full((rows, cols), -1, dtype=np.int64)
    dense_w = np.zeros((rows, cols), dtype=np.float64)
    dense_ids[run_row[real], run_col[real]] = run_ids[real]
    dense_w[run_row[real], run_col[real]] = sums[real]
    by_weight = np.argsort(-dense_w, axis=1, kind="stable")  # empty slots (weight 0) last
    dense_ids, dense_w = np.take_along_axis(dense_ids, by_weight, 1), np.take_along_axis(dense_w, by_weight, 1)
    lengths = (dense_ids >= 0).sum(1)
    wide = max(int(lengths.max(initial=0)) if width is None else width, 1)
    if wide > cols:
        dense_ids = np.pad(dense_ids, ((0, 0), (0, wide - cols)), constant_values=-1)
        dense_w = np.pad(dense_w, ((0, 0), (0, wide - cols)))
    return dense_ids[:, :wide], dense_w[:, :wide], lengths


def mix_topk(parts: list[tuple[TopKRows, np.ndarray]], width: int) -> TopKRows:
    """The mixed top-k rows of one record (module doc): `parts` = each teacher's rows, aligned to the
    primary's positions, with its weight per position (0 where it does not take part; the weights of a
    position sum to 1). Row ids of the result are the union, log-probs log Σ_t w_t p_t, the log tail
    log Σ_t w_t m_t; `width` columns (the teachers' K summed)."""
    ids = np.concatenate([t.ids for t, _ in parts], axis=1)
    probs = np.concatenate([np.exp(t.logprobs.astype(np.float64)) * w[:, None] for t, w in parts], axis=1)
    out_ids, out_p, _ = merge_rows(ids, probs, width)
    tail = sum(np.exp(t.tail_logprob.astype(np.float64)) * w for t, w in parts)
    with np.errstate(divide="ignore"):
        logprobs = np.where(out_ids >= 0, np.log(out_p), -np.inf).astype(np.float32)
        log_tail = np.log(tail).astype(np.float32)
    primary = parts[0][0]
    return TopKRows(out_ids.astype(np.int32), logprobs, primary.token_logprob, log_tail)


def mix_weighted(parts: list[tuple[WeightedRows, np.ndarray]]) -> WeightedRows:
    """The mixed weighted ids of one record: the union of the teachers' ids, weights Σ_t w_t · weight_t."""
    ids = np.concatenate([t.ids for t, _ in parts], axis=1)
    weights = np.concatenate([t.weights.astype(np.float64) * w[:, None] for t, w in parts], axis=1)
    out_ids, out_w, lengths = merge_rows(ids, weights)
    return WeightedRows(out_ids, out_w.astype(np.float32), lengths)


def aligned(rows: TopKRows | WeightedRows, take: np.ndarray, valid: np.ndarray) -> TopKRows | WeightedRows:
    """A teacher's rows at the primary's positions: row `take[j]` where `valid[j]`, an empty row elsewhere."""
    take = np.where(valid, take, 0)
    if isinstance(rows, TopKRows):
        if not len(rows.ids):
            rows = TopKRows(np.full((1, rows.ids.shape[1]), -1, np.int32), np.full((1, rows.ids.shape[1]), -np.inf, np.float32),
                            np.zeros(1, np.float32), np.full(1, -np.inf, np.float32))
        ids = np.where(valid[:, None], rows.ids[take], -1)
        return TopKRows(ids, rows.logprobs[take], rows.token_logprob[take], rows.tail_logprob[take])
    if not len(rows.ids):
        rows = WeightedRows(np.full((1, 1), -1, np.int64), np.zeros((1, 1), np.float32), np.zeros(1, np.int64))
    return WeightedRows(np.where(valid[:, None], rows.ids[take], -1), rows.weights[take], rows.lengths[take])


# -- the teachers of a run ------------------------------------------------------------------------------
class Teachers:
    """The stores of a run besides the primary, joined to it; mixes a primary record's targets with theirs."""

    def __init__(self, primary_weight: float, partners: list[Partner], width: int,
                 storage: tuple[dict[str, Any] | None, bool, bool]) -> None:
        self.primary_weight, self.partners, self.width = primary_weight, partners, width
        self._storage = storage  # (storage options, strict, verify_reads) to reopen the stores in a worker
        self._stores: list[Store] | None = None
        self._pid = os.getpid()
        self.positions = 0  # scored positions mixed since `take_counts`
        self.partial = 0  # of them, positions where not every teacher took part

    @classmethod
    def open(cls, primary: Store, plan: LoaderPlan, stores: list[Store], weights: list[float],
             shards: list[list[str]] | None = None) -> tuple[Teachers, LoaderPlan]:
        """Join the other stores (opened like the primary; `weights`, the primary's is 1 − their sum)
        to the primary's `plan` (`shards`: theirs, pinned on resume); the plan restricted to the
        records every store holds. Refuses stores that share no training id or whose prompts differ."""
        storage = (primary.storage_options, primary.strict, primary.verify_reads)
        check_same_tokenizer([primary, *stores])
        partners = [join(primary, plan, store, w, shards[i] if shards else None)
                    for i, (store, w) in enumerate(zip(stores, weights, strict=True))]
        joined = joined_plan(plan, partners)
        if joined.num_train == 0:
            raise ConfigError(f"stores {primary.url} and {', '.join(s.url for s in stores)} share no training record "
                              "id: they were not made over the same prompts")
        width = primary.manifest.targets.k + sum(s.manifest.targets.k for s in stores)
        teachers = cls(1.0 - sum(weights), partners, width, storage)
        teachers._stores = stores
        teachers.check_prompts(primary, joined)
        return teachers, joined

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_stores": None}

    @property
    def stores(self) -> list[Store]:
        """This process's handles of the other stores (reopened in a loader worker)."""
        if self._stores is None or self._pid != os.getpid():
            options, strict, verify = self._storage
            self._stores = [open_store(p.url, options, strict=strict, verify_reads=verify) for p in self.partners]
            self._pid = os.getpid()
        return self._stores

    def check_prompts(self, primary: Store, plan: LoaderPlan) -> None:
        """Refuse stores made over different prompts: the first training record's prompt tokens must be
        the same in every store."""
        s = next(i for i, rows in enumerate(plan.train_rows) if len(rows))
        name, row = plan.shards[s], int(plan.train_rows[s][0])
        views = primary.shard(name).views
        prompt = views.input_ids_of(row)[: int(views.score_start[row])]
        for partner, store in zip(self.partners, self.stores, strict=True):
            reader, r = self._reader(partner, store, name, row)
            other = reader.views.input_ids_of(r)[: int(reader.views.score_start[r])]
            if not np.array_equal(prompt, other):
                raise ConfigError(f"stores {primary.url} and {store.url} were made over different prompts: record "
                                  f"{reader.ids[r]!r} starts with other tokens in each")

    def _reader(self, partner: Partner, store: Store, name: str, row: int) -> tuple[ShardReader, int]:
        position = int(partner.at[name][row])
        if position < 0:
            raise TrainError(f"record {row} of shard {name} is not in {partner.url}")
        shard = partner.shards[int(partner.shard[position])]
        reader = store.shard(shard)  # opening it checks its files and values once (verify_reads)
        store.mark_checked((shard,))  # so that reopening it after the reader cache let it go does not check again
        return reader, int(partner.row[position])

    def sequence(self, whole: Sequence, name: str, row: int, targets: str) -> Sequence:
        """The primary's record `whole` (shard `name`, `row`) with the targets of every teacher mixed in."""
        s, n = whole.score_start, len(whole.ids)
        positions = np.arange(s, n)
        parts: list[tuple[Any, np.ndarray]] = [(whole.targets, np.full(n - s, self.primary_weight))]
        for partner, store in zip(self.partners, self.stores, strict=True):
            reader, r = self._reader(partner, store, name, row)
            theirs = record_sequence(reader, r, targets)
            cp = common_prefix(whole.ids, theirs.ids)
            valid = (positions >= theirs.score_start) & (positions < len(theirs.ids)) & (positions <= cp)
            parts.append((aligned(theirs.targets, positions - theirs.score_start, valid), np.where(valid, partner.weight, 0.0)))
        total = sum(w for _, w in parts)
        parts = [(rows, w / total) for rows, w in parts]
        self.positions += n - s
        self.partial += int((total < 1.0 - 1e-9).sum())
        mixed = mix_topk(parts, self.width) if targets == "topk" else mix_weighted(parts)
        return dataclasses.replace(whole, targets=mixed)

    def own_sequence(self, teacher: int, primary: Store, name: str, row: int, targets: str) -> Sequence:
        """The primary's record (shard `name`, `row`) as teacher `teacher` stored it, its targets alone
        (0: the primary, as in `describe`): how `potstill eval` measures a student against each teacher."""
        if teacher == 0:
            return record_sequence(primary.shard(name), row, targets)
        partner, store = self.partners[teacher - 1], self.stores[teacher - 1]
        reader, r = self._reader(partner, store, name, row)
        return record_sequence(reader, r, targets)

    def take_counts(self) -> tuple[int, int]:
        counts = (self.positions, self.partial)
        self.positions = self.partial = 0
        return counts

    def describe(self, primary: str) -> list[dict[str, Any]]:
        """Each store of the run: its weight, and the records it lacks or holds beyond the primary's."""
        out = [{"store": primary, "weight": self.primary_weight, "role": "primary (sequences, hidden states, rationales)"}]
        out += [{"store": p.url, "weight": p.weight, "missing_records": p.missing, "extra_records": p.extra}
                for p in self.partners]
        return out

    def order_spec(self) -> dict[str, Any]:
        """What fixes the joined records and their mixture: a resume must match it."""
        return {"teachers": [p.url for p in self.partners], "teacher_weights": [p.weight for p in self.partners],
                "teacher_shards": [p.shards for p in self.partners]}


class MixedDataset(StoreDataset):
    """`StoreDataset` over the primary store, each record's targets mixed with the other teachers'."""

    def __init__(self, store: Store, plan: LoaderPlan, teachers: Teachers, **settings: Any) -> None:
        super().__init__(store, plan, **settings)
        self.teachers = teachers

    @property
    def target_width(self) -> int:
        return self.teachers.width

    def record(self, reader: ShardReader, shard_idx: int, row: int) -> Sequence:
        whole = super().record(reader, shard_idx, row)
        return self.teachers.sequence(whole, self.plan.shards[shard_idx], row, self.targets)

    def collate_records(self, samples: list[tuple[int, int]]) -> dict[str, Any]:
        self.teachers.take_counts()
        batch = super().collate_records(samples)
        positions, partial = self.teachers.take_counts()
        if "input_ids" in batch:  # the share of scored positions where not every teacher took part
            batch["teachers_partial"] = torch.tensor(partial / max(positions, 1))
        return batch

    def _order_spec(self) -> dict[str, Any]:
        return {**super()._order_spec(), **self.teachers.order_spec()}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "teachers": self.teachers.describe(self.store.url)}
