"""The GPU run: capture against the bare forward, and the training step, at the anchor sizes, in one go.

One command (`bench/gpu.sh`, which runs this file) on one H100/H200 measures, side by side in one
process, with a Llama-shaped random teacher (hidden 2048, 16 layers, 32/8 heads, vocab 128,256,
1.24B parameters, bf16) on batches of 8 × 1024 tokens:

  bare           model(input_ids).logits: what any scoring pass costs
  capture fused  HFTeacher.score with the fused Triton kernel (top-64, the target's log-prob, the
                 direct log tail, in one read of each logits chunk) + 3 hidden layers, copied to host
  capture torch  the same with the torch path (torch.topk / block top-k + the compiled logsumexp)
  store          capture fused + potstill's writer filling a real store (Arrow + Zarr, committed)

in turn, round after round (`--rounds`), timed with CUDA events after a warm-up; tokens/s are the
median round's and each ratio to `bare` is the median of the ratios within a round. Peak memory is
torch.cuda.max_memory_allocated during each. Then it checks the fused kernel against the torch path
and a float64 reference on the teacher's real logits, and runs `bench/train_step.py` at the anchor
sizes (student hidden 768, 12 layers): the KD step from a store vs the same targets in memory vs
online KD. With `--vllm-teacher FOLDER` (where vllm is installed) it also runs
bench/generate_speed.py with vLLM on the GPU: potstill's in-engine capture against plain vLLM generation
and prompt scoring (goal: ≥ 0.9× each). It prints a table and writes everything to $OUT/gpu.json (or --out). Goals: store ≥ 90%
of bare; training from the store ≥ 95% of in memory and ≥ 2.2× online KD. About 3–5 minutes on an
H100 (model building, torch.compile and Triton compilation included).

It installs nothing. The GPU image has torch, transformers, triton and pyarrow but not zarr and its
dependencies; carry them in `bench/_gpu_deps` (git-ignored; ~40 MB), filled once on a machine with
the internet for the GPU machine's Python (3.12 in the image this was written for; check
`python3 --version` there, the compiled wheels of numcodecs and google-crc32c depend on it):

    bench/gpu.sh --prep 3.12        # pip install --target bench/_gpu_deps --python-version 3.12 ... (no deps)
    bench/gpu.sh                    # on the GPU machine (this file, with bench/_gpu_deps on the path)
    python bench/gpu.py --device cpu --quick   # anywhere: a tiny end-to-end run of every step
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # capture.py, train_step.py
sys.path.append(os.path.join(HERE, "_gpu_deps"))  # carried packages, used only where the machine has none


def _import_checkout() -> None:
    """The GPU machine installs nothing: where potstill is not installed, import this checkout's
    folders as pyproject.toml's package-dir maps them (store/ is potstill.store, ...)."""
    try:
        import potstill.store
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("potstill"):
            raise
        root = os.path.dirname(HERE)
        sys.path.insert(0, root)
        sys.modules.pop("potstill", None)
        import potstill

        potstill.__path__.append(root)  # potstill.X: the checkout's X/ folder


_import_checkout()

import capture as capture_bench  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import train_step  # noqa: E402

from potstill.store import (  # noqa: E402
    HiddenLayer,
    HiddenSpec,
    StoreManifest,
    TargetSpec,
    TeacherInfo,
    TokenizerInfo,
    create_store,
)
from potstill.teacher_gen.capture import block_topk, make_logsumexp, resolve_layers, topk_logprobs  # noqa: E402
from potstill.teacher_gen.config import GenerateConfig  # noqa: E402
from potstill.teacher_gen.fused_capture import FusedTopK, interpreting, probe, triton_available  # noqa: E402
from potstill.teacher_gen.hf_backend import HFTeacher  # noqa: E402
from potstill.teacher_gen.jobs import ScoreJob  # noqa: E402
from potstill.teacher_gen.model_info import TeacherSpec  # noqa: E402
from potstill.teacher_gen.runner import RecordBuilder  # noqa: E402
from potstill.teacher_gen.writer import WriterPool  # noqa: E402

ANCHOR = dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256, batch=8, seq=1024,
              student_hidden=768, student_layers=12, batches=8, rounds=3, warmup=2, check_rows=1024)
