"""The ``filter_gates`` action (Leclerc, Castro Fernandez & Madden, ShrinkNets): a Filter layer ``y = x * max(0,
theta)`` with one ``theta`` per channel after each matched module, trained with an L1 penalty ``lambda * |theta|`` so
that channels die (``theta <= 0`` makes the channel exactly zero, and in a training forward dead for good).

Channels are dimension 1 after a ``Conv{1,2,3}d`` and the last dimension after ``Linear``/``Conv1D``/``Embedding``.
``placement: auto`` puts the gate after a BatchNorm that is the layer's only consumer (the ShrinkNets order
Conv -> BN -> Filter -> ReLU), ``output`` right after the layer. ``init: ones`` starts every gate at 1 (the model
computes exactly what it did), ``uniform`` at ``U(0, 1)`` drawn from Philox key ``derive_seed(seed, module, "gate")``.
The gate is installed as ``{module}_gate`` beside the module. Add :func:`penalty` to the loss;
:func:`gate_parameters` gives the ``theta`` tensors for their own optimizer group (ShrinkNets used no weight decay on
them).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.fx as fx
import torch.nn as nn
from pydantic import Field

from ..actions import StrictModel, ActionSpec, per_module, register_action
from ..kernels import philox
from ..kernels.philox import derive_seed
from ..rewriter.graph import insert_after, install
from ..rewriter.match import Target
from .layout import call_sites, layout, sibling_name, stored_weight

__all__ = ["FilterGates", "FilterGate", "filter_gates", "penalty", "gate_parameters"]


class FilterGates(StrictModel):
    """``filter_gates``: a per-channel gate ``y = x * max(0, theta)`` after the module, L1 weight ``lambda``."""

    lambda_: float = Field(default=0.0, ge=0.0, alias="lambda", description="the L1 penalty's weight on the gates "
                                                                            "(`seedrand.penalty`), >= 0")
    init: Literal["ones", "uniform"] = Field("ones", description="the gates' start: open (ones), or seeded U(0, 1) "
                                                                 "(ShrinkNets)")
    placement: Literal["auto", "output"] = Field("auto", description="`auto`: after the BatchNorm that directly "
                                                                       "follows the layer, if any; `output`: on the "
                                                                       "layer's output")

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class FilterGate(nn.Module):
    """``y = x * max(0, theta) * alive``, ``theta`` of shape ``(channels,)`` broadcast along ``channel_dim``.

    A channel whose ``theta`` reaches ``<= 0`` in a training forward is dead for good (``alive`` false): as in
    ShrinkNets, where such a unit is removed, it cannot come back when the L1 term's gradient (or Adam's momentum)
    pushes ``theta`` above zero again before :func:`seedrand.collect_garbage` removes it.

    Args:
        theta: initial gate values, ``(channels,)``, the model's dtype.
        channel_dim: ``1`` (conv activations ``(N, C, ...)``) or ``-1`` (``(..., C)``).
        lambda_: weight of this gate's L1 penalty (see :func:`penalty`).

    Attributes:
        alive: bool buffer ``(channels,)`` (in the state dict), false once the channel's ``theta`` was ``<= 0``.

    Input and output: any shape with ``channels`` entries on ``channel_dim``; dtype of the input.
    """

    def __init__(self, theta: torch.Tensor, channel_dim: int, lambda_: float):
        super().__init__()
        self.theta = nn.Parameter(theta)
        self.register_buffer("alive", theta.detach() > 0)
        self.channel_dim, self.lambda_ = channel_dim, lambda_

    @property
    def live(self) -> torch.Tensor:
        """Bool ``(channels,)``: the channels that are neither dead for good nor at ``theta <= 0`` now."""
        return self.alive & (self.theta.detach() > 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.alive &= self.theta > 0
        # the mask is a new tensor, so a second call in the same forward (a shared layer's gate) may update alive
        gate = torch.relu(self.theta).masked_fill(~self.alive, 0.0)
        if self.channel_dim == 1:
            gate = gate.reshape(-1, *[1] * (x.dim() - 2))
        return x * gate

    def extra_repr(self) -> str:
        return f"channels={self.theta.shape[0]}, channel_dim={self.channel_dim}, lambda={self.lambda_}"


def penalty(model: nn.Module) -> torch.Tensor:
    """``sum(lambda * |theta|)`` over every :class:`FilterGate` of ``model``: a 0-d tensor to add to the loss
    (float32; zero if there are no gates). Raises nothing."""
    terms = [g.lambda_ * g.theta.abs().sum() for g in model.modules() if isinstance(g, FilterGate)]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The ``theta`` of every :class:`FilterGate` of ``model``, in module order (for an optimizer group of their
    own, e.g. without weight decay). Raises nothing."""
    return [g.theta for g in model.modules() if isinstance(g, FilterGate)]


def _after_batch_norm(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """The BatchNorm output that directly and solely consumes ``node``, else ``node`` itself (also when the
    BatchNorm module is called elsewhere too: a gate after it would gate every call)."""
    if len(node.users) != 1:
        return node
    (user,) = node.users
    if user.op == "call_module" and isinstance(gm.get_submodule(user.target), _BATCH_NORMS):
        calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == user.target]
        return user if len(calls) == 1 else node
    if user.op == "call_function" and user.target == torch.ops.aten.batch_norm.default and user.args[0] is node:
        return user
    return node


def filter_gates(gm: fx.GraphModule, target: Target) -> None:
    """Insert a :class:`FilterGate` after every place the graph computes module ``target`` (see the module
    docstring).

    Raises:
        PolicyError: the module is not a registered layer (whose channels are known), it is the root, or
            ``{module}_gate`` is taken (names the module, the rule and its YAML line).
    """
    p, qualname = target.rule.params, target.qualname
    name = sibling_name(gm, target, "gate")
    lay = layout(gm, target)
    channels, dtype = lay.features, stored_weight(gm, target).dtype
    if p.init == "ones":
        theta = torch.ones(channels, dtype=dtype)
    else:
        theta = philox.rand(derive_seed(target.seed, qualname, "gate"), torch.arange(channels)).to(dtype)
    install(gm, name, FilterGate(theta, lay.channel_dim, p.lambda_))
    sites = call_sites(gm, target, lay.kind)
    if not sites:
        raise target.error("its weight is never used by the traced forward")
    for node, _ in sites:
        insert_after(gm, _after_batch_norm(gm, node) if p.placement == "auto" else node, name)


register_action(ActionSpec("filter_gates", FilterGates, per_module(filter_gates), once_per_module=True,
                           not_captured="it adds trainable gates (and garbage collection changes the module's "
                                        "shapes)"))
