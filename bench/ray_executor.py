"""`generate --executor ray` against the local executor: throughput on one machine, the same tiny teacher,
the same number of workers, side by side in one run.

  local  W processes `potstill generate --workers W --worker-index i`, started at once (the static
         split users launch box by box), one torch thread each;
  ray    `generate_on_ray` with W actors on a local Ray instance (one torch thread each: Ray's default).

Throughput is committed records per second of capture (start-up excluded: imports, Ray's start,
model loading): the local executor's is all records over the longest worker's capture time. The
ratio ray / local is the Ray executor's own overhead (goal ≥ 0.9). It also names the cost per block,
measured in the actors: the block's commit protocol (its writer leases taken, the look for an earlier
attempt's commits and leftovers), the compute, the writers' close (the last records written, the
commit records, the leases released: in a thread, beside the next block's compute, as the local
executor's writers run beside its model); and Ray's scheduling: the round trip of one actor call
carrying a block's worth of tokenized prompts.

    OMP_NUM_THREADS=1 python bench/ray_executor.py                 # 2 workers, 320 prompts, 3 rounds
    OMP_NUM_THREADS=1 python bench/ray_executor.py --workers 2 --prompts 160 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from common import build_llama, build_tokenizer, prompt_rows, write_jsonl

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def settings(teacher: str, prompts: str, store: str, shard_records: int) -> dict:
    return {"teacher": teacher, "prompts": prompts, "store": store, "device": "cpu", "progress": False,
            "targets": "topk", "top_k": 16, "codec": "none", "hidden_layers": [-1], "shard_records": shard_records,
            "batch_tokens": 512}


def flags(values: dict) -> list[str]:
    out = []
    for key, value in values.items():
        flag = "--out" if key == "store" else "--" + key.replace("_", "-")
        if key == "progress":
            out.append("--no-progress")
        elif isinstance(value, list):
            out += [flag, ",".join(map(str, value))]
        else:
            out += [flag, str(value)]
    return out


def run_local(values: dict, workers: int) -> tuple[float, int]:
    """(records/s, records) of W worker processes started at once."""
    procs = [subprocess.Popen([sys.executable, "-m", "potstill.cli.main", "generate", *flags(values), "--threads", "1",
                               "--workers", str(workers), "--worker-index", str(i), "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for i in range(workers)]
    summaries = []
    for proc in procs:
        out, err = proc.communicate(timeout=1800)
        if proc.returncode != 0:
            raise SystemExit(f"local worker failed: {err[-2000:]}")
        summaries.append(json.loads(out))
    records = sum(s["records"] for s in summaries)
    return records / max(s["capture_seconds"] for s in summaries), records


def run_ray(values: dict, workers: int) -> tuple[float, int, dict]:
    from potstill.teacher_gen.config import GenerateConfig
    from potstill.teacher_gen.ray_executor import generate_on_ray

    stats: dict = {}
    summary = generate_on_ray(GenerateConfig.build(**values, executor="ray", num_actors=workers), stats=stats)
    stats["capture_s"] = summary.capture_seconds
    return summary.records / summary.capture_seconds, summary.records, stats


def actor_call_ms(ray: object, calls: int = 60) -> float:
    """Median round trip of one call to a Ray actor carrying a block's worth of tokenized prompts (16
    records of 64 tokens, as `Encoded` holds them): what Ray's scheduling adds to each block."""
    import numpy as np

    @ray.remote(num_cpus=0)
    class Echo:
        def take(self, block: list) -> int:
            return len(block)

    echo = Echo.remote()
    block = [{"id": f"r{i:04d}", "prompt": "x" * 200, "prompt_ids": np.arange(64, dtype=np.int32)} for i in range(16)]
    ray.get(echo.take.remote(block))
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        ray.get(echo.take.remote(block))
        times.append(time.perf_counter() - start)
    ray.kill(echo)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=320)
    parser.add_argument("--shard-records", type=int, default=16, help="records per shard, so per Ray block")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=128, help="teacher width")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    import ray

    work = tempfile.mkdtemp(prefix="potstill-ray-bench-")
    tok, teacher = os.path.join(work, "tok"), os.path.join(work, "teacher")
    build_tokenizer(tok)
    from transformers import AutoTokenizer

    build_llama(teacher, len(AutoTokenizer.from_pretrained(tok)), hidden=args.hidden, layers=4, seed=0, tokenizer_dir=tok)
    prompts = write_jsonl(os.path.join(work, "p.jsonl"), prompt_rows(args.prompts, seed=5))
    ray.init(num_cpus=args.workers + 2, include_dashboard=False, logging_level="WARNING", configure_logging=False)
    local_rates, ray_rates, per_block = [], [], []
    try:
        for r in range(args.rounds):  # interleaved, so that the machine's load falls on both alike
            rate, n = run_local(settings(teacher, prompts, os.path.join(work, f"local-{r}"), args.shard_records),
                                args.workers)
            local_rates.append(rate)
            rate, m, stats = run_ray(settings(teacher, prompts, os.path.join(work, f"ray-{r}"), args.shard_records),
                                     args.workers)
            assert n == m == args.prompts, (n, m)
            ray_rates.append(rate)
            blocks = stats["blocks"]
            per_block.append((stats["protocol_s"] / blocks, 0.0, stats["compute_s"] / blocks,
                              stats["close_s"] / blocks, blocks))
            print(f"round {r}: local {local_rates[-1]:.1f} rec/s, ray {ray_rates[-1]:.1f} rec/s "
                  f"({ray_rates[-1] / local_rates[-1]:.2f}x)", file=sys.stderr, flush=True)
        call_ms = actor_call_ms(ray)
    finally:
        ray.shutdown()
    ratio = statistics.median(r / lo for r, lo in zip(ray_rates, local_rates, strict=True))
    protocol, _, compute, close, blocks = (statistics.median(x[i] for x in per_block) for i in range(5))
    result = {"workers": args.workers, "prompts": args.prompts, "records_per_block": args.shard_records,
              "blocks": blocks, "local_records_per_s": [round(x, 1) for x in local_rates],
              "ray_records_per_s": [round(x, 1) for x in ray_rates], "ratio_median": round(ratio, 3),
              "commit_protocol_ms_per_block": round(protocol * 1e3, 1),
              "ray_actor_call_ms": round(call_ms, 2), "compute_ms_per_block": round(compute * 1e3, 1),
              "close_ms_per_block": round(close * 1e3, 1)}
    print(f"| executor | records/s (median of {args.rounds}) |\n|---|---:|\n"
          f"| local, {args.workers} worker processes | {statistics.median(local_rates):.1f} |\n"
          f"| ray, {args.workers} actors | {statistics.median(ray_rates):.1f} |")
    print(f"ratio ray/local {ratio:.2f}x; per block of {args.shard_records} records: commit protocol "
          f"{protocol * 1e3:.1f} ms, Ray's actor call (round trip) {call_ms:.1f} ms, compute {compute * 1e3:.1f} ms, "
          f"writers' close (last records, commit records) {close * 1e3:.1f} ms")
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
