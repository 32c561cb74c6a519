"""Tracing and matching, the helpers every pass uses; the rewrite driver, which runs the passes, is
:mod:`seedrand.rewriter.rewrite` (not imported here, so that passes importing these helpers form no cycle with it)."""

from .match import Target, resolve
from .trace import TraceInfo, trace

__all__ = ["Target", "resolve", "TraceInfo", "trace"]
