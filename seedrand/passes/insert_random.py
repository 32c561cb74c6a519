"""The ``insert_random`` action (van den Heuvel & Sladek 2020, "introducing new random layers"; residual random layers
with one trainable scale per layer or per unit): ``count`` new layers whose weights are regenerated from Philox keys,
inserted after a module's output.

After a ``Linear``/``Conv1D``/``Embedding`` (features on the last dimension) the new layers are
:class:`~seedrand.passes.random.RandomLinear`; after a ``Conv{1,2,3}d`` (channels on dimension 1) they are 1x1
:class:`~seedrand.passes.random.RandomConv`. None has a bias. With ``n`` the module's output features:

* ``residual: false``: ``h = activation(W_i h)`` for each layer; the first maps ``n -> width``, the last
  ``width -> n`` (so what follows still gets ``n`` features), the others ``width -> width``; ``width`` defaults to
  ``n`` and needs ``count >= 2`` when it differs.
* ``residual: true``: ``h = h + s * activation(W_i h)`` with square ``W_i`` (``n -> n``). ``scale: none`` fixes
  ``s = 1``; ``scalar`` trains one ``s`` per layer, ``per_channel`` one per feature. Trainable scales start at 0
  (as ReZero), so the rewritten model first computes exactly what the original did.

Layer ``i`` is installed in a :class:`RandomStack` named ``{module}_random`` beside the module; its weight's Philox
key is ``derive_seed(seed, "{module}_random.layers.{i}", "weight")`` and ``init`` defaults to ``kaiming_uniform``
(PyTorch's Linear/Conv default).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.fx as fx
import torch.nn as nn
from pydantic import Field, model_validator

from ..actions import StrictModel, ActionSpec, Init, per_module, register_action
from ..kernels.philox import derive_seed
from ..rewriter.graph import insert_after, install
from ..rewriter.match import Target
from .layout import call_sites, layout, sibling_name, stored_weight
from .random import RandomConv, RandomLinear

__all__ = ["InsertRandom", "RandomStack", "insert_random"]


class InsertRandom(StrictModel):
    """``insert_random``: ``count`` new random layers after the matched module (van den Heuvel & Sladek 2020)."""

    width: Optional[int] = Field(default=None, ge=1, description="the inserted layers' hidden width; none: the "
                                                                 "module's output width")
    count: int = Field(default=1, ge=1, description="how many random layers are inserted (>= 1)")
    activation: Literal["relu", "gelu", "tanh", "sigmoid", "identity"] = Field(
        "relu", description="the activation after each inserted layer")
    residual: bool = Field(False, description="`x + s * f(W x)` instead of `f(W x)`")
    scale: Literal["none", "scalar", "per_channel"] = Field(
        "none", description="the residual branch's trainable scale `s`: none, one scalar, or one per channel "
                            "(needs `residual: true`)")
    init: Init = Field("kaiming_uniform", description="the inserted layers' init")

    @model_validator(mode="after")
    def _scale_needs_residual(self):
        if self.scale != "none" and not self.residual:
            raise ValueError(f"scale: {self.scale} scales the residual branch x + s * f(W x); it needs residual: true")
        return self

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "identity": nn.Identity}


class RandomStack(nn.Module):
    """Random layers applied in sequence, plain or residual (see the module docstring).

    Args:
        layers: the random layers (``RandomLinear`` or 1x1 ``RandomConv``), in order.
        activation: ``relu``, ``gelu``, ``tanh``, ``sigmoid`` or ``identity``.
        residual: ``h + s * activation(layer(h))`` instead of ``activation(layer(h))``.
        scale: ``none``, ``scalar`` or ``per_channel`` (residual only): shape of each layer's trainable ``s``.
        channel_dim: where the features are (``-1`` after Linear/Embedding, ``1`` after Conv).
        dtype: dtype of the trainable scales (the model's).

    Input and output: ``(..., n, ...)`` with ``n`` features on ``channel_dim``; same dtype.
    """

    def __init__(self, layers: list[nn.Module], activation: str, residual: bool, scale: str, channel_dim: int,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.activation = _ACTIVATIONS[activation]()
        self.residual, self.channel_dim = residual, channel_dim
        shape = {"none": None, "scalar": (), "per_channel": (layers[0].weight_shape[0],)}[scale]
        self.scales = None if shape is None else nn.ParameterList(
            nn.Parameter(torch.zeros(shape, dtype=dtype)) for _ in layers)

    def _scale(self, i: int, h: torch.Tensor) -> Optional[torch.Tensor]:
        if self.scales is None:
            return None
        s = self.scales[i]
        return s.reshape(-1, *[1] * (h.dim() - 2)) if s.dim() and self.channel_dim == 1 else s

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            branch = self.activation(layer(h))
            if not self.residual:
                h = branch
                continue
            s = self._scale(i, h)
            h = h + (branch if s is None else s * branch)
        return h


def _widths(target: Target, n: int) -> list[int]:
    """Feature counts ``[n, ..., n]`` between the ``count`` layers (``count + 1`` entries)."""
    p = target.rule.params
    width = p.width or n
    if p.residual and width != n:
        raise target.error(f"residual random layers keep the width: width must be {n} (the module's output "
                           f"features) or omitted, not {width}")
    if width != n and p.count < 2:
        raise target.error(f"width {width} differs from the module's {n} output features: the last inserted layer "
                           "maps back to them, so count must be at least 2")
    return [n] + [width] * (p.count - 1) + [n]


def insert_random(gm: fx.GraphModule, target: Target) -> None:
    """Insert a :class:`RandomStack` after every place the graph computes module ``target`` (see the module
    docstring).

    Raises:
        PolicyError: the module is not a registered layer (whose output shape is known), the widths do
            not fit, the name ``{module}_random`` is taken, or the module is the root (names the module, the rule and
            its YAML line).
    """
    p = target.rule.params
    name = sibling_name(gm, target, "random")
    lay = layout(gm, target)
    widths = _widths(target, lay.features)
    init, dtype = p.init, stored_weight(gm, target).dtype
    if lay.channel_dim == 1:  # a convolution: 1x1 random convolutions
        dims = len(lay.shape) - 2
        layers = [RandomConv((o, i) + (1,) * dims, (1,) * dims, (0,) * dims, (1,) * dims, 1,
                             derive_seed(target.seed, f"{name}.layers.{k}", "weight"), init, None)
                  for k, (i, o) in enumerate(zip(widths, widths[1:]))]
    else:
        layers = [RandomLinear(i, o, derive_seed(target.seed, f"{name}.layers.{k}", "weight"), init, None)
                  for k, (i, o) in enumerate(zip(widths, widths[1:]))]
    stack = RandomStack(layers, p.activation, p.residual, p.scale, lay.channel_dim, dtype)
    sites = call_sites(gm, target, lay.kind)
    if not sites:
        raise target.error("its weight is never used by the traced forward")
    install(gm, name, stack)
    for node, _ in sites:
        insert_after(gm, node, name)


register_action(ActionSpec("insert_random", InsertRandom, per_module(insert_random),
                           not_captured="it inserts new modules (with trainable scales unless scale: none)"))
