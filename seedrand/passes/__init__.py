"""One module per policy action. A pass is ``fn(gm, target) -> None``: it rewrites the GraphModule ``gm`` for one
:class:`~seedrand.rewriter.match.Target` (module, rule), using nothing but its arguments."""

from __future__ import annotations

from typing import Callable

import torch.fx as fx

from ..rewriter.match import Target
from .freeze import freeze

__all__ = ["PASSES"]

PASSES: dict[str, Callable[[fx.GraphModule, Target], None]] = {
    "freeze": freeze,
}
