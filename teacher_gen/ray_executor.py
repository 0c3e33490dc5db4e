"""`generate_on_ray(config)`: `potstill generate --executor ray`, the teacher held by a pool of Ray actors.

The driver (this process) does what the local executor does before its model loads: reads and checks
the prompts, skips the ids the store has committed, tokenizes the rest and builds the manifest (the
same functions, so both write the same store). It then cuts the work into *blocks*: runs of the very
forward batches the local executor would make (`score_batches` / `generate_batches` of the backend), so
every record is computed in the same batch and its bytes are the local executor's. Each block goes to
whichever actor is free; the actor runs the local executor's batch loop over it (`Run.execute`) and
writes its records as shards through the store's own writer.

Exactly once, whatever fails. A block's writer id is a hash of its record ids (`ray-<hash>`), the
same in every attempt and every rerun that forms the block again, so:
  - a shard is committed by the exclusive creation of its commit record: two attempts can never both
    commit one shard name;
  - an attempt first takes the block's writer lease (a live lease of another attempt is refused:
    the block is deferred and tried again later), then skips the records that an earlier attempt
    committed and removes that attempt's uncommitted leftovers, which are its own now;
  - a rerun driver waits until no block writer of an earlier run is alive before it reads what is
    committed, so a dying actor of a killed driver cannot commit behind its back.
Ray restarts an actor that died and runs its blocks again (`max_restarts`, `max_task_retries`): at
least once, which the protocol above makes exactly once; an actor Ray gives up on is dropped and its
blocks go to the others.

Plain actors and `ray.wait`, not Ray Data: blocks must be runs of whole forward batches, decided by
the driver, and each must be tracked until its commit records exist; Ray Data's blocks are its own and
its sinks are retried at least once, so it would add a layer without removing any of this.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from potstill.phases import Phases
from potstill.store import CommitRecord, Store, find_leftovers
from potstill.store.commit import parse_shard_name
from potstill.store.fs import join, listdir_names, temp_pid, temp_target
from potstill.store.leases import STALE_AFTER_S, WriterIdInUse, all_leases, lease_path
from potstill.store.verify import clean_leftovers
from potstill.teacher_gen.capture import resolve_layers
from potstill.teacher_gen.config import GenerateConfig
from potstill.teacher_gen.encode import Encoded, context_length
from potstill.teacher_gen.errors import GenerateError
from potstill.teacher_gen.jobs import GenRequest, derive_seed
from potstill.teacher_gen.model_info import describe_teacher
from potstill.teacher_gen.runner import (
    GenerateSummary,
    Progress,
    RecordBuilder,
    Run,
    check_backend,
    load_teacher,
    load_tokenizer,
    make_job,
    record_id,
    recorded,
    refuse_all_skipped,
)
from potstill.teacher_gen.writer import WriterPool

BLOCK_PREFIX = "ray-"  # block writer ids: ray-<hash of the block's record ids>
IN_FLIGHT = 2  # blocks queued on one actor: the next is there when the current one ends
MAX_RESTARTS = 4  # restarts of one actor by Ray (a process that died: out of memory, a lost node)
MAX_ATTEMPTS = 4  # attempts of one block on one actor (Ray's retries after the actor died and was restarted)
DEFER_S = 5.0  # a block whose writer lease is held by a live attempt waits this long before it is tried again
WAIT_S = 0.5  # the driver's poll: progress and deferred blocks


@dataclass
class Block:
    """A run of consecutive forward batches; its records are written under one writer id."""

    writer_id: str
    encoded: list[tuple[Encoded, list[int]]]  # (item, its sample indices here), in the prompt file's order
    records: int
    first_id: str
    attempts: int = 0  # actors dropped while they held the block (each after Ray's own retries)
    not_before: float = 0.0


@dataclass
class BlockResult:
    writer_id: str
    commits: list[CommitRecord] = field(default_factory=list)  # the block's shards, earlier attempts' included
    generated_tokens: int = 0
    deferred: str | None = None  # a live attempt holds the block's lease (in words); nothing was done
    retried: bool = False  # an earlier attempt of the block died (its lease was left behind)
    protocol_s: float = 0.0  # the block's own protocol: its leases taken, the look for earlier attempts' commits
    compute_s: float = 0.0  # the batches, the writing that overlaps them included
    close_s: float = 0.0  # the writers' close: the last records written, the commit records, the leases released


# -- planning ----------------------------------------------------------------------------------------
def block_writer_id(ids: list[str]) -> str:
    return BLOCK_PREFIX + hashlib.sha256("\n".join(ids).encode()).hexdigest()[:24]


def plan_blocks(config: GenerateConfig, encoded: list[tuple[Encoded, list[int]]], block_records: int) -> list[Block]:
    """Blocks of at most `block_records` records (at least one batch each), in the local executor's
    batch order. Within a block the items keep the prompt file's order, so the backend batches them
    again exactly as it batched them among all the items (a stable sort, then greedy packing)."""
    n = config.num_samples
    position = {id(enc): i for i, (enc, _) in enumerate(encoded)}
    if config.mode == "score":
        units = [make_job(config, enc, record_id(enc.item.id, 0, n), 0) for enc, _ in encoded]
        pairs = lambda batch: [(job.encoded, job.sample_index) for job in batch]  # noqa: E731
        batches = _backend_batches(config, units, generate=False)
    else:
        units = [GenRequest(record_id(enc.item.id, k, n), enc, k, derive_seed(config.seed, enc.item.id, k))
                 for enc, todo in encoded for k in todo]
        pairs = lambda batch: [(r.encoded, r.sample_index) for r in batch]  # noqa: E731
        batches = _backend_batches(config, units, generate=True)
    blocks, current = [], []
    for batch in batches:
        if current and len(current) + len(batch) > block_records:
            blocks.append(_block(config, current, position))
            current = []
        current += pairs(batch)
    if current:
        blocks.append(_block(config, current, position))
    return blocks


def _block(config: GenerateConfig, pairs: list[tuple[Encoded, int]], position: dict[int, int]) -> Block:
    by_item: dict[int, tuple[Encoded, list[int]]] = {}
    for enc, k in sorted(pairs, key=lambda p: (position[id(p[0])], p[1])):
        by_item.setdefault(id(enc), (enc, []))[1].append(k)
    encoded = list(by_item.values())
    ids = [record_id(enc.item.id, k, config.num_samples) for enc, todo in encoded for k in todo]
    return Block(block_writer_id(ids), encoded, len(ids), ids[0])


def _backend_batches(config: GenerateConfig, units: list, generate: bool) -> Iterator[list]:
    if config.backend == "vllm":
        from potstill.teacher_gen.vllm_backend import groups

        return groups(units)
    from potstill.teacher_gen.hf_backend import generate_batches, score_batches

    return generate_batches(config, units) if generate else score_batches(config, units)


# -- the actor ---------------------------------------------------------------------------------------
class BlockWorker:
    """What a Ray actor holds: the teacher, loaded once, and the store it writes blocks into. A plain
    class, so that it also runs in-process (tests; `ray.remote` makes the actor)."""

    def __init__(self, config: GenerateConfig) -> None:
        self.config = config
        self.error: str | None = None
        self.store: Store | None = None
        try:
            spec = describe_teacher(config)
            tokenizer = load_tokenizer(config)
            layers = resolve_layers(config.hidden_layers, spec.num_layers)
            max_length = config.max_length or context_length(spec.hf_config, tokenizer)
            self.teacher = load_teacher(config, spec, tokenizer, layers, max_length)
            self.build = RecordBuilder(config, tokenizer)
        except Exception as e:  # told to the driver by `ready`, as one line
            self.error = str(e) if isinstance(e, GenerateError) else f"{type(e).__name__}: {e}"

    def ready(self) -> dict[str, Any]:
        return {"error": self.error, "host": socket.gethostname(), "pid": os.getpid()}

    def run_block(self, block: Block) -> BlockResult:
        started = self.start_block(block)
        return started if isinstance(started, BlockResult) else self.finish_block(*started)

    def start_block(self, block: Block) -> BlockResult | tuple[BlockResult, WriterPool]:
        """Take the block's leases, skip what earlier attempts committed, compute the rest and hand it to
        the writers; a deferred block's result at once. `finish_block` then closes the writers."""
        started = time.perf_counter()
        config = self.config
        if self.store is None:
            self.store = Store(config.store)
        store = self.store
        ids = ([block.writer_id] if config.writer_threads == 1
               else [f"{block.writer_id}.{j}" for j in range(config.writer_threads)])
        # (a lease left behind: an attempt of this block died; this one takes the block over)
        retried = any(store.fs.exists(lease_path(store, wid)) for wid in ids)
        try:  # the leases first: what is read below cannot change while they are held
            pool = WriterPool(store, block.writer_id, self.build, threads=config.writer_threads,
                              shard_records=config.shard_records, shard_bytes=config.shard_bytes,
                              max_batches=config.queue_batches)
        except WriterIdInUse as e:
            return BlockResult(block.writer_id, deferred=e.why)
        result = BlockResult(block.writer_id, retried=retried)
        try:
            result.commits, done = _earlier_attempts(store, set(ids))
            wanted = [record_id(enc.item.id, k, config.num_samples) for enc, todo in block.encoded for k in todo]
            result.protocol_s = time.perf_counter() - started
            if any(rid not in done for rid in wanted):
                computing = time.perf_counter()
                # The whole block is computed again (its batches, so its bytes, stay the local executor's);
                # what an earlier attempt committed is not written twice.
                run = Run(replace(config, progress=False), None, None)
                run.execute(self.teacher, _Skipping(pool, done), block.encoded)
                result.generated_tokens = run.generated_done
                result.compute_s = time.perf_counter() - computing
        except BaseException:
            with contextlib.suppress(Exception):
                pool.abort()
            raise
        return result, pool

    def finish_block(self, result: BlockResult, pool: WriterPool) -> BlockResult:
        """Write what the writers hold, commit it and release the leases."""
        closing = time.perf_counter()
        try:
            result.commits = result.commits + pool.close()
        except BaseException:
            with contextlib.suppress(Exception):
                pool.abort()
            raise
        result.close_s = time.perf_counter() - closing
        return result


