"""The start-up phases of a long command (`generate`, `train`), named on stderr as they begin.

Loading a teacher or a student can take a minute before any progress shows; each phase is one
line, written when it begins and completed with its duration when it ends, so a user sees what
is running and what took the time. The durations are kept for the command's summary.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import TextIO


class Phases:
    """One command's start-up phases, in order; `show=False` times them without printing (--no-progress)."""

    def __init__(self, show: bool = True, stream: TextIO | None = None) -> None:
        self.show = show
        self.stream = stream
        self.seconds: dict[str, float] = {}
        self._current: tuple[str, float] | None = None

    def begin(self, name: str) -> None:
        """Start phase `name`, ending the one under way."""
        self.end()
        self._current = (name, time.perf_counter())
        self._write(f"{name} ... ")

    def end(self, failed: bool = False) -> None:
        """End the phase under way (if any) and complete its line with how long it took."""
        if self._current is None:
            return
        name, started = self._current
        self._current = None
        took = time.perf_counter() - started
        self.seconds[name] = self.seconds.get(name, 0.0) + took
        self._write(f"{'failed after ' if failed else ''}{took:.1f} s\n")

    @property
    def running(self) -> bool:
        return self._current is not None

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.begin(name)
        try:
            yield
        except BaseException:
            self.end(failed=True)  # the error's own line then starts on a line of its own
            raise
        self.end()

    def format(self) -> str:
        """`name 1.2 s, name 0.3 s, ...` for a summary line."""
        return ", ".join(f"{name} {s:.1f} s" for name, s in self.seconds.items())

    def _write(self, text: str) -> None:
        if not self.show:
            return
        stream = self.stream or sys.stderr  # looked up late: tests and tqdm may swap sys.stderr
        stream.write(text)
        stream.flush()
