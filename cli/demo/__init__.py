"""`potstill demo`: the whole two-phase story on a built-in arithmetic task, offline, on a CPU."""
