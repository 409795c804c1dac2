"""Errors that carry the CLI exit code they map to (see DESIGN.md, "Exit codes")."""

from __future__ import annotations

EXIT_USAGE = 2
EXIT_BAD_MODEL = 3
EXIT_INFEASIBLE = 4
EXIT_VALIDATION = 5


class AldsError(Exception):
    """Base class: ``str(err)`` is one sentence meant for the user."""

    exit_code = 1


class UsageError(AldsError):
    exit_code = EXIT_USAGE


class ModelError(AldsError):
    """The model file is missing, unreadable or invalid."""

    exit_code = EXIT_BAD_MODEL


class InfeasibleBudget(AldsError):
    exit_code = EXIT_INFEASIBLE

    def __init__(self, message: str, smallest_fraction: float):
        super().__init__(message)
        self.smallest_fraction = smallest_fraction


class ValidationFailed(AldsError):
    exit_code = EXIT_VALIDATION


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's text (its type's name when it has none), for a one-sentence
    error that names what a library said."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]
