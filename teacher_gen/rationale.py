"""Chain-of-thought prompting and splitting a teacher's output into rationale and answer."""

from __future__ import annotations

import re
from functools import lru_cache

DEFAULT_RATIONALE_TEMPLATE = (
    "{prompt}\n\n"
    "Let's think step by step. Explain your reasoning, then end with a final line of the form "
    '"The answer is X".'
)

# The last "The answer is X" (or "final answer is", "answer:") or GSM8K-style "#### X" line.
DEFAULT_ANSWER_PATTERN = (
    r"(?:[Tt]he (?:final )?answer is|[Ff]inal [Aa]nswer:|####)\s*:?\s*(?P<answer>[^\n]*)"
)


def apply_template(template: str, prompt: str) -> str:
    # str.replace, not str.format: prompts are full of braces (code, JSON, LaTeX).
    return template.replace("{prompt}", prompt)


@lru_cache(maxsize=16)
def compile_pattern(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def split_rationale(text: str, pattern: str = DEFAULT_ANSWER_PATTERN) -> tuple[str, str | None]:
    """(rationale, answer): the text before the last answer match, and the answer it names.

    The answer is the pattern's `answer` group (else its first group, else the whole match),
    stripped of spaces, a trailing period and markdown bold. With no match the whole text is the
    rationale and the answer is None.
    """
    regex = compile_pattern(pattern)
    m = None
    pos = 0
    # The last match, overlaps allowed: "the answer is 3? No, the answer is 5" answers 5.
    while (found := regex.search(text, pos)) is not None:
        m = found
        pos = found.start() + 1
    if m is None:
        return text.strip(), None
    if "answer" in m.re.groupindex:
        answer = m.group("answer")
    elif m.re.groups:
        answer = m.group(1)
    else:
        answer = m.group(0)
    answer = (answer or "").strip().rstrip(".").strip().strip("*").strip().rstrip(".").strip()
    return text[: m.start()].strip(), answer or None
