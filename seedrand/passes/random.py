"""The ``random`` action (paper 000): a layer whose weight is non-trainable and regenerated from its Philox key on
every use, forward and backward, so it stores zero bytes. This version handles ``nn.Linear`` and transformers'
``Conv1D`` (GPT-2), on graphs from either tracing strategy.

Weight element ``(o, i)`` of a ``(out_features, in_features)`` weight is element ``o * in_features + i`` of
``seedrand.kernels.init.regenerate(derive_seed(seed, qualname, "weight"), ...)``, for ``Conv1D`` too (its stored
weight is ``(in, out)``; the regenerated one follows the Linear convention). ``init`` bounds use
``fan_in = in_features``, ``fan_out = out_features``: ``kaiming_uniform`` is exactly PyTorch's default Linear init.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn

from ..kernels.init import init_distribution, regenerate
from ..kernels.ops import DEFAULT_CHUNK_BYTES, regen_matmul
from ..kernels.philox import derive_seed
from ..rewriter.match import Target

__all__ = ["RandomLinear", "random"]

_aten = torch.ops.aten


class RandomLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` regenerated from ``seed`` (never stored, never a parameter).

    Args:
        in_features, out_features: the weight's shape is ``(out_features, in_features)``.
        seed: the weight's Philox key.
        init: an init name (``seedrand.kernels.init``); fans are ``in_features``/``out_features``.
        bias: ``None`` (no bias), a ``Parameter`` (trainable, or frozen and stored), or the int Philox key of a
            regenerated ``U(-1/sqrt(in_features), 1/sqrt(in_features))`` bias (PyTorch's default Linear bias init).
        chunk_bytes: float32 bytes of weight regenerated at a time (``seedrand.kernels.ops``).

    Input ``(..., in_features)`` of any float dtype; output ``(..., out_features)`` of the same dtype.
    """

    def __init__(self, in_features: int, out_features: int, seed: int, init: str,
                 bias: nn.Parameter | int | None, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        super().__init__()
        self.in_features, self.out_features, self.seed, self.init = in_features, out_features, seed, init
        self.chunk_bytes = chunk_bytes
        kind, self.scale = init_distribution(init, in_features, out_features)
        self.normal = kind == "normal"
        self.bias_seed = bias if isinstance(bias, int) else None
        self.bias = bias if isinstance(bias, nn.Parameter) else None

    def _bias(self, dtype: torch.dtype, device: torch.device) -> Optional[torch.Tensor]:
        if self.bias_seed is not None:
            bound = 1 / math.sqrt(self.in_features)
            return regenerate(self.bias_seed, (self.out_features,), f"uniform({bound!r})", 1, 1, dtype, device)
        return self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = regen_matmul(x, self.seed, self.out_features, self.in_features, self.scale, self.normal, False,
                         self.chunk_bytes)
        bias = self._bias(x.dtype, x.device)
        return y if bias is None else y + bias

    def weight(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
        """The regenerated ``(out_features, in_features)`` weight, materialized (for inspection and export)."""
        return regenerate(self.seed, (self.out_features, self.in_features), self.init, self.in_features,
                          self.out_features, dtype, device)

    def seedrand_regenerated(self) -> dict[str, torch.Tensor]:
        """Meta tensors with the shapes of what this module regenerates (for ``seedrand.summary``)."""
        shapes = {"weight": (self.out_features, self.in_features)}
        if self.bias_seed is not None:
            shapes["bias"] = (self.out_features,)
        return {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, init={self.init}, "
                f"seed={self.seed}, bias={'random' if self.bias_seed is not None else self.bias is not None}")


def _shape(target: Target, weight: torch.Tensor) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or Conv1D weight."""
    if issubclass(target.cls, nn.Linear):
        return weight.shape[1], weight.shape[0]
    return weight.shape[0], weight.shape[1]  # Conv1D stores (in, out)


def _bias(target: Target, stored: Optional[torch.Tensor]) -> nn.Parameter | int | None:
    mode = target.rule.params.bias
    if mode == "zero" or (stored is None and mode in ("keep", "trainable")):
        return None
    if mode == "random":
        return derive_seed(target.seed, target.qualname, "bias")
    return nn.Parameter(stored.detach().clone(), requires_grad=mode == "trainable")


def _call_sites(gm: fx.GraphModule, target: Target) -> list[tuple[fx.Node, fx.Node]]:
    """``(node, input)`` pairs computing the layer: its ``call_module`` node (symbolic trace), or the
    ``aten.linear``/``aten.addmm`` nodes reading its weight (export)."""
    sites = [(n, n.args[0]) for n in gm.graph.nodes if n.op == "call_module" and n.target == target.qualname]
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target != f"{target.qualname}.weight":
            continue
        for user in node.users:
            if user.target == _aten.linear.default and user.args[1] is node:
                sites.append((user, user.args[0]))
            elif user.target == _aten.addmm.default and user.args[2] is node and len(user.args) == 3:
                sites.append((user, user.args[1]))
            else:
                raise target.error(f"its weight is also read by {user.target} (tied or shared weights cannot be "
                                   "regenerated without changing the other reader)")
    return sites


def random(gm: fx.GraphModule, target: Target) -> None:
    """Replace the Linear/Conv1D ``target`` by a :class:`RandomLinear` (see the module docstring).

    Raises:
        PolicyError: the module is of another type, or its weight is shared with other ops (names the module, the
            rule and its YAML line).
    """
    from transformers.pytorch_utils import Conv1D

    if not issubclass(target.cls, (nn.Linear, Conv1D)):
        raise target.error("random supports nn.Linear and transformers Conv1D in this version")
    weight = gm.get_parameter(f"{target.qualname}.weight")
    try:
        stored_bias = gm.get_parameter(f"{target.qualname}.bias")
    except AttributeError:
        stored_bias = None
    sites = _call_sites(gm, target)
    if not sites:
        raise target.error("its weight is never used by the traced forward")
    in_f, out_f = _shape(target, weight)
    module = RandomLinear(in_f, out_f, derive_seed(target.seed, target.qualname, "weight"), target.rule.params.init,
                          _bias(target, stored_bias))
    _install(gm, target.qualname, module)
    for node, x in sites:
        if node.op != "call_module":
            with gm.graph.inserting_before(node):
                new = gm.graph.call_module(target.qualname, (x,))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
    for node in [n for n in gm.graph.nodes if n.op == "get_attr" and n.target.startswith(f"{target.qualname}.")]:
        if not node.users:
            gm.graph.erase_node(node)


def _install(gm: fx.GraphModule, qualname: str, module: nn.Module) -> None:
    parent_name, _, name = qualname.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, name, module)  # replaces the original module and, with it, its stored weight
