"""How each supported layer type stores its weight: which dimension holds the filters, the fans ``torch.nn.init``
computes, the layer's own default init, and the Philox counter of every stored element.

Supported: ``nn.Linear``, ``nn.Conv1d/2d/3d``, ``nn.Embedding`` and ``transformers.pytorch_utils.Conv1D``. A
regenerated weight is indexed in the *canonical* layout ``(out, in, *kernel)`` (``(num_embeddings, embedding_dim)``
for an embedding): element ``(o, i, k...)`` is Philox counter ``o * in * K + i * K + k``. ``Conv1D`` stores the
transpose ``(in, out)``; its elements keep their canonical counters, so a ``Conv1D`` and an ``nn.Linear`` of the same
shape regenerate the same matrix.

It also finds where a graph computes such a layer: its ``call_module`` node (symbolic trace) or the aten ops reading
its weight (export).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn

from ..kernels.init import init_distribution
from ..kernels.philox import derive_seed
from ..rewriter.graph import inline_module, substitute_tensor
from ..rewriter.match import Target
from .regenerated import Stream

__all__ = ["Layout", "layout", "layout_of", "conv1d_types", "row_major_strides", "slice_counters", "substitute_weight", "stored_weight", "weight_readers", "call_sites", "sibling_name", "CONV_OPS"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_aten = torch.ops.aten
CONV_OPS = {_aten.conv1d.default, _aten.conv2d.default, _aten.conv3d.default}
# per layout kind: the exported ops that compute such a layer, and (weight, input) argument positions
_LAYER_OPS = {
    "linear": {_aten.linear.default: (1, 0), _aten.addmm.default: (2, 1)},
    "conv": {op: (1, 0) for op in CONV_OPS},
    "embedding": {_aten.embedding.default: (0, 1)},
}




@dataclass(frozen=True)
class Layout:
    """A layer's weight layout.

    Attributes:
        kind: ``"linear"`` (``nn.Linear`` and ``Conv1D``), ``"conv"`` or ``"embedding"``.
        shape: the canonical shape ``(out, in, *kernel)`` / ``(num_embeddings, embedding_dim)``.
        transposed: the weight is stored as the transpose of ``shape`` (``Conv1D``).
        fan_in, fan_out: as ``torch.nn.init._calculate_fan_in_and_fan_out`` on the canonical weight.
        default_init: the layer's own initialization (``kaiming_uniform`` for Linear/Conv, ``normal(1.0)`` for
            Embedding, ``normal(0.02)`` for ``Conv1D``), used where a rule gives no ``init``.
    """

    kind: str
    shape: tuple[int, ...]
    transposed: bool
    fan_in: int
    fan_out: int
    default_init: str

    @property
    def features(self) -> int:
        """Size of the output's feature dimension: ``out`` (Linear, Conv) or ``embedding_dim`` (Embedding)."""
        return self.shape[1] if self.kind == "embedding" else self.shape[0]

    def stored_dim(self, dim: str) -> int:
        """The stored weight's dimension holding the output filters (``"out"``) or input channels (``"in"``)."""
        canonical = 0 if dim == "out" else 1
        return 1 - canonical if self.transposed else canonical

    def counter_strides(self) -> tuple[int, ...]:
        """Per stored dimension, how much the Philox counter grows per step (row-major in the canonical layout)."""
        strides = row_major_strides(self.shape)
        return strides[::-1] if self.transposed else strides

    def init(self, rule_init: Optional[str]) -> str:
        """The rule's init, else the layer's own default."""
        return rule_init or self.default_init

    def stream(self, target: Target, name: str, rule_init: Optional[str] = None,
               shape: tuple[int, ...] = ()) -> Stream:
        """The regenerated ``weight`` (the init: the rule's or the layer's own) or ``bias`` (PyTorch's default
        Linear/Conv bias init ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``) of module ``target``: Philox key
        ``derive_seed(seed, qualname, name)``, the key the ``random`` action uses for the same tensor.

        Raises:
            ValueError: ``name`` is neither ``"weight"`` nor ``"bias"``.
        """
        if name == "weight":
            kind, scale = init_distribution(self.init(rule_init), self.fan_in, self.fan_out)
        elif name == "bias":
            kind, scale = "uniform", 1 / math.sqrt(self.fan_in)
        else:
            raise ValueError(f"a layer regenerates its weight or bias, not {name!r}")
        return Stream(derive_seed(target.seed, target.qualname, name), kind, scale, shape)