class _OverlappingBlockWorker(BlockWorker):
    """The actor: an asyncio actor whose block closes its writers in a thread while the next block (queued
    on the actor) computes, as the local executor's writers run beside its model. Computing is not
    awaited, so one block computes at a time."""

    async def run_block(self, block: Block) -> BlockResult:  # type: ignore[override]
        import asyncio

        started = self.start_block(block)
        if isinstance(started, BlockResult):
            return started
        return await asyncio.get_running_loop().run_in_executor(None, self.finish_block, *started)


class _Skipping:
    """The writer pool, but records in `done` (committed by an earlier attempt) are not written again."""

    def __init__(self, pool: WriterPool, done: set[str]) -> None:
        self.pool, self.done = pool, done

    def put(self, pairs: list[tuple[Any, Any]]) -> None:
        pairs = [(job, capture) for job, capture in pairs if job.record_id not in self.done]
        if pairs:
            self.pool.put(pairs)


def _earlier_attempts(store: Store, writer_ids: set[str]) -> tuple[list[CommitRecord], set[str]]:
    """The commits of earlier attempts of a block (its writer ids' shards) and their record ids; their
    uncommitted shard folders and cut-short temporary files are removed: this attempt holds the leases,
    so they are its own leftovers."""
    commits_dir, shards_dir = join(store.root, "commits"), join(store.root, "shards")
    committed = {n[:-5] for n in listdir_names(store.fs, commits_dir) if n.endswith(".json")}
    mine = {n for n in committed | set(listdir_names(store.fs, shards_dir))
            if (parsed := parse_shard_name(n)) is not None and parsed[0] in writer_ids}
    dead = [join(shards_dir, name) for name in sorted(mine - committed)]
    for folder in ("commits", "writers"):  # temporary files of atomic writes the dead attempt cut short
        for name in listdir_names(store.fs, join(store.root, folder)):
            target = temp_target(name)
            if target is None or temp_pid(name) == os.getpid():
                continue
            stem = target.removesuffix(".json")
            parsed = parse_shard_name(stem) if folder == "commits" else (stem, 0)
            if parsed is not None and parsed[0] in writer_ids:
                dead.append(join(store.root, folder, name))
    for path in dead:
        if store.fs.exists(path):
            store.fs.rm(path, recursive=True)
    names = sorted(mine & committed)
    if not names:  # a first attempt: one listing of each folder is all the protocol reads
        return [], set()
    store.refresh()
    commits = [store.commit(name) for name in names]
    return commits, {rid for name in names for rid in store.shard_ids(name).to_pylist()}


