"""Training across nodes: two torchrun "nodes" on this machine (`--nnodes 2`, c10d rendezvous over
localhost, gloo, one process each) train to the same weights as one process with the same global batch.

Why the two runs see the same records in the same steps: the loader cuts an epoch into
world_size × num_workers spans (student_train/data.py), so 2 nodes × 1 loader worker and 1 process
× 2 loader workers read the same two spans, and with `--shuffle-buffer 0` in the same order. Each
optimizer step then takes one micro-batch of each span: on the two nodes one per rank, averaged by
DDP's all-reduce; in the one process both, one after the other, under `--grad-accum 2`. The loss
is a mean per micro-batch, so both gradients are (g0 + g1) / 2: the same two float32 terms, whose
sum does not depend on their order and whose halving is exact. So the weights are expected to be
bitwise equal, and the test asserts exactly that.
"""

from __future__ import annotations

import collections
import os
import re
import socket
import subprocess
import sys

import pytest
from genhelpers import run_main
from trainhelpers import teacherless_setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
STEPS = 5


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_teacher_dir, tiny_tokenizer_dir) -> dict:
    return teacherless_setup(tmp_path_factory.mktemp("nodes"), tiny_teacher_dir, tiny_tokenizer_dir, seed=2)


def train_args(setup: dict, out: str, *, grad_accum: int, workers: int) -> list[str]:
    return ["-m", "potstill.cli.main", "train", "--store", setup["store"], "--student", setup["student"],
            "--out", out, "--max-steps", str(STEPS), "--batch-size", "3", "--grad-accum", str(grad_accum),
            "--num-workers", str(workers), "--shuffle-buffer", "0", "--lr", "1e-2", "--save-steps", "1000",
            "--report-to", "none", "--eval-fraction", "0.2", "--eval-max-records", "2", "--logging-steps", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def weights(folder: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


@pytest.mark.slow
def test_two_nodes_train_to_the_weights_of_one_process_with_the_same_global_batch(setup: dict) -> None:
    one = str(setup["root"] / "one")
    # The one process: `potstill train` through its entry point in this one (the nodes below are the processes)
    proc = run_main(train_args(setup, one, grad_accum=2, workers=2)[2:])
    assert proc.returncode == 0, proc.stderr[-3000:]

    two = str(setup["root"] / "two")
    port = free_port()
    nodes = [
        subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank),
                          "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}",
                          "--rdzv-id", "potstill-nodes-test", *train_args(setup, two, grad_accum=1, workers=1)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
        for rank in (0, 1)
    ]
    try:
        results = [node.communicate(timeout=600) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for node, (_, err) in zip(nodes, results, strict=True):
        assert node.returncode == 0, err[-3000:]

    import json

    with open(os.path.join(two, "training_report.json")) as f:
        report = json.load(f)
    assert report["world_size"] == 2 and report["global_step"] == STEPS
    with open(os.path.join(one, "training_report.json")) as f:
        assert json.load(f)["world_size"] == 1

    start, a, b = weights(setup["student"]), weights(one), weights(two)
    assert a.keys() == b.keys()
    assert any(not a[name].equal(start[name]) for name in a)  # the runs did train
    unequal = [name for name in a if not a[name].equal(b[name])]
    assert not unequal, f"{len(unequal)} tensors differ, e.g. {unequal[0]}: max |Δ| " \
                        f"{(a[unequal[0]] - b[unequal[0]]).abs().max().item():.3g}"


COUNTING_TRAIN = """
import sys

from potstill.cli.main import main
from potstill.store import reader

hash_file = reader._check_digest
by_pieces = reader.ShardReader._check_by_pieces  # (the loader's whole check of a records file)


def note(where):  # every process of the job (ranks, loader workers) appends here
    if where.endswith("records.arrow"):
        with open({log!r}, "a") as f:
            f.write(where + "\\n")


def logged(data, entry, where):
    note(where)
    return hash_file(data, entry, where)


def logged_pieces(self, buffer, where):
    note(where)
    return by_pieces(self, buffer, where)


reader._check_digest = logged
reader.ShardReader._check_by_pieces = logged_pieces
sys.argv[0] = "potstill"
main()
"""


def run_counting(setup: dict, tmp_path) -> tuple[subprocess.CompletedProcess, list[str], str]:
    """A two-rank torchrun job (gloo, one loader worker each, ~2 epochs of each rank's share) whose
    processes log each records file they check whole (by its sha256 or by its pieces); its result,
    that log and its temporary folder."""
    log = tmp_path / "hashed.log"
    log.touch()
    script = tmp_path / "counting_train.py"
    script.write_text(COUNTING_TRAIN.format(log=str(log)))
    args = train_args(setup, str(tmp_path / "out"), grad_accum=1, workers=1)
    args[args.index("--max-steps") + 1] = "14"
    temp = tmp_path / "temp"
    temp.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           *args[2:]]
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                           env={**ENV, "TMPDIR": str(temp)}, start_new_session=True)
    try:
        out, err = job.communicate(timeout=300)
    except subprocess.TimeoutExpired:  # (a hung rank: end the whole job, its ranks and workers too)
        import psutil

        for process in [*psutil.Process(job.pid).children(recursive=True), psutil.Process(job.pid)]:
            process.kill()
        out, err = job.communicate()
        raise AssertionError(f"the job hung: {err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, job.returncode, out, err), log.read_text().splitlines(), str(temp)


@pytest.mark.slow
def test_the_ranks_of_a_torchrun_job_check_each_shard_once(setup: dict, tmp_path) -> None:
    """Two ranks, each reading most shards, and the final evaluation reading them all again: each
    records file is checked whole once in the whole job; the ranks' shared verdicts go when the job ends."""
    proc, hashed, temp = run_counting(setup, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from potstill.store import open_store

    shards = open_store(setup["store"]).shard_names
    assert collections.Counter(hashed) == {f"{setup['store']}/shards/{s}/records.arrow": 1 for s in shards}, hashed
    assert not [p for p in os.listdir(temp) if p.startswith("potstill-checks-")]


@pytest.mark.slow
def test_a_torchrun_job_skips_a_bad_shard_on_every_rank_and_trains_to_the_end(setup: dict, tmp_path) -> None:
    """Two ranks, --skip-bad-shards, one shard with NaN log-probs holding whole micro-batches of a rank:
    that rank's batch is empty (it trains nothing) while the other's is not, and a log step follows.
    The job hung there: the ranks entered different collectives at the log step. Now it trains to the
    end, both ranks say the same skip line, and the report names the shard as a one-rank run does."""
    import json
    import shutil

    import numpy as np
    from faults import rewrite_column

    store = str(tmp_path / "store")
    shutil.copytree(setup["store"], store)
    rewrite_column(store, "t0-000000", "topk_logprobs", lambda flat: flat.__setitem__(slice(None), np.nan))
    args = train_args({**setup, "store": store}, str(tmp_path / "out"), grad_accum=1, workers=0)
    args[args.index("--batch-size") + 1] = "2"
    args[args.index("--max-steps") + 1] = "6"
    args += ["--skip-bad-shards"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--tee", "3",
           *args]
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ENV,
                           start_new_session=True)
    try:
        out, err = job.communicate(timeout=240)
    except subprocess.TimeoutExpired:  # (a hung rank: end the whole job, its ranks too)
        import psutil

        for process in [*psutil.Process(job.pid).children(recursive=True), psutil.Process(job.pid)]:
            process.kill()
        out, err = job.communicate()
        raise AssertionError(f"the job hung: {err[-3000:]}") from None
    assert job.returncode == 0, err[-3000:]
    with open(tmp_path / "out" / "training_report.json") as f:
        report = json.load(f)
    assert report["world_size"] == 2 and report["global_step"] == 6
    assert list(report["skipped_shards"]) == ["t0-000000"] and "NaN" in report["skipped_shards"]["t0-000000"]
    assert all(np.isfinite(e["loss"]) for e in report["loss_curve"])
    said = re.findall(r"\[default(\d)\]:potstill train: (skipping shard t0-000000: [^\n]*)", out + err)
    assert sorted(rank for rank, _ in said) == ["0", "1"] and len({line for _, line in said}) == 1, err[-3000:]
    assert said[0][1] == f"skipping shard t0-000000: {report['skipped_shards']['t0-000000']}"
