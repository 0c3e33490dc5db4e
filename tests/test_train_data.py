"""The training loader on a store written from a real tiny teacher: alignment, the split across ranks
and workers, determinism, exact mid-epoch resume, multitask sequences, hidden states read on demand."""

from __future__ import annotations

import collections
import gc
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
from faults import flip_bytes
from torch.utils.data import DataLoader
from trainhelpers import arithmetic_items, build_teacher_store

from potstill.store import open_store
from potstill.student_train.data import (
    LOCK_PREFIX,
    MAIN_TASK,
    RATIONALE_TASK,
    CheckedShards,
    StoreDataset,
    _fold_unknown_ids,
    buffer_shuffle,
    collate,
    eval_cut,
    is_held_out,
    multitask_sequences,
    record_sequence,
    split_rationale,
)
from potstill.student_train.errors import TrainError

RECORDS = 37  # three shards of 16, 16 and 5: uneven on purpose


@pytest.fixture(scope="module")
def store_url(tmp_path_factory, tiny_teacher_dir) -> str:
    url = str(tmp_path_factory.mktemp("train-data") / "store")
    build_teacher_store(url, tiny_teacher_dir, arithmetic_items(RECORDS), shard_records=16)
    return url


def loader_batches(dataset: StoreDataset, count: int, workers: int, context: str | None = None) -> list[list[str]]:
    """The record ids of the first `count` batches, through a real DataLoader with worker processes."""
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, multiprocessing_context=context)
    return [batch["record_ids"] for batch, _ in zip(loader, range(count), strict=False)]


def test_collation_aligns_each_target_with_the_logit_that_predicts_it(store_url: str) -> None:
    store = open_store(store_url)
    name = store.shard_names[0]
    seqs = [record_sequence(store.shard(name), row) for row in (0, 1, 2)]
    batch = collate(seqs, k=store.manifest.targets.k, pad_id=0)
    start = 0
    for b, seq in enumerate(seqs):
        n, s = len(seq.ids), seq.score_start
        rows = slice(start, start + n - s)
        assert batch["pos_batch"][rows].eq(b).all()
        assert batch["pos_index"][rows].tolist() == list(range(s - 1, n - 1))  # logit p predicts token p + 1
        assert batch["hard_ids"][rows].tolist() == seq.ids[s:].tolist()
        assert batch["topk_ids"][rows].numpy().tolist() == seq.targets[0].tolist()  # target row j ↔ token s + j
        assert batch["input_ids"][b, :n].tolist() == seq.ids.tolist() and batch["attention_mask"][b, n:].eq(0).all()
        start += n - s
    assert start == len(batch["hard_ids"]) and batch["has_kd"].all()


def test_the_teacher_as_student_has_near_zero_losses_through_the_real_path(store_url: str, tiny_teacher_dir: str) -> None:
    """If any target were off by one position, the teacher would disagree with its own targets."""
    from transformers import AutoModelForCausalLM

    from potstill.student_train.model import DistillModel
    from potstill.student_train.objective import Objective, distill_loss

    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, dtype=torch.float32).eval()
    dataset = StoreDataset.open(store_url, batch_size=4, eval_fraction=0.0, hidden_layers=(1, 2))
    batch = next(dataset.batches(0))
    objective = Objective(hidden_pairs=((1, 1), (2, 2)), relation_weight=1.0)
    with torch.no_grad():
        _, parts = distill_loss(DistillModel(teacher, [(1, 1), (2, 2)], {1: 32, 2: 32}).eval(), batch, objective)
        student = AutoModelForCausalLM.from_config(teacher.config).eval()  # a random model for scale
        _, random_parts = distill_loss(DistillModel(student, [(1, 1), (2, 2)], {1: 32, 2: 32}).eval(), batch, objective)
    assert parts["kd"] < 1e-4 < random_parts["kd"] / 100  # fp16 rounding of the stored log-probs only
    assert parts["hidden"] < 1e-3 * random_parts["hidden"]  # bf16 rounding of the stored states only
    assert parts["relation"] < 1e-3 * random_parts["relation"]