QUICK = dict(hidden=32, layers=4, heads=4, kv_heads=2, intermediate=64, vocab=512, batch=2, seq=24,
             student_hidden=32, student_layers=2, batches=2, rounds=1, warmup=1, check_rows=16)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto: cuda when available")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every step (CPU)")
    for name in ANCHOR:
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                       help=f"default {ANCHOR[name]} ({QUICK[name]} with --quick)")
    p.add_argument("--top-k", type=int, default=None, help="default 64 (8 with --quick)")
    p.add_argument("--chunk-positions", type=int, default=GenerateConfig.chunk_positions)
    p.add_argument("--writer-threads", type=int, default=GenerateConfig.writer_threads)
    p.add_argument("--skip-train", action="store_true", help="capture only")
    p.add_argument("--vllm-teacher", default=None, metavar="FOLDER",
                   help="also run bench/generate_speed.py --backends vllm on this model folder (bf16): potstill's "
                        "vLLM capture against plain vLLM generation and prompt scoring; needs vllm importable")
    p.add_argument("--out", default=None, help="JSON result (default: $OUT/gpu.json when $OUT is set)")
    args = p.parse_args(argv)
    sizes = QUICK if args.quick else ANCHOR
    for name, value in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.top_k is None:
        args.top_k = 8 if args.quick else 64
    args.device = torch.device(args.device if args.device != "auto" else
                               ("cuda" if torch.cuda.is_available() else "cpu"))
    return args


