"""The plan of one collection: closures that each slice one tensor, rewrite one argument or update one module's
sizes, decided for the whole model from the channel dependency graph before anything runs."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from .graph import ChannelGraph
from .surgery import resize, slice_tensor

if TYPE_CHECKING:  # the report is filled by these steps, made by collect (which imports this module)
    from .collect import GarbageReport

__all__ = ["plan_removal", "shrinking", "apply_plan"]


def plan_removal(gm: fx.GraphModule, graph: ChannelGraph, removed: set[int]) -> list:
    """Closures that each slice one tensor, rewrite one argument or update one module's sizes; nothing changes until
    they run."""
    if not removed:
        return []
    keeps: dict[fx.Node, torch.Tensor] = {}

    def keep(node: fx.Node) -> torch.Tensor:
        if node not in keeps:
            keeps[node] = graph.keep(node, removed)
        return keeps[node]

    names = {id(m): name for name, m in gm.named_modules()}
    plan = []
    for s in graph.slices:
        kept, total = keep(s.node), len(graph.channels[s.node].ids)
        if len(kept) < total:
            name = names[id(s.ref.owner)] if s.output else None
            plan.append(functools.partial(slice_tensor, s.ref, s.dim, kept, name, total - len(kept)))
    for size in graph.sizes:
        value = size.value(keep(size.node))
        if value != size.value(torch.arange(len(graph.channels[size.node].ids))):
            plan.append(functools.partial(lambda write, v, *_: write(v), size.write, value))
    resized = set()
    for node, module in graph.layers.items():
        if id(module) in resized:  # a module called more than once follows its tensors once
            continue
        resized.add(id(module))
        old = len(graph.channels[node].ids)
        if len(keep(node)) < old or (node.args[0] in graph.channels and
                                     len(keep(node.args[0])) < len(graph.channels[node.args[0]].ids)):
            plan.append(functools.partial(resize, module, old))
    return plan


def shrinking(plan: list) -> list[nn.Parameter]:
    """The parameters ``plan`` slices."""
    return [step.args[0].tensor for step in plan if isinstance(step, functools.partial) and step.func is slice_tensor
            and isinstance(step.args[0].tensor, nn.Parameter)]


def apply_plan(model: fx.GraphModule, plan: list, optimizer: Optional[torch.optim.Optimizer],
           report: GarbageReport) -> None:
    for apply in plan:
        apply(optimizer, report)
    model.recompile()
