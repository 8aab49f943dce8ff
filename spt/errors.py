"""Errors that describe a user's mistake (bad config, bad file), not a bug.

The CLI turns every :class:`UserError` into one message and exit status 2.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: the message says what is wrong and how to fix it."""


class ConfigError(UserError, ValueError):
    """A configuration field holds a value that cannot be used."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")


class UnsupportedBackboneError(UserError, ValueError):
    """The model family has no backbone adapter."""
