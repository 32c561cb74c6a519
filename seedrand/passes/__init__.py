"""One module per policy action. A pass is ``fn(gm, targets) -> None``: it rewrites the GraphModule ``gm`` for one
rule, given the :class:`~seedrand.rewriter.match.Target` (module, rule) pairs it selected in model order, using
nothing but its arguments. Actions that treat each module on its own are written per module and applied in turn
(:func:`per_module`); an action whose modules share state (``subspace`` with ``scope: global``) takes them all."""

from __future__ import annotations

from typing import Callable

import torch.fx as fx
import torch.nn as nn

from ..rewriter.match import Target
from .filter_gates import filter_gates
from .freeze import freeze, freeze_captured
from .freeze_fraction import freeze_fraction, freeze_fraction_captured
from .grow import grow
from .insert_random import insert_random
from .random import random, random_captured
from .subspace import check_subspace, subspace

__all__ = ["PASSES", "CHECKS", "CAPTURED_PASSES", "per_module"]


def per_module(fn: Callable[[fx.GraphModule, Target], None]) -> Callable[[fx.GraphModule, list[Target]], None]:
    """The rule-level pass that applies the per-module pass ``fn`` to each target in order."""
    def apply(gm: fx.GraphModule, targets: list[Target]) -> None:
        for target in targets:
            fn(gm, target)
    apply.__doc__ = fn.__doc__
    return apply


PASSES: dict[str, Callable[[fx.GraphModule, list[Target]], None]] = {
    "filter_gates": per_module(filter_gates),
    "freeze": per_module(freeze),
    "freeze_fraction": per_module(freeze_fraction),
    "grow": per_module(grow),
    "insert_random": per_module(insert_random),
    "random": per_module(random),
    "subspace": subspace,
}

# Checks on the model (a private copy) before it is traced: ``fn(model, targets)`` raises ``PolicyError`` for what the
# pass would change silently; actions without an entry need none.
CHECKS: dict[str, Callable[[nn.Module, list[Target]], None]] = {
    "subspace": check_subspace,
}

# The same actions on graphs Dynamo captured for the ``seedrand`` backend: ``fn(gm, target, parameters)`` where
# ``parameters`` maps fully qualified parameter names to their placeholder nodes.
CAPTURED_PASSES: dict[str, Callable[[fx.GraphModule, Target, dict[str, fx.Node]], None]] = {
    "freeze": freeze_captured,
    "freeze_fraction": freeze_fraction_captured,
    "random": random_captured,
}
