"""How a registered layer stores its weight (:mod:`seedrand.layers`): which dimension holds the filters, the fans
``torch.nn.init`` computes, the layer's own default init, and the Philox counter of every stored element.

A regenerated weight is indexed in the *canonical* layout ``(out, in, *kernel)`` (``(num_embeddings, embedding_dim)``
for an embedding): element ``(o, i, k...)`` is Philox counter ``o * in * K + i * K + k``. A layer that stores the
transpose of its first two dims (transformers' ``Conv1D``: ``(in, out)``; a transposed convolution:
``(in, out, *kernel)``) keeps the canonical counters, so a ``Conv1D`` and an ``nn.Linear`` of the same shape
regenerate the same matrix.

It also finds where a graph computes such a layer: its ``call_module`` node (symbolic trace) or the aten ops reading
its weight (export), and the convolution hyperparameters either records.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from ..kernels.init import init_distribution
from ..kernels.philox import derive_seed
from ..layers import LayerSpec, layer_spec, registered_names
from ..rewriter.graph import full_args, inline_module, reads_module, substitute_tensor
from ..rewriter.match import Target
from .regenerated import Stream

__all__ = ["Layout", "layout", "layout_of", "row_major_strides", "slice_counters", "substitute_weight",
           "stored_weight", "weight_readers", "call_sites", "sibling_name", "conv_hyperparameters", "spec_of", "CONV_OPS"]

_aten = torch.ops.aten
CONV_OPS = {_aten.conv1d.default, _aten.conv2d.default, _aten.conv3d.default, _aten.conv1d.padding,
            _aten.conv2d.padding, _aten.conv3d.padding}
CONV_TRANSPOSE_OPS = {_aten.conv_transpose1d.default, _aten.conv_transpose2d.input, _aten.conv_transpose3d.input}
_TRANSPOSES = {_aten.t.default, _aten.numpy_T.default}
# per layout: the exported ops that compute such a layer, and (weight, input) argument positions
_LAYER_OPS = {
    "linear": {_aten.linear.default: (1, 0), _aten.addmm.default: (2, 1)},
    "conv": {op: (1, 0) for op in CONV_OPS},
    "conv_transpose": {op: (1, 0) for op in CONV_TRANSPOSE_OPS},
    "embedding": {_aten.embedding.default: (0, 1)},
}
# positions of the hyperparameters in the exported ops' arguments
_CONV_ARGS = {"stride": 3, "padding": 4, "dilation": 5, "groups": 6}
_CONV_TRANSPOSE_ARGS = {"stride": 3, "padding": 4, "output_padding": 5, "groups": 6, "dilation": 7}


@dataclass(frozen=True)
class Layout:
    """A layer's weight layout.

    Attributes:
        kind: the registered layout (``seedrand.layers.LAYOUTS``): ``"linear"``, ``"conv"``, ``"conv_transpose"`` or
            ``"embedding"``.
        shape: the canonical shape ``(out, in, *kernel)`` / ``(num_embeddings, embedding_dim)``.
        transposed: the weight is stored with the first two dims of ``shape`` swapped (``Conv1D``, transposed
            convolutions).
        fan_in, fan_out: as ``torch.nn.init._calculate_fan_in_and_fan_out`` computes them for the layer's own init
            (on the canonical weight; on the stored one for a transposed convolution, as PyTorch's
            ``ConvTranspose`` initializes).
        default_init: the layer's own initialization (:attr:`seedrand.layers.LayerSpec.init`), used where a rule
            gives no ``init``.
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

    @property
    def channel_dim(self) -> int:
        """The output's dimension holding the features: 1 for a convolution, the last (-1) otherwise."""
        return 1 if self.kind in ("conv", "conv_transpose") else -1

    def stored_dim(self, dim: str) -> int:
        """The stored weight's dimension holding the output filters (``"out"``) or input channels (``"in"``)."""
        canonical = 0 if dim == "out" else 1
        return 1 - canonical if self.transposed else canonical

    def counter_strides(self) -> tuple[int, ...]:
        """Per stored dimension, how much the Philox counter grows per step (row-major in the canonical layout)."""
        strides = row_major_strides(self.shape)
        return (strides[1], strides[0], *strides[2:]) if self.transposed else strides

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
        if not reads_module(gm, target.qualname):
            raise target.error("its weight is never used by the traced forward (the forward never calls the module; "
                               "optional: true skips such modules)") from None
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
        PolicyError: the module's class is not registered (``seedrand.register_layer``), it has no weight, or it is
            a grouped transposed convolution (names the module, the rule and its YAML line).
    """
    spec_of(target)  # an unregistered class or a wrapper is named as such, before its missing weight
    lay = layout_of(target, tuple(stored_weight(gm, target).shape))
    if lay.kind == "conv_transpose" and conv_hyperparameters(gm, target, lay)["groups"] != 1:
        raise target.error(f"{target.rule.action} supports transposed convolutions with groups=1 only")
    return lay


def spec_of(target: Target) -> LayerSpec:
    """The :class:`~seedrand.layers.LayerSpec` of the module's class.

    Raises:
        PolicyError: the class is not registered (names the registered classes and ``seedrand.register_layer``),
            it is a wrapper (``LayerSpec.delegate``: select the child), or its layout is ``"tensors"`` and the
            action is not ``random``.
    """
    spec = layer_spec(target.cls)
    if spec is not None and spec.layout == "tensors" and target.rule.action != "random":
        raise target.error(f"{target.rule.action} does not apply to a layer whose forward reads its weights as "
                           "tensors (layout 'tensors': attention in-projections, mixture-of-experts weights); random "
                           "and freeze do")
    if spec is not None and spec.delegate is not None:
        raise target.error(f"{target.rule.action} applies to the layer a {target.cls.__name__} wraps: select its "
                           f"{spec.delegate!r}")
    if spec is None:
        raise target.error(f"{target.rule.action} applies to registered layer classes ({registered_names()}); "
                           f"register {target.cls.__qualname__} with seedrand.register_layer if its forward is one "
                           "of their layouts")
    return spec


def layout_of(target: Target, shape: tuple[int, ...]) -> Layout:
    """The :class:`Layout` of a weight of the stored ``shape`` in a module of class ``target.cls``.

    Raises:
        PolicyError: the class is not registered, or ``shape`` does not fit its layout.
    """
    spec = spec_of(target)
    if len(shape) != (2 if spec.layout in ("linear", "embedding") else len(shape)) or len(shape) < 2:
        raise target.error(f"its weight of shape {shape} is not a {spec.layout} weight")
    receptive = math.prod(shape[2:])
    if spec.layout == "conv_transpose":  # fans of the stored (in, out / groups, *kernel), as PyTorch initializes
        return Layout("conv_transpose", (shape[1], shape[0], *shape[2:]), True, shape[1] * receptive,
                      shape[0] * receptive, spec.init)
    canonical = (shape[1], shape[0]) if spec.transposed else shape
    fan_in, fan_out = canonical[1] * receptive, canonical[0] * receptive
    return Layout(spec.layout, canonical, spec.transposed, fan_in, fan_out, spec.init)


def weight_readers(gm: fx.GraphModule, target: Target) -> list[tuple[fx.Node, fx.Node]]:
    """``(weight get_attr node, op reading it)`` pairs in an exported graph (none in a symbolically traced one)."""
    return [(node, user) for node in gm.graph.nodes
            if node.op == "get_attr" and node.target == f"{target.qualname}.weight" for user in node.users]


def call_sites(gm: fx.GraphModule, target: Target, kind: str) -> list[tuple[fx.Node, fx.Node]]:
    """``(node, input)`` pairs computing the layer of layout ``kind``: its ``call_module`` node (symbolic trace), or
    the exported ops reading its weight (``aten.linear``/``aten.addmm``, ``aten.conv{1,2,3}d`` with numeric or
    string padding, ``aten.conv_transpose{1,2,3}d``, ``aten.embedding``), or ``x @ W.T`` (``aten.matmul`` of the
    input and ``aten.t``/``aten.numpy_T`` of a linear weight: Falcon's ``FalconLinear``).

    Raises:
        PolicyError: another op reads the weight too (tied or shared weights).
    """
    sites = [(n, n.args[0]) for n in gm.graph.nodes if n.op == "call_module" and n.target == target.qualname]
    for weight, user in weight_readers(gm, target):
        positions = _LAYER_OPS[kind].get(user.target)
        if positions and len(user.args) > positions[0] and user.args[positions[0]] is weight:
            sites.append((user, user.args[positions[1]]))
        elif kind == "linear" and _matmul_by_transpose(user):
            (matmul,) = user.users
            sites.append((_with_bias(gm, target, matmul), matmul.args[0]))
        else:
            raise target.error(f"its weight is also read by {user.target} (tied or shared weights cannot be "
                               "regenerated without changing the other reader)")
    return sites


def _matmul_by_transpose(node: fx.Node) -> bool:
    """``node`` transposes a weight for one ``aten.matmul(x, node)`` and nothing else: ``x @ W.T``."""
    if node.target not in _TRANSPOSES or len(node.users) != 1:
        return False
    (user,) = node.users
    return user.target is _aten.matmul.default and user.args[1] is node and user.args[0] is not node


def _with_bias(gm: fx.GraphModule, target: Target, matmul: fx.Node) -> fx.Node:
    """The node computing ``x @ W.T + b``: the ``add`` of the module's bias after ``matmul``, or ``matmul`` itself
    when the module has no bias.

    Raises:
        PolicyError: the module has a bias that is not added right after ``x @ W.T`` (the layer would not be
            ``linear(x, W, b)``).
    """
    bias = f"{target.qualname}.bias"
    if bias not in dict(gm.named_parameters()):
        return matmul
    adds = [u for u in matmul.users if u.target is _aten.add.Tensor and len(matmul.users) == 1
            and any(a.op == "get_attr" and a.target == bias for a in u.args if isinstance(a, fx.Node))]
    if not adds:
        raise target.error("it computes x @ W.T but does not add its bias right after; its forward is not "
                           "linear(x, W, b)")
    return adds[0]


def conv_hyperparameters(gm: fx.GraphModule, target: Target, lay: Layout) -> dict[str, object]:
    """``stride``, ``padding``, ``dilation``, ``groups`` (and ``output_padding`` for a transposed convolution) of the
    convolution ``target``: from the leaf module's attributes of those names (symbolic trace; PyTorch's defaults
    where it has none) or from the exported call's arguments. Lists as the module or the op holds them; ``padding``
    may be ``"same"``/``"valid"``.

    Raises:
        PolicyError: the weight is read by no convolution of the traced forward, or the module pads other than with
            zeros (``padding_mode``).
    """
    positions = _CONV_TRANSPOSE_ARGS if lay.kind == "conv_transpose" else _CONV_ARGS
    calls = [user for _, user in weight_readers(gm, target) if user.target in _LAYER_OPS[lay.kind]]
    if calls:
        args = full_args(calls[0])
        return {name: args[i] for name, i in positions.items()}
    if not any(n.op == "call_module" and n.target == target.qualname for n in gm.graph.nodes):
        raise target.error("its weight is never used by a convolution in the traced forward")
    module = gm.get_submodule(target.qualname)
    if getattr(module, "padding_mode", "zeros") != "zeros":
        raise target.error(f"{target.rule.action} supports zero padding only, not "
                           f"padding_mode={module.padding_mode!r}")
    defaults = {"stride": 1, "padding": 0, "output_padding": 0, "dilation": 1, "groups": 1}
    return {name: getattr(module, name, defaults[name]) for name in positions}


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
