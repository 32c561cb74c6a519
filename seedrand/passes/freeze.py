"""The ``freeze`` action: make a module's own parameters non-trainable, values kept (Rosenfeld & Tsotsos 2018, table 1:
"learn only BatchNorm" / "learn only one block" are one freeze rule with an ``exclude``)."""

from __future__ import annotations

import torch
import torch.fx as fx

from ..actions import StrictModel, ActionSpec, per_module, register_action
from ..rewriter.graph import own_parameters
from ..rewriter.match import Target

__all__ = ["Freeze", "freeze", "freeze_captured"]


class Freeze(StrictModel):
    """``freeze: {}``: every parameter of the matched module becomes non-trainable; values are kept (stored)."""


def freeze(gm: fx.GraphModule, target: Target) -> None:
    """Set ``requires_grad=False`` on the parameters the module ``target.qualname`` owns directly (not its
    children's: select a subtree with ``re:block(\\..*)?``). Stored values are unchanged; optimizers built
    afterwards over ``requires_grad`` parameters skip them. Raises nothing."""
    for _, param in own_parameters(gm, target.qualname):
        param.requires_grad_(False)


def freeze_captured(gm: fx.GraphModule, target: Target, parameters: dict[str, fx.Node]) -> None:
    """``freeze`` on a graph Dynamo captured, whose parameters are placeholders (the user's live Parameters): each
    placeholder the module owns is ``detach``-ed inside the graph, so no gradient reaches it, and the user's module
    is not changed (its ``requires_grad`` flags stay as they are).

    Args:
        gm: the captured graph.
        target: the module and rule.
        parameters: fully qualified parameter name -> its placeholder node.
    """
    prefix = f"{target.qualname}." if target.qualname else ""
    for name, node in parameters.items():
        if name.startswith(prefix) and "." not in name[len(prefix):]:
            with gm.graph.inserting_after(node):
                detached = gm.graph.call_function(torch.ops.aten.detach.default, (node,))
            node.replace_all_uses_with(detached, delete_user_cb=lambda user: user is not detached)


register_action(ActionSpec("freeze", Freeze, per_module(freeze), captured=freeze_captured))
