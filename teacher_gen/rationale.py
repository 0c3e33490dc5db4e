"""Chain-of-thought prompting and splitting a teacher's output into rationale and answer."""

from __future__ import annotations

import re
from functools import lru_cache

from potstill.teacher_gen.errors import GenerateError

DEFAULT_RATIONALE_TEMPLATE = (
    "{prompt}\n\n"
    "Let's think step by step. Explain your reasoning, then end with a final line of the form "
    '"The answer is X".'
)

# "The answer is X" (or "The final answer is X", "Final answer: X") or GSM8K-style "#### X". The
# answer runs to the end of its sentence (a period, comma, semicolon, ! or ? followed by a space, or
# the end of the line), and is never the literal placeholder X of the prompt template: small models
# repeat the template's "The answer is X" line, which names no answer.
DEFAULT_ANSWER_PATTERN = (
    r"(?:[Tt]he (?:final )?answer is|[Ff]inal [Aa]nswer:|####)(?![ \t]*:?[ \t]*[\"'*]*X\b)[ \t]*:?[ \t]*"
    r"(?P<answer>[^\n]*?)(?=[.,;!?]?[ \t]*(?:\n|$)|[.,;!?][ \t])"
)


def apply_template(template: str, prompt: str) -> str:
    # str.replace, not str.format: prompts are full of braces (code, JSON, LaTeX).
    return template.replace("{prompt}", prompt)


def check_answer_pattern(pattern: str) -> None:
    """--answer-pattern compiles, and says which group is the answer: one named `answer`, else its only
    group (else the whole match); with several groups and no `answer`, the pick would be a guess."""
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise GenerateError(f"--answer-pattern {pattern!r} is not a valid regular expression ({e})") from None
    if regex.groups > 1 and "answer" not in regex.groupindex:
        raise GenerateError(f"--answer-pattern {pattern!r} has {regex.groups} groups and none named 'answer': "
                            "name the answer's group (?P<answer>...)")


@lru_cache(maxsize=16)
def compile_pattern(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def find_answer(text: str, pattern: str = DEFAULT_ANSWER_PATTERN, match: str = "last") -> tuple[int, str | None] | None:
    """(where the match starts, the answer it names) of the last (or first) match of `pattern` in
    `text`, overlaps allowed ("the answer is 3? No, the answer is 5": last 5, first 3); None when
    nothing matches. The answer is the pattern's `answer` group (else its first group, else the whole
    match), stripped of spaces, a trailing period and markdown bold; None when that leaves nothing."""
    regex = compile_pattern(pattern)
    m = None
    pos = 0
    while (found := regex.search(text, pos)) is not None:
        m = found
        if match == "first":
            break
        pos = found.start() + 1
    if m is None:
        return None
    if "answer" in m.re.groupindex:
        answer = m.group("answer")
    elif m.re.groups:
        answer = m.group(1)
    else:
        answer = m.group(0)
    answer = (answer or "").strip().rstrip(".").strip().strip("*").strip().rstrip(".").strip()
    return m.start(), answer or None


def split_rationale(text: str, pattern: str = DEFAULT_ANSWER_PATTERN, match: str = "last") -> tuple[str, str | None]:
    """(rationale, answer): the text before the last (`match="first"`: the first) answer match, and
    the answer it names (`find_answer`). With no match the whole text is the rationale and the answer
    is None."""
    found = find_answer(text, pattern, match)
    if found is None:
        return text.strip(), None
    start, answer = found
    return text[:start].strip(), answer