# -- the driver --------------------------------------------------------------------------------------
def generate_on_ray(config: GenerateConfig, *, phases: Phases | None = None,
                    on_progress: Callable[[Progress], None] | None = None,
                    block_records: int | None = None, stats: dict[str, float] | None = None) -> GenerateSummary:
    """Fill `config.store` as `runner.generate` does, with the teacher on Ray actors; returns the same
    summary. Joins the Ray instance this process is connected to, else `config.ray_address`, else
    starts a local one (and stops it at the end). `block_records`: records per block (default
    `--shard-records`: a block is a shard per writer thread). `stats`, when given, is filled with the blocks,
    their retries and the seconds the actors spent in each block's protocol, computing and closing."""
    config.validate()
    check_backend(config)
    ray = _import_ray()
    run = Run(config, None, on_progress, phases)
    if config.writer_id is None:
        run.summary.writer_id = f"ray-run-{secrets.token_hex(4)}"
    started_ray: list[bool] = []  # filled once this call started a local Ray instance (to stop it at the end)
    pool = ActorPool(ray)
    try:
        with recorded(run):
            return _generate_on_ray(ray, run, config, pool, started_ray, block_records, stats)
    finally:
        pool.close()
        if started_ray:
            ray.shutdown()


def _generate_on_ray(ray: Any, run: Run, config: GenerateConfig, pool: ActorPool, started_ray: list[bool],
                     block_records: int | None, stats: dict[str, float] | None) -> GenerateSummary:
    tokenizer, _, _, _, encoded = run.prepare()
    if run.store is not None:
        wait_for_block_writers(run.store, run.phases, run.claim.writer_id)
        # Again after the wait: an earlier run's actor still alive when `prepare` cleaned may have died
        # since, leaving its lease (only dead writers' leftovers are removed).
        run.summary.cleaned_leftovers += clean_leftovers(run.store, find_leftovers(run.store))
        run.store.refresh()
        encoded = run.skip_committed(encoded, run.store)
    refuse_all_skipped(run, encoded)
    if not encoded:
        return run.finish([])
    if run.on_progress is not None:
        run.on_progress(Progress(0, run.total, 0, 0.0, run.summary.already_done))
    run.phases.begin("start Ray")
    if _connect(ray, config):
        started_ray.append(True)
    run.phases.begin("load teacher (on the actors)")
    pool.start(config)
    pool.wait_first_ready()
    if run.store is None:
        run.phases.begin("create store")
        encoded = run.skip_committed(encoded, run.attach_store(tokenizer))
    run.phases.end()
    blocks = plan_blocks(config, encoded, block_records or config.shard_records)
    commits = _dispatch(run, pool, blocks, stats if stats is not None else {}) if blocks else []
    run.write_errors()
    return run.finish(commits)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise GenerateError("--executor ray: Ray is not installed here (pip install 'potstill[ray]')") from None
    return ray


