"""A model folder written whole or not at all (a student made from a teacher, a converted GGUF file)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable


def write_folder(out: str, fill: Callable[[str], None], prefix: str) -> str:
    """Let `fill` write a new folder next to `out`, then rename it into place: a reader (or a run
    killed halfway) never sees a part of it. An empty folder at `out` is replaced; what `fill`
    wrote is removed when it fails."""
    parent = os.path.dirname(os.path.abspath(out)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the folder is an ordinary model folder
    try:
        fill(tmp)
        if os.path.isdir(out):
            os.rmdir(out)  # (only an empty one: the rename needs the name free)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
