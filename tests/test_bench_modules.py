"""Every benchmark script imports: a bench that names a helper the project renamed fails here, not
half an hour into its run."""

from __future__ import annotations

import importlib
import os

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
MODULES = sorted(name[:-3] for name in os.listdir(BENCH) if name.endswith(".py"))


@pytest.mark.parametrize("module", MODULES)
def test_bench_module_imports(module: str) -> None:
    importlib.import_module(module)
