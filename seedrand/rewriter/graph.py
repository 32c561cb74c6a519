"""Helpers that find a module's tensors in a traced GraphModule, whichever strategy traced it."""

from __future__ import annotations

import torch
import torch.fx as fx

__all__ = ["own_parameters", "full_args"]


def own_parameters(gm: fx.GraphModule, qualname: str) -> list[tuple[str, torch.nn.Parameter]]:
    """``(fully qualified name, parameter)`` for each parameter the module ``qualname`` owns directly.

    Works on symbolically traced graphs (the module is a submodule) and on exported ones (the parameters keep their
    fully qualified names under plain container modules). Tied parameters appear under every name that holds them.
    Parameters the traced forward never reads are absent: tracing drops them. Raises nothing; an unknown
    ``qualname`` gives an empty list.
    """
    prefix = f"{qualname}." if qualname else ""
    return [(n, p) for n, p in gm.named_parameters(remove_duplicate=False)
            if n.startswith(prefix) and "." not in n[len(prefix):]]


def full_args(node: fx.Node) -> tuple:
    """A call's positional arguments with its op schema's defaults filled in, as far as they are positional and not
    given by keyword (an export omits arguments equal to their default, e.g. ``dropout_p=0.0``)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return tuple(node.args)
    extra = []
    for arg in [a for a in schema.arguments if not a.kwarg_only][len(node.args):]:
        if arg.name in node.kwargs or not arg.has_default_value():
            break
        extra.append(arg.default_value)
    return tuple(node.args) + tuple(extra)
