"""Errors of student training a user can cause; each is one line (the CLI prints it as `error: ...`)."""

from __future__ import annotations

from potstill.store.errors import PotstillError


class TrainError(PotstillError):
    """A training or evaluation run cannot start or continue as asked."""


class ConfigError(TrainError):
    """A setting is missing, malformed or out of range."""


class CompatibilityError(TrainError):
    """The student does not fit the store (tokenizer, vocabulary, layers)."""
