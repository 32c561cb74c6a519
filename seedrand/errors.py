"""Exceptions raised by seedrand. Each names what the user must fix: the rule, the module and, for policies loaded
from a file, the file, YAML line and column."""

from __future__ import annotations


class SeedrandError(Exception):
    """Base class of every error seedrand raises on bad input."""


class PolicyError(SeedrandError, ValueError):
    """A policy is malformed, or does not fit the model it is applied to.

    Attributes:
        path: the YAML file, or ``None`` for policies built from dicts.
        line, column: 1-based position of the offending YAML node, or ``None``.
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
