"""Errors of teacher generation.

Two kinds: `GenerateError` stops a run (bad flags, a teacher that cannot be loaded, too many bad
inputs) and is printed as one line by the CLI; `InputError` is one bad input row, collected and
reported, never fatal on its own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from potstill.store.errors import PotstillError


class GenerateError(PotstillError):
    """A run cannot start or go on: wrong settings, an unusable teacher or prompt file."""


@dataclass
class InputError:
    """One input that was skipped: where it is (line/row number and id when known) and why."""

    line: int | None
    id: str | None
    reason: str

    @property
    def where(self) -> str:
        parts = []
        if self.line is not None:
            parts.append(f"line {self.line}")
        if self.id is not None:
            parts.append(f"id {self.id!r}")
        return ", ".join(parts) or "input"

    @property
    def key(self) -> str:
        """What decides which worker reports this error (its id, else its line)."""
        return self.id if self.id is not None else f"line:{self.line}"

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"

    def to_dict(self) -> dict:
        return asdict(self)


class TooManyInputErrors(GenerateError):
    """More bad inputs than `--max-errors` allows."""

    def __init__(self, errors: list[InputError], limit: int) -> None:
        self.errors = errors
        super().__init__(
            f"{len(errors)} bad inputs, more than --max-errors {limit}; first: {errors[0]}"
        )


def describe_load_error(e: BaseException) -> str:
    """The first line of a loading error from transformers, with the flag that fixes remote code."""
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    if "custom code" in text or "trust_remote_code" in text:
        first += " Pass --trust-remote-code to allow running it."
    return first
