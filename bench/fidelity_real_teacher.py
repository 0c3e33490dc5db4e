"""Fidelity bench, `--real-teacher DIR`: no training; each sampled kind's error E‖p̂ − p‖² against a
real teacher's exact distributions on held-out text, with its packed and compact bytes (the
gradient error any student's logits get)."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
import torch
from fidelity_common import STORES, Run, blocks_of, figure, pm, say
from fidelity_gradient import GRAD_REPEATS


# -- a real teacher's targets -------------------------------------------------------------------------
@torch.no_grad()
def real_teacher_variance(model_dir: str, texts: list[str], blocks: int, seq: int, repeats: int, variants: list[str],
                          seed: int = 0) -> list[dict[str, Any]]:
    """Per sampled variant, on a real teacher's distributions over held-out text: the distinct ids per
    position, the packed target bytes per token (the codec's bit widths, without the per-record
    padding to whole bytes), and E‖p̂ − p‖² per position, p̂ the variant's weights as the loader makes
    them, p the exact float64 distribution. With Σ p̂ = 1 that is E‖∇_z L̂ − ∇_z KL(p ‖ softmax z)‖²,
    the error of the gradient any student's logits get from the targets: no student needed. `seed` picks
    the held-out blocks and the uniforms."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from potstill.store.codec import (
        IdOrder,
        bits_for,
        encode_sampled_compact,
        sampled_from_draws,
    )
    from potstill.student_train.data import hybrid_weights
    from potstill.teacher_gen.capture import logit_transform, topk_logprobs

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    transform = logit_transform(model.config)
    every_block = blocks_of(texts, tokenizer, seq)
    data = every_block[np.random.default_rng(seed).permutation(len(every_block))[:blocks]]
    head = model.get_output_embeddings()
    vocab = head.weight.shape[0]
    id_bits, lp_bits = bits_for(vocab - 1), 12
    # the compact codec's id order, as `potstill generate` makes it from the text it scores: here, all the held-out text
    order = IdOrder(IdOrder.from_tokens(list(every_block)), vocab=1 << id_bits)
    sums = {v: {"sq_error": 0.0, "entries": 0, "bits": 0.0, "compact_bits": 0.0} for v in variants}
    positions = 0
    for b, block in enumerate(data):
        x = torch.from_numpy(block[None])
        hidden = model.model(input_ids=x).last_hidden_state[0, :-1]
        logits = head(hidden).float()
        p = torch.softmax((transform(logits) if transform else logits).double(), -1)
        targets = x[0, 1:]
        positions += len(targets)
        for variant in variants:
            settings = STORES[variant]
            n = settings["samples"]
            k = settings.get("top_k", 0) if settings["targets"] == "hybrid" else 0
            for r in range(repeats):
                uniforms = torch.from_numpy(np.random.default_rng([seed, b, r, 99]).random((len(targets), n)))
                draws = torch.empty(uniforms.shape, dtype=torch.int32)
                ids, lp, _, tail = topk_logprobs(hidden, head, targets, k, uniforms=uniforms, draws_out=draws,
                                                 transform=transform, sampler=settings.get("sampler", "iid"),
                                                 draw_from_rest=k > 0)
                sampled = sampled_from_draws(draws.numpy())
                rows = np.arange(len(targets))
                if k:
                    w_ids, w = hybrid_weights(ids.numpy(), lp.float().numpy(), tail.numpy(), sampled, rows)
                else:
                    w_ids, counts = sampled.padded(rows)
                    w = counts / n
                dense = torch.zeros_like(p)
                valid = w_ids >= 0
                dense.index_put_((torch.from_numpy(np.nonzero(valid)[0]), torch.from_numpy(w_ids[valid])),
                                 torch.from_numpy(w[valid].astype(np.float64)), accumulate=True)
                s = sums[variant]
                s["sq_error"] += (dense - p).square().sum().item() / repeats
                s["entries"] += sampled.num_entries / repeats
                # packed: token log-prob; top-k ids + log-probs + float32 log tail; draws' ids + counts
                fixed = len(targets) * (lp_bits + (k * (id_bits + lp_bits) + 32 if k else 0))
                s["bits"] += (fixed + sampled.num_entries * (id_bits + bits_for(n))) / repeats
                # compact: the draws' two streams as the codec writes them for this block (one record)
                s["compact_bits"] += (fixed + 8 * sum(map(len, encode_sampled_compact(sampled, order)))) / repeats
        say(f"real teacher: block {b + 1}/{len(data)}")
    return [{"variant": v, "distinct_ids_per_position": s["entries"] / positions,
             "packed_target_bytes_per_token": s["bits"] / 8 / positions,
             "compact_target_bytes_per_token": s["compact_bits"] / 8 / positions, "grad_sq_error": s["sq_error"] / positions,
             "positions": positions} for v, s in sums.items()]