def _connect(ray: Any, config: GenerateConfig) -> bool:
    """Join a Ray instance; returns whether this process started it (then it stops it)."""
    if ray.is_initialized():
        return False
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True, "logging_level": "WARNING"}
    try:
        if config.ray_address:
            ray.init(address=config.ray_address, **options)
        else:  # a logical CPU per actor at least, and one for Ray's own work (the driver's tasks, if any)
            cpus = max(os.cpu_count() or 1, (config.num_actors or 1) + 1)
            ray.init(num_cpus=cpus, **options)
    except Exception as e:
        where = f"the Ray cluster at {config.ray_address}" if config.ray_address else "a local Ray instance"
        raise GenerateError(f"--executor ray: cannot start or join {where}: {str(e).splitlines()[0]}") from None
    return True


def wait_for_block_writers(store: Store, phases: Phases, own_claim: str) -> None:
    """Wait until no block writer of an earlier run holds a live lease (an actor of a killed driver that
    has not died yet): its records would otherwise be planned again and could be committed twice.
    While another run is live (on a disjoint share: its claim was checked) its block writers cannot be
    told from those of a dead run, so none is waited for: Ray ends a dead driver's actors within seconds."""
    deadline = time.monotonic() + STALE_AFTER_S + 60
    shown = False
    while True:
        leases = [lease for lease in all_leases(store) if lease.live]
        if any(lease.writer_id.endswith(".run") and lease.writer_id != own_claim for lease in leases):
            return
        live = [lease for lease in leases
                if lease.writer_id.startswith(BLOCK_PREFIX) and not lease.writer_id.endswith(".run")]
        if not live:
            return
        if not shown:
            phases.begin(f"wait for {len(live)} block writer(s) of an earlier run to end ({live[0].why})")
            shown = True
        if time.monotonic() > deadline:
            raise GenerateError(f"store {store.url}: block writer {live[0].writer_id} of an earlier run is still alive "
                                f"({live[0].why}); wait until it ends")
        time.sleep(1.0)


