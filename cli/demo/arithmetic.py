"""The demo's synthetic task: multi-digit addition, solved digit by digit with a worked rationale.

A small model that writes the carries out step by step learns this quickly; one that must emit
the sum directly does not — which is what makes rationale distillation pay off visibly.
"""

from __future__ import annotations

import random
import re

COT_TRIGGER = "Let's think step by step.\n"
ANSWER_RE = re.compile(r"The answer is (-?\d+)")


def problems(seed: int, count: int, digits: int = 4, exclude: set[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
    """`count` distinct (a, b) pairs of `digits`-digit numbers, none of them in `exclude`."""
    rng = random.Random(seed)
    lo, hi = 10 ** (digits - 1), 10**digits
    out: list[tuple[int, int]] = []
    seen = set(exclude or ())
    while len(out) < count:
        pair = (rng.randrange(lo, hi), rng.randrange(lo, hi))
        if pair not in seen:
            seen.add(pair)
            out.append(pair)
    return out


def question(a: int, b: int) -> str:
    return f"What is {a} + {b}?\n"


def rationale(a: int, b: int) -> str:
    """Column addition from the ones digit up, one line per column, carries written out."""
    xs, ys = str(a)[::-1], str(b)[::-1]
    carry, lines = 0, []
    for i in range(max(len(xs), len(ys))):
        x = int(xs[i]) if i < len(xs) else 0
        y = int(ys[i]) if i < len(ys) else 0
        total = x + y + carry
        lines.append(f"{x}+{y}+{carry}={total}, write {total % 10} carry {total // 10}.")
        carry = total // 10
    return "\n".join(lines) + "\n"


def answer_text(a: int, b: int) -> str:
    return f"The answer is {a + b}."


def worked_solution(a: int, b: int) -> str:
    return rationale(a, b) + answer_text(a, b)


def parse_answer(text: str) -> int | None:
    m = ANSWER_RE.search(text)
    return int(m.group(1)) if m else None
