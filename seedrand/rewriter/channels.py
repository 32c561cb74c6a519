"""The channel dependency graph of a traced model: which channels of which tensors must be removed together, which
are provably zero, and which reads would notice their removal (paper 004's removal events; the dependency groups of
Torch-Pruning's DepGraph, minus its habit of treating unknown ops as element-wise).

Every tracked tensor (a node's output) has one *slot* per channel along its channel dimension. Slots that must go
together are joined in a union-find; a joined set is a **dependency group**. Ops join slots by their index maps:
element-wise ops keep slot ``i`` as slot ``i``; ``add``/``mul`` join their operands' slots (broadcast operands do not
take part); ``cat``/``split``/``chunk`` along the channel dimension place operands' slots side by side;
``flatten``/``view``/``reshape``/``unsqueeze`` map channel ``c`` to output positions ``c * S .. c * S + S - 1`` (``S`` from the
propagated shapes); a grouped or depthwise convolution joins each group's inputs with its outputs (so only whole
groups go). A ``Linear``/``Conv`` (``groups=1``) starts new slots: its inputs are *sinks*, whose removal is exact
when the slot is zero or the layer's columns for it are all zero.

Zero analysis, per slot: a gate with ``theta <= 0``, a layer row whose weights are zero wherever its input is not
(with zero bias), a BatchNorm entry with zero weight and bias, and what zero-preserving ops (ReLU, GELU, SiLU, tanh,
dropout, pooling, ``mul`` by anything, ``add`` of zeros, ``cat``, reshapes) make of those.

Anything else is a **barrier**: the graph's inputs and outputs, unknown ops, norms that mix channels (LayerNorm,
GroupNorm, RMSNorm), reductions over the channel dimension, modules called twice, shapes written as literal numbers
in ``view``/``reshape``. A barrier pins the slots it reads, and a group with a pinned slot is kept, with the reason.

A group can be removed when nothing pins it, every sink in it reads a zero or unread channel, and it has at least one
sink; removing it slices producer rows, BatchNorm and gate entries, grouped-conv groups, consumer columns and
``split`` sizes, which leaves every output unchanged.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..passes.filter_gates import FilterGate

__all__ = ["ChannelGraph", "Channels", "LAYERS", "NORMS"]

LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_ZERO_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.ELU, nn.Hardswish, nn.Dropout,
                 nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity)
_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                 nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                 nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_CHANNEL_MODULES = (nn.Sigmoid, nn.Hardsigmoid)  # keep channels apart but map 0 to a non-zero value
_ZERO_FUNCTIONS = {torch.relu, F.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, torch.tanh, F.elu, F.hardswish,
                   F.dropout, torch.dropout}
_POOL_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
                   F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool2d}
_CHANNEL_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid}
_ZERO_METHODS = {"relu", "tanh", "contiguous"}
_CHANNEL_METHODS = {"sigmoid"}
_BINARY = {operator.add: "add", torch.add: "add", "add": "add", operator.sub: "sub", torch.sub: "sub", "sub": "sub",
           operator.mul: "mul", torch.mul: "mul", "mul": "mul", operator.truediv: "div", torch.div: "div",
           "div": "div"}
_RESHAPES = {torch.flatten, "flatten", "view", "reshape", torch.reshape}
_SPLITS = {torch.split: "split", "split": "split", torch.chunk: "chunk", "chunk": "chunk"}
_REDUCTIONS = {torch.mean, "mean", torch.sum, "sum"}


@dataclass
class Channels:
    """The slots of one tensor: ``ids[i]`` is the slot of channel ``i`` along dimension ``dim`` (non-negative)."""

    dim: int
    ids: torch.Tensor  # int64, (channels,)


@dataclass
class Split:
    """A ``split``/``chunk`` along the channel dimension: the slots of the input and each section's size."""

    source: Channels
    sizes: list[int]