# -- timing -------------------------------------------------------------------------------------
def clock(device: torch.device, fn: Callable[[], Any]) -> float:
    """Seconds of `fn()`: CUDA events around it on a GPU (work queued before is finished first)."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    torch.cuda.synchronize(device)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1000


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


# -- capture ------------------------------------------------------------------------------------
class CaptureRun:
    """The teacher, its HFTeacher, the batches and the variants to time."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        device = args.device
        self.dtype_name = "bfloat16" if device.type == "cuda" else "float32"
        self.model = capture_bench.build_teacher(args, device, getattr(torch, self.dtype_name))
        self.layers = resolve_layers([args.layers // 4, args.layers // 2, -1], args.layers)
        self.tokens_per_batch = args.batch * args.seq
        self.config = GenerateConfig.build(
            teacher="bench-random-llama", prompts="-", store="-", device=str(device), targets="topk", top_k=args.top_k,
            chunk_positions=args.chunk_positions, batch_tokens=self.tokens_per_batch, capture_kernel="torch",
            writer_threads=args.writer_threads,
        )
        self.info = TeacherInfo(name_or_path="bench-random-llama", config_hash="sha256:bench", dtype=self.dtype_name,
                                architecture="LlamaForCausalLM", num_hidden_layers=args.layers,
                                hidden_size=args.hidden, vocab_size=args.vocab)
        spec = TeacherSpec(self.model.config, self.info, self.dtype_name, args.layers, args.hidden, args.vocab)
        self.tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=1)
        self.teacher = HFTeacher(self.config, spec, self.tokenizer, self.layers, model=self.model)
        # The fused kernel runs on CUDA, and on a CPU only under Triton's interpreter (slow: --quick sizes).
        can_fuse = triton_available() and (device.type == "cuda" or interpreting())
        self.fused = FusedTopK() if can_fuse else None
        # a kernel that does not compile or disagrees with torch here is reported, and the rest still runs
        self.fused_problem = (probe(self.fused, device, self.model.dtype, args.vocab, args.top_k)
                              if self.fused is not None else "needs CUDA (or TRITON_INTERPRET=1) and Triton")
        if self.fused_problem is not None:
            self.fused = None
        self.warm = capture_bench.make_batches(args, args.warmup, seed=1)
        self.batches = capture_bench.make_batches(args, args.batches, seed=2)
        self.device_batches = [torch.from_numpy(b.astype(np.int64)).to(device) for b in self.batches]
        self.root = tempfile.mkdtemp(prefix="potstill-gpu-bench-")
        self.stores = 0

    def bare(self) -> None:
        with torch.inference_mode():
            for b in self.device_batches:
                self.model(input_ids=b).logits  # noqa: B018 (the forward is the point)

    def capture(self, fused: bool, batches: list[np.ndarray] | None = None) -> None:
        self.teacher.fused = self.fused if fused else None
        capture_bench.run_capture(self.teacher, batches or self.batches, "cap", lambda jobs, captures: None)

    def store(self) -> int:
        """Capture (fused when it can run) with the store written; returns the bytes committed."""
        self.teacher.fused = self.fused
        self.stores += 1
        manifest = StoreManifest(
            teacher=self.info,
            tokenizer=TokenizerInfo(fingerprint="sha256:bench", vocab_size=self.args.vocab),
            targets=TargetSpec(k=self.args.top_k),
            hidden=HiddenSpec([HiddenLayer(i, self.args.hidden, "bfloat16", post_norm=i == self.args.layers)
                               for i in self.layers]),
            generation={"bench": True},
        )
        path = os.path.join(self.root, f"s{self.stores}.store")
        store = create_store(path, manifest, {"tokenizer.json": b"{}"})
        writer = WriterPool(store, "bench", RecordBuilder(self.config, self.tokenizer), threads=self.config.writer_threads,
                            shard_records=16, shard_bytes=1 << 30, max_batches=self.config.queue_batches)

        def write(jobs: list[ScoreJob], captures: list) -> None:
            writer.put(list(zip(jobs, captures, strict=True)))

        capture_bench.run_capture(self.teacher, self.batches, "rec", write)
        written = sum(c.bytes for c in writer.close())
        shutil.rmtree(path, ignore_errors=True)  # the next round's store must not find a full disk
        return written

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def time_capture(run: CaptureRun) -> dict[str, Any]:
    args, device = run.args, run.args.device
    variants: dict[str, Callable[[], Any]] = {"bare": run.bare}
    if run.fused is not None:
        variants["capture fused"] = lambda: run.capture(True)
    variants["capture torch"] = lambda: run.capture(False)
    variants["store"] = run.store
    # warm-up: compilation (Triton, torch.compile) and allocator growth stay out of the timed rounds
    run.bare()
    for fused in ([True] if run.fused is not None else []) + [False]:
        run.capture(fused, run.warm)
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    peaks: dict[str, float | None] = {}
    stored_bytes = 0
    for _ in range(args.rounds):
        for name, fn in variants.items():
            reset_peak(device)
            result: list[Any] = []
            seconds[name].append(clock(device, lambda fn=fn, result=result: result.append(fn())))
            peak = peak_gib(device)
            peaks[name] = max(peak, peaks.get(name) or 0.0) if peak is not None else None
            if name == "store":
                stored_bytes = result[0]
    tokens = run.tokens_per_batch * args.batches
    rows: dict[str, Any] = {}
    for name, secs in seconds.items():
        rows[name] = {"tokens_per_s": round(tokens / statistics.median(secs)), "peak_GiB": peaks[name]}
        if name != "bare":
            rows[name]["of_bare"] = round(statistics.median(
                b / s for b, s in zip(seconds["bare"], secs, strict=True)), 3)
    rows["store"]["kernel"] = "triton" if run.fused is not None else "torch"
    rows["store"]["bytes_per_token"] = round(stored_bytes / tokens, 1)
    return rows


def check_fused(run: CaptureRun) -> dict[str, Any]:
    """The fused kernel against the torch path (torch.topk + eager fp32 logsumexp) and float64, on
    the teacher's own logits of one batch (`check_rows` positions; bf16 logits tie a lot)."""
    if run.fused is None:
        return {"skipped": f"the fused kernel {run.fused_problem}"}
    args, model = run.args, run.model
    with torch.inference_mode():
        body = model.get_decoder()
        final = body(input_ids=run.device_batches[0][:, :-1]).last_hidden_state.reshape(-1, args.hidden)
        hidden = final[: args.check_rows]
        targets = run.device_batches[0][:, 1:].reshape(-1)[: args.check_rows]
        head = model.get_output_embeddings()
        k = args.top_k
        got = topk_logprobs(hidden, head, targets, k, chunk=args.chunk_positions, fused=run.fused)
        ref = topk_logprobs(hidden, head, targets, k, chunk=args.chunk_positions, logsumexp=make_logsumexp(None))
        ids, lp, token, tail = got
        ref_ids, ref_lp, ref_token, ref_tail = ref
        logits = head(hidden)
        # equal up to ties: each chosen id's logit, sorted, is torch.topk's value list
        same_values = torch.equal(logits.gather(1, ids.long()).sort(-1).values, logits.gather(1, ref_ids.long()).sort(-1).values)
        rows64 = min(64, hidden.shape[0])
        logp64 = torch.log_softmax(logits[:rows64].double(), dim=-1)
        outside = logp64.scatter(1, ids[:rows64].long(), float("-inf"))
        tail64 = torch.logsumexp(outside, dim=-1)
        lp64 = logp64.gather(1, ids[:rows64].long())
        result = {
            "rows": int(hidden.shape[0]), "vocab": int(logits.shape[1]), "k": k,
            "ids_identical_fraction": round(float((ids == ref_ids).float().mean()), 5),
            "chosen_values_equal_up_to_ties": bool(same_values),
            "max_abs_logprob_diff_vs_torch": float((lp - ref_lp).abs().max()),
            "max_abs_tail_diff_vs_torch": float((tail - ref_tail).abs().max()),
            "max_abs_token_diff_vs_torch": float((token - ref_token).abs().max()),
            "max_abs_logprob_err_vs_float64": float((lp[:rows64].double() - lp64).abs().max()),
            "max_abs_tail_err_vs_float64": float((tail[:rows64].double() - tail64).abs().max()),
            "nan": bool(torch.isnan(lp).any() or torch.isnan(tail).any() or torch.isnan(token).any()),
        }
    result["ok"] = (result["chosen_values_equal_up_to_ties"] and not result["nan"]
                    and result["max_abs_logprob_err_vs_float64"] < 1e-4 and result["max_abs_tail_err_vs_float64"] < 1e-4)
    return result


def time_kernel(run: CaptureRun, reps: int = 20) -> dict[str, Any]:
    """One LM-head chunk of the teacher's logits (`--chunk-positions` rows): the fused kernel against
    the torch path's two reductions (block / plain top-k, then the compiled logsumexp outside it),
    median of `reps` event-timed calls each, and the fused kernel's read rate of the logits."""
    if run.fused is None:
        return {"skipped": f"the fused kernel {run.fused_problem}"}
    args, teacher = run.args, run.teacher
    if args.device.type != "cuda":  # Triton's interpreter: once, to see it run
        reps = 1
    with torch.inference_mode():
        final = run.model.get_decoder()(input_ids=run.device_batches[0]).last_hidden_state.reshape(-1, args.hidden)
        logits = teacher.head(final[: args.chunk_positions])

        def torch_path() -> None:
            if teacher.block is not None:
                _, idx = block_topk(logits, args.top_k, teacher.block)
            else:
                _, idx = logits.topk(args.top_k, dim=-1)
            teacher.logsumexp(logits, idx)

        def fused() -> None:
            run.fused(logits, args.top_k)

        result: dict[str, Any] = {"rows": int(logits.shape[0]), "vocab": int(logits.shape[1])}
        for name, fn in (("fused", fused), ("torch", torch_path)):
            for _ in range(3 if args.device.type == "cuda" else 0):
                fn()
            result[f"{name}_ms"] = round(1000 * statistics.median(clock(args.device, fn) for _ in range(reps)), 3)
        result["fused_read_GB_per_s"] = round(logits.numel() * logits.element_size() / (result["fused_ms"] / 1000) / 1e9, 1)
    return result


# -- training -----------------------------------------------------------------------------------
def time_training(args: argparse.Namespace, out_dir: str) -> dict[str, Any]:
    """`bench/train_step.py` at the same sizes: KD from the store vs in memory vs online KD."""
    flags = ["--device", args.device.type, "--modes", "memory,store,online", "--vocab", str(args.vocab),
             "--k", str(args.top_k), "--batch", str(args.batch), "--seq", str(args.seq),
             "--teacher-hidden", str(args.hidden), "--teacher-layers", str(args.layers),
             "--student-hidden", str(args.student_hidden), "--student-layers", str(args.student_layers),
             "--json", os.path.join(out_dir, "gpu_train_step.json")]
    if args.quick:
        flags += ["--preset", "cpu", "--steps", "2", "--warmup", "1", "--rounds", "1", "--workers", "1"]
    else:
        flags += ["--preset", "anchor"]
    report = train_step.main(flags)
    results = report["results"]
    rows = {f"train {name}": {"tokens_per_s": round(r["tokens_per_s"]), "peak_GiB": r.get("peak_GiB")}
            for name, r in results.items()}
    rows["train store"]["of_memory"] = round(results["store"]["tokens_per_s"] / results["memory"]["tokens_per_s"], 3)
    rows["train store"]["of_online"] = round(results["store"]["tokens_per_s"] / results["online"]["tokens_per_s"], 3)
    return rows


# -- report -------------------------------------------------------------------------------------
GOALS = {("store", "of_bare"): 0.90, ("train store", "of_memory"): 0.95, ("train store", "of_online"): 2.2}


def time_vllm(args: argparse.Namespace, out_dir: str) -> dict[str, Any]:
    """bench/generate_speed.py with vLLM on this GPU, in its own process (the engine takes its own
    share of the GPU's memory): generate and score mode, potstill against plain vLLM."""
    import importlib.util
    import subprocess

    if importlib.util.find_spec("vllm") is None:
        return {"skipped": "vllm is not installed in this Python"}
    out = os.path.join(out_dir, "vllm_speed.json")
    command = [sys.executable, os.path.join(HERE, "generate_speed.py"), "--teacher", args.vllm_teacher,
               "--backends", "vllm", "--device", "cuda", "--dtype", "bfloat16", "--rounds", "3", "--out", out]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"failed": proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]}
    with open(out) as f:
        result = json.load(f)
    return {"generate vs plain": result["generate"]["vllm potstill"]["vs_plain"],
            "score vs plain": result["score"]["vllm potstill vs plain"], "detail": result}


