"""The main job and a training step on a shared CPU: torch's old threading vs `--threads auto`, alone and beside a CPU hog.

Contenders (each one a fresh process, so that OpenMP reads its settings at start-up):

- `old`: 2 torch threads and OpenMP's own wait policy (threads spin a while before they sleep): what
  `potstill demo` used before `--threads`, and torch's default on a 2-core machine;
- `auto`: `--threads auto` (cli/threads.py: the CPUs this process may use, minus loader workers)
  with `OMP_WAIT_POLICY=PASSIVE` (threads sleep while they wait), potstill's default now.

Workloads:

- `demo`: `potstill demo` (the main job) at the size given (`--demo-args`), wall time;
- `train`: `bench/train_step.py --preset cpu --modes store` (the real KD step fed by 2 loader
  workers), tokens/s.

Each runs alone (no hog started by this script; other processes on the machine are not controlled)
and beside a hog: `--hog` processes of `while True: pass`, started here and stopped after each
measurement. Contenders alternate within each pair, so drift on the machine hits both alike.

    python bench/shared_cpu.py --workloads demo,train --contenders old,auto --hog 2 \
        --demo-args "--train-problems 200 --student-steps 40 --eval-problems 40"   # docs/results.md
    python bench/shared_cpu.py --workloads demo --contenders auto --beside alone  # the demo at its defaults
    python bench/shared_cpu.py --workloads train --contenders old,auto,1 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from potstill.cli.threads import auto_threads, usable_cpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# OpenMP / MKL settings a contender must not inherit from the shell running the bench.
CLEARED_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "KMP_BLOCKTIME", "GOMP_SPINCOUNT")


def contender_env(name: str) -> tuple[dict[str, str], str]:
    """The environment and the `--threads` value of a contender: `old`, `auto`, or a thread count
    (with the passive wait, as `--threads N` gets it)."""
    env = {k: v for k, v in os.environ.items() if k not in CLEARED_ENV}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    env["TOKENIZERS_PARALLELISM"] = "false"
    if name == "old":
        # OpenMP's own default (libgomp: spin ~300k rounds, then sleep). Set but empty, because the CLI fills in
        # PASSIVE only where the variable is absent; libgomp treats an empty value as unset.
        env["OMP_WAIT_POLICY"] = ""
        return env, "2"
    return env, name  # auto or N: the CLI sets OMP_WAIT_POLICY=PASSIVE itself, before torch loads


class Hog:
    """`n` busy-looping processes, for the duration of a `with` block."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> Hog:
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.n)]
        time.sleep(1.0)  # let them take their cores
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()


def run_demo(name: str, demo_args: list[str], timeout: float) -> float:
    env, threads = contender_env(name)
    out = tempfile.mkdtemp(prefix="potstill-bench-demo-")
    try:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "potstill.cli.main", "demo", "--out", out, "--threads", threads, *demo_args],
                       env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=timeout)
        return time.perf_counter() - start
    finally:
        shutil.rmtree(out, ignore_errors=True)


def run_train(name: str, train_args: list[str], store_dir: str, timeout: float) -> float:
    env, threads = contender_env(name)
    if name == "old":
        del env["OMP_WAIT_POLICY"]  # the bench script does not go through the CLI: absent is OpenMP's default
    else:  # what `potstill train --threads auto|N` sets up beside its 2 loader workers
        env["OMP_WAIT_POLICY"], env["KMP_BLOCKTIME"] = "PASSIVE", "0"
        if threads == "auto":
            threads = str(auto_threads(loader_workers=2, environ={}))
    report = os.path.join(store_dir, f"report-{name}.json")
    subprocess.run([sys.executable, os.path.join(ROOT, "bench", "train_step.py"), "--preset", "cpu", "--modes", "store",
                    "--workers", "2", "--threads", threads, "--store-dir", store_dir, "--json", report, *train_args],
                   env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout)
    with open(report) as f:
        return float(json.load(f)["results"]["store"]["tokens_per_s"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default="demo,train")
    p.add_argument("--contenders", default="old,auto", help="old, auto, or a thread count N (passive wait)")
    p.add_argument("--demo-args", default="", help="extra `potstill demo` flags, e.g. '--train-problems 600'")
    p.add_argument("--train-args", default="--rounds 1", help="extra bench/train_step.py flags")
    p.add_argument("--hog", type=int, default=2, help="busy-looping processes beside the job")
    p.add_argument("--beside", default="alone,hog", help="alone, hog, or both")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds one run may take")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)

    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    store_dir = tempfile.mkdtemp(prefix="potstill-bench-shared-")
    results: dict[str, dict[str, list[float]]] = {}
    started, load_before = time.time(), os.getloadavg()
    try:
        for workload in workloads:
            for beside in [b.strip() for b in args.beside.split(",") if b.strip()]:
                key = f"{workload} {beside}"
                results[key] = {name: [] for name in contenders}
                for repeat in range(args.repeats):
                    order = contenders if repeat % 2 == 0 else contenders[::-1]
                    for name in order:
                        with Hog(args.hog if beside == "hog" else 0):
                            if workload == "demo":
                                value = run_demo(name, args.demo_args.split(), args.timeout)
                            else:
                                value = run_train(name, args.train_args.split(), store_dir, args.timeout)
                        results[key][name].append(value)
                        print(f"  {key:<12} {name:<5} {value:,.1f}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(store_dir, ignore_errors=True)
    report = {
        "results": results,
        "cpus": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "auto_threads": {"demo": auto_threads(0, environ={}), "train": auto_threads(2, environ={})},
        "hog": args.hog,
        "machine": platform.processor() or platform.machine(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "seconds": round(time.time() - started, 1),
        "args": vars(args),
    }
    print_table(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


def print_table(report: dict[str, Any]) -> None:
    auto = report["auto_threads"]
    print(f"{report['cpus']} CPUs ({report['usable_cpus']} usable), hog: {report['hog']} busy processes; "
          f"auto = {auto['demo']} threads for the demo, {auto['train']} beside 2 loader workers; "
          f"{report['seconds']:.0f} s in all; load average {report['load_average_before'][0]:.1f} before, "
          f"{report['load_average_after'][0]:.1f} after")
    names = list(next(iter(report["results"].values())))
    label = {"old": "old: 2 threads, OpenMP default wait", "auto": "auto threads, passive wait"}
    heads = [label.get(n, f"{n} thread(s), passive wait") for n in names]
    ratios = [f"{n} vs old" for n in names if n != "old"] if "old" in names else []
    print("| workload | " + " | ".join(heads + ratios) + " |")
    print("|---" * (1 + len(heads) + len(ratios)) + "|")
    for key, runs in report["results"].items():
        median = {n: sorted(runs[n])[len(runs[n]) // 2] for n in names}
        demo = key.startswith("demo")
        cells = [f"{median[n]:,.0f} s" if demo else f"{median[n]:,.0f} tokens/s" for n in names]
        if "old" in names:  # how many times faster than old
            cells += [f"{(median['old'] / median[n]) if demo else (median[n] / median['old']):.2f}×"
                      for n in names if n != "old"]
        print(f"| {key} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
