"""Generation-service benchmark: status-call latency under load, and whether merging jobs would pay.

load (default)  Starts a real `potstill serve` (a subprocess on 127.0.0.1), gives it a long
                background job so the job thread is busy the whole time, then runs --clients client
                processes. Each submits --jobs-per-client small jobs and, in between and afterwards,
                polls the status of its jobs as fast as it can for --seconds. Every call's latency
                is recorded; at the end every submitted job must be listed and finish `done` (none
                lost), and the shared store must hold each id once.
--batching      In one process, with the teacher loaded once: K jobs of M records run one after
                another through `generate(preloaded=...)`, against one job of K x M records. The
                difference over K is what a job boundary costs, i.e. the most that merging queued
                jobs into shared batches could save.

The teacher is --teacher (a local folder), or a random Llama built from bench/common.py
(--hidden, --layers). Prints JSON (also to --out).

    python bench/serve_load.py                                 # load: 8 clients x 50 jobs, 20 s
    python bench/serve_load.py --batching --hidden 256 --layers 4
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from common import build_llama, build_tokenizer, prompt_rows, write_jsonl

from potstill.teacher_gen.service.client import ServiceClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_teacher(folder: str, hidden: int, layers: int) -> str:
    from transformers import AutoTokenizer

    tok_dir, teacher = os.path.join(folder, "tokenizer"), os.path.join(folder, "teacher")
    build_tokenizer(tok_dir)
    vocab = len(AutoTokenizer.from_pretrained(tok_dir))
    build_llama(teacher, vocab, hidden=hidden, layers=layers, heads=max(4, hidden // 64), seed=0, tokenizer_dir=tok_dir)
    return teacher


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {"n": len(ordered), "p50_ms": round(at(0.5) * 1e3, 2), "p99_ms": round(at(0.99) * 1e3, 2),
            "max_ms": round(ordered[-1] * 1e3, 2), "mean_ms": round(statistics.fmean(ordered) * 1e3, 2)}


# -- load ------------------------------------------------------------------------------------------
def start_service(teacher: str, state: str, device: str, data_root: str) -> tuple[subprocess.Popen, str]:
    service_file = os.path.join(state, "service.json")
    log = open(os.path.join(state, "serve.log"), "w")  # noqa: SIM115 - the child writes it until stopped
    proc = subprocess.Popen([sys.executable, "-m", "potstill.cli.main", "serve", "--teacher", teacher, "--device", device,
                             "--state", state, "--port", "0", "--data-root", data_root],
                            stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the service exited: see {state}/serve.log")
        if os.path.exists(service_file):
            with open(service_file) as f:
                info = json.load(f)
            if info["pid"] == proc.pid:
                with ServiceClient(info["url"]) as c:
                    if c.health()["status"] == "ready":
                        return proc, info["url"]
        time.sleep(0.2)
    raise SystemExit("the service did not start in 300 s")


def client_process(url: str, prompts: str, store: str, jobs: int, seconds: float, seed: int,
                   results: Any) -> None:
    """Submit `jobs` jobs with status polls in between, then poll until `seconds` have passed."""
    rng = random.Random(seed)
    ids: list[str] = []
    submit_s: list[float] = []
    status_s: list[float] = []
    with ServiceClient(url) as client:
        start = time.perf_counter()
        for i in range(jobs):
            t = time.perf_counter()
            ids.append(client.submit({"prompts": prompts, "store": store, "seed": seed * 1000 + i})["id"])
            submit_s.append(time.perf_counter() - t)
            for _ in range(5):
                t = time.perf_counter()
                client.status(rng.choice(ids))
                status_s.append(time.perf_counter() - t)
        while time.perf_counter() - start < seconds:
            t = time.perf_counter()
            client.status(rng.choice(ids))
            status_s.append(time.perf_counter() - t)
    results.put({"ids": ids, "submit_s": submit_s, "status_s": status_s})


def run_load(args: argparse.Namespace, teacher: str, work: str) -> dict[str, Any]:
    state, data = os.path.join(work, "state"), os.path.join(work, "data")  # jobs may use data/ only
    os.makedirs(state)
    os.makedirs(data)
    background = write_jsonl(os.path.join(data, "background.jsonl"), prompt_rows(max(args.background_records, 1), seed=1))
    small = write_jsonl(os.path.join(data, "small.jsonl"), prompt_rows(4, seed=2))
    small_store = os.path.join(data, "small.store")
    proc, url = start_service(teacher, state, args.device, data)
    busy = None
    try:
        if args.background_records:
            with ServiceClient(url) as c:
                busy = c.submit({"prompts": background, "store": os.path.join(data, "background.store"),
                                 "batch_tokens": 256, "hidden_layers": [-1]})["id"]
        results: Any = mp.Queue()
        started = time.perf_counter()
        clients = [mp.Process(target=client_process, args=(url, small, small_store, args.jobs_per_client,
                                                            args.seconds, k + 1, results))
                   for k in range(args.clients)]
        for p in clients:
            p.start()
        outcomes = [results.get(timeout=args.seconds + 600) for _ in clients]
        for p in clients:
            p.join()
        wall = time.perf_counter() - started
        ids = [i for o in outcomes for i in o["ids"]]
        with ServiceClient(url) as c:
            busy_state = c.status(busy)["state"] if busy else None
            listed = {j["id"] for j in c.list()}
            finals = [c.wait(i, poll_s=0.2, timeout_s=1200)["state"] for i in ids]
            if busy:
                c.wait(busy, poll_s=1.0, timeout_s=3600)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=180)
    from potstill.store import open_store

    stored = [i for commit in open_store(small_store).commits for i in commit.ids]
    status_s = [s for o in outcomes for s in o["status_s"]]
    return {
        "clients": args.clients, "jobs_submitted": len(ids), "jobs_listed": len(listed & set(ids)),
        "jobs_done": finals.count("done"), "lost": len(set(ids) - listed),
        "small_store_ids_once": len(stored) == len(set(stored)) == 4,
        "background_job_busy_during_load": busy_state == "running",
        "status": percentiles(status_s), "submit": percentiles([s for o in outcomes for s in o["submit_s"]]),
        "status_calls_per_s": round(len(status_s) / wall, 1), "seconds": round(wall, 1),
    }


# -- batching --------------------------------------------------------------------------------------
def run_batching(args: argparse.Namespace, teacher: str, work: str) -> dict[str, Any]:
    from potstill.teacher_gen.config import GenerateConfig
    from potstill.teacher_gen.runner import generate
    from potstill.teacher_gen.service.settings import ServeConfig
    from potstill.teacher_gen.service.worker import ServiceTeacher

    loaded = ServiceTeacher(ServeConfig(teacher=teacher, device=args.device))
    loaded.check()
    loaded.load()
    k, m = args.batch_jobs, args.batch_records
    rows = prompt_rows(k * m, seed=3)
    parts = [write_jsonl(os.path.join(work, f"part{i}.jsonl"), rows[i * m:(i + 1) * m]) for i in range(k)]
    whole = write_jsonl(os.path.join(work, "whole.jsonl"), rows)

    def run(prompts: str, store: str) -> float:
        config = GenerateConfig.build(teacher=teacher, prompts=prompts, store=store, device=args.device,
                                      progress=False, targets="topk", hidden_layers=[-1])
        t = time.perf_counter()
        generate(config, preloaded=loaded.model)
        return time.perf_counter() - t

    run(parts[0], os.path.join(work, "warmup.store"))
    rounds = []
    for r in range(args.rounds):  # interleaved, so a busy neighbour slows both alike
        separate = sum(run(p, os.path.join(work, f"sep{r}-{i}.store")) for i, p in enumerate(parts))
        merged = run(whole, os.path.join(work, f"one{r}.store"))
        rounds.append((separate, merged))
    separate = statistics.median(s for s, _ in rounds)
    merged = statistics.median(m_ for _, m_ in rounds)
    return {"jobs": k, "records_per_job": m, "rounds": args.rounds,
            "separate_s": round(separate, 3), "merged_s": round(merged, 3),
            "per_job_overhead_s": round((separate - merged) / k, 3),
            "merged_speedup": round(separate / merged, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", help="local teacher folder (default: a random tiny Llama)")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--jobs-per-client", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=20.0, help="how long each client keeps polling")
    parser.add_argument("--background-records", type=int, default=20000, help="0: no background job")
    parser.add_argument("--batching", action="store_true", help="measure job boundaries instead of load")
    parser.add_argument("--batch-jobs", type=int, default=8)
    parser.add_argument("--batch-records", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="potstill-serve-bench-") as work:
        teacher = args.teacher or build_teacher(work, args.hidden, args.layers)
        result = run_batching(args, teacher, work) if args.batching else run_load(args, teacher, work)
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "device": args.device}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