def print_table(report: dict[str, Any]) -> None:
    print(f"\n{report['device']}, torch {report['torch']}, triton {report['triton']}, {report['dtype']}, "
          f"teacher {report['teacher_params_M']}M params, vocab {report['vocab']}, batch {report['batch']}, "
          f"top-{report['top_k']} + hidden layers {report['hidden_layers']}, {report['seconds']:.0f} s in all")
    print("| run | tokens/s | ratio | goal | peak GiB |\n|---|---|---|---|---|")
    for name, row in report["rows"].items():
        ratios = [(key, value) for key, value in row.items() if key.startswith("of_")]
        for i, (key, value) in enumerate(ratios or [("", None)]):
            goal = GOALS.get((name, key))
            met = "" if goal is None else (f"≥ {goal} {'met' if value >= goal else 'MISSED'}")
            ratio = "" if value is None else f"{value:.3f} of {key[3:]}"
            label = name if i == 0 else ""
            tok = f"{row['tokens_per_s']:,}" if i == 0 else ""
            peak = row.get("peak_GiB") if i == 0 and row.get("peak_GiB") is not None else ""
            print(f"| {label} | {tok} | {ratio} | {met} | {peak} |")
    check = report["fused_check"]
    print("fused vs reference on real logits:", json.dumps(check))
    print("one logits chunk, fused kernel vs torch path:", json.dumps(report["kernel_per_chunk"]))
    if "vllm" in report:
        print("vLLM, potstill vs plain:", json.dumps({k: v for k, v in report["vllm"].items() if k != "detail"}))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    out = args.out or (os.path.join(os.environ["OUT"], "gpu.json") if os.environ.get("OUT") else None)
    out_dir = os.path.dirname(os.path.abspath(out)) if out else tempfile.mkdtemp(prefix="potstill-gpu-out-")
    os.makedirs(out_dir, exist_ok=True)
    if args.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    run = CaptureRun(args)
    try:
        rows = time_capture(run)
        check = check_fused(run)
        kernel = time_kernel(run)
    finally:
        run.close()
    teacher_params = round(sum(p.numel() for p in run.model.parameters()) / 1e6, 1)
    del run
    if args.device.type == "cuda":
        torch.cuda.empty_cache()
    if not args.skip_train:
        rows.update(time_training(args, out_dir))
    vllm_report = time_vllm(args, out_dir) if args.vllm_teacher else None
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    report = {
        "device": torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else
        (platform.processor() or platform.machine()),
        "torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
        "dtype": "bfloat16" if args.device.type == "cuda" else "float32",
        "teacher_params_M": teacher_params, "vocab": args.vocab, "batch": f"{args.batch} x {args.seq}",
        "top_k": args.top_k, "hidden_layers": resolve_layers([args.layers // 4, args.layers // 2, -1], args.layers),
        "timed_batches": args.batches, "rounds": args.rounds, "quick": args.quick,
        "rows": rows, "fused_check": check, "kernel_per_chunk": kernel,
        "goals_met": {f"{name} {key}": rows[name][key] >= goal for (name, key), goal in GOALS.items()
                      if name in rows and key in rows[name]},
        "seconds": round(time.perf_counter() - started, 1),
    }
    if vllm_report is not None:
        report["vllm"] = vllm_report
    print_table(report)
    if out:
        with open(out, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
