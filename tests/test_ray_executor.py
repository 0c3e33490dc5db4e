"""`potstill generate --executor ray` on a real local Ray instance (one for the module), with the tiny
teacher: the records are the local executor's byte for byte, and every record is committed once
whatever dies (an actor mid-block, the driver), whichever executor started the store."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
from common import prompt_rows, write_jsonl
from faultcampaigns import store_contents
from genhelpers import config, popen_cli

from potstill.store import open_store, verify_store
from potstill.store.leases import WriterLease
from potstill.store.provenance import read_runs
from potstill.teacher_gen.errors import GenerateError
from potstill.teacher_gen.ray_executor import BLOCK_PREFIX, BlockWorker, generate_on_ray, plan_blocks
from potstill.teacher_gen.runner import Run, generate

N = 24
# One record per forward batch: a record's bytes do not depend on its batch-mates, so stores written
# in any split (worker shares, resumed runs) compare byte for byte with one reference.
SETTINGS = {"hidden_layers": [0, -1], "shard_records": 3, "batch_tokens": 1, "top_k": 8}


@pytest.fixture(scope="module")
def ray_address():
    import ray

    # Logical CPUs beyond the machine's: each actor takes one, and the actors of a killed driver may
    # still hold theirs while the next run starts its own.
    ray.init(num_cpus=6, include_dashboard=False, logging_level="WARNING", configure_logging=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> str:
    return write_jsonl(str(tmp_path_factory.mktemp("prompts") / "p.jsonl"), prompt_rows(N, seed=33))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_teacher_dir, prompts) -> dict:
    """The local executor's records, id -> exact content (hidden states included)."""
    store = str(tmp_path_factory.mktemp("ref") / "s")
    generate(config(tiny_teacher_dir, prompts, store, **SETTINGS))
    return store_contents(store)[1]


def _assert_complete(store: str, reference: dict) -> None:
    ids, records = store_contents(store)
    assert sorted(ids) == sorted(reference)  # every record once
    assert records == reference  # byte for byte
    report = verify_store(store)
    assert report.ok, [str(p) for p in report.problems]
    assert not report.leftovers


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["score", "generate"])
def test_records_are_the_local_executors_byte_for_byte(tmp_path, tiny_teacher_dir, prompts, ray_address, mode):
    # Batches of several records (the block plan must reproduce them) and, in generate mode, seeded
    # sampling and sampled targets with the compact codec (its id order comes from the driver's text).
    extra = ({"batch_tokens": 48} if mode == "score" else
             {"batch_tokens": 96, "mode": "generate", "max_new_tokens": 5, "num_samples": 2, "targets": "sampled",
              "codec": "compact", "samples": 16, "hidden_layers": []})
    settings = {**SETTINGS, **extra}
    if mode == "generate":  # (decoding is the slow part: fewer prompts)
        prompts = write_jsonl(str(tmp_path / "p.jsonl"), prompt_rows(10, seed=34))
    local, on_ray = str(tmp_path / "local"), str(tmp_path / "ray")
    want = generate(config(tiny_teacher_dir, prompts, local, **settings))
    stats: dict = {}
    got = generate_on_ray(config(tiny_teacher_dir, prompts, on_ray, executor="ray", num_actors=2, **settings),
                          block_records=5, stats=stats)
    assert stats["blocks"] > 2
    assert (got.records, got.tokens, got.scored_tokens, got.generated_tokens) == (
        want.records, want.tokens, want.scored_tokens, want.generated_tokens)
    assert got.records == (N if mode == "score" else 20)
    assert got.writer_id.startswith("ray-run-")
    assert "wrote" in got.format()
    a, b = open_store(local), open_store(on_ray)
    assert a.manifest.targets == b.manifest.targets and a.manifest.generation == b.manifest.generation
    assert a.manifest.hidden == b.manifest.hidden and a.manifest.teacher == b.manifest.teacher
    _assert_complete(on_ray, store_contents(local)[1])
    assert all(c.writer_id.startswith(BLOCK_PREFIX) for c in b.commits)
    # The driver's run record says how it ended, and the job is complete by the store's own count.
    runs = read_runs(b.fs, b.root).runs
    assert [(r["writer_id"], r["state"], r["records"]) for r in runs] == [(got.writer_id, "complete", got.records)]
    assert b.manifest.provenance["prompts"]["count"] == (N if mode == "score" else 10)
    job = verify_store(on_ray).job
    assert job is not None and job.complete and job.committed == job.expected == got.records


def _killer(store: str, stop: threading.Event, killed: list[int]) -> None:
    """SIGKILL the first actor seen holding a block's writer lease after that block committed a shard:
    it dies in the middle of its block."""
    writers, commits = os.path.join(store, "writers"), os.path.join(store, "commits")
    while not stop.is_set() and not killed:
        try:
            leases = [n[:-5] for n in os.listdir(writers) if n.startswith(BLOCK_PREFIX) and n.endswith(".json")
                      and not n.endswith(".run.json")]
            done = os.listdir(commits)
        except FileNotFoundError:
            leases, done = [], []
        for writer in leases:
            if any(n.startswith(writer + "-") for n in done):
                try:
                    with open(os.path.join(writers, writer + ".json")) as f:
                        pid = json.load(f)["pid"]
                except (OSError, ValueError):
                    continue
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
        time.sleep(0.002)