class ActorPool:
    """The teacher actors. They are used as they become ready (an autoscaling cluster adds nodes for
    the ones that do not fit yet); one that Ray cannot restart any more is dropped."""

    def __init__(self, ray: Any) -> None:
        self.ray = ray
        self.actors: list[Any] = []  # every actor started, ready or not: what `close` kills
        self.pending: dict[Any, Any] = {}  # ready refs not answered yet, and their actors
        self.ready: list[Any] = []
        self.errors: list[str] = []

    def start(self, config: GenerateConfig) -> None:
        """Start the actors (one per GPU of the cluster by default); each loads the teacher meanwhile."""
        ray = self.ray
        gpus = config.gpus_per_actor
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        count = config.num_actors or (max(1, int(ray.cluster_resources().get("GPU", 0) // gpus)) if gpus else 1)
        actor_config = replace(config, progress=False)
        if config.backend == "vllm" and gpus > 1:
            actor_config = replace(actor_config, tensor_parallel_size=int(gpus))
        if gpus > 0 and config.device.startswith("cuda:"):  # Ray shows each actor its own GPUs only
            actor_config = replace(actor_config, device="cuda")
        # Ray restarts a dead actor and runs the blocks it held again (at least once: the commit protocol
        # makes a repeat harmless); a block that fails more often than that comes back to the driver.
        remote = ray.remote(_OverlappingBlockWorker).options(num_cpus=1, num_gpus=gpus, max_restarts=MAX_RESTARTS,
                                                 max_task_retries=MAX_ATTEMPTS - 1)
        for _ in range(count):  # each listed as it starts: one started before a failure is still killed
            actor = remote.remote(actor_config)
            self.actors.append(actor)
            self.pending[actor.ready.remote()] = actor

    def poll(self, timeout: float = 0.0) -> None:
        """Take in the actors that answered `ready` (an actor whose teacher did not load is killed)."""
        if not self.pending:
            return
        answered, _ = self.ray.wait(list(self.pending), num_returns=len(self.pending), timeout=timeout)
        for ref in answered:
            actor = self.pending.pop(ref)
            try:
                info = self.ray.get(ref)
            except Exception as e:
                self.errors.append(_first_line(e))
                continue
            if info["error"]:
                self.errors.append(info["error"])
                self.ray.kill(actor, no_restart=True)
            else:
                self.ready.append(actor)

    def wait_first_ready(self) -> None:
        while not self.ready:
            if not self.pending:
                raise GenerateError(f"no Ray actor could load the teacher: {self.errors[0] if self.errors else 'unknown'}")
            self.poll(timeout=WAIT_S)

    def close(self) -> None:
        """Kill every actor this pool started (at the run's end, whatever happened)."""
        for actor in self.actors:
            with contextlib.suppress(Exception):
                self.ray.kill(actor, no_restart=True)

    def drop(self, actor: Any) -> None:
        """An actor Ray could not keep alive (restarted too often, its node gone): no more blocks go to it."""
        if actor in self.ready:
            self.ready.remove(actor)
            with contextlib.suppress(Exception):
                self.ray.kill(actor, no_restart=True)


def _first_line(error: BaseException) -> str:
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException) and not isinstance(cause, type(error)):
        error = cause
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _dispatch(run: Run, pool: ActorPool, blocks: list[Block], stats: dict[str, float]) -> list[CommitRecord]:
    """Hand the blocks to the actors, at most `IN_FLIGHT` each, until every block has its commits."""
    ray, config = pool.ray, run.config
    queue: deque[Block] = deque(blocks)
    in_flight: dict[Any, tuple[Block, Any]] = {}
    load: dict[Any, int] = {}
    commits: list[CommitRecord] = []
    bar = _bar(config, run.total)
    run.loop_started = time.perf_counter()
    retried = 0
    protocol = compute = close = 0.0
    try:
        while queue or in_flight:
            pool.poll()
            if not pool.ready and not pool.pending:
                raise GenerateError(f"every Ray actor died or failed to start: {pool.errors[-1] if pool.errors else ''}")
            now = time.monotonic()
            for actor in list(pool.ready):
                while load.get(actor, 0) < IN_FLIGHT and (block := _next_block(queue, now)) is not None:
                    in_flight[actor.run_block.remote(block)] = (block, actor)
                    load[actor] = load.get(actor, 0) + 1
            if not in_flight:
                time.sleep(WAIT_S)  # only deferred blocks, or no actor ready yet
                continue
            finished, _ = ray.wait(list(in_flight), num_returns=1, timeout=WAIT_S)
            for ref in finished:
                block, actor = in_flight.pop(ref)
                load[actor] -= 1
                try:
                    result: BlockResult = ray.get(ref)
                except ray.exceptions.RayActorError as e:  # Ray's retries spent: another actor takes the block
                    pool.drop(actor)
                    block.attempts += 1
                    retried += 1
                    if block.attempts >= 2:
                        raise GenerateError(f"block of {block.records} records from {block.first_id!r} "
                                            f"({block.writer_id}): its actor died {block.attempts} times, last: "
                                            f"{_first_line(e)}") from None
                    queue.appendleft(block)
                    continue
                except ray.exceptions.RayTaskError as e:
                    raise GenerateError(f"block from {block.first_id!r} ({block.writer_id}) failed: {_first_line(e)}") from None
                retried += result.retried
                if result.deferred is not None:
                    block.not_before = time.monotonic() + DEFER_S
                    queue.append(block)
                    continue
                commits += result.commits
                protocol += result.protocol_s
                compute += result.compute_s
                close += result.close_s
                records = sum(c.records for c in result.commits)
                tokens = sum(c.tokens for c in result.commits)
                run.done += records
                run.tokens_done += tokens
                run.generated_done += result.generated_tokens
                bar.update(records)
                bar.set_postfix_str(f"{len(pool.ready)} actors" + (f", {retried} blocks retried" if retried else ""),
                                    refresh=False)
                if run.on_progress is not None:
                    run.on_progress(Progress(run.done, run.total, run.tokens_done, time.perf_counter() - run.loop_started,
                                             run.summary.already_done, run.generated_done))
    finally:
        bar.close()
    stats.update(blocks=len(blocks), retried=retried, protocol_s=protocol, compute_s=compute, close_s=close)
    return commits


def _next_block(queue: deque[Block], now: float) -> Block | None:
    """The first block that may be tried now (deferred ones wait out their delay)."""
    for _ in range(len(queue)):
        block = queue.popleft()
        if block.not_before <= now:
            return block
        queue.append(block)
    return None


def _bar(config: GenerateConfig, total: int) -> Any:
    if not config.progress:
        from potstill.teacher_gen.runner import _NoBar

        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="rec", desc="generate (ray)", file=sys.stderr, dynamic_ncols=True, mininterval=1.0)