def real_teacher_table(runs: list[list[dict[str, Any]]]) -> str:
    """Mean ± standard deviation over seeds (held-out blocks and uniforms) of `real_teacher_variance`."""
    base = [next(r["grad_sq_error"] for r in rows if r["variant"] == "sampled12") for rows in runs]
    lines = ["| targets | packed target B/scored token | compact target B/scored token | "
             "distinct ids per position | E‖p̂ − p‖² per position | vs sampled12 (i.i.d.) |",
             "|---|---:|---:|---:|---:|---:|"]
    for i, first in enumerate(runs[0]):
        rows = [run[i] for run in runs]
        lines.append(f"| {first['variant']} | {pm([r['packed_target_bytes_per_token'] for r in rows])} | "
                     f"{pm([r.get('compact_target_bytes_per_token', math.nan) for r in rows])} | "
                     f"{pm([r['distinct_ids_per_position'] for r in rows], fmt='.2f')} | "
                     f"{pm([r['grad_sq_error'] for r in rows], fmt='.5f')} | "
                     f"{pm([r['grad_sq_error'] / b for r, b in zip(rows, base, strict=True)], fmt='.3f')} |")
    return "\n".join(lines)


def plot_real(runs: list[list[dict[str, Any]]], folder: str, teacher: str) -> None:
    """docs/images/fidelity-real-teacher.png: each sampled variant's target error against its packed bytes."""
    with figure(folder, "fidelity-real-teacher.png") as ax:
        for i, first in enumerate(runs[0]):
            rows = [run[i] for run in runs]
            x = np.mean([r["packed_target_bytes_per_token"] for r in rows])
            y = [r["grad_sq_error"] for r in rows]
            ax.errorbar(x, np.mean(y), yerr=np.std(y, ddof=1) if len(y) > 1 else 0, marker="o", capsize=3,
                        label=first["variant"])
        ax.axvline(40, color="grey", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_xlabel("packed target bytes per token")
        ax.set_ylabel("E‖p̂ − p‖² per position")
        ax.set_title(f"Sampled targets of {teacher}: error against bytes")


def run_real_teacher(run: Run, held_texts: list[str]) -> None:
    """`--real-teacher DIR`: the target error of every sampled kind, over `--seeds` (default 2) seeds."""
    args = run.args
    real = [real_teacher_variance(args.real_teacher, held_texts, args.real_blocks, args.real_seq, repeats=GRAD_REPEATS,
                                  variants=[v for v in STORES if STORES[v]["targets"] != "topk"], seed=seed)
            for seed in range(args.seeds or 2)]
    print(real_teacher_table(real))
    if args.plots:
        plot_real(real, args.plots, os.path.basename(args.real_teacher.rstrip("/")))
    say(f"done in {run.minutes():.1f} min")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"real_teacher": os.path.basename(args.real_teacher.rstrip("/")), "blocks": args.real_blocks,
                       "seq": args.real_seq, "repeats": GRAD_REPEATS, "runs": real}, f, indent=2)
