"""Exceptions raised by seedrand. Each names what the user must fix: the rule, the module and, for policies loaded
from a file, the file, YAML line and column; for checkpoints, the file."""

from __future__ import annotations

import reprlib

__all__ = ["SeedrandError", "PolicyError", "TraceError", "CheckpointError", "ModelError", "shown"]

_MAX_MESSAGE = 4000  # characters: a message never grows with the user's data past this
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 8
_REPR.maxlevel = 3


def shown(value: object) -> str:
    """``repr(value)`` cut to about 80 characters (strings, and containers to 8 items and 3 levels): what error
    messages quote of user data, so that a huge or alias-expanded value never makes a huge message."""
    return _REPR.repr(value)


def _bounded(message: str) -> str:
    if len(message) <= _MAX_MESSAGE:
        return message
    return f"{message[:_MAX_MESSAGE]}... ({len(message) - _MAX_MESSAGE} more characters)"


class SeedrandError(Exception):
    """Base class of every error seedrand raises on bad input. Its message is at most about 4,000 characters."""

    def __init__(self, message: str = ""):
        super().__init__(_bounded(str(message)))


class PolicyError(SeedrandError, ValueError):
    """A policy is malformed, or does not fit the model it is applied to.

    Attributes:
        path: the YAML file (or ``"<dict>"`` for a policy built from a dict, ``"FILE:policy"`` for one stored in a
            checkpoint), or ``None``.
        line, column: 1-based position of the offending YAML node, or ``None`` (dict policies have none).
        rule: the rule's label (its ``name`` or ``rules[i]``), or ``None`` for policy-level errors.
    """

    def __init__(self, message: str, *, path=None, line=None, column=None, rule=None):
        self.path, self.line, self.column, self.rule = path, line, column, rule
        where = ""
        if path is not None or line is not None:
            where = f"{path or '<policy>'}" + (f":{line}:{column}" if line is not None else "") + ": "
        who = f"rule {rule}: " if rule is not None else ""
        super().__init__(f"{where}{who}{message}")


class TraceError(SeedrandError, RuntimeError):
    """No tracing strategy could capture the model's forward as a graph."""


class CheckpointError(SeedrandError, ValueError):
    """A checkpoint file is missing, unreadable, malformed, corrupted (a checksum does not match) or does not fit the
    model it is loaded into.

    Attributes:
        path: the file.
    """

    def __init__(self, path, message: str):
        self.path = str(path)
        super().__init__(f"{path}: {message}")


class ModelError(SeedrandError, TypeError):
    """What was passed as the model (or its example inputs, or optimizer) is not something seedrand can rewrite:
    the message names the argument and what it needs."""
