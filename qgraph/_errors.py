"""Errors that qgraph raises for problems the user can fix.

The CLI turns every :class:`QGraphError` into a one-line message and exit status 2; anything else
is a bug in qgraph and is allowed to show its traceback.
"""

from __future__ import annotations

__all__ = ["first_line", "QGraphError", "InputError", "PreconditionError", "PostconditionError", "VerifierError"]


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name if the message is empty)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class QGraphError(Exception):
    """Base class: a problem with the user's model, data, options or paths."""


class InputError(QGraphError):
    """A model file, data file, option or path that qgraph cannot use."""


class PreconditionError(QGraphError):
    """A pass was given a graph it cannot work on (its ``requires`` failed)."""


class PostconditionError(QGraphError):
    """A pass produced a graph that breaks its own promise (its ``ensures`` failed)."""


class VerifierError(QGraphError):
    """The structural verifier found a broken graph after a pass."""
