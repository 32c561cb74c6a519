"""One module per policy action. A pass is ``fn(gm, target) -> None``: it rewrites the GraphModule ``gm`` for one
:class:`~seedrand.rewriter.match.Target` (module, rule), using nothing but its arguments."""

from __future__ import annotations

from typing import Callable

import torch.fx as fx

from ..rewriter.match import Target
from .freeze import freeze, freeze_captured
from .freeze_fraction import freeze_fraction
from .insert_random import insert_random
from .random import random

__all__ = ["PASSES", "CAPTURED_PASSES"]

PASSES: dict[str, Callable[[fx.GraphModule, Target], None]] = {
    "freeze": freeze,
    "freeze_fraction": freeze_fraction,
    "insert_random": insert_random,
    "random": random,
}

# The same actions on graphs Dynamo captured for the ``seedrand`` backend: ``fn(gm, target, parameters)`` where
# ``parameters`` maps fully qualified parameter names to their placeholder nodes.
CAPTURED_PASSES: dict[str, Callable[[fx.GraphModule, Target, dict[str, fx.Node]], None]] = {
    "freeze": freeze_captured,
}
