"""Teacher generation: run a teacher over prompts and fill a store (`potstill generate`).

    from potstill.teacher_gen import GenerateConfig, generate
    summary = generate(GenerateConfig.build(teacher="...", prompts="p.jsonl", store="run.store"))

`GenerateConfig` is light to import; `generate` (torch, transformers) is imported on first use.
"""

from __future__ import annotations

from typing import Any

from potstill.teacher_gen.config import GenerateConfig
from potstill.teacher_gen.errors import GenerateError, InputError, TooManyInputErrors

__all__ = ["GenerateConfig", "GenerateError", "GenerateSummary", "InputError", "Progress", "TooManyInputErrors",
           "generate"]


def __getattr__(name: str) -> Any:
    if name in ("generate", "GenerateSummary", "Progress"):
        from potstill.teacher_gen import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'teacher_gen' has no attribute {name!r}")
