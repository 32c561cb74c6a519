"""``seedrand.collect_garbage``: remove the channels that filter gates have killed (paper 004, ShrinkNets: dead
channels are removed during training by propagating removal events through the graph).

This first version handles gates whose channel is produced by an ``nn.Linear`` / ``nn.Conv{1,2,3}d`` (``groups=1``),
optionally through a BatchNorm, in a symbolically traced graph, and read by ``nn.Linear`` / ``nn.Conv{n}d``
consumers through ops that keep a zero channel zero and keep channels apart (ReLU, Dropout, max/average pooling) and
``flatten(x, 1)`` (whose index map, ``channel * spatial + position``, comes from shapes propagated with the rewrite's
example inputs). A dead channel (``theta <= 0``) is exactly zero after its gate, so removing the producer's row, the
BatchNorm entry, the gate entry and the consumers' input columns leaves the outputs unchanged up to summation order.
Anything else on the way (residual adds, concatenation, reshapes, unknown ops, graph outputs, exported graphs) is a
barrier: those channels are kept and ``explain`` says which op blocked them. Never guess.

Parameters shrink in place (values and ``.grad`` are sliced into the same ``Parameter`` objects with
``torch.utils.swap_tensors``), and
when an optimizer is passed every per-parameter state tensor of the parameter's shape (momentum, Adam moments) is
sliced the same way, so training simply continues.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import SeedrandError
from .passes.filter_gates import FilterGate
from .rewriter.rewrite import RECORD_KEY

__all__ = ["collect_garbage", "GarbageReport"]

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_PASS_MODULES = (nn.ReLU, nn.Dropout, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
                 nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_F = torch.nn.functional
_PASS_FUNCTIONS = {torch.relu, _F.relu, _F.dropout, _F.max_pool1d, _F.max_pool2d, _F.max_pool3d, _F.avg_pool1d,
                   _F.avg_pool2d, _F.avg_pool3d, _F.adaptive_avg_pool2d}


@dataclass
class GarbageReport:
    """What :func:`collect_garbage` did.

    Attributes:
        removed: gate module name -> number of channels removed there.
        blocked: gate module name -> why its dead channels were kept (the op that blocked them).
        parameters_before, parameters_after: parameter element counts of the whole model.
    """

    removed: dict[str, int] = field(default_factory=dict)
    blocked: dict[str, str] = field(default_factory=dict)
    parameters_before: int = 0
    parameters_after: int = 0


def _module(gm: fx.GraphModule, node: fx.Node) -> Optional[nn.Module]:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _producer(gm: fx.GraphModule, gate: fx.Node) -> tuple[list[fx.Node], str]:
    """``[layer]`` or ``[layer, norm]`` feeding the gate alone, else ``([], reason)``."""
    chain, node = [], gate.args[0]
    if isinstance(_module(gm, node), _NORMS) and len(node.users) == 1:
        chain, node = [node], node.args[0]
    layer = _module(gm, node)
    if not isinstance(layer, _LAYERS) or len(node.users) != 1 or getattr(layer, "groups", 1) != 1:
        return [], f"its input comes from {node.format_node()} (not a Linear/Conv read only by the gate)"
    return [node, *chain], ""


def _consumers(gm: fx.GraphModule, gate: fx.Node) -> tuple[list[tuple[fx.Node, int]], str]:
    """``(consumer layer node, spatial size per channel)`` for every path from the gate, else ``([], reason)``."""
    found, todo = [], [(gate, 1)]
    while todo:
        node, spatial = todo.pop()
        for user in node.users:
            module = _module(gm, user)
            if isinstance(module, _LAYERS) and user.args[0] is node and getattr(module, "groups", 1) == 1:
                found.append((user, spatial))
            elif isinstance(module, _PASS_MODULES) or (user.op == "call_function" and user.target in _PASS_FUNCTIONS
                                                       and user.args[0] is node) or (
                    user.op == "call_method" and user.target == "relu"):
                todo.append((user, spatial))
            elif user.op == "call_function" and user.target is torch.flatten and user.args[1:] in ((1,), (1, -1)):
                shape = node.meta["tensor_meta"].shape
                todo.append((user, int(torch.Size(shape[2:]).numel())))
            else:
                return [], f"{user.format_node()} reads the gated channels"
    return found, ""


def _keep(tensor: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    return tensor.index_select(dim, index.to(tensor.device))


def _shrink(param: nn.Parameter, dim: int, index: torch.Tensor, optimizer: Optional[torch.optim.Optimizer]) -> None:
    """Keep ``index`` along ``dim`` of ``param``, its gradient and its optimizer state, in place."""
    old_shape = param.shape
    if optimizer is not None and param in optimizer.state:
        state = optimizer.state[param]
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == old_shape:
                state[key] = _keep(value, dim, index)
    smaller = nn.Parameter(_keep(param.detach(), dim, index), requires_grad=param.requires_grad)
    if param.grad is not None:
        smaller.grad = _keep(param.grad, dim, index)
    # swap, not .data: the Python object (optimizer key, user references) stays, and autograd's cached gradient
    # accumulator, which remembers the old shape while a previous graph is alive, goes with the old tensor
    torch.utils.swap_tensors(param, smaller)


def collect_garbage(model: fx.GraphModule, optimizer: Optional[torch.optim.Optimizer] = None,
                    explain: bool = False) -> GarbageReport:
    """Remove dead gated channels from ``model`` in place (see the module docstring).

    Args:
        model: a GraphModule returned by ``seedrand.rewrite`` with ``filter_gates`` (symbolically traced, with
            example inputs if it flattens gated channels).
        optimizer: its optimizer, whose state is sliced to match; training continues without rebuilding it.
        explain: print which op kept which gate's dead channels.

    Returns:
        A :class:`GarbageReport`.

    Raises:
        SeedrandError: ``model`` was not returned by ``seedrand.rewrite``.
    """
    record = getattr(model, "meta", {}).get(RECORD_KEY)
    if record is None:
        raise SeedrandError("collect_garbage needs a model returned by seedrand.rewrite")
    report = GarbageReport(parameters_before=sum(p.numel() for p in model.parameters()))
    if record.example_inputs is not None:  # shapes only: cast to the model's dtype, which may have changed since
        dtype = next(model.parameters()).dtype
        inputs = [x.to(dtype) if x.is_floating_point() else x for x in record.example_inputs]
        was_training = model.training
        with torch.no_grad():  # in eval mode: a train-mode run would update BatchNorm statistics and use the RNG
            ShapeProp(model.eval()).propagate(*inputs)
        model.train(was_training)
    for gate in [n for n in model.graph.nodes if isinstance(_module(model, n), FilterGate)]:
        module = model.get_submodule(gate.target)
        dead = (module.theta <= 0).nonzero().flatten()
        if not len(dead):
            continue
        if len(dead) == module.theta.numel():
            report.blocked[gate.target] = "every channel is dead; removing them all would leave an empty layer"
            continue
        producer, why = _producer(model, gate)
        consumers, why_consumers = _consumers(model, gate) if producer else ([], why)
        if not producer or not consumers:
            report.blocked[gate.target] = why or why_consumers or "no consumer layer reads the channels"
            continue
        keep = (module.theta > 0).nonzero().flatten()
        _remove(model, producer, module, consumers, keep, optimizer)
        report.removed[gate.target] = len(dead)
    model.recompile()
    report.parameters_after = sum(p.numel() for p in model.parameters())
    if explain:
        for name, why in report.blocked.items():
            print(f"{name}: dead channels kept: {why}")
    return report


def _remove(gm: fx.GraphModule, producer: list[fx.Node], gate: FilterGate, consumers: list[tuple[fx.Node, int]],
            keep: torch.Tensor, optimizer: Optional[torch.optim.Optimizer]) -> None:
    layer = _module(gm, producer[0])
    _shrink(layer.weight, 0, keep, optimizer)
    if layer.bias is not None:
        _shrink(layer.bias, 0, keep, optimizer)
    _set_width(layer, out=len(keep))
    for node in producer[1:]:
        norm = _module(gm, node)
        for p in (norm.weight, norm.bias):
            if p is not None:
                _shrink(p, 0, keep, optimizer)
        for name in ("running_mean", "running_var"):
            if getattr(norm, name, None) is not None:
                setattr(norm, name, _keep(getattr(norm, name), 0, keep))
        norm.num_features = len(keep)
    _shrink(gate.theta, 0, keep, optimizer)
    for node, spatial in consumers:
        consumer = _module(gm, node)
        columns = (keep[:, None] * spatial + torch.arange(spatial)).flatten()
        _shrink(consumer.weight, 1, columns, optimizer)
        _set_width(consumer, inp=len(columns))


def _set_width(layer: nn.Module, out: Optional[int] = None, inp: Optional[int] = None) -> None:
    """Keep the layer's size attributes (``in_features``/``out_channels``...) true to its weight."""
    if isinstance(layer, nn.Linear):
        layer.out_features = out if out is not None else layer.out_features
        layer.in_features = inp if inp is not None else layer.in_features
    else:
        layer.out_channels = out if out is not None else layer.out_channels
        layer.in_channels = inp if inp is not None else layer.in_channels
