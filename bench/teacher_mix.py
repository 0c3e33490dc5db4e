"""The error of mixing top-k teachers (student_train/teachers.py `mix_topk`) against the float64
mixture of their full distributions.

Each case draws T teachers' full distributions over V tokens (random logits: a part the teachers
share plus a part of their own, scaled by `sharpness`), keeps each one's top-K with its tail mass as
a store does, mixes them by the stated rule, and compares, at several temperatures:

- moved: the mass the rule puts in the tail bucket that the exact mixture has on the union's ids
  (the total-variation distance between the rule's buckets and the exact mixture's on the same buckets);
- bucket_err: |loss(rule buckets) − loss(exact mixture on the same buckets)| / the latter: the error
  the mixing rule adds, forward KL as training computes it (float32);
- full_err: |loss(rule buckets) − T² KL(P_T ‖ q_T) over the full vocabulary| / the latter (float64):
  the rule and the bucketing together (a single top-k teacher has the bucketing part too: single_err).

    python bench/teacher_mix.py            # the table in docs/guides/train.md
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from potstill.store.targets import TopKRows
from potstill.student_train.losses import sparse_kd
from potstill.student_train.teachers import mix_topk


def full_kl(p: np.ndarray, z: np.ndarray, temperature: float) -> np.ndarray:
    """T² KL(p_T ‖ softmax(z / T)) per row, float64, over the full vocabulary (p_T ∝ p^{1/T})."""
    lp = np.log(p) / temperature
    lp -= np.logaddexp.reduce(lp, axis=-1, keepdims=True)
    lq = z / temperature - np.logaddexp.reduce(z / temperature, axis=-1, keepdims=True)
    return temperature**2 * (np.exp(lp) * (lp - lq)).sum(-1)


def topk_rows(p: np.ndarray, k: int) -> TopKRows:
    """A store's top-k rows of full distributions p [S, V] (float64 log-probs kept as float32)."""
    order = np.argsort(-p, axis=-1, kind="stable")
    ids = order[:, :k]
    top = np.take_along_axis(p, ids, -1)
    tail = np.take_along_axis(p, order[:, k:], -1).sum(-1)  # summed directly, as a store's direct tail is
    with np.errstate(divide="ignore"):
        return TopKRows(ids.astype(np.int32), np.log(top).astype(np.float32), np.zeros(len(p), np.float32),
                        np.log(tail).astype(np.float32))


def bucket_loss(z: np.ndarray, rows: TopKRows, temperature: float) -> np.ndarray:
    """The training loss (float32, forward KL on the K + 1 buckets) of student logits z against rows."""
    return sparse_kd(torch.from_numpy(z.astype(np.float32)), torch.from_numpy(rows.ids.astype(np.int64)),
                     torch.from_numpy(rows.logprobs), torch.from_numpy(rows.tail_logprob),
                     temperature=temperature).double().numpy()


def exact_on_buckets(mixed: TopKRows, p: np.ndarray) -> TopKRows:
    """The exact mixture p on the same buckets as `mixed` (its ids, the rest as the tail)."""
    ids = mixed.ids.astype(np.int64)
    on = np.where(ids >= 0, np.take_along_axis(p, ids.clip(min=0), -1), 0.0)
    with np.errstate(divide="ignore"):
        return TopKRows(mixed.ids, np.where(ids >= 0, np.log(on), -np.inf).astype(np.float32), mixed.token_logprob,
                        np.log(np.clip(1.0 - on.sum(-1), 0.0, None)).astype(np.float32))


def measure(vocab: int, k: int, teachers: int, temperature: float, *, sharpness: float = 3.0, shared: float = 0.5,
            rows: int = 256, seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    common = rng.standard_normal((rows, vocab))
    weights = rng.dirichlet(np.ones(teachers))
    ps = []
    for _ in range(teachers):
        logits = sharpness * (np.sqrt(shared) * common + np.sqrt(1 - shared) * rng.standard_normal((rows, vocab)))
        ps.append(np.exp(logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)))
    p = sum(w * q for w, q in zip(weights, ps, strict=True))
    z = sharpness * rng.standard_normal((rows, vocab))
    parts = [(topk_rows(q, k), np.full(rows, w)) for q, w in zip(ps, weights, strict=True)]
    mixed = mix_topk(parts, k * teachers)
    exact = exact_on_buckets(mixed, p)
    rule_loss, exact_loss, reference = bucket_loss(z, mixed, temperature), bucket_loss(z, exact, temperature), full_kl(p, z, temperature)
    single = bucket_loss(z, topk_rows(ps[0], k), temperature)
    moved = np.exp(mixed.tail_logprob.astype(np.float64)) - np.exp(exact.tail_logprob.astype(np.float64))
    return {
        "vocab": vocab, "k": k, "teachers": teachers, "temperature": temperature,
        "moved_mean": float(moved.mean()), "moved_max": float(moved.max()),
        "bucket_err": float(np.abs(rule_loss.mean() - exact_loss.mean()) / exact_loss.mean()),
        "full_err": float(np.abs(rule_loss.mean() - reference.mean()) / reference.mean()),
        "single_err": float(np.abs(single.mean() - full_kl(ps[0], z, temperature).mean()) / full_kl(ps[0], z, temperature).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = [measure(args.vocab, k, n, t) for n in (2, 3) for k in (8, 64) for t in (0.5, 1.0, 2.0, 4.0)]
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print("| teachers | K | T | moved mass (mean / max) | rule vs exact mixture on the buckets | vs full mixture | one teacher vs its full |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['teachers']} | {r['k']} | {r['temperature']} | {r['moved_mean']:.4f} / {r['moved_max']:.4f} | "
              f"{r['bucket_err']:.2%} | {r['full_err']:.2%} | {r['single_err']:.2%} |")


if __name__ == "__main__":
    main()
