"""What the benches that compare with MosaicML Streaming need to run in its environment.

mosaicml-streaming lives in an environment of its own (installed plainly it replaces torch with a
CUDA build), where potstill may be installed from elsewhere or not at all. `import_this_checkout`
makes `import potstill` load this repository's code there; `streaming` imports mosaicml-streaming
without its image datasets.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import tomllib
import types
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_this_checkout() -> None:
    """Map the `potstill` packages to this checkout (pyproject's package-dir) ahead of any installed copy."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        mapping = tomllib.load(f)["tool"]["setuptools"]["package-dir"]

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
            if name not in mapping:
                return None
            folder = os.path.join(ROOT, mapping[name])
            return importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"),
                                                          submodule_search_locations=[folder])

    sys.meta_path.insert(0, Finder())


def streaming() -> Any:
    """mosaicml-streaming (None where it is not installed), without its image datasets
    (`streaming.vision`): they import torchvision, which fails to load in an environment whose
    torchvision was built for another torch."""
    if importlib.util.find_spec("streaming") is None:
        return None
    if "streaming" not in sys.modules:
        sys.modules.setdefault("streaming.vision", types.ModuleType("streaming.vision"))
    import streaming as mds

    return mds
