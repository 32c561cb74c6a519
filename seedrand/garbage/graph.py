"""The channel dependency graph of a traced model: which channels of which tensors must be removed together, which
are provably zero, and which reads would notice their removal (the removal events of Leclerc et al.'s ShrinkNets; the
dependency groups of Torch-Pruning's DepGraph, minus its habit of treating unknown ops as element-wise).

Works on symbolically traced graphs (``call_module`` layers, torch functions, tensor methods) and on exported ones
(``aten`` ops reading ``get_attr`` parameters), so on ``transformers`` models too.

Every tracked tensor (a node's output) has one *slot* per channel along its channel dimension. Slots that must go
together are joined in a union-find; a joined set is a **dependency group**. Ops join slots by their index maps:
element-wise ops keep slot ``i`` as slot ``i``; ``add``/``mul`` join their operands' slots (broadcast operands do not
take part; a per-channel parameter operand, such as a bias or a layer scale, is sliced with them); ``cat``/
``split``/``chunk`` along the channel dimension place operands' slots side by side; ``flatten``/``view``/
``reshape`` map channel ``c`` to output positions ``c * S .. c * S + S - 1`` (``S`` from the propagated shapes; a
size written as a number in the channel position is rewritten on removal); ``permute``/``transpose``/``unsqueeze``/
``select``/``slice`` move the channel dimension; a grouped or depthwise convolution joins each group's inputs with its
outputs (so only whole groups go). A registered layer (``seedrand.register_layer``: Linear, Conv, ConvTranspose;
``groups=1``) starts new slots: its inputs are *sinks*, whose removal is exact when the slot is zero or the layer's
columns for it are all zero.

Zero analysis, per slot: a gate with ``theta <= 0``, a layer row whose weights are zero wherever its input is not
(with zero bias), a BatchNorm entry with zero weight and bias, and what zero-preserving ops (ReLU, GELU, SiLU, tanh,
hardtanh, abs, dropout, pooling, zero padding, positive powers, ``mul`` by anything, ``add`` of zeros, ``cat``,
reshapes, reductions over other dims) make of those. What an op does to channels is its rule
(:func:`register_channel_rule`, one registration for every spelling of the op); the built-in element-wise, pooling
and reduction ops are registered through it at import, as a user registers their own, and the structural ops
(arithmetic, ``cat``, reshapes, permutes, splits, layers, norms, attention) register their handler the same way, once
per op for all its spellings (``_handles``).

Anything else is a **barrier**: the graph's inputs and outputs, unknown ops, norms that mix channels (LayerNorm,
GroupNorm, RMSNorm's mean over channels), reductions over the channel dimension, shared (tied) parameters read by
different ops, in-place ops on tensors read elsewhere, attention's split of channels into heads. A barrier pins the
slots it reads, and a group with a pinned slot is kept, with the reason.

A module called more than once (a shared activation, a weight-shared layer and its gate) joins its calls' channels:
a row, column or entry of its tensors goes only when it can go in every use, and a call whose input is not tracked
pins them.

A group can be removed when nothing pins it, every sink in it reads a zero or unread channel, and it has at least one
sink. Removing it applies :attr:`ChannelGraph.slices` (producer rows, consumer columns, biases, BatchNorm entries and
statistics, gates, per-channel operands), :attr:`ChannelGraph.sizes` (literal sizes, ``split`` sections, conv
``groups``), which leaves every output unchanged.
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..layers import layer_spec
from ..passes.filter_gates import FilterGate
from .rules import handler, handles, in_place, keeps_heads, module_rule, op_rule
from .slots import Slots

__all__ = ["ChannelGraph", "Channels", "Ref", "Slice", "Size"]

aten = torch.ops.aten
_NORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class Channels:
    """The slots of one tensor: ``ids[i]`` is the slot of channel ``i`` along dimension ``dim`` (non-negative).

    Attention splits channels into heads: then ``inner`` (the head size) > 1 and channel ``i`` sits at index
    ``i // inner`` of ``dim`` (heads) and ``i % inner`` of ``inner_dim``. A channel shuffle (ShuffleNet's
    ``view(N, groups, C // groups, ...)``, ``transpose``, ``view(N, C, ...)``) splits them the same way into groups
    (``shuffle``): position ``i % inner`` of every group is one dependency group, so removal keeps the group count.
    """

    dim: int
    ids: torch.Tensor  # int64, (channels,)
    inner: int = 1
    inner_dim: int = -1
    shuffle: bool = False


@dataclass(frozen=True)
class Ref:
    """A tensor attribute ``name`` of module ``owner`` (a parameter or a buffer), by reference."""

    owner: nn.Module
    name: str

    @property
    def tensor(self) -> torch.Tensor:
        """The tensor itself."""
        return getattr(self.owner, self.name)


@dataclass
class Slice:
    """On removal, keep along ``dim`` of ``ref`` the channels of ``node`` that stay; ``output``: ``node`` is what the
    tensor's owner produces (rows, biases, norm entries, gates), not what it reads (columns)."""

    ref: Ref
    dim: int
    node: fx.Node
    output: bool = True


@dataclass
class Size:
    """On removal, set the argument that ``write(new_value)`` sets: ``value(kept channels of node)`` (a literal
    size, ``split`` sections, a conv's ``groups``)."""

    node: fx.Node
    value: Callable[[torch.Tensor], object]
    write: Callable[[object], None]


class ChannelGraph(Slots):
    """The dependency groups of ``gm`` (see the module docstring).

    Args:
        gm: a GraphModule (symbolically traced or exported) whose nodes carry ``meta["tensor_meta"]`` (``ShapeProp``).

    Attributes:
        channels: node -> :class:`Channels` for every tracked tensor.
        slices: what removal slices; sizes: which arguments removal rewrites.
        layers: node -> the module it calls (``call_module`` layers and BatchNorms), whose size attributes follow.

    Raises nothing: whatever it does not understand becomes a barrier.
    """

    def __init__(self, gm: fx.GraphModule):
        super().__init__()
        self.gm = gm
        self.channels: dict[fx.Node, Channels] = {}
        self.slices: list[Slice] = []
        self.sizes: list[Size] = []
        self.layers: dict[fx.Node, nn.Module] = {}
        self._sliced: dict[tuple[int, str, int], Slice] = {}  # (owner, tensor, dim) -> its one Slice
        self._splits: dict[fx.Node, tuple[Channels, list[int]]] = {}
        calls: dict[str, int] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
        self._twice = {t for t, n in calls.items() if n > 1}
        for node in gm.graph.nodes:
            self._visit(node)

    def _pin_inputs(self, node: fx.Node, why: str) -> None:
        for arg in node.all_input_nodes:
            if arg in self.channels:
                self._pin(self.channels[arg].ids, why)

    # shapes and attributes ---------------------------------------------------------------------------------------
    @staticmethod
    def _shape(node) -> Optional[torch.Size]:
        meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
        return getattr(meta, "shape", None)

    def _get(self, node: fx.Node, dim: int) -> torch.Tensor:
        """The slots of ``node`` along ``dim``; an untracked tensor gets pinned slots (its channels are fixed)."""
        tracked = self.channels.get(node)
        if tracked is not None and tracked.dim == dim and tracked.inner == 1:
            return tracked.ids
        if tracked is not None:
            self._pin(tracked.ids, f"{node.name} is read along dim {dim}, but its channels are on dim {tracked.dim}")
        ids = self._new(torch.zeros(self._shape(node)[dim], dtype=torch.bool))
        self._pin(ids, f"the channels of {node.name} come from outside the tracked graph (an input, a constant or a "
                       "barrier)")
        return ids

    def _set(self, node: fx.Node, dim: int, ids: torch.Tensor) -> None:
        self.channels[node] = Channels(dim, ids)

    def _derived(self, node: fx.Node, source: Channels, zero: torch.Tensor) -> None:
        """``node``'s channel ``i`` depends on ``source``'s channel ``i`` alone, with its own zero flags."""
        ids = self._new(zero)
        self._join(source.ids, ids)
        self.channels[node] = Channels(source.dim, ids, source.inner, source.inner_dim, source.shuffle)

    def _ref(self, node) -> Optional[Ref]:
        """The parameter or buffer a ``get_attr`` node read by one op reads (``None`` for anything else: a shared
        tensor, whose slicing would change another reader)."""
        if not isinstance(node, fx.Node) or node.op != "get_attr" or len(node.users) != 1:
            return None
        owner, _, name = node.target.rpartition(".")
        return Ref(self.gm.get_submodule(owner), name)

    def _module_ref(self, module: nn.Module, name: str) -> Optional[Ref]:
        return Ref(module, name) if getattr(module, name, None) is not None else None

    def _slice(self, *slices: Slice) -> None:
        """Record what removal slices. A tensor sliced again along the same dim belongs to a module called more than
        once: its calls' channels are joined instead (a row, a column, a gate entry goes when it can go in every
        use), and the tensor is sliced once."""
        for s in slices:
            key = (id(s.ref.owner), s.ref.name, s.dim)
            first = self._sliced.get(key)
            if first is None:
                self._sliced[key] = s
                self.slices.append(s)
            else:
                self._join(self.channels[first.node].ids, self.channels[s.node].ids)

    def _shared(self, node: fx.Node) -> bool:
        """``node`` calls a module that the graph calls more than once."""
        return node.op == "call_module" and node.target in self._twice

    # ops ---------------------------------------------------------------------------------------------------------
    def _visit(self, node: fx.Node) -> None:
        if node.op == "output":
            self._pin_inputs(node, "they are outputs of the model")
            return
        if node.op in ("placeholder", "get_attr"):
            return
        if in_place(node.target) and len(node.args[0].users) > 1:
            handled = f"{_describe(node)} changes {node.args[0].name} in place while others read it"
        else:
            handled = self._dispatch(node)
        if handled is not True:
            self._pin_inputs(node, handled or f"{_describe(node)} reads them, and it is not known to keep channels "
                                              "apart")

    def _dispatch(self, node: fx.Node):
        """Handle ``node`` by its op's rule or handler: ``True``, or a reason (``None`` for the generic one) to pin
        what it reads."""
        target = node.target
        heads = [a for a in node.all_input_nodes if a in self.channels and self.channels[a].inner > 1]
        rule = op_rule(target) if node.op != "call_module" else None
        if heads and not keeps_heads(target):
            return f"{_describe(node)} reads attention heads, and it is not known to keep them apart"
        if node.op == "call_module":
            return self._call_module(node)
        if rule == "reduce":
            return self._reduce(node)
        if rule is not None:
            return self._elementwise(node, rule)
        handle = handler(target)
        return handle(self, node) if handle is not None else None

    def _size(self, node: fx.Node):
        if node.op != "call_method":
            return None
        return True if node.args[1:] == (0,) or node.kwargs == {"dim": 0} else "their sizes are read"

    def _hardtanh(self, node: fx.Node):
        low = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
        high = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
        return self._elementwise(node, "keeps_zero" if low <= 0 <= high else "elementwise")

    def _pow(self, node: fx.Node):
        exponent = node.args[1] if len(node.args) > 1 else None
        if not isinstance(exponent, (int, float)) or isinstance(exponent, bool):
            return None
        return self._elementwise(node, "keeps_zero" if exponent > 0 else "elementwise")  # x ** p keeps 0 if p > 0

    def _getitem(self, node: fx.Node):
        return self._section(node) if node.args[0] in self._splits else None

    def _linear(self, node: fx.Node):  # aten.linear; F.linear: a layer inlined by a weight pass
        args = node.args
        return self._layer(node, args[0], self._ref(args[1]), args[2] if len(args) > 2 else None, 1, False,
                           conv=False)

    def _conv(self, node: fx.Node, transposed: bool):
        args = node.args
        return self._layer(node, args[0], self._ref(args[1]), args[2] if len(args) > 2 else None,
                           args[6] if len(args) > 6 else 1, transposed, conv=True)

    def _addmm(self, node: fx.Node):  # transformers' Conv1D: addmm(bias, x, W_stored)
        args = node.args
        if len(args) != 3 or node.kwargs:
            return None
        return self._layer(node, args[1], self._ref(args[2]), args[0], 1, True, conv=False)

    def _aten_batch_norm(self, node: fx.Node):
        return self._batch_norm(node, [self._ref(a) if a is not None else False for a in node.args[1:5]])

    def _aten_rms_norm(self, node: fx.Node):
        args = node.args
        weight = self._ref(args[2]) if len(args) > 2 else None
        eps = args[3] if len(args) > 3 else None
        return self._rms_norm(node, args[1], weight, eps, lambda e, n, node=node: (
            _set_arg(node, 1, [n]), _set_arg(node, 3, e)))

    def _call_module(self, node: fx.Node):
        module = self.gm.get_submodule(node.target)
        spec = layer_spec(type(module))
        if spec is not None and spec.layout in ("linear", "conv", "conv_transpose"):
            self.layers[node] = module
            return self._layer(node, node.args[0], Ref(module, "weight"), self._module_ref(module, "bias"),
                               getattr(module, "groups", 1), spec.transposed or spec.layout == "conv_transpose",
                               conv=spec.layout != "linear")
        if isinstance(module, _NORM_MODULES):
            self.layers[node] = module
            return self._batch_norm(node, [self._module_ref(module, n) or False for n in (
                "weight", "bias", "running_mean", "running_var")])
        if isinstance(module, FilterGate):
            return self._gate(node, module)
        if isinstance(module, nn.RMSNorm):
            return self._rms_norm(node, module.normalized_shape, self._module_ref(module, "weight"),
                                  module.eps, lambda e, n, m=module: (setattr(m, "eps", e),
                                                                      setattr(m, "normalized_shape", (n,))))
        if isinstance(module, nn.Flatten):
            return self._reshape(node)
        rule = module_rule(module)
        return self._elementwise(node, rule) if rule else None

    def _layer(self, node: fx.Node, x: fx.Node, weight: Optional[Ref], bias, groups: int, transposed: bool,
               conv: bool):
        """A Linear/Conv (``transposed``: the weight is stored ``(in, out, ...)``, as by transformers' Conv1D and
        transposed convolutions)."""
        if bias is not None and not isinstance(bias, Ref):
            bias = self._ref(bias)
            if bias is None:
                return "its bias is not a parameter read by this layer alone"
        if weight is None or not isinstance(groups, int):
            return "its weight is not a parameter read by this layer alone"
        if transposed and groups != 1:
            return "a grouped transposed convolution (its groups are not tracked)"
        shape = self._shape(node)
        dim = 1 if conv else len(shape) - 1
        # a shared layer's columns are sliced for all its calls: a call whose input is not tracked pins them
        in_ids = self._get(x, dim) if groups != 1 or x in self.channels or self._shared(node) else None
        if in_ids is not None and x not in self.channels:  # a shared layer's call on untracked (pinned) channels
            self._set(x, dim, in_ids)
        w = weight.tensor.detach()
        w = w.transpose(0, 1) if transposed else w
        w = w.reshape(w.shape[0], w.shape[1], -1)  # (out, in / groups, kernel positions)
        out, per_group_out = w.shape[0], w.shape[0] // groups
        in_zero = self.zero(in_ids) if in_ids is not None else torch.zeros(w.shape[1] * groups, dtype=torch.bool)
        bias_zero = bias.tensor.detach() == 0 if bias is not None else torch.ones(out, dtype=torch.bool)
        # column i of row j contributes nothing when its weights are zero or its input is
        group_in = in_zero.reshape(groups, 1, -1).expand(groups, per_group_out, -1).reshape(out, -1)
        out_ids = self._new(bias_zero & ((w == 0).all(-1) | group_in).all(1))
        self._set(node, dim, out_ids)
        self._slice(Slice(weight, 1 if transposed else 0, node))
        if bias is not None:
            self._slice(Slice(bias, 0, node))
        if groups == 1:
            if in_ids is not None:
                self._sink(in_ids, in_zero | (w == 0).all(-1).all(0), _describe(node))
                self._slice(Slice(weight, 0 if transposed else 1, x, output=False))
            return True
        ins, outs = in_ids.reshape(groups, -1), out_ids.reshape(groups, -1)
        for g in range(groups):  # a group's inputs and outputs go together: removal takes whole groups
            members = torch.cat([ins[g], outs[g]])
            self._join(members[:1].expand(len(members)), members)
        if node.op == "call_function":
            self.sizes.append(Size(node, lambda keep, n=groups, o=out: n * len(keep) // o,
                                   lambda v, node=node: _set_arg(node, 6, v)))
        return True

    def _batch_norm(self, node: fx.Node, refs: list):
        """``refs``: weight, bias, running mean, running var (``False`` where absent, ``None`` where not sliceable)."""
        x = node.args[0]
        if x not in self.channels and not self._shared(node):
            return True
        if any(r is None for r in refs):
            return "the BatchNorm's tensors are shared or not parameters"
        source = Channels(1, self._get(x, 1))
        weight, bias = refs[0], refs[1]
        zero = (weight.tensor.detach() == 0) & (bias.tensor.detach() == 0) if weight and bias else \
            torch.zeros(len(source.ids), dtype=torch.bool)
        self._derived(node, source, zero)
        self._slice(*[Slice(r, 0, node) for r in refs if r])
        return True

    def _rms_norm(self, node: fx.Node, normalized_shape, weight: Optional[Ref], eps: Optional[float], resize):
        """RMSNorm over the channels (the last dim): ``y = x / sqrt(mean(x^2) + eps) * w`` mixes them through the
        mean, so a channel goes only if its input is zero (not merely unread), and then the ``n'`` channels left get
        ``eps' = eps * n / n'`` and ``w' = w * sqrt(n / n')``, which gives every kept output exactly as before."""
        x = node.args[0]
        shape = self._shape(node)
        source = self.channels.get(x)
        if source is None and self._shared(node):
            source = Channels(len(shape) - 1, self._get(x, len(shape) - 1))
        if source is None:
            return True
        if tuple(normalized_shape) != (shape[-1],) or source.dim != len(shape) - 1 or not weight:
            return ("an RMSNorm over more than the channel dim, or without a weight of its own (a weight is what "
                    "compensates for the channels removed)")
        zero = self.zero(source.ids)
        self._sink(source.ids, zero, f"{_describe(node)} (its mean of squares)")
        self._derived(node, source, zero | (weight.tensor.detach() == 0))
        n = len(source.ids)
        self._slice(Slice(weight, 0, node))
        if not (self._shared(node) and any(size.node.target == node.target for size in self.sizes)):  # once
            self.sizes.append(Size(node, len, lambda kept, w=weight: _compensate_rms(w, eps, resize, x, n, kept)))
        return True

    def _gate(self, node: fx.Node, gate: FilterGate):
        x = node.args[0]
        if x not in self.channels and not self._shared(node):
            return True
        dim = gate.channel_dim % len(self._shape(node))
        source = Channels(dim, self._get(x, dim))
        self._derived(node, source, self.zero(source.ids) | ~gate.live)
        self._slice(Slice(Ref(gate, "theta"), 0, node), Slice(Ref(gate, "alive"), 0, node))
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
        if kind == "elementwise":
            self._derived(node, source, torch.zeros(len(source.ids), dtype=torch.bool))
        else:
            self.channels[node] = source
        return True

    def _pad(self, node: fx.Node):
        source = self.channels.get(node.args[0])
        if source is None:
            return True
        pad = node.args[1]
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
        if len(self._shape(node)) - len(pad) // 2 <= source.dim:
            return f"{_describe(node)} pads the channel dim"
        self._set(node, source.dim, source.ids) if mode == "constant" and not value else \
            self._derived(node, source, torch.zeros(len(source.ids), dtype=torch.bool))
        return True

    def _binary(self, node: fx.Node, op: str):
        shape = self._shape(node)
        tracked = [a for a in node.args if a in self.channels]
        if not tracked:
            return True
        dims = {self.channels[a].dim + len(shape) - len(self._shape(a)) for a in tracked}
        if len(dims) != 1:
            return "operands have their channels on different dims"
        dim = dims.pop()
        taking, others_nonzero = [], False
        for i, a in enumerate(node.args[:2]):
            a_shape = self._shape(a)
            if a_shape is None:  # a Python number
                others_nonzero |= not (a == 0 and op in ("add", "sub"))
                continue
            a_dim = dim - (len(shape) - len(a_shape))
            if a_dim < 0 or a_shape[a_dim] == 1:
                if a in self.channels:
                    return f"{a.name} is broadcast along the channel dim"
                others_nonzero = True
                continue
            taking.append((i, self._operand(node, a, a_dim)))
        zeros = torch.stack([self.zero(ids) for _, ids in taking])
        if op == "mul":
            zero = zeros.any(0)
        elif op == "div":
            zero = zeros[0] if taking[0][0] == 0 else torch.zeros(shape[dim], dtype=torch.bool)
        else:
            zero = zeros.all(0) & (not others_nonzero)
        ids = self._new(zero)
        for _, operand in taking:
            self._join(operand, ids)
        self._set(node, dim, ids)
        return True

    def _operand(self, node: fx.Node, a: fx.Node, dim: int) -> torch.Tensor:
        """Slots of a binary op's operand; a per-channel parameter (a bias, a layer scale) read by this op alone gets
        slots of its own, zero where it is zero, and is sliced with them."""
        ref = self._ref(a) if a not in self.channels else None
        if ref is None:
            return self._get(a, dim)
        value = ref.tensor.detach()
        ids = self._new((value == 0).movedim(dim, 0).reshape(value.shape[dim], -1).all(1))
        self._slice(Slice(ref, dim, node))
        return ids

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
        parts = [self._get(a, dim) for a in tensors]
        if cat_dim % ndim == dim:
            self._set(node, dim, torch.cat(parts))
            return True
        ids = self._new(torch.stack([self.zero(p) for p in parts]).all(0))
        for p in parts:
            self._join(p, ids)
        self._set(node, dim, ids)
        return True

    def _reshape(self, node: fx.Node):
        source = self.channels.get(node.args[0])
        if source is None:
            return True
        before, after, d = tuple(self._shape(node.args[0])), tuple(self._shape(node)), source.dim
        inner, inner_dim, shuffle, count = 1, -1, False, len  # count: the channel position's size from the kept ones
        size_dim = None  # where a literal size follows the kept channels (default: the channel dim)
        if source.shuffle:
            return self._unshuffle(node, source, before, after)
        if source.inner > 1:
            if before == after:
                out_dim, ids, inner, inner_dim = d, source.ids, source.inner, source.inner_dim
                count = (lambda keep, n=source.inner: len(keep) // n)
            elif source.inner_dim == d + 1 == len(before) - 1 and after == (*before[:d], before[d] * before[d + 1]):
                out_dim, ids = d, source.ids  # heads merged back into channels
            else:
                return f"{_describe(node)} reshapes attention heads"
        elif after[:d + 1] == before[:d + 1]:  # the channel dim and those before it untouched
            out_dim, ids = d, source.ids
        elif d == len(before) - 1 and after[-1] == before[-1]:  # leading dims reshaped, channels last
            out_dim, ids = len(after) - 1, source.ids
        elif after == (*before[:d], math.prod(before[d:])):  # the channel dim and those after it merged
            out_dim, ids = d, source.ids.repeat_interleave(math.prod(before[d + 1:]))
        elif d == len(before) - 1 and after[:d] == before[:d] and len(after) == d + 2 and \
                after[d] * after[d + 1] == before[d]:  # channels split into heads (attention)
            out_dim, ids, inner, inner_dim = d, source.ids, after[d + 1], d + 1
            count = (lambda keep, n=after[d + 1]: len(keep) // n)
        elif after[:d] == before[:d] and after[d + 2:] == before[d + 1:] and len(after) == len(before) + 1 and \
                after[d] * after[d + 1] == before[d]:  # channels split into groups (a channel shuffle's first view)
            groups, per = after[d], after[d + 1]
            grid = source.ids.reshape(groups, per)
            self._join(grid[:1].expand(groups, per).reshape(-1), grid.reshape(-1))  # a position goes in every group
            out_dim, ids, inner, inner_dim, shuffle = d, source.ids, per, d + 1, True
            count, size_dim = (lambda keep, g=groups: len(keep) // g), d + 1
        else:
            return f"{_describe(node)} mixes the channel dim with others"
        self._literal_size(node, out_dim if size_dim is None else size_dim, count)
        self.channels[node] = Channels(out_dim, ids, inner, inner_dim, shuffle)
        return True

    def _literal_size(self, node: fx.Node, dim: int, count: Callable) -> None:
        """A ``view``/``reshape`` that writes the size of ``dim`` as a number gets it rewritten to ``count(kept)``."""
        if node.target in ("view", "reshape", torch.reshape, aten.view.default, aten.reshape.default):
            sizes = node.args[1] if isinstance(node.args[1], (list, tuple)) else node.args[1:]
            if isinstance(sizes[dim], int) and sizes[dim] != -1:  # a literal channel (head, group) count
                self.sizes.append(Size(node, count, lambda v, node=node, i=dim: _set_size(node, i, v)))

    def _unshuffle(self, node: fx.Node, source: Channels, before: tuple, after: tuple):
        """A reshape of channels split into groups: the same shape (a ``view`` of it), or the groups merged back,
        in their order or transposed (a channel shuffle: channel ``k * inner + j`` of the split moves to
        ``j * groups + k``)."""
        d, g = source.dim, source.inner_dim
        if before == after:
            self._literal_size(node, g, lambda keep, n=before[d]: len(keep) // n)
            self.channels[node] = source
            return True
        low = min(d, g)
        if abs(d - g) != 1 or after != (*before[:low], before[d] * before[g], *before[low + 2:]):
            return f"{_describe(node)} reshapes a channel shuffle's groups"
        groups, per = before[d], before[g]
        ids = source.ids if g == d + 1 else source.ids.reshape(groups, per).t().reshape(-1)
        self._literal_size(node, low, len)
        self.channels[node] = Channels(low, ids)
        return True

    def _attention(self, node: fx.Node):
        """``scaled_dot_product_attention(q, k, v, mask, ...)`` on ``(batch, heads, tokens, head size)``: a head's
        output is zero where its values are; a head's queries, keys, values and outputs go together (whole heads),
        so the softmax scale (from the unchanged head size, or given) stays."""
        q, k, v = node.args[:3]
        parts = [self.channels.get(a) for a in (q, k, v)]
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        if any(p is None or (p.dim, p.inner_dim) != (1, 3) for p in parts) or len({len(p.ids) for p in parts}) != 1 \
                or len({p.inner for p in parts}) != 1 or node.kwargs.get("enable_gqa"):
            return "attention whose queries, keys and values are not all split into the same heads"
        if isinstance(mask, fx.Node) and self._shape(mask)[1] != 1:
            return "its attention mask differs per head"
        inner = parts[0].inner
        ids = self._new(self.zero(parts[2].ids))
        for head in range(len(ids) // inner):
            members = torch.cat([p.ids[head * inner:(head + 1) * inner] for p in (*parts, Channels(1, ids))])
            self._join(members[:1].expand(len(members)), members)
        self.channels[node] = Channels(1, ids, inner, 3)
        return True

    def _permute(self, node: fx.Node):
        source = self.channels.get(node.args[0])
        if source is None:
            return True
        ndim = len(self._shape(node))
        if node.target in (aten.transpose.int, "transpose", torch.transpose):
            a, b = (d % ndim for d in node.args[1:3])
            order = list(range(ndim))
            order[a], order[b] = b, a
        else:
            dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else node.args[1:]
            order = [d % ndim for d in dims]
        inner_dim = order.index(source.inner_dim) if source.inner > 1 else -1
        self.channels[node] = Channels(order.index(source.dim), source.ids, source.inner, inner_dim, source.shuffle)
        return True

    def _unsqueeze(self, node: fx.Node):
        source = self.channels.get(node.args[0])
        if source is not None:
            dim = (node.args[1] if len(node.args) > 1 else node.kwargs["dim"]) % len(self._shape(node))
            self._set(node, source.dim + (dim <= source.dim), source.ids)
        return True

    def _index(self, node: fx.Node):
        """``select``/``slice`` along a dim other than the channels'."""
        source = self.channels.get(node.args[0])
        if source is None:
            return True
        dim = node.args[1] % len(self._shape(node.args[0]))
        if dim == source.dim:
            return f"{_describe(node)} indexes the channel dim"
        dropped = node.target is aten.select.int and dim < source.dim
        self._set(node, source.dim - dropped, source.ids)
        return True

    def _split(self, node: fx.Node):
        source = self.channels.get(node.args[0])
        if source is None:
            return True
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        if any(u.target is not operator.getitem for u in node.users):
            return f"{_describe(node)}'s result is used other than by indexing"
        if dim % len(self._shape(node.args[0])) != source.dim:
            self._splits[node] = (source, [])
            return True
        sizes = [m.shape[source.dim] for m in node.meta["tensor_meta"]]
        self._splits[node] = (source, sizes)
        bounds = torch.tensor(sizes).cumsum(0)

        def sections(keep: torch.Tensor) -> list[int]:
            return torch.bucketize(keep, bounds, right=True).bincount(minlength=len(bounds)).tolist()

        self.sizes.append(Size(node.args[0], sections, lambda v, node=node: _as_split(node, v)))
        return True

    def _section(self, node: fx.Node):
        source, sizes = self._splits[node.args[0]]
        k = node.args[1]
        start = sum(sizes[:k])
        self._set(node, source.dim, source.ids[start:start + sizes[k]] if sizes else source.ids)
        return True

    def _reduce(self, node: fx.Node):
        source = self.channels.get(node.args[0])
        if source is None:
            return True
        schema = getattr(node.target, "_schema", None)
        if schema is not None and "dim" not in [a.name for a in schema.arguments]:  # aten.sum.default: all dims
            return f"{_describe(node)} reduces over every dim"
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if dims is None or (isinstance(dims, (list, tuple)) and not dims):  # amax(x, dim=[]): every dim
            return f"{_describe(node)} reduces over every dim"
        ndim = len(self._shape(node.args[0]))
        dims = [d % ndim for d in (dims if isinstance(dims, (tuple, list)) else [dims])]
        if source.dim in dims:
            return f"{_describe(node)} reduces over the channel dim"
        self._set(node, source.dim - (0 if keepdim else sum(d < source.dim for d in dims)), source.ids)
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


_G = ChannelGraph
handles(["scaled_dot_product_attention"], _G._attention, heads=True)
handles(["size"], _G._size, overloads=())
handles(["hardtanh", "hardtanh_"], _G._hardtanh, overloads=("default",))
handles([operator.pow, "pow"], _G._pow, overloads=("Tensor_Scalar",))
handles(["pad"], _G._pad, overloads=("default",))
for _op in ("add", "sub", "mul", "div"):
    handles([getattr(operator, "truediv" if _op == "div" else _op), _op, f"{_op}_"],
             functools.partial(lambda graph, node, op: graph._binary(node, op), op=_op), overloads=("Tensor",))
handles(["cat", "concat"], _G._cat, overloads=("default",))
handles(["flatten"], _G._reshape, overloads=("using_ints",), heads=True)
handles(["view", "reshape"], _G._reshape, overloads=("default",), heads=True)
handles(["permute"], _G._permute, overloads=("default",), heads=True)
handles(["transpose"], _G._permute, overloads=("int",), heads=True)
handles(["unsqueeze"], _G._unsqueeze, overloads=("default",))
handles([aten.select.int, aten.slice.Tensor], _G._index)
handles(["split"], _G._split, overloads=("Tensor",))
handles(["split_with_sizes", "chunk"], _G._split, overloads=("default",))
handles([operator.getitem], _G._getitem)
handles(["linear"], _G._linear, overloads=("default",))
handles(["conv1d", "conv2d", "conv3d"], functools.partial(_G._conv, transposed=False),
         overloads=("default", "padding"))
handles(["conv_transpose1d"], functools.partial(_G._conv, transposed=True), overloads=("default",))
handles(["conv_transpose2d", "conv_transpose3d"], functools.partial(_G._conv, transposed=True),
         overloads=("input",))
handles([aten.addmm.default], _G._addmm)
handles([aten.batch_norm.default], _G._aten_batch_norm)
handles([aten.rms_norm.default], _G._aten_rms_norm)

def _compensate_rms(weight: Ref, eps: Optional[float], resize, x: fx.Node, n: int, kept: int) -> None:
    """After an RMSNorm lost ``n - kept`` zero channels: ``resize(eps * n / kept, kept)`` and scale the weight by
    ``sqrt(n / kept)``."""
    if eps is None:  # torch's default: the input dtype's machine epsilon
        eps = torch.finfo(x.meta["tensor_meta"].dtype).eps
    resize(eps * n / kept, kept)
    with torch.no_grad():
        weight.tensor.mul_(math.sqrt(n / kept))


def _set_arg(node: fx.Node, index: int, value) -> None:
    args = list(node.args)
    args += [None] * (index + 1 - len(args))
    args[index] = value
    node.args = tuple(args)


def _set_size(node: fx.Node, index: int, value: int) -> None:
    """Set entry ``index`` of a view/reshape's sizes (a list argument, or varargs of a tensor method)."""
    if isinstance(node.args[1], (list, tuple)):
        sizes = list(node.args[1])
        sizes[index] = value
        _set_arg(node, 1, sizes)
    else:
        _set_arg(node, 1 + index, value)


def _as_split(node: fx.Node, sizes: list[int]) -> None:
    """Make a ``split``/``chunk`` node a split into ``sizes`` along its dim."""
    if node.op == "call_method":
        node.target = "split"
    elif node.target in (aten.split.Tensor, aten.chunk.default, aten.split_with_sizes.default):
        node.target = aten.split_with_sizes.default
    else:
        node.target = torch.split
    _set_arg(node, 1, sizes)


def _describe(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {target!r} ({node.name})"
