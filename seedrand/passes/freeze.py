"""The ``freeze`` action: make a module's own parameters non-trainable, values kept (papers 002, table 1: "learn
only BatchNorm" / "learn only one block" are one freeze rule with an ``exclude``)."""

from __future__ import annotations

import torch.fx as fx

from ..rewriter.graph import own_parameters
from ..rewriter.match import Target

__all__ = ["freeze"]


def freeze(gm: fx.GraphModule, target: Target) -> None:
    """Set ``requires_grad=False`` on the parameters the module ``target.qualname`` owns directly (not its
    children's: select a subtree with ``re:block(\\..*)?``). Stored values are unchanged; optimizers built
    afterwards over ``requires_grad`` parameters skip them. Raises nothing."""
    for _, param in own_parameters(gm, target.qualname):
        param.requires_grad_(False)
