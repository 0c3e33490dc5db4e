"""Errors a user can cause. Each carries a one-line message that names the store, shard,
record or file and what is wrong; the CLI prints it without a traceback."""

from __future__ import annotations


class PotstillError(Exception):
    """Base class for every error potstill reports to a user as one line."""


class StoreError(PotstillError):
    """A store is missing, malformed, corrupted, or used in a way its format does not allow."""


class FormatVersionError(StoreError):
    """The store (or one of its shards) was written by a newer major format version."""
