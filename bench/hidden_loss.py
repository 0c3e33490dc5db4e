"""Which hidden-state loss helps a student of a real LLM: none, MSE, cosine, or MSE of per-token
standardised states.

Real LLMs have massive activations: a few coordinates of a middle layer reach tens of thousands
(SmolLM2-135M-Instruct, layer 15: max |h| ≈ 25,000). A raw MSE on such states is thousands of
times larger than the KD loss and takes over the gradient; cosine and the standardised MSE do not
depend on the scale.

1. A store: the teacher (SmolLM2-135M-Instruct, 30 layers of width 576; `--teacher` a GGUF file or a
   model folder; by default the tests' copy, fetched once by bench/common.py, the tests' copy) answers 60 prompts
   (the 20 chat prompts of tests/data/chat_prompts.jsonl and 40 short questions made here), greedy,
   up to 64 new tokens, top-K 16, with its hidden states after layer 15 and after the final norm (30).
2. One student init: Llama, 4 layers of width 256, the teacher's tokenizer (≈15.7M parameters, most
   of them the tied embeddings).
3. The same training run for each variant (`--steps`, batch 4, lr 1e-3 cosine, 1 thread, the same
   seed and batches), with `--hidden-map 2:15,4:30 --hidden-weight 1` and `--hidden-loss` mse |
   cosine | standardized_mse, and one run without hidden matching.
4. On the held-out records (eval fraction 0.2, at least 8 records): kd_loss (forward KL on the K + 1
   buckets) and top-1 agreement with the teacher; from the training log: the hidden and KD terms at
   the first logging step, the largest gradient norm, and the hidden term's share of the gradient.

    python bench/hidden_loss.py                     # ~10 min on 2 shared CPU cores
    python bench/hidden_loss.py --steps 40          # a quick look

The store and the init stay in `--workdir` between runs. Results: a markdown table on stdout and
`--json FILE`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VARIANTS = ("none", "mse", "cosine", "standardized_mse")
HIDDEN_MAP = "2:15,4:30"


def questions() -> list[dict[str, Any]]:
    """40 short prompts: arithmetic, facts, definitions and small writing tasks (deterministic)."""
    items = ["a river", "the moon", "a library", "autumn leaves", "a bicycle", "the ocean", "a volcano", "bread"]
    rows: list[dict[str, Any]] = []
    for i in range(12):
        a, b = 7 + 5 * i, 3 + 4 * i
        rows.append({"id": f"sum-{i}", "prompt": f"What is {a} plus {b}?"})
    for i in range(8):
        rows.append({"id": f"describe-{i}", "prompt": f"Describe {items[i]} in two sentences."})
    for i in range(8):
        rows.append({"id": f"why-{i}", "prompt": f"Explain briefly why {items[i]} matters to people."})
    for i in range(12):
        a, b = 4 + i, 3 + (i % 5)
        rows.append({"id": f"times-{i}", "prompt": f"A box holds {a} pencils. How many pencils are in {b} boxes?"})
    return rows


def teacher_path(given: str | None) -> str:
    if given:
        return given
    from common import fetch_real_teacher

    return fetch_real_teacher().folder


def build_store(teacher: str, workdir: str) -> str:
    from potstill.teacher_gen.config import GenerateConfig
    from potstill.teacher_gen.runner import generate

    store = os.path.join(workdir, "smollm2.store")
    if os.path.isfile(os.path.join(store, "manifest.json")) and os.path.isfile(os.path.join(workdir, "store.done")):
        return store
    with open(os.path.join(ROOT, "tests", "data", "chat_prompts.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()] + questions()
    prompts = os.path.join(workdir, "prompts.jsonl")
    with open(prompts, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    summary = generate(GenerateConfig.build(
        teacher=teacher, prompts=prompts, store=store, mode="generate", max_new_tokens=64, sampling_temperature=0.0,
        targets="topk", top_k=16, hidden_layers=[15, 30], device="cpu", dtype="float32", progress=False,
    ))
    print(f"store: {summary.records} records, {summary.tokens} tokens in {summary.seconds:.0f} s", file=sys.stderr)
    open(os.path.join(workdir, "store.done"), "w").close()
    return store


def build_init(teacher: str, workdir: str) -> str:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    init = os.path.join(workdir, "student-init")
    if os.path.isfile(os.path.join(init, "config.json")):
        return init
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=49152, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )).save_pretrained(init)
    AutoTokenizer.from_pretrained(teacher).save_pretrained(init)
    return init


def run_variant(variant: str, store: str, init: str, workdir: str, steps: int, seed: int = 0) -> dict[str, Any]:
    from potstill.student_train import TrainConfig, evaluate, train

    out = os.path.join(workdir, f"student-{variant}")
    if os.path.isdir(out):
        import shutil

        shutil.rmtree(out)
    hidden = {} if variant == "none" else {"hidden_map": HIDDEN_MAP, "hidden_loss": variant, "hidden_weight": 1.0}
    started = time.time()
    report = train(TrainConfig(
        store=store, student=init, out=out, max_steps=steps, batch_size=4, lr=1e-3, lr_scheduler="cosine",
        warmup_steps=steps // 10, eval_fraction=0.2, report_to="none", num_workers=0, save_steps=10 * steps,
        logging_steps=10, eval_max_records=0, eval_max_new_tokens=1, seed=seed, **hidden,
    ).validate())
    seconds = time.time() - started
    metrics = evaluate(store, out, eval_fraction=0.2, answers=False)
    curve = report["loss_curve"]
    first = curve[0]
    return {
        "variant": variant,
        "seed": seed,
        "kd_loss": metrics["kd_loss"],
        "top1_agreement": metrics["top1_agreement"],
        "eval_records": metrics["records"],
        "first_log": {k: first.get(k) for k in ("step", "kd", "hidden", "grad_norm", "grad_share/kd", "grad_share/hidden")},
        "max_grad_norm": max(e.get("grad_norm", 0.0) for e in curve),
        "mean_grad_share_hidden": (sum(e.get("grad_share/hidden", 0.0) for e in curve) / len(curve)) if hidden else None,
        "train_seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", help="GGUF file or model folder of SmolLM2-135M-Instruct (default: the tests' copy)")
    parser.add_argument("--workdir", default=os.path.join(os.path.expanduser("~"), ".cache", "potstill", "bench-hidden-loss"))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seeds", default="0", help="training seeds (batch order), comma-separated; one row each")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    os.makedirs(args.workdir, exist_ok=True)
    teacher = teacher_path(args.teacher)
    store = build_store(teacher, args.workdir)
    init = build_init(teacher, args.workdir)
    results = []
    for seed in (int(x) for x in args.seeds.split(",")):
        for variant in args.variants.split(","):
            result = run_variant(variant, store, init, args.workdir, args.steps, seed)
            print(json.dumps(result), file=sys.stderr, flush=True)
            results.append(result)
    print(f"\n{args.steps} steps, hidden map {HIDDEN_MAP}, weight 1, held-out records: {results[0]['eval_records']}\n")
    print("| --hidden-loss | seed | held-out kd_loss | top-1 agreement | hidden / kd at step 10 | largest grad norm | hidden's grad share (mean) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        f = r["first_log"]
        ratio = f"{f['hidden']:.4g} / {f['kd']:.3g}" if f.get("hidden") is not None else f"— / {f['kd']:.3g}"
        share = f"{r['mean_grad_share_hidden']:.3f}" if r["mean_grad_share_hidden"] is not None else "—"
        name = "(no hidden matching)" if r["variant"] == "none" else r["variant"]
        print(f"| {name} | {r['seed']} | {r['kd_loss']:.3f} | {r['top1_agreement']:.3f} | {ratio} | {r['max_grad_norm']:.4g} | {share} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"steps": args.steps, "hidden_map": HIDDEN_MAP, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