def row_major_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Per dimension of ``shape``, how many elements apart consecutive indices lie when it is flattened row-major
    (the Philox counter step of a tensor regenerated in its own layout)."""
    return tuple(math.prod(shape[d + 1:]) for d in range(len(shape)))


def slice_counters(shape: tuple[int, ...], strides: tuple[int, ...], dim: int, index: torch.Tensor) -> torch.Tensor:
    """The Philox counters of a slice of a whole tensor: element ``idx`` of the whole tensor has counter
    ``sum(idx[d] * strides[d])``; the slice takes ``index`` (int64, 1-d) along ``dim`` and everything elsewhere.

    Returns:
        int64 tensor of ``shape`` (``shape[dim] == len(index)``), on ``index``'s device.
    """
    counters = torch.zeros((), dtype=torch.int64, device=index.device)
    for d, (size, stride) in enumerate(zip(shape, strides)):
        along = index if d == dim else torch.arange(size, device=index.device)
        counters = counters + (along * stride).reshape(-1, *[1] * (len(shape) - d - 1))
    return counters


def substitute_weight(gm: fx.GraphModule, target: Target, modules: dict[str, torch.nn.Module]) -> None:
    """Inline module ``target`` and let each module in ``modules`` (keyed ``"weight"``, ``"bias"``; a forward with
    no input returning the tensor) compute that tensor wherever the graph read it (the ``freeze_fraction`` and
    ``grow`` assemblers).

    Raises:
        PolicyError: the traced forward never reads the weight (names the module, the rule and its YAML line).
    """
    inline_module(gm, target.qualname)
    for name, module in modules.items():
        if not substitute_tensor(gm, f"{target.qualname}.{name}", module) and name == "weight":
            raise target.error("its weight is never used by the traced forward")


def stored_weight(gm: fx.GraphModule, target: Target) -> torch.nn.Parameter:
    """The parameter ``{target.qualname}.weight`` of ``gm``.

    Raises:
        PolicyError: the traced module has no such parameter, or shares it with another module (tied weights: a
            weight action would change the other module too). Names the module, the rule and its YAML line.
    """
    name = f"{target.qualname}.weight"
    try:
        weight = gm.get_parameter(name)
    except AttributeError:
        raise target.error(f"{target.rule.action} needs a weight parameter that the traced forward uses; the module "
                           "has none") from None
    aliases = [n for n, p in gm.named_parameters(remove_duplicate=False) if p is weight and n != name]
    if aliases:
        raise target.error(f"its weight is tied to {', '.join(aliases)}; {target.rule.action} cannot change one "
                           "without the other")
    return weight


def layout(gm: fx.GraphModule, target: Target) -> Layout:
    """The :class:`Layout` of module ``target``'s weight in ``gm``.

    Raises:
        PolicyError: the module is not one of the supported types, or has no weight (names the module, the rule and
            its YAML line).
    """
    return layout_of(target, tuple(stored_weight(gm, target).shape))


def conv1d_types() -> tuple[type, ...]:
    """transformers' ``Conv1D`` if transformers is imported (a model holding one has imported it), else ``()``:
    seedrand itself never needs transformers."""
    module = sys.modules.get("transformers.pytorch_utils")
    return (module.Conv1D,) if module is not None else ()


def layout_of(target: Target, shape: tuple[int, ...]) -> Layout:
    """The :class:`Layout` of a weight of the stored ``shape`` in a module of class ``target.cls``.

    Raises:
        PolicyError: the module is not one of the supported types.
    """
    conv1d = conv1d_types()
    cls = target.cls
    if not issubclass(cls, (nn.Linear, *conv1d, *_CONVS, nn.Embedding)):
        raise target.error(f"{target.rule.action} supports nn.Linear, transformers Conv1D, nn.Conv1d/2d/3d and "
                           "nn.Embedding")
    if issubclass(cls, nn.Linear):
        return Layout("linear", shape, False, shape[1], shape[0], "kaiming_uniform")
    if issubclass(cls, conv1d):
        return Layout("linear", shape[::-1], True, shape[0], shape[1], "normal(0.02)")
    if issubclass(cls, _CONVS):
        receptive = math.prod(shape[2:])
        return Layout("conv", shape, False, shape[1] * receptive, shape[0] * receptive, "kaiming_uniform")
    return Layout("embedding", shape, False, shape[1], shape[0], "normal(1.0)")


def weight_readers(gm: fx.GraphModule, target: Target) -> list[tuple[fx.Node, fx.Node]]:
    """``(weight get_attr node, op reading it)`` pairs in an exported graph (none in a symbolically traced one)."""
    return [(node, user) for node in gm.graph.nodes
            if node.op == "get_attr" and node.target == f"{target.qualname}.weight" for user in node.users]


def call_sites(gm: fx.GraphModule, target: Target, kind: str) -> list[tuple[fx.Node, fx.Node]]:
    """``(node, input)`` pairs computing the layer of layout ``kind``: its ``call_module`` node (symbolic trace), or
    the ``aten.linear``/``aten.addmm``, ``aten.conv{1,2,3}d`` or ``aten.embedding`` nodes reading its weight (export).

    Raises:
        PolicyError: another op reads the weight too (tied or shared weights).
    """
    sites = [(n, n.args[0]) for n in gm.graph.nodes if n.op == "call_module" and n.target == target.qualname]
    for weight, user in weight_readers(gm, target):
        positions = _LAYER_OPS[kind].get(user.target)
        if positions and len(user.args) > positions[0] and user.args[positions[0]] is weight:
            sites.append((user, user.args[positions[1]]))
        else:
            raise target.error(f"its weight is also read by {user.target} (tied or shared weights cannot be "
                               "regenerated without changing the other reader)")
    return sites


def sibling_name(gm: fx.GraphModule, target: Target, suffix: str) -> str:
    """``{module}_{suffix}``, the free name beside module ``target`` where a pass installs what it inserts.

    Raises:
        PolicyError: the module is the root (nothing is beside it), or the name is taken (names the module, the rule
            and its YAML line).
    """
    if not target.qualname:
        raise target.error(f"{target.rule.action} inserts beside a submodule, not the root module")
    name = f"{target.qualname}_{suffix}"
    parent_name, _, leaf = name.rpartition(".")
    if hasattr(gm.get_submodule(parent_name) if parent_name else gm, leaf):
        raise target.error(f"cannot insert {name!r}: the name is taken")
    return name
