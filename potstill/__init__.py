"""potstill: offline, two-phase knowledge distillation for LLMs.

A teacher runs once and writes what it knows into a store (`potstill.store`, `potstill.teacher_gen`);
students train from that store later without the teacher (`potstill.student_train`). The
`potstill` command is `potstill.cli`.
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("potstill")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+source"

__all__ = ["__version__"]
