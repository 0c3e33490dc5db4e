"""Rounding error of stored log-probs, by range: float16 (unpacked stores) against the packed codec's
uniform quantiser (docs/reference/store-format.md §4.3), on the same values.

For each range of log-probs, 200,000 values spread uniformly over it (float32, as the capture
computes them) are rounded both ways and read back; the table gives the largest and the mean
absolute error of each, in nats, and which is smaller. Prints a Markdown table.

    python bench/quantiser_error.py                        # the defaults: 12 bits over [-24, 0]
    python bench/quantiser_error.py --bits 16 --lo -30
"""

from __future__ import annotations

import argparse

import numpy as np

from potstill.store.codec import LogprobQuantizer

RANGES = [(-0.5, 0.0), (-1.0, -0.5), (-2.0, -1.0), (-4.0, -2.0), (-8.0, -4.0), (-16.0, -8.0), (-24.0, -16.0)]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bits", type=int, default=12)
    p.add_argument("--lo", type=float, default=-24.0)
    p.add_argument("--values", type=int, default=200_000)
    args = p.parse_args(argv)
    q = LogprobQuantizer(args.bits, args.lo)
    rng = np.random.default_rng(0)
    rows = []
    print(f"{args.bits}-bit quantiser over [{args.lo}, 0]: step {q.step:.5f}, bound step/2 = {q.max_error:.5f} nats\n")
    print("| log-probs in | float16 max error | float16 mean error | packed max error | packed mean error | smaller max error |")
    print("|---|---:|---:|---:|---:|---|")
    for lo, hi in RANGES:
        x = rng.uniform(lo, hi, args.values).astype(np.float32)
        fp16 = np.abs(x.astype(np.float16).astype(np.float64) - x)
        packed = np.abs(q.decode(q.encode(x)).astype(np.float64) - x)
        row = {"range": (lo, hi), "fp16_max": fp16.max(), "fp16_mean": fp16.mean(), "packed_max": packed.max(),
               "packed_mean": packed.mean()}
        rows.append(row)
        better = "packed" if row["packed_max"] < row["fp16_max"] else "float16"
        print(f"| [{lo:g}, {hi:g}) | {row['fp16_max']:.2e} | {row['fp16_mean']:.2e} | {row['packed_max']:.2e} | "
              f"{row['packed_mean']:.2e} | {better} |")
    return rows


if __name__ == "__main__":
    main()
