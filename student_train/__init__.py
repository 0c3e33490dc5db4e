"""Student training: stream a store into a student with sparse KD losses (docs/guides/train.md).

Heavy modules (torch, transformers) load on first use of `train` / `evaluate`.
"""

from __future__ import annotations

from typing import Any

from potstill.student_train.config import TrainConfig, build_config
from potstill.student_train.errors import CompatibilityError, ConfigError, TrainError


def train(config: TrainConfig, callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Train a student from a store; returns the training report (see student_train.trainer.train)."""
    from potstill.student_train.trainer import train as _train

    return _train(config, callbacks)


def evaluate(store: Any, model_dir: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """Evaluate a student on a store's held-out records (see student_train.evaluation.evaluate)."""
    from potstill.student_train.evaluation import evaluate as _evaluate

    return _evaluate(store, model_dir, **kwargs)


__all__ = ["CompatibilityError", "ConfigError", "TrainConfig", "TrainError", "build_config", "evaluate", "train"]
