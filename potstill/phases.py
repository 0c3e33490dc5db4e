"""The start-up phases of a long command (`generate`, `train`), named on stderr as they begin.

Loading a teacher or a student can take a minute before any progress shows; each phase is one
line, written when it begins and completed with its duration when it ends, so a user sees what
is running and what took the time. Where something else wrote to stderr meanwhile (a library's own
bar or warning), the line is written again whole with the duration. The durations are kept for the
command's summary.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import TextIO


class Phases:
    """One command's start-up phases, in order; `show=False` times them without printing (--no-progress)."""

    def __init__(self, show: bool = True) -> None:
        self.show = show
        self.seconds: dict[str, float] = {}
        self._current: tuple[str, float] | None = None
        self._watch: _Watched | None = None  # sys.stderr while a shown phase runs

    def begin(self, name: str) -> None:
        """Start phase `name`, ending the one under way."""
        self.end()
        self._current = (name, time.perf_counter())
        if self.show:
            sys.stderr.write(f"{name} ... ")
            sys.stderr.flush()
            self._watch = _Watched(sys.stderr)
            sys.stderr = self._watch

    def end(self, failed: bool = False) -> None:
        """End the phase under way (if any) and complete its line with how long it took."""
        if self._current is None:
            return
        name, started = self._current
        self._current = None
        took = time.perf_counter() - started
        self.seconds[name] = self.seconds.get(name, 0.0) + took
        watch, self._watch = self._watch, None
        if watch is None:
            return
        if sys.stderr is watch:
            sys.stderr = watch.stream
        text = f"{'failed after ' if failed else ''}{took:.1f} s\n"
        if watch.last:  # the line was broken by another writer
            text = ("" if watch.last == "\n" else "\n") + f"{name} ... {text}"
        watch.stream.write(text)
        watch.stream.flush()

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



class _Watched:
    """sys.stderr during a phase: notes what others write (warnings, a library's bar), to mend the phase's line."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.last = ""  # the last character written by another writer, "" while none was

    def write(self, text: str) -> int:
        if text:
            self.last = text[-1]
        return self.stream.write(text)

    def __getattr__(self, name: str) -> object:
        return getattr(self.stream, name)