def test_two_ranks_with_two_workers_each_cover_every_training_record_once(store_url: str) -> None:
    store = open_store(store_url)
    fraction = 0.15
    cut = eval_cut(store.id_index().ids().to_pylist(), fraction)  # raised to hold out at least 8
    held = {i for i in store.id_index().ids().to_pylist() if is_held_out(i, cut)}
    train_ids = set(store.id_index().ids().to_pylist()) - held
    assert held and len(train_ids) % 4  # some held out, and not divisible by 2 ranks × 2 workers
    seen, per_rank = [], []
    for rank in (0, 1):
        ds = StoreDataset.open(store_url, batch_size=3, eval_fraction=fraction, rank=rank, world_size=2, num_workers=2, seed=5)
        span = ds.plan.span
        batches = loader_batches(ds, 2 * (span // 3 + 2), workers=2)
        # the DataLoader alternates workers: even batches come from worker 0, odd from worker 1
        for worker in (0, 1):
            stream = [rid for batch in batches[worker::2] for rid in batch]
            seen.extend(stream[:span])  # this worker's share of epoch 0
        per_rank.append((ds.batches_per_epoch, ds.steps_for_epochs(1.0, grad_accum=2)))
    counts = collections.Counter(seen)
    assert set(counts) == train_ids  # nothing lost, nothing held out leaks in
    assert len(seen) == 4 * span
    assert sum(c - 1 for c in counts.values()) == ds.plan.repeated_per_epoch == 4 * span - len(train_ids)
    assert per_rank[0] == per_rank[1]  # every rank runs the same number of steps


def test_a_restarted_loader_continues_exactly_where_the_state_says(store_url: str) -> None:
    def dataset() -> StoreDataset:
        return StoreDataset.open(store_url, batch_size=4, eval_fraction=0.1, num_workers=2, shuffle_buffer=8, seed=3)

    reference = loader_batches(dataset(), 14, workers=2)  # 14 batches run past the end of epoch 0
    assert dataset().batches_per_epoch < 14
    for consumed in (3, 8):  # an odd count rotates the worker roles
        resumed = dataset()
        resumed.load_state_dict(dataset().state_dict(consumed))
        assert loader_batches(resumed, 14 - consumed, workers=2) == reference[consumed:]


def test_loader_workers_read_through_their_own_store_handle_forked_or_spawned(store_url: str) -> None:
    """The handle the dataset was given serves its own process only: a forked worker reopens the store
    from its URL, a spawned one gets a copy without the handle; both yield the in-process order."""
    dataset = StoreDataset.open(store_url, batch_size=4, eval_fraction=0.1, num_workers=2, seed=3)
    given = dataset.store
    assert pickle.loads(pickle.dumps(dataset))._store is None
    streams = [dataset.batches(worker) for worker in (0, 1)]  # the DataLoader takes them round-robin
    in_process = [next(streams[worker])["record_ids"] for _ in range(2) for worker in (0, 1)]
    for context in ("fork", "spawn"):
        assert loader_batches(dataset, 4, workers=2, context=context) == in_process, context
    assert dataset.store is given  # the main process still reads through the handle it was given


def test_a_worker_hands_over_the_batch_it_made_in_one_shared_block(store_url: str) -> None:
    """Through worker processes a batch is the one made in process, tensor for tensor (dtype, shape,
    values); its tensors are views of one shared-memory block (one file descriptor to pass), apart
    from the hidden states, which are made in shared memory of their own."""
    dataset = StoreDataset.open(store_url, batch_size=4, eval_fraction=0.0, num_workers=2, hidden_layers=(2,))
    streams = [dataset.batches(worker) for worker in (0, 1)]
    in_process = [next(streams[worker]) for _ in range(2) for worker in (0, 1)]
    loader = DataLoader(dataset, batch_size=None, num_workers=2, multiprocessing_context="fork")
    for got, made in zip(loader, in_process, strict=False):
        assert got.keys() == made.keys() and got["record_ids"] == made["record_ids"]
        tensors = {key: value for key, value in made.items() if isinstance(value, torch.Tensor)}
        assert len(tensors) >= 10, sorted(tensors)
        for key, want in tensors.items():
            assert got[key].dtype == want.dtype and got[key].shape == want.shape, key
            assert torch.equal(got[key], want), key
        blocks = {got[key].untyped_storage().data_ptr() for key in tensors if not key.startswith("teacher_hidden")}
        assert len(blocks) == 1 and got["topk_ids"].is_shared()


def test_a_damaged_first_shard_is_reported_by_the_workers_not_when_the_loader_is_made(store_url: str, tmp_path,
                                                                                     monkeypatch) -> None:
    """A loader with workers reads one record before they fork (so that they inherit the compiled checks
    loaded for it); what that finds wrong is not raised there but reported by the batch that reads it."""
    from potstill.store import reader

    copy = tmp_path / "store"
    shutil.copytree(store_url, copy)
    monkeypatch.setattr(reader, "_VERIFIED", set())
    first = open_store(str(copy)).shard_names[0]
    flip_bytes(str(copy / "shards" / first / "records.arrow"), count=40)
    dataset = StoreDataset.open(str(copy), batch_size=16, eval_fraction=0.0, num_workers=2, shuffle_buffer=1)
    loader = DataLoader(dataset, batch_size=None, num_workers=2, multiprocessing_context="fork")
    errors = [batch.get("error", "") for batch, _ in zip(loader, range(4), strict=False)]
    assert any(f"shards/{first}/records.arrow: fails its check" in error for error in errors), errors


def test_each_shard_is_checked_once_per_job_by_whichever_worker_reads_it_first(store_url: str, tmp_path,
                                                                              monkeypatch) -> None:
    """Over several epochs each of two workers meets most shards; a shard's records file is checked whole
    (every piece against its pieces file) and its values once in all, by the first worker process to
    read it, and every read still sees checked data (the records read before that check is done are
    checked one by one: `test_shard_checks`)."""
    from potstill.store import reader

    log = tmp_path / "checked.log"
    hash_file, check_values = reader._check_digest, reader.value_problems
    store = open_store(store_url)  # what a shard's whole check logs
    whole = {f"values {store.shard_ids(c.shard)[0]} {c.records}" for c in store.commits}

    def logged(name: str, check):  # the workers are forked: they append to one file
        def run(*args, **kwargs):
            with open(log, "a") as f:
                what = args[-1] if name == "hash" else f"{args[0].batch.column('id')[0]} {args[0].num_rows}"
                f.write(f"{name} {what}\n")
            return check(*args, **kwargs)
        return run

    monkeypatch.setattr(reader, "_VERIFIED", set())  # nothing checked yet in this process (or its forks)
    monkeypatch.setattr(reader, "_check_digest", logged("hash", hash_file))
    monkeypatch.setattr(reader, "value_problems", logged("values", check_values))
    by_pieces = reader.ShardReader._check_by_pieces  # a loader's whole check of a records file

    def logged_pieces(self, buffer, where: str) -> None:
        with open(log, "a") as f:
            f.write(f"hash {where}\n")
        by_pieces(self, buffer, where)

    monkeypatch.setattr(reader.ShardReader, "_check_by_pieces", logged_pieces)
    ds = StoreDataset.open(store_url, batch_size=4, eval_fraction=0.0, num_workers=2, shuffle_buffer=4, seed=1)
    epochs = 4
    batches = loader_batches(ds, epochs * 2 * (ds.plan.span // 4 + 1), workers=2, context="fork")
    seen = collections.Counter(rid for batch in batches for rid in batch)
    assert set(seen) == set(open_store(store_url).id_index().ids().to_pylist()) and min(seen.values()) >= epochs

    def whole_checks() -> list[str]:  # (not the pieces files, nor the values of the records of one batch)
        lines = log.read_text().splitlines()
        return [ln for ln in lines if ln.endswith(("records.arrow", "ids.arrow")) or ln in whole]

    checks = whole_checks()
    # three shards, each file once: the ids files by the plan, the records by the first worker to read them
    assert collections.Counter(line.split()[0] for line in checks) == {"hash": 6, "values": 3}, checks
    assert sum(line.endswith("ids.arrow") for line in checks) == 3, checks
    assert len(set(checks)) == 9, checks
    # the run's final evaluation reads them in the main process: told what the workers checked, it
    # checks nothing again, and still checks a shard they did not (its sha256)
    store = open_store(store_url, verify_reads=True)
    store.mark_checked(ds.checked_shards()[1:])
    for name in store.shard_names:
        store.shard(name)
    assert len(whole_checks()) == 9 + 2, log.read_text()


def test_the_ranks_of_a_job_check_each_shard_once_and_refuse_a_bad_one_alike(store_url: str, tmp_path,
                                                                            monkeypatch) -> None:
    """Two ranks of one job on one node, each with two forked loader workers, share a verdicts folder:
    every records file is checked once in all four processes, though each rank reads every shard; a
    damaged shard is checked once too, and both ranks refuse it with the same line."""
    from potstill.store import reader

    store_dir = tmp_path / "store"
    shutil.copytree(store_url, store_dir)
    log = tmp_path / "hashed.log"
    hash_file = reader._check_digest

    def note(where: str) -> None:  # the workers are forked: they append to one file
        if where.endswith("records.arrow"):
            with open(log, "a") as f:
                f.write(f"{where}\n")

    def logged(data, entry, where):
        note(where)
        return hash_file(data, entry, where)

    def logged_pieces(self, buffer, where: str) -> None:
        note(where)
        by_pieces(self, buffer, where)

    monkeypatch.setattr(reader, "_VERIFIED", set())
    monkeypatch.setattr(reader, "_check_digest", logged)
    by_pieces = reader.ShardReader._check_by_pieces  # a loader's whole check of a records file
    monkeypatch.setattr(reader.ShardReader, "_check_by_pieces", logged_pieces)
    folder = str(tmp_path / "verdicts")

    def rank(r: int) -> StoreDataset:
        return StoreDataset.open(str(store_dir), batch_size=4, eval_fraction=0.0, world_size=2, rank=r, num_workers=2,
                                 shuffle_buffer=4, seed=1, checks_folder=folder)

    ranks = [rank(0), rank(1)]
    batches = [loader_batches(ds, 2 * 2 * (ds.plan.span // 4 + 1), workers=2, context="fork") for ds in ranks]
    store = open_store(str(store_dir))
    shards = store.shard_names
    shard_of = {rid: name for name in shards for rid in store.shard_ids(name).to_pylist()}
    for got in batches:  # every rank reads every shard in 2 epochs
        assert {shard_of[rid] for b in got for rid in b} == set(shards)
    hashed = log.read_text().splitlines()
    assert sorted(hashed) == sorted(f"{store_dir}/shards/{s}/records.arrow" for s in shards), hashed
    assert sorted(ranks[0].checked_shards()) == sorted(ranks[1].checked_shards()) == sorted(shards)

    # a shard damaged on disk, in new jobs: its first reader finds it bad, the other rank is told;
    # by its whole check, and in a first batch by the check of the records read
    bad = shards[1]
    flip_bytes(str(store_dir / "shards" / bad / "records.arrow"))
    opened: list[tuple[str, bool]] = []
    open_shard = reader.ShardReader.__init__

    def logged_open(self, store, commit, **kwargs):
        opened.append((commit.shard, kwargs.get("by_record", False)))
        open_shard(self, store, commit, **kwargs)

    monkeypatch.setattr(reader.ShardReader, "__init__", logged_open)
    for job, whole in enumerate((True, False)):
        log.write_text("")
        opened.clear()
        monkeypatch.setattr(reader, "_VERIFIED", set())
        folder = str(tmp_path / f"verdicts-{job}")
        ranks = [rank(0), rank(1)]
        opened.clear()  # (each dataset read a record of its first shard for its workers to inherit: `_load_kernels`)
        errors = []
        for ds in ranks:
            if whole:
                ds.check_ahead.start()  # (as after a first batch)
            errors.append(ds.collate_records([(shards.index(bad), row) for row in range(3)])["error"])
        assert errors[0] == errors[1] and bad in errors[0], errors
        assert "records.arrow: fails its check (corrupted bytes " in errors[0], errors
        assert log.read_text().splitlines() == ([f"{store_dir}/shards/{bad}/records.arrow"] if whole else [])
        assert opened == [(bad, not whole)], opened  # read by one rank; the other is told


def test_order_is_deterministic_in_seed_and_epoch(store_url: str) -> None:
    plan = StoreDataset.open(store_url, batch_size=2, eval_fraction=0.0).plan
    a = plan.epoch_span(seed=1, epoch=0, part=0, shuffle_buffer=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, plan.epoch_span(1, 0, 0, 4), strict=True))
    assert not np.array_equal(a[1], plan.epoch_span(1, 1, 0, 4)[1])
    assert not np.array_equal(a[1], plan.epoch_span(2, 0, 0, 4)[1])


def test_the_shuffle_buffer_is_a_bounded_permutation() -> None:
    order = buffer_shuffle(1000, 16, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(1000))
    assert np.all(order <= np.arange(1000) + 16)  # an item leaves at most `buffer` places early
    assert not np.array_equal(order, np.arange(1000))
    assert np.array_equal(buffer_shuffle(50, 1, np.random.default_rng(0)), np.arange(50))


def test_a_resume_with_other_settings_fails_in_one_line(store_url: str) -> None:
    state = StoreDataset.open(store_url, batch_size=4, world_size=2, rank=0).state_dict(5)
    other = StoreDataset.open(store_url, batch_size=4, world_size=1)
    with pytest.raises(TrainError, match=r"world_size=2, now world_size=1") as err:
        other.load_state_dict(state)
    assert "\n" not in str(err.value)


def test_hidden_states_are_read_only_when_a_loss_needs_them(store_url: str, tmp_path) -> None:
    copy = tmp_path / "no-hidden"
    shutil.copytree(store_url, copy)
    for folder in copy.glob("shards/*/hidden"):
        shutil.rmtree(folder)  # a store whose hidden states are gone
    batch = next(StoreDataset.open(str(copy), batch_size=4, eval_fraction=0.0).batches(0))
    assert not any(k.startswith("teacher_hidden") for k in batch)
    # a shard that fails to read is a one-line error batch (the trainer stops with it), never garbage
    bad = next(StoreDataset.open(str(copy), batch_size=4, eval_fraction=0.0, hidden_layers=(1,)).batches(0))
    assert set(bad) == {"error"} and "hidden" in bad["error"] and "\n" not in bad["error"]
    batch = next(StoreDataset.open(store_url, batch_size=4, eval_fraction=0.0, hidden_layers=(2,)).batches(0))
    assert batch["teacher_hidden_2"].dtype == torch.bfloat16 and batch["teacher_hidden_2"].shape[:2] == batch["hidden_mask"].shape


def test_multitask_builds_a_rationale_task_and_an_answer_task(store_url: str) -> None:
    from transformers import AutoTokenizer

    store = open_store(store_url)
    tok = AutoTokenizer.from_pretrained(store.tokenizer_dir)
    reader = store.shard(store.shard_names[0])
    whole = record_sequence(reader, 0)
    rationale = reader.views.text_of("rationale", 0)
    end = split_rationale(tok, whole.ids, whole.score_start, rationale)
    assert end is not None and tok.decode(whole.ids[whole.score_start : end].tolist()).strip() == rationale
    marker = np.array(tok(" [answer]", add_special_tokens=False)["input_ids"], dtype=np.int32)
    answer, rat = multitask_sequences(whole, end, marker)
    s = whole.score_start
    assert rat.task == RATIONALE_TASK and np.array_equal(rat.ids, whole.ids[:end])
    assert answer.task == MAIN_TASK and tok.decode(answer.ids[s + len(marker) :].tolist()).strip().startswith("the answer is")
    batch = collate([answer, rat], k=store.manifest.targets.k, pad_id=0)
    answer_rows = batch["pos_batch"] == 0
    assert not batch["has_kd"][answer_rows].any()  # answer tokens follow a context the teacher never saw
    assert batch["has_kd"][~answer_rows].all() and int((~answer_rows).sum()) == end - s
    assert int(answer_rows.sum()) == len(answer.ids) - s - len(marker)  # the marker is read, not predicted
    assert split_rationale(tok, whole.ids, whole.score_start, "text that is not there at all") is None


def test_ids_outside_the_student_vocabulary_fold_into_the_tail() -> None:
    """In log space, exactly: the folded log tail is log(tail + Σ p of the unknown ids), rounded once."""
    ids = np.array([[3, 9, 1, 12], [3, 4, 5, 6], [9, 10, -1, -1]], dtype=np.int64)
    with np.errstate(divide="ignore"):  # log 0 = −inf: empty slots, and an empty tail
        lp = np.log(np.array([[0.5, 0.2, 0.1, 1e-9], [0.4, 0.3, 0.2, 0.1], [0.6, 0.4, 0, 0]])).astype(np.float32)
        tail = np.log(np.array([2e-7, 1e-12, 0.0])).astype(np.float32)  # the last: the top-K covered the vocabulary
    with np.errstate(divide="ignore"):
        want = np.log(np.exp(tail.astype(np.float64)) + np.where(ids >= 8, np.exp(lp.astype(np.float64)), 0).sum(-1))
    _fold_unknown_ids(ids, lp, tail, vocab=8)
    assert ids.tolist() == [[3, -1, 1, -1], [3, 4, 5, 6], [-1, -1, -1, -1]]
    assert np.isneginf(lp[0, [1, 3]]).all() and np.isneginf(lp[2]).all()
    np.testing.assert_allclose(tail, want, rtol=2**-23, atol=0)
    assert tail[1] == np.float32(np.log(1e-12))  # untouched row


def test_a_killed_loaders_lock_file_is_removed_by_the_next_loader_and_a_live_ones_kept(tmp_path, monkeypatch) -> None:
    """A single-process job's `CheckedShards` keeps its lock in the temporary folder, named by its pid;
    a process killed before its exit leaves it, and the next loader on the machine removes it."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    dead = tmp_path / f"{LOCK_PREFIX}{killed.pid}-abc123"
    live = tmp_path / f"{LOCK_PREFIX}{os.getppid()}-def456"
    other = tmp_path / f"{LOCK_PREFIX}xyz"  # (named by another tool: not ours to judge)
    for path in (dead, live, other):
        path.write_bytes(b"")
    checked = CheckedShards(["s0", "s1"])
    assert os.path.basename(checked.lock_path).startswith(f"{LOCK_PREFIX}{os.getpid()}-")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, os.path.basename(checked.lock_path)])
    checked.check(0, lambda: None)  # the lock is taken and given back
    assert checked.passed(0) and not checked.passed(1)
    path = checked.lock_path
    del checked
    gc.collect()
    assert not os.path.exists(path)  # its owner removes it when it is done with it
