"""The ``random`` action (paper 000): a layer whose weight is non-trainable and regenerated from its Philox key on
every use, forward and backward, so it stores zero bytes. This version handles ``nn.Linear``, transformers'
``Conv1D`` (GPT-2) and ``nn.Conv1d/2d/3d`` with zero padding, on graphs from either tracing strategy.

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

from ..kernels.init import init_distribution, regenerate, sample
from ..kernels.ops import DEFAULT_CHUNK_BYTES, regen_conv, regen_matmul
from ..kernels.philox import derive_seed
from ..rewriter.graph import full_args
from ..rewriter.match import Target

__all__ = ["RandomLinear", "RandomConv", "random"]

_aten = torch.ops.aten
_WEIGHT_SECOND = {_aten.linear.default, _aten.conv1d.default, _aten.conv2d.default, _aten.conv3d.default}


class _Regenerated(nn.Module):
    """A layer whose ``weight_shape`` weight is regenerated from ``seed``; bias as in :class:`RandomLinear`."""

    def __init__(self, weight_shape: tuple[int, ...], fan_in: int, fan_out: int, seed: int, init: str,
                 bias: nn.Parameter | int | None):
        super().__init__()
        self.weight_shape, self.fan_in, self.fan_out, self.seed, self.init = weight_shape, fan_in, fan_out, seed, init
        kind, self.scale = init_distribution(init, fan_in, fan_out)
        self.normal = kind == "normal"
        self.bias_seed = bias if isinstance(bias, int) else None
        self.bias = bias if isinstance(bias, nn.Parameter) else None

    def _bias(self, dtype: torch.dtype, device: torch.device) -> Optional[torch.Tensor]:
        if self.bias_seed is not None:  # PyTorch's default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            return sample(self.bias_seed, (self.weight_shape[0],), "uniform", 1 / math.sqrt(self.fan_in), dtype, device)
        return self.bias

    def weight(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
        """The regenerated weight (shape ``weight_shape``), materialized (for inspection and export)."""
        return regenerate(self.seed, self.weight_shape, self.init, self.fan_in, self.fan_out, dtype, device)

    def seedrand_regenerated(self) -> dict[str, torch.Tensor]:
        """Meta tensors with the shapes of what this module regenerates (for ``seedrand.summary``)."""
        shapes = {"weight": self.weight_shape}
        if self.bias_seed is not None:
            shapes["bias"] = (self.weight_shape[0],)
        return {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}

    def extra_repr(self) -> str:
        bias = "random" if self.bias_seed is not None else self.bias is not None
        return f"weight_shape={tuple(self.weight_shape)}, init={self.init}, seed={self.seed}, bias={bias}"


class RandomLinear(_Regenerated):
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
        super().__init__((out_features, in_features), in_features, out_features, seed, init, bias)
        self.in_features, self.out_features, self.chunk_bytes = in_features, out_features, chunk_bytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = regen_matmul(x, self.seed, self.out_features, self.in_features, self.scale, self.normal, False,
                         self.chunk_bytes)
        bias = self._bias(x.dtype, x.device)
        return y if bias is None else y + bias


class RandomConv(_Regenerated):
    """A Conv1d/2d/3d (zero padding) whose weight is regenerated from ``seed`` on every use (``regen_conv``).

    Args:
        weight_shape: ``(out_channels, in_channels / groups, *kernel)``.
        stride, padding, dilation, groups: as ``nn.Conv{n}d`` (tuples of ``len(kernel)`` ints; numeric padding).
        seed, init, bias: as :class:`RandomLinear`; fans are those ``torch.nn.init`` computes for such a weight.

    Input ``(N, C_in, *spatial)``; output ``(N, C_out, *spatial_out)``, dtype of the input.
    """

    def __init__(self, weight_shape: tuple[int, ...], stride: tuple[int, ...], padding: tuple[int, ...],
                 dilation: tuple[int, ...], groups: int, seed: int, init: str, bias: nn.Parameter | int | None):
        receptive = math.prod(weight_shape[2:])
        super().__init__(tuple(weight_shape), weight_shape[1] * receptive, weight_shape[0] * receptive, seed, init,
                         bias)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = regen_conv(x, self.seed, list(self.weight_shape), self.scale, self.normal, list(self.stride),
                       list(self.padding), list(self.dilation), self.groups)
        bias = self._bias(x.dtype, x.device)
        return y if bias is None else y + bias.reshape(-1, *[1] * (y.dim() - 2))


def _bias(target: Target, stored: Optional[torch.Tensor]) -> nn.Parameter | int | None:
    mode = target.rule.params.bias
    if mode == "zero" or (stored is None and mode in ("keep", "trainable")):
        return None
    if mode == "random":
        return derive_seed(target.seed, target.qualname, "bias")
    return nn.Parameter(stored.detach().clone(), requires_grad=mode == "trainable")


def _weight_readers(gm: fx.GraphModule, target: Target) -> list[tuple[fx.Node, fx.Node]]:
    """``(weight get_attr node, op reading it)`` pairs in an exported graph (none in a symbolically traced one)."""
    return [(node, user) for node in gm.graph.nodes
            if node.op == "get_attr" and node.target == f"{target.qualname}.weight" for user in node.users]


def _call_sites(gm: fx.GraphModule, target: Target) -> list[tuple[fx.Node, fx.Node]]:
    """``(node, input)`` pairs computing the layer: its ``call_module`` node (symbolic trace), or the
    ``aten.linear``/``aten.conv{1,2,3}d``/``aten.addmm`` nodes reading its weight (export)."""
    sites = [(n, n.args[0]) for n in gm.graph.nodes if n.op == "call_module" and n.target == target.qualname]
    for weight, user in _weight_readers(gm, target):
        if user.target in _WEIGHT_SECOND and user.args[1] is weight:
            sites.append((user, user.args[0]))
        elif user.target == _aten.addmm.default and len(user.args) == 3 and user.args[2] is weight:
            sites.append((user, user.args[1]))
        else:
            raise target.error(f"its weight is also read by {user.target} (tied or shared weights cannot be "
                               "regenerated without changing the other reader)")
    return sites


def _replacement(gm: fx.GraphModule, target: Target, bias: nn.Parameter | int | None) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    weight = gm.get_parameter(f"{target.qualname}.weight")
    seed, init = derive_seed(target.seed, target.qualname, "weight"), target.rule.params.init
    if issubclass(target.cls, nn.Linear):
        return RandomLinear(weight.shape[1], weight.shape[0], seed, init, bias)
    if issubclass(target.cls, Conv1D):  # stores its weight as (in, out)
        return RandomLinear(weight.shape[0], weight.shape[1], seed, init, bias)
    if issubclass(target.cls, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return RandomConv(tuple(weight.shape), *_conv_hyperparameters(gm, target, weight.dim() - 2), seed, init, bias)
    raise target.error("random supports nn.Linear, transformers Conv1D and nn.Conv1d/2d/3d in this version")


def _conv_hyperparameters(gm: fx.GraphModule, target: Target, n: int) -> tuple:
    """``(stride, padding, dilation, groups)`` of the convolution: from the leaf module (symbolic trace) or from
    the exported ``aten.conv{n}d`` call's arguments 3 to 6 (export)."""
    module = gm.get_submodule(target.qualname)
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.padding_mode != "zeros":
            raise target.error(f"random supports zero padding only, not padding_mode={module.padding_mode!r}")
        found = (module.stride, module.padding, module.dilation, module.groups)
    else:
        calls = [user for _, user in _weight_readers(gm, target)
                 if user.target in _WEIGHT_SECOND - {_aten.linear.default}]
        if not calls:
            raise target.error("its weight is never used by a convolution in the traced forward")
        found = full_args(calls[0])[3:7]
    stride, padding, dilation, groups = found
    if isinstance(padding, str):
        raise target.error(f"random supports numeric padding only, not padding={padding!r}")
    return _per_dim(stride, n), _per_dim(padding, n), _per_dim(dilation, n), groups


def _per_dim(value, n: int) -> tuple[int, ...]:
    """An aten conv argument (an int, or a list of 1 or ``n`` ints) as ``n`` ints."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    return tuple(values * n if len(values) == 1 else values)


def random(gm: fx.GraphModule, target: Target) -> None:
    """Replace the Linear/Conv1D/Conv ``target`` by a :class:`RandomLinear`/:class:`RandomConv` (see the module
    docstring).

    Raises:
        PolicyError: the module is of another type, or its weight is shared with other ops (names the module, the
            rule and its YAML line).
    """
    try:
        stored_bias = gm.get_parameter(f"{target.qualname}.bias")
    except AttributeError:
        stored_bias = None
    module = _replacement(gm, target, _bias(target, stored_bias))
    sites = _call_sites(gm, target)
    if not sites:
        raise target.error("its weight is never used by the traced forward")
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
