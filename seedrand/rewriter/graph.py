"""Helpers that find a module's tensors in a traced GraphModule, whichever strategy traced it."""

from __future__ import annotations

import torch
import torch.fx as fx

__all__ = ["own_parameters"]


def own_parameters(gm: fx.GraphModule, qualname: str) -> list[tuple[str, torch.nn.Parameter]]:
    """``(fully qualified name, parameter)`` for each parameter the module ``qualname`` owns directly.

    Works on symbolically traced graphs (the module is a submodule) and on exported ones (the parameters keep their
    fully qualified names under plain container modules). Tied parameters appear under every name that holds them.
    Parameters the traced forward never reads are absent: tracing drops them.
    """
    prefix = f"{qualname}." if qualname else ""
    return [(n, p) for n, p in gm.named_parameters(remove_duplicate=False)
            if n.startswith(prefix) and "." not in n[len(prefix):]]
