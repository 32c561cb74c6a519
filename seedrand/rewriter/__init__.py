"""Tracing, matching and the rewrite driver."""

from .match import Target, resolve
from .rewrite import RewriteRecord, as_policy, rewrite
from .trace import TraceInfo, trace

__all__ = ["Target", "resolve", "RewriteRecord", "as_policy", "rewrite", "TraceInfo", "trace"]