@pytest.mark.slow
def test_an_actor_killed_mid_block_is_restarted_and_its_block_committed_once(tmp_path, tiny_teacher_dir, prompts,
                                                                             reference, ray_address):
    store = str(tmp_path / "s")
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_killer, args=(store, stop, killed), daemon=True)
    killer.start()
    stats: dict = {}
    try:
        summary = generate_on_ray(config(tiny_teacher_dir, prompts, store, executor="ray", num_actors=1, **SETTINGS),
                                  block_records=12, stats=stats)
    finally:
        stop.set()
        killer.join()
    assert killed, "the block ended before the actor could be killed in it"
    assert stats["retried"] >= 1
    assert summary.records == N  # the shards the dead attempt committed are counted once, with the rest
    _assert_complete(store, reference)


@pytest.mark.slow
def test_driver_killed_then_rerun_writes_only_the_missing_ids(tmp_path, tiny_teacher_dir, prompts, reference,
                                                              ray_address):
    store = str(tmp_path / "s")
    args = ["generate", "--teacher", tiny_teacher_dir, "--prompts", prompts, "--out", store, "--device", "cpu",
            "--executor", "ray", "--ray-address", ray_address, "--num-actors", "1", "--shard-records", "1",
            "--batch-tokens", "1", "--hidden-layers", "0,-1", "--top-k", "8", "--targets", "topk", "--samples", "50",
            "--sampler", "iid", "--codec", "none", "--no-progress"]
    proc = popen_cli(args)
    commits = os.path.join(store, "commits")
    deadline = time.monotonic() + 120
    while not (os.path.isdir(commits) and len(os.listdir(commits)) >= 3):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no commit within 120 s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    # (the dead driver's actor may still commit a shard or two until Ray ends it: the rerun waits for it)
    summary = generate_on_ray(config(tiny_teacher_dir, prompts, store, executor="ray", num_actors=1,
                                     **{**SETTINGS, "shard_records": 1}))
    assert 0 < summary.already_done < N
    assert summary.records == N - summary.already_done
    _assert_complete(store, reference)


def test_a_block_written_twice_leaves_one_copy(tmp_path, tiny_teacher_dir, prompts, reference):
    store = str(tmp_path / "s")
    generate(config(tiny_teacher_dir, prompts, store, workers=3, worker_index=0, **SETTINGS))  # the store exists
    cfg = config(tiny_teacher_dir, prompts, store, **SETTINGS)
    run = Run(cfg, None, None)
    encoded = run.prepare()[-1]
    run.claim.release()
    blocks = plan_blocks(cfg, encoded, 7)
    worker = BlockWorker(cfg)
    assert worker.ready()["error"] is None
    first = worker.run_block(blocks[0])
    again = worker.run_block(blocks[0])  # a retried task, a restarted actor: the sink written again
    assert [c.shard for c in again.commits] == [c.shard for c in first.commits]
    assert sum(c.records for c in first.commits) == blocks[0].records
    ids = open_store(store).id_index().ids().to_pylist()
    assert len(ids) == len(set(ids))

    # A live attempt holds the next block's lease: this one is deferred and writes nothing.
    s = open_store(store)
    lease = WriterLease(s, f"{blocks[1].writer_id}.0").start()  # (two writer threads: ids W.0 and W.1)
    try:
        assert worker.run_block(blocks[1]).deferred
    finally:
        lease.release()
    for block in blocks[1:]:
        worker.run_block(block)
    _assert_complete(store, reference)


@pytest.mark.slow
def test_a_store_started_by_workers_is_finished_by_ray_and_the_reverse(tmp_path, tiny_teacher_dir, prompts,
                                                                       reference, ray_address):
    by_workers = str(tmp_path / "a")
    first = generate(config(tiny_teacher_dir, prompts, by_workers, workers=2, worker_index=0, **SETTINGS))
    rest = generate_on_ray(config(tiny_teacher_dir, prompts, by_workers, executor="ray", num_actors=1, **SETTINGS))
    assert rest.already_done == first.records and rest.records == N - first.records
    _assert_complete(by_workers, reference)

    by_ray = str(tmp_path / "b")
    share = generate_on_ray(config(tiny_teacher_dir, prompts, by_ray, executor="ray", num_actors=1, workers=2,
                                   worker_index=1, **SETTINGS))
    assert 0 < share.records < N and share.workers == 2
    rest = generate(config(tiny_teacher_dir, prompts, by_ray, **SETTINGS))
    assert rest.already_done == share.records
    _assert_complete(by_ray, reference)


def test_ray_flags_without_the_ray_executor_are_refused(tiny_teacher_dir, prompts, tmp_path):
    for flag, value in (("num_actors", 2), ("ray_address", "auto"), ("gpus_per_actor", 1.0)):
        with pytest.raises(GenerateError, match="only apply with --executor ray"):
            config(tiny_teacher_dir, prompts, str(tmp_path / "s"), **{flag: value}).validate()
    with pytest.raises(GenerateError, match="tensor parallel needs --backend vllm"):
        config(tiny_teacher_dir, prompts, str(tmp_path / "s"), executor="ray", gpus_per_actor=2).validate()
