"""Errors that describe a user's mistake (bad config, bad file, bad option), not a bug.

Every one names what is wrong in ``field`` (a config field such as ``search.lr``, a
command-line option such as ``--out``, or a file and line) and says what to do in
``problem``. The CLI prints ``error: <field>: <problem>`` and exits with status 2.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user, with the ``field`` it concerns.

    ``UserError("search.lr", "must be > 0, got -1")``. Given one string, the part before
    the first ``": "`` is taken as the field (``UserError("--out: exists")``).
    """

    def __init__(self, field: str, problem: str | None = None) -> None:
        if problem is None:
            field, _, problem = field.partition(": ") if ": " in field else ("", "", field)
        self.field = str(field)
        self.problem = problem
        super().__init__(f"{self.field}: {problem}" if self.field else problem)


class ConfigError(UserError, ValueError):
    """A configuration field holds a value that cannot be used (alone or with the others)."""


class UnsupportedBackboneError(ConfigError):
    """The model family has no backbone adapter."""


class MissingHeadError(ConfigError):
    """A verbalizer needs the backbone's trained LM head, and the checkpoint has none."""

    def __init__(self, field: str, problem: str, detail: str) -> None:
        super().__init__(field, problem)
        self.detail = detail  # which head weights are missing, for messages that name another field
