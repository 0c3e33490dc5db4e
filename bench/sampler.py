"""Cost of the sampled-target sampler: the float64 inverse CDF (format 2.x, docs/reference/store-format.md §4.2)
against the fp32 one it replaced, on the same chunk of logits, in the same run.

A chunk of `--rows` positions of bfloat16 logits shaped like a teacher's (a bulk of spread 2, a few
tokens 15-30 above it) is sampled `--samples` times per position by both, in turn, `--rounds`
times; the medians and the median ratio of the rounds are printed as JSON (also written to --out,
or $OUT/sampler.json when $OUT is set). It also reports how far each is from the exact
distribution: the total variation between p and the distribution its running sum implies.

    python bench/sampler.py                                     # 1024 positions x 128,256 ids, N = 50
    python bench/sampler.py --device cuda --vocab 152064
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time

import numpy as np
import torch

from potstill.teacher_gen.capture import SAMPLE_BLOCK_ELEMENTS, sample_chunk, sampling_cdf


def fp32_sample_chunk(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Format 2.0's sampler, kept here only to measure against: inverse CDF over an fp32 running sum."""
    x = logits.float()
    cdf = torch.cumsum((x - torch.logsumexp(x, -1, keepdim=True)).exp_(), dim=-1)
    total = cdf[:, -1:]
    points = (uniforms.to(cdf.device, torch.float64) * total.double()).to(torch.float32)
    points = torch.minimum(points, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, points.contiguous(), right=True).to(torch.int32)


def teacher_logits(rows: int, vocab: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, vocab, generator=g) * 2.0
    peaks = torch.randint(0, vocab, (rows, 6), generator=g)
    x.scatter_(-1, peaks, torch.tensor([30.0, 27.0, 25.0, 22.0, 19.0, 15.0]).expand(rows, 6))
    return x.to(torch.bfloat16).to(device)


def total_variation(cdf: torch.Tensor, logits: torch.Tensor) -> float:
    """Largest TV over the rows between the distribution `cdf` implies and the exact p (fsum-normalised)."""
    c = cdf.double().cpu().numpy()
    implied = np.diff(c, axis=-1, prepend=0.0) / c[:, -1:]
    worst = 0.0
    for r, row in enumerate(logits.float().double().cpu().numpy()):
        e = np.exp(row - row.max())
        worst = max(worst, 0.5 * float(np.abs(implied[r] - e / math.fsum(e)).sum()))
    return worst


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1024, help="positions in the chunk (the capture's default chunk)")
    p.add_argument("--vocab", type=int, default=128_256)
    p.add_argument("--samples", type=int, default=50, help="draws per position")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    logits = teacher_logits(args.rows, args.vocab, device)
    uniforms = torch.from_numpy(np.random.default_rng(1).random((args.rows, args.samples))).to(device)

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    contenders = {"float64": lambda: sample_chunk(logits, uniforms), "fp32": lambda: fp32_sample_chunk(logits, uniforms)}
    for fn in contenders.values():
        fn()  # warm up
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, fn in contenders.items():
            seconds[name].append(timed(fn))
    x = logits[:8].float()
    cdf32 = torch.cumsum(torch.exp(x - torch.logsumexp(x, -1, keepdim=True)), -1)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "rows": args.rows, "vocab": args.vocab, "samples": args.samples, "rounds": args.rounds,
        "block_rows": max(1, SAMPLE_BLOCK_ELEMENTS // args.vocab),
        "float64_ms": round(1000 * float(np.median(seconds["float64"])), 2),
        "fp32_ms": round(1000 * float(np.median(seconds["fp32"])), 2),
        "float64_over_fp32": round(float(np.median([a / b for a, b in zip(seconds["float64"], seconds["fp32"], strict=True)])), 3),
        "float64_positions_per_s": round(args.rows / float(np.median(seconds["float64"]))),
        "float64_tv_max": total_variation(sampling_cdf(logits[:8]), logits[:8]),
        "fp32_tv_max": total_variation(cdf32, logits[:8]),
    }
    text = json.dumps(result, indent=1)
    print(text)
    out = args.out or (os.path.join(os.environ["OUT"], "sampler.json") if os.environ.get("OUT") else None)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