class ChannelGraph:
    """The dependency groups of ``gm`` (see the module docstring).

    Args:
        gm: a symbolically traced GraphModule whose nodes carry ``meta["tensor_meta"]`` (``ShapeProp``).

    Attributes:
        channels: node -> :class:`Channels` for every tracked tensor.
        splits: ``split``/``chunk`` node -> :class:`Split`.

    Raises nothing: whatever it does not understand becomes a barrier.
    """

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.channels: dict[fx.Node, Channels] = {}
        self.splits: dict[fx.Node, Split] = {}
        self._parent: list[int] = []
        self._zero: list[bool] = []
        self._pinned: dict[int, str] = {}  # slot -> why it cannot be removed
        self._read: dict[int, str] = {}  # sink slot -> "" if its removal is exact, else the reading layer
        calls: dict[str, int] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
        self._twice = {t for t, n in calls.items() if n > 1}
        for node in gm.graph.nodes:
            self._visit(node)

    # union-find over slots ---------------------------------------------------------------------------------------
    def _new(self, zero: torch.Tensor) -> torch.Tensor:
        start = len(self._parent)
        self._parent.extend(range(start, start + len(zero)))
        self._zero.extend(bool(z) for z in zero)
        return torch.arange(start, start + len(zero))

    def root(self, slot: int) -> int:
        """The dependency group (its representative slot) of ``slot``."""
        parent = self._parent
        while parent[slot] != slot:
            parent[slot] = parent[parent[slot]]
            slot = parent[slot]
        return slot

    def _join(self, a: torch.Tensor, b: torch.Tensor) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = self.root(x), self.root(y)
            if rx != ry:
                self._parent[ry] = rx

    def zero(self, ids: torch.Tensor) -> torch.Tensor:
        """Whether each slot is provably zero: bool, like ``ids``."""
        return torch.tensor([self._zero[i] for i in ids.tolist()], dtype=torch.bool)

    def _pin(self, ids: torch.Tensor, why: str) -> None:
        for i in ids.tolist():
            self._pinned.setdefault(i, why)

    def _pin_inputs(self, node: fx.Node, why: str) -> None:
        for arg in node.all_input_nodes:
            if arg in self.channels:
                self._pin(self.channels[arg].ids, why)

    # shapes ------------------------------------------------------------------------------------------------------
    @staticmethod
    def _shape(node) -> Optional[torch.Size]:
        meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
        return getattr(meta, "shape", None)

    def _get(self, node: fx.Node, dim: int) -> torch.Tensor:
        """The slots of ``node`` along ``dim``; an untracked tensor gets pinned slots (its channels are fixed)."""
        tracked = self.channels.get(node)
        if tracked is not None and tracked.dim == dim:
            return tracked.ids
        if tracked is not None:
            self._pin(tracked.ids, f"{node.name} is read along dim {dim}, but its channels are on dim {tracked.dim}")
        size = self._shape(node)[dim]
        ids = self._new(torch.zeros(size, dtype=torch.bool))
        self._pin(ids, f"the channels of {node.name} come from outside the tracked graph (an input, a constant or a "
                       "barrier)")
        return ids

    def _set(self, node: fx.Node, dim: int, ids: torch.Tensor) -> None:
        self.channels[node] = Channels(dim, ids)

    def _derived(self, node: fx.Node, source: Channels, zero: torch.Tensor) -> None:
        """``node``'s channel ``i`` depends on ``source``'s channel ``i`` alone, with its own zero flags."""
        ids = self._new(zero)
        self._join(source.ids, ids)
        self._set(node, source.dim, ids)

    # ops ---------------------------------------------------------------------------------------------------------
    def _visit(self, node: fx.Node) -> None:
        if node.op == "output":
            self._pin_inputs(node, "they are outputs of the model")
            return
        if node.op in ("placeholder", "get_attr"):
            return
        handled = self._dispatch(node)
        if handled is not True:
            self._pin_inputs(node, handled or f"{_describe(node)} reads them, and it is not known to keep channels "
                                              "apart")

    def _dispatch(self, node: fx.Node):
        """Handle ``node``: ``True``, or a reason (``None`` for the generic one) to pin what it reads."""
        if node.op == "call_module":
            if node.target in self._twice:
                return f"module {node.target!r} is called more than once"
            module = self.gm.get_submodule(node.target)
            if isinstance(module, LAYERS):
                return self._layer(node, module)
            if isinstance(module, NORMS):
                return self._batch_norm(node, module)
            if isinstance(module, FilterGate):
                return self._gate(node, module)
            if isinstance(module, nn.Flatten):
                return self._reshape(node)
            kind = ("zero" if isinstance(module, _ZERO_MODULES) else "pool" if isinstance(module, _POOL_MODULES)
                    else "channel" if isinstance(module, _CHANNEL_MODULES) else None)
            return self._elementwise(node, kind) if kind else None
        target = node.target
        if node.op == "call_method" and target == "size":
            return True if node.args[1:] == (0,) or node.kwargs == {"dim": 0} else "their sizes are read"
        if target in _ZERO_FUNCTIONS or target in _ZERO_METHODS:
            return self._elementwise(node, "zero")
        if target in _POOL_FUNCTIONS:
            return self._elementwise(node, "pool")
        if target in _CHANNEL_FUNCTIONS or target in _CHANNEL_METHODS:
            return self._elementwise(node, "channel")
        if target in _BINARY:
            return self._binary(node, _BINARY[target])
        if target in (torch.cat, torch.concat):
            return self._cat(node)
        if target in _RESHAPES:
            return self._reshape(node)
        if target in _SPLITS:
            return self._split(node, _SPLITS[target])
        if target is operator.getitem and node.args[0] in self.splits:
            return self._section(node)
        if target in _REDUCTIONS:
            return self._reduce(node)
        if target in (torch.unsqueeze, "unsqueeze"):
            return self._unsqueeze(node)
        return None

    def _layer(self, node: fx.Node, layer: nn.Module):
        x, shape = node.args[0], self._shape(node)
        dim = len(shape) - 1 if isinstance(layer, nn.Linear) else 1
        groups = getattr(layer, "groups", 1)
        if groups != 1 or x in self.channels:
            in_ids = self._get(x, dim)
        else:
            in_ids = None
        weight = layer.weight.detach()
        weight = weight.reshape(weight.shape[0], weight.shape[1], -1)  # (out, in / groups, kernel positions)
        in_zero = self.zero(in_ids) if in_ids is not None else torch.zeros(weight.shape[1] * groups, dtype=torch.bool)
        bias_zero = layer.bias.detach() == 0 if layer.bias is not None else torch.ones(weight.shape[0], dtype=bool)
        per_group_out = weight.shape[0] // groups
        # column (i) of row (j) contributes nothing when its weights are zero or its input is
        group_in = in_zero.reshape(groups, 1, -1).expand(groups, per_group_out, -1).reshape(weight.shape[0], -1)
        silent = (weight == 0).all(-1) | group_in
        out_ids = self._new(bias_zero & silent.all(1))
        self._set(node, 1 if dim == 1 else len(shape) - 1, out_ids)
        if groups == 1:
            if in_ids is not None:
                unread = (weight == 0).all(-1).all(0)
                for slot, ok in zip(in_ids.tolist(), (in_zero | unread).tolist()):
                    if not ok:
                        self._read[slot] = f"{node.target!r} reads them while they are non-zero"
                    else:
                        self._read.setdefault(slot, "")
            return True
        ins, outs = in_ids.reshape(groups, -1), out_ids.reshape(groups, -1)
        for g in range(groups):  # a group's inputs and outputs go together: removal takes whole groups
            members = torch.cat([ins[g], outs[g]])
            self._join(members[:1].expand(len(members)), members)
        return True

    def _batch_norm(self, node: fx.Node, norm: nn.Module):
        x = node.args[0]
        if x not in self.channels:
            return "the BatchNorm's input channels are not tracked"
        source = Channels(1, self._get(x, 1))
        zero = (norm.weight.detach() == 0) & (norm.bias.detach() == 0) if norm.affine else \
            torch.zeros(norm.num_features, dtype=torch.bool)
        self._derived(node, source, zero)
        return True

    def _gate(self, node: fx.Node, gate: FilterGate):
        x = node.args[0]
        if x not in self.channels:
            return "the gate's input channels are not tracked"
        dim = gate.channel_dim % len(self._shape(node))
        source = Channels(dim, self._get(x, dim))
        self._derived(node, source, self.zero(source.ids) | (gate.theta.detach() <= 0))
        return True

    def _elementwise(self, node: fx.Node, kind: str):
        x = node.args[0]
        if any(a in self.channels for a in node.all_input_nodes if a is not x):
            return None
        source = self.channels.get(x)
        if source is None:
            return True
        if kind == "pool" and source.dim != 1:
            return f"{_describe(node)} pools over dims after 1, but the channels are on dim {source.dim}"
        if kind == "channel":
            self._derived(node, source, torch.zeros(len(source.ids), dtype=torch.bool))
        else:
            self._set(node, source.dim, source.ids)
        return True

    def _binary(self, node: fx.Node, op: str):
        shape = self._shape(node)
        tracked = [a for a in node.args if a in self.channels]
        if not tracked or shape is None:
            return True if not tracked else None
        dims = {self.channels[a].dim + len(shape) - len(self._shape(a)) for a in tracked}
        if len(dims) != 1:
            return "operands have their channels on different dims"
        dim = dims.pop()
        size = shape[dim]
        taking, others_nonzero = [], False
        for i, a in enumerate(node.args):
            a_shape = self._shape(a)
            if a_shape is None:  # a Python number
                others_nonzero |= not (isinstance(a, (int, float)) and a == 0 and op in ("add", "sub"))
                continue
            a_dim = dim - (len(shape) - len(a_shape))
            if a_dim < 0 or a_shape[a_dim] == 1:
                if a in self.channels:
                    return f"{a.name} is broadcast along the channel dim"
                others_nonzero = True
                continue
            taking.append((i, self._get(a, a_dim)))
        zeros = [self.zero(ids) for _, ids in taking]
        if op == "mul":
            zero = torch.stack(zeros).any(0)
        elif op == "div":
            zero = zeros[0] if taking[0][0] == 0 else torch.zeros(size, dtype=torch.bool)
        else:
            zero = torch.stack(zeros).all(0) & (not others_nonzero)
        ids = self._new(zero)
        for _, operand in taking:
            self._join(operand, ids)
        self._set(node, dim, ids)
        return True

    def _cat(self, node: fx.Node):
        tensors = node.args[0]
        cat_dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        tracked = [a for a in tensors if a in self.channels]
        if not tracked:
            return True
        ndim = len(self._shape(node))
        dims = {self.channels[a].dim for a in tracked}
        if len(dims) != 1:
            return "operands have their channels on different dims"
        dim = dims.pop()
        if cat_dim % ndim == dim:
            self._set(node, dim, torch.cat([self._get(a, dim) for a in tensors]))
            return True
        parts = [self._get(a, dim) for a in tensors]
        ids = self._new(torch.stack([self.zero(p) for p in parts]).all(0))
        for p in parts:
            self._join(p, ids)
        self._set(node, dim, ids)
        return True

    def _reshape(self, node: fx.Node):
        x = node.args[0]
        source = self.channels.get(x)
        if source is None:
            return True
        if node.op != "call_module" and node.target in ("view", "reshape", torch.reshape) and \
                not self._shape_free(node):
            return f"{_describe(node)} writes a size as a number, which removal would make wrong"
        before, after = self._shape(x), self._shape(node)
        d = source.dim
        if tuple(after[:d + 1]) == tuple(before[:d + 1]):  # the channel dim and those before it untouched
            self._set(node, d, source.ids)
        elif tuple(after) == (*before[:d], math.prod(before[d:])):  # the channel dim and those after it merged
            self._set(node, d, source.ids.repeat_interleave(math.prod(before[d + 1:])))
        else:
            return f"{_describe(node)} mixes the channel dim with others"
        return True

    def _shape_free(self, node: fx.Node) -> bool:
        """A ``view``/``reshape`` whose sizes are ``-1`` or the batch size read from a tensor (``x.size(0)``)."""
        sizes = node.args[1:]
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
            sizes = sizes[0]
        return all(s == -1 or (isinstance(s, fx.Node) and s.target == "size") for s in sizes)

    def _split(self, node: fx.Node, kind: str):
        x = node.args[0]
        source = self.channels.get(x)
        if source is None:
            return True
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        if any(u.target is not operator.getitem for u in node.users):
            return f"{_describe(node)}'s result is used other than by indexing"
        metas = node.meta.get("tensor_meta")
        if dim % len(self._shape(x)) == source.dim:
            self.splits[node] = Split(source, [m.shape[source.dim] for m in metas])
        else:
            self.splits[node] = Split(source, [])
        return True

    def _section(self, node: fx.Node):
        split = self.splits[node.args[0]]
        k, source = node.args[1], split.source
        if not split.sizes:
            self._set(node, source.dim, source.ids)
        else:
            start = sum(split.sizes[:k])
            self._set(node, source.dim, source.ids[start:start + split.sizes[k]])
        return True

    def _reduce(self, node: fx.Node):
        x = node.args[0]
        source = self.channels.get(x)
        if source is None:
            return True
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if dims is None:
            return f"{_describe(node)} reduces over every dim"
        ndim = len(self._shape(x))
        dims = [d % ndim for d in (dims if isinstance(dims, (tuple, list)) else [dims])]
        if source.dim in dims:
            return f"{_describe(node)} reduces over the channel dim"
        self._set(node, source.dim - (0 if keepdim else sum(d < source.dim for d in dims)), source.ids)
        return True

    def _unsqueeze(self, node: fx.Node):
        source = self.channels.get(node.args[0])
        if source is not None:
            dim = (node.args[1] if len(node.args) > 1 else node.kwargs["dim"]) % len(self._shape(node))
            self._set(node, source.dim + (dim <= source.dim), source.ids)
        return True

    # groups ------------------------------------------------------------------------------------------------------
    def removable(self) -> tuple[set[int], dict[int, str]]:
        """``(groups that can be removed, {group: why it is kept})`` over every group with a sink or a pin; a group
        is identified by its root slot."""
        why: dict[int, str] = {}
        for slot, reason in self._pinned.items():
            why.setdefault(self.root(slot), reason)
        for slot, reader in self._read.items():
            if reader:
                why.setdefault(self.root(slot), reader)
        candidates = {self.root(s) for s in self._read} - set(why)
        for node, ch in self.channels.items():  # never empty a tensor
            roots = {self.root(i) for i in ch.ids.tolist()}
            if roots and roots <= candidates:
                for r in roots:
                    why[r] = f"every channel of {node.name} is dead; removing them all would leave it empty"
                candidates -= roots
        return candidates, why

    def keep(self, node: fx.Node, removed: set[int]) -> torch.Tensor:
        """Indices (int64) of ``node``'s channels that stay when the groups ``removed`` go."""
        ids = self.channels[node].ids.tolist()
        return torch.tensor([i for i, s in enumerate(ids) if self.root(s) not in removed], dtype=torch.long)


def _describe(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {target!r} ({node.name})"
