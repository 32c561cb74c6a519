"""Philox (pure torch reference), Triton kernels and custom ops. ``triton_philox`` is imported on demand: importing
Triton must happen after ``TRITON_INTERPRET`` is set."""

from . import philox

__all__ = ["philox"]
