"""Generate-mode speed on a real model: potstill against the engine's own batched generation.

The teacher is loaded once per backend, in this process, and the contenders run interleaved,
round after round, on the same chat prompts (the teacher's chat template applied by potstill's
own encoder), in the same batches, greedy:

  hf plain          model.generate on the left-padded batch (KV cache), nothing else
  hf potstill       potstill's `generate` in generate mode with that model preloaded: generation,
                    the top-K targets of every generated token, records written to a fresh store
  hf potstill+hid   the same with --hidden-layers -1: that layer's states kept while decoding
  hf potstill+hid2  (with --second-forward) the same, the completion scored by a second forward
                    over prompt + completion instead, as before the states were kept while decoding
  vllm plain        vllm.LLM.generate on the same token ids
  vllm potstill     potstill's `generate --backend vllm` with that engine preloaded
  vllm capture      potstill's vLLM backend alone (`VLLMTeacher.generate`: generation with the
                    capture inside the engine, the captures fetched), no store: the engine's share

tokens/s counts generated tokens (up to and including EOS) over the wall time of the call; `cpu vs
plain` compares the CPU time of this process in each call instead (every thread: torch's, the
writers'), which other programs on a busy machine change far less than the wall time. The
bench checks that each backend's potstill completions equal its plain ones.

Score mode (teacher forcing over prompt + the first backend's plain completions) is timed too, on
the same token ids: potstill's score mode on each backend, and with vLLM its plain prompt-scoring
pass (`LLM.generate` with `prompt_logprobs=1`, `max_tokens=1`, prefix cache not read, as potstill's
requests do), the reference that `vllm potstill score` is compared with.

    OMP_NUM_THREADS=2 python bench/generate_speed.py --teacher SmolLM2-135M-Instruct.Q4_1.gguf
    OMP_NUM_THREADS=2 .venv-vllm/bin/python bench/generate_speed.py --teacher FOLDER --backends hf,vllm

It prints a table and one JSON object (also written to --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PROMPTS = os.path.join(ROOT, "tests", "data", "chat_prompts.jsonl")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", required=True, help="model folder or .gguf file (vLLM needs a folder)")
    p.add_argument("--prompts", default=DEFAULT_PROMPTS, help="chat prompts (JSONL with messages)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--backends", default="hf", help="hf, vllm or hf,vllm")
    p.add_argument("--threads", type=int, default=2, help="torch threads for the HF backend")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (vLLM's CUDA build; bench/gpu.py --vllm-teacher)")
    p.add_argument("--dtype", default="float32", help="the teacher's dtype (float32 on CPU, bfloat16 on a GPU)")
    p.add_argument("--second-forward", action="store_true",
                   help="also time hf potstill+hid with a second forward instead of capture while decoding")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


class Bench:
    """The prompts, encoded once, and one fresh store per potstill call."""

    def __init__(self, args: argparse.Namespace, workdir: str) -> None:
        from potstill.teacher_gen.encode import encode_item
        from potstill.teacher_gen.jobs import GenRequest
        from potstill.teacher_gen.prompts import FieldMap, load_prompts
        from potstill.teacher_gen.runner import load_tokenizer

        self.args = args
        self.workdir = workdir
        self.calls = 0
        base = self.config("hf", "generate")
        self.tokenizer = load_tokenizer(base)
        self.items = load_prompts(args.prompts, FieldMap()).items
        self.requests = [GenRequest(item.id, encode_item(item, self.tokenizer, base, None), 0, 0) for item in self.items]
        self.batch_tokens = base.batch_tokens
        self.eos = int(self.tokenizer.eos_token_id)

    def config(self, backend: str, mode: str, prompts: str | None = None, **extra: Any) -> Any:
        from potstill.teacher_gen.config import GenerateConfig

        self.calls += 1
        return GenerateConfig.build(
            teacher=self.args.teacher, prompts=prompts or self.args.prompts,
            store=os.path.join(self.workdir, f"s{self.calls}"), backend=backend, mode=mode,
            max_new_tokens=self.args.max_new_tokens, sampling_temperature=0.0, targets="topk", top_k=self.args.top_k,
            dtype=self.args.dtype, device=self.args.device, progress=False, **extra,
        )

    def cut(self, tokens: list[int]) -> list[int]:
        return tokens[: tokens.index(self.eos) + 1] if self.eos in tokens else tokens

    # -- the engines alone ---------------------------------------------------------------------
    def hf_plain(self, model: Any) -> tuple[float, dict[str, list[int]]]:
        """Batched `model.generate`, in the batches potstill's HF backend forms (the same budget)."""
        import torch
        from transformers import GenerationConfig

        from potstill.teacher_gen.jobs import batches_by_tokens

        torch.set_num_threads(self.args.threads)
        out: dict[str, list[int]] = {}
        start = time.perf_counter()
        with torch.inference_mode():
            for batch in batches_by_tokens(self.requests, lambda r: len(r.prompt_ids) + r.max_new_tokens,
                                           self.batch_tokens, key=lambda r: r.max_new_tokens):
                t = max(len(r.prompt_ids) for r in batch)
                ids = torch.full((len(batch), t), self.eos, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for row, r in enumerate(batch):
                    ids[row, t - len(r.prompt_ids):] = torch.from_numpy(r.prompt_ids.astype("int64"))
                    mask[row, t - len(r.prompt_ids):] = 1
                gen = model.generate(input_ids=ids, attention_mask=mask, generation_config=GenerationConfig(
                    max_new_tokens=self.args.max_new_tokens, do_sample=False, num_beams=1, pad_token_id=self.eos,
                    eos_token_id=self.eos))
                for row, r in enumerate(batch):
                    out[r.record_id] = self.cut(gen[row, t:].tolist())
        return time.perf_counter() - start, out

    def vllm_plain(self, llm: Any) -> tuple[float, dict[str, list[int]]]:
        import vllm
        from vllm.inputs import TokensPrompt

        params = vllm.SamplingParams(max_tokens=self.args.max_new_tokens, temperature=0.0, detokenize=False)
        start = time.perf_counter()
        outputs = llm.generate([TokensPrompt(prompt_token_ids=r.prompt_ids.tolist()) for r in self.requests], params,
                               use_tqdm=False)
        seconds = time.perf_counter() - start
        return seconds, {r.record_id: self.cut(list(o.outputs[0].token_ids)) for r, o in zip(self.requests, outputs,
                                                                                           strict=True)}

    # -- potstill ------------------------------------------------------------------------------
    def vllm_capture(self, llm: Any) -> tuple[float, dict[str, list[int]]]:
        from potstill.teacher_gen.model_info import describe_teacher
        from potstill.teacher_gen.vllm_backend import VLLMTeacher

        cfg = self.config("vllm", "generate")
        teacher = VLLMTeacher(cfg, describe_teacher(cfg), self.tokenizer, None, llm=llm)
        start = time.perf_counter()
        generated = teacher.generate(self.requests)
        seconds = time.perf_counter() - start
        assert all(g.capture is not None for g in generated)
        return seconds, {r.record_id: g.ids.tolist() for r, g in zip(self.requests, generated, strict=True)}

    def potstill(self, backend: str, preloaded: Any, second_forward: bool = False,
                 **extra: Any) -> tuple[float, dict[str, list[int]]]:
        import torch

        from potstill.store import open_store
        from potstill.teacher_gen.hf_backend import HFTeacher
        from potstill.teacher_gen.runner import generate

        torch.set_num_threads(self.args.threads)
        cfg = self.config(backend, "generate", **extra)
        HFTeacher.capture_while_decoding = not second_forward
        start = time.perf_counter()
        try:
            generate(cfg, preloaded=preloaded)
        finally:
            HFTeacher.capture_while_decoding = True
        seconds = time.perf_counter() - start
        return seconds, {r.id: r.input_ids[r.score_start :].tolist() for r in open_store(cfg.store).iter_records()}

    def score(self, backend: str, preloaded: Any, prompts: str) -> tuple[float, int]:
        import torch

        from potstill.teacher_gen.runner import generate

        torch.set_num_threads(self.args.threads)
        cfg = self.config(backend, "score", prompts=prompts)
        start = time.perf_counter()
        summary = generate(cfg, preloaded=preloaded)
        return time.perf_counter() - start, summary.tokens

    def vllm_plain_score(self, llm: Any, prompts: str) -> tuple[float, int]:
        """vLLM's own prompt scoring of the same token ids potstill scores: the log-prob of each token
        and its rank (`prompt_logprobs=1`), with nothing kept."""
        import numpy as np
        import vllm
        from vllm.inputs import TokensPrompt

        from potstill.teacher_gen.encode import encode_item
        from potstill.teacher_gen.prompts import FieldMap, load_prompts

        cfg = self.config("vllm", "score", prompts=prompts)
        encoded = [encode_item(item, self.tokenizer, cfg, None) for item in load_prompts(prompts, FieldMap()).items]
        ids = [np.concatenate([e.prompt_ids, e.completion_ids]).tolist() for e in encoded]
        params = vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1, detokenize=False,
                                     skip_reading_prefix_cache=True)
        start = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=x) for x in ids], params, use_tqdm=False)
        return time.perf_counter() - start, sum(len(e.completion_ids) for e in encoded)

    def score_prompts(self, completions: dict[str, list[int]]) -> str:
        """The chat prompts with the given completions as their answers, for score mode."""
        path = os.path.join(self.workdir, "scored.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for item in self.items:
                text = self.tokenizer.decode(completions[item.id], skip_special_tokens=True)
                f.write(json.dumps({"id": item.id, "messages": item.messages, "completion": text}) + "\n")
        return path


def load_hf(args: argparse.Namespace) -> Any:
    from potstill.teacher_gen.config import GenerateConfig
    from potstill.teacher_gen.hf_backend import load_model
    from potstill.teacher_gen.model_info import describe_teacher

    cfg = GenerateConfig.build(teacher=args.teacher, prompts="-", store="-", targets="topk", dtype=args.dtype,
                               device=args.device)
    return load_model(cfg, describe_teacher(cfg)).eval()


def load_vllm(args: argparse.Namespace, bench: Bench) -> Any:
    from potstill.teacher_gen.config import GenerateConfig
    from potstill.teacher_gen.model_info import describe_teacher
    from potstill.teacher_gen.vllm_backend import VLLMTeacher

    cfg = GenerateConfig.build(teacher=args.teacher, prompts="-", store="-", backend="vllm", dtype=args.dtype,
                               targets="topk", top_k=args.top_k, device=args.device)
    return VLLMTeacher(cfg, describe_teacher(cfg), bench.tokenizer, None).llm


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    backends = args.backends.split(",")
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="potstill-genspeed-") as workdir:
        bench = Bench(args, workdir)
        engines = {}
        if "vllm" in backends:  # first: vLLM sets the process's thread settings as it starts
            engines["vllm"] = load_vllm(args, bench)
        if "hf" in backends:
            engines["hf"] = load_hf(args)
        contenders = []
        if "hf" in backends:
            contenders += [("hf plain", lambda: bench.hf_plain(engines["hf"])),
                           ("hf potstill", lambda: bench.potstill("hf", engines["hf"])),
                           ("hf potstill+hid", lambda: bench.potstill("hf", engines["hf"], hidden_layers="-1"))]
            if args.second_forward:
                contenders.append(("hf potstill+hid2", lambda: bench.potstill("hf", engines["hf"], second_forward=True,
                                                                              hidden_layers="-1")))
        if "vllm" in backends:
            contenders += [("vllm plain", lambda: bench.vllm_plain(engines["vllm"])),
                           ("vllm potstill", lambda: bench.potstill("vllm", engines["vllm"])),
                           ("vllm capture", lambda: bench.vllm_capture(engines["vllm"]))]
        for _, run in contenders:  # warm-up: first-call allocations, lazy imports
            run()
        seconds: dict[str, list[float]] = {name: [] for name, _ in contenders}
        cpu: dict[str, list[float]] = {name: [] for name, _ in contenders}
        tokens: dict[str, int] = {}
        completions: dict[str, dict[str, list[int]]] = {}
        score_seconds: dict[str, list[float]] = {}
        score_tokens = 0
        for round_ in range(args.rounds):
            order = contenders if round_ % 2 == 0 else contenders[::-1]
            for name, run in order:
                cpu_start = time.process_time()
                took, done = run()
                cpu[name].append(time.process_time() - cpu_start)
                seconds[name].append(took)
                tokens[name] = sum(len(c) for c in done.values())
                completions[name] = done
            prompts = bench.score_prompts(completions[f"{backends[0]} plain"])
            scorers = [(f"{b} potstill", lambda b=b, p=prompts: bench.score(b, engines[b], p)) for b in backends]
            if "vllm" in backends:
                scorers.append(("vllm plain", lambda p=prompts: bench.vllm_plain_score(engines["vllm"], p)))
            for name, run in scorers if round_ % 2 == 0 else scorers[::-1]:
                took, score_tokens = run()
                score_seconds.setdefault(name, []).append(took)

    result: dict[str, Any] = {
        "teacher": args.teacher, "prompts": len(bench.items), "max_new_tokens": args.max_new_tokens,
        "top_k": args.top_k, "rounds": args.rounds, "threads": args.threads, "device": args.device,
        "dtype": args.dtype,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "generate": {},
    }
    for name in seconds:
        plain = f"{name.split()[0]} plain"
        identical = sum(completions[name][rid] == completions[plain][rid] for rid in completions[plain])
        rates = [tokens[name] / s for s in seconds[name]]
        ratios = [p / s for p, s in zip(seconds[plain], seconds[name], strict=True)]  # same round, same tokens
        cpu_ratios = [p / s for p, s in zip(cpu[plain], cpu[name], strict=True)]
        result["generate"][name] = {
            "tokens": tokens[name], "seconds": [round(s, 3) for s in seconds[name]],
            "tokens_per_s": round(statistics.median(rates), 2),
            "vs_plain": round(statistics.median(ratios), 3), "identical_completions": f"{identical}/{len(completions[plain])}",
            "cpu_seconds": [round(s, 3) for s in cpu[name]], "cpu_vs_plain": round(statistics.median(cpu_ratios), 3),
        }
    result["score"] = {"tokens": score_tokens, **{
        f"{name} tokens_per_s": round(statistics.median(score_tokens / t for t in took), 1)
        for name, took in score_seconds.items()}}
    if "vllm" in backends:  # the same round's pair: the machine's load changes less within a round
        result["score"]["vllm potstill vs plain"] = round(statistics.median(
            p / s for p, s in zip(score_seconds["vllm plain"], score_seconds["vllm potstill"], strict=True)), 3)
    if len(backends) == 2:
        result["score"]["vllm_vs_hf"] = round(statistics.median(
            h / v for h, v in zip(score_seconds["hf potstill"], score_seconds["vllm potstill"], strict=True)), 3)
    print(f"{'contender':<18} {'tokens':>7} {'tokens/s':>9} {'vs plain':>9} {'cpu vs plain':>13} {'identical':>10}")
    for name, row in result["generate"].items():
        print(f"{name:<18} {row['tokens']:>7} {row['tokens_per_s']:>9.2f} {row['vs_plain']:>8.2f}x "
              f"{row['cpu_vs_plain']:>12.2f}x {row['identical_completions']:>10}")
    print(f"score mode, {score_tokens} scored tokens: " + ", ".join(
        f"{name.removesuffix(' tokens_per_s')} {value} tokens/s" for name, value in result["score"].items()
        if name.endswith("tokens_per_s")))
    if "vllm potstill vs plain" in result["score"]:
        print(f"score mode, vllm potstill vs plain: {result['score']['vllm potstill vs plain']}x")
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
