"""The ``random`` action (van den Heuvel & Sladek 2020): a layer whose weight is non-trainable and regenerated from its
Philox key on every use, forward and backward, so it stores zero bytes. Handles every registered layer
(:func:`seedrand.register_layer`; built in: ``nn.Linear``, transformers' ``Conv1D`` (GPT-2), ``nn.Conv1d/2d/3d``
and ``nn.ConvTranspose1d/2d/3d`` with zero padding, ``nn.Embedding``), on graphs from either tracing strategy.

The weight's Philox key is ``derive_seed(seed, qualname, "weight")``; its elements use the counters of
``seedrand.passes.layout`` (row-major in ``(out, in, *kernel)``, for ``Conv1D`` too, whose stored weight is the
transpose, and for transposed convolutions). ``init`` defaults to the layer's own (``kaiming_uniform``, exactly PyTorch's default Linear/Conv init;
``normal(1.0)`` for Embedding; ``normal(0.02)`` for ``Conv1D``) with the fans ``torch.nn.init`` computes.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch
import torch.fx as fx
import torch.nn as nn
from pydantic import Field

from ..actions import StrictModel, ActionSpec, Init, per_module, register_action
from ..kernels.dispatch import autocast_input, plain_torch_ops
from ..kernels.init import init_distribution, sample, sample_at
from ..kernels.ops import DEFAULT_CHUNK_BYTES, regen_conv, regen_matmul
from ..kernels.philox import derive_seed
from ..layers import LayerSpec
from ..rewriter.graph import erase_with_dead_inputs, full_args, install, substitute_tensor
from ..rewriter.kept import compute_attribute
from ..rewriter.match import Target
from .layout import (Layout, call_sites, conv_hyperparameters, layout, layout_of, spec_of, stored_weight,
                     weight_readers)
from .regenerated import Regenerating, Stream

__all__ = ["Random", "RandomLinear", "RandomConv", "RandomConvTranspose", "RandomEmbedding", "RandomTensor", "random",
           "random_captured"]


class Random(StrictModel):
    """``random``: the weight becomes non-trainable and regenerated from its Philox key on every use."""

    init: Optional[Init] = Field(None, description="the regenerated weight's init; none: the layer's own "
                                                   "(`kaiming_uniform` for Linear/Conv, `normal(1.0)` for "
                                                   "Embedding, `normal(0.02)` for `Conv1D`)")
    bias: Literal["zero", "random", "keep", "trainable"] = Field(
        "keep", description="`keep`: stored, frozen; `trainable`: stored, trained; `zero`: dropped; `random`: "
                            "regenerated (PyTorch's default bias init)")


class _RandomLayer(Regenerating):
    """A layer whose ``weight_shape`` weight is regenerated from ``seed`` (stream ``weight``); bias as in
    :class:`RandomLinear` (a regenerated bias is stream ``bias``)."""

    def __init__(self, weight_shape: tuple[int, ...], fan_in: int, fan_out: int, seed: int, init: str,
                 bias: nn.Parameter | int | None, dtype: torch.dtype = torch.float32, transposed: bool = False):
        super().__init__()
        self.weight_shape, self.fan_in, self.fan_out, self.init = tuple(weight_shape), fan_in, fan_out, init
        self.transposed = transposed
        self.register_dtype(dtype)
        self.streams["weight"] = Stream(seed, *init_distribution(init, fan_in, fan_out), self.weight_shape)
        if isinstance(bias, int):  # PyTorch's default Linear/Conv bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            self.streams["bias"] = Stream(bias, "uniform", 1 / math.sqrt(fan_in), (weight_shape[0],))
        self.bias = bias if isinstance(bias, nn.Parameter) else None

    @property
    def seed(self) -> int:
        """The weight's Philox key."""
        return self.streams["weight"].seed

    def _distribution(self) -> tuple[float, bool]:
        stream = self.streams["weight"]
        return stream.scale, stream.kind == "normal"

    def _bias(self, dtype: torch.dtype, device: torch.device) -> Optional[torch.Tensor]:
        return self.regenerate("bias", dtype, device) if "bias" in self.streams else self.bias

    @property
    def weight(self) -> torch.Tensor:
        """The regenerated weight (shape ``weight_shape``) materialized in the dtype and on the device the module
        follows: a new tensor per read, not a parameter (for inspection and for tools that read a layer's
        ``weight.device``/``dtype``/``shape``; the forward never materializes it). ``regenerate("weight", dtype,
        device)`` gives it in any dtype and on any device."""
        return self.regenerate("weight", self.dtype, self.dtype_probe.device)

    def merged(self) -> dict[str, Optional[torch.Tensor]]:
        """The replaced layer's ``weight`` (its stored layout: transposed for ``Conv1D`` and transposed
        convolutions) and ``bias`` materialized, in the dtype and on the device this module follows (what
        :func:`seedrand.merge` puts back)."""
        weight = self.weight
        return {"weight": weight.transpose(0, 1) if self.transposed else weight,
                "bias": self._bias(weight.dtype, weight.device)}

    def extra_repr(self) -> str:
        bias = "random" if "bias" in self.streams else self.bias is not None
        return f"weight_shape={self.weight_shape}, init={self.init}, seed={self.seed}, bias={bias}"


class RandomLinear(_RandomLayer):
    """``y = x @ W.T + b`` with ``W`` regenerated from ``seed`` (never stored, never a parameter).

    Args:
        in_features, out_features: the weight's shape is ``(out_features, in_features)``.
        seed: the weight's Philox key.
        init: an init name (``seedrand.kernels.init``); fans are ``in_features``/``out_features``.
        bias: ``None`` (no bias), a ``Parameter`` (trainable, or frozen and stored), or the int Philox key of a
            regenerated ``U(-1/sqrt(in_features), 1/sqrt(in_features))`` bias (PyTorch's default Linear bias init).
        chunk_bytes: float32 bytes of weight regenerated at a time (``seedrand.kernels.ops``).
        dtype: the replaced layer's dtype (follows ``module.to(dtype)``): what :meth:`merged` materializes in.
        transposed: the replaced layer stored the weight transposed (transformers ``Conv1D``).

    Input ``(..., in_features)`` of any float dtype; output ``(..., out_features)`` of the same dtype.
    """

    def __init__(self, in_features: int, out_features: int, seed: int, init: str,
                 bias: nn.Parameter | int | None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 dtype: torch.dtype = torch.float32, transposed: bool = False):
        super().__init__((out_features, in_features), in_features, out_features, seed, init, bias, dtype, transposed)
        self.in_features, self.out_features, self.chunk_bytes = in_features, out_features, chunk_bytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = autocast_input(x)
        if plain_torch_ops():  # ONNX export, torch.func.grad
            y = nn.functional.linear(x, self.regenerate("weight", x.dtype, x.device))
        else:
            y = regen_matmul(x, self.seed, self.out_features, self.in_features, *self._distribution(), False,
                             self.chunk_bytes)
        bias = self._bias(x.dtype, x.device)
        return y if bias is None else y + bias.to(y.dtype)


class RandomConv(_RandomLayer):
    """A Conv1d/2d/3d (zero padding) whose weight is regenerated from ``seed`` on every use (``regen_conv``).

    Args:
        weight_shape: ``(out_channels, in_channels / groups, *kernel)``.
        stride, padding, dilation, groups: as ``nn.Conv{n}d`` (tuples of ``len(kernel)`` ints; numeric padding).
        seed, init, bias, dtype: as :class:`RandomLinear`; fans are those ``torch.nn.init`` computes for such a
            weight.

    Input ``(N, C_in, *spatial)``; output ``(N, C_out, *spatial_out)``, dtype of the input.
    """

    def __init__(self, weight_shape: tuple[int, ...], stride: tuple[int, ...], padding: tuple[int, ...],
                 dilation: tuple[int, ...], groups: int, seed: int, init: str, bias: nn.Parameter | int | None,
                 dtype: torch.dtype = torch.float32):
        receptive = math.prod(weight_shape[2:])
        super().__init__(tuple(weight_shape), weight_shape[1] * receptive, weight_shape[0] * receptive, seed, init,
                         bias, dtype)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = autocast_input(x)
        if plain_torch_ops():  # ONNX export, torch.func.grad
            conv = (nn.functional.conv1d, nn.functional.conv2d, nn.functional.conv3d)[len(self.weight_shape) - 3]
            y = conv(x, self.regenerate("weight", x.dtype, x.device), None, self.stride, self.padding, self.dilation, self.groups)
        else:
            y = regen_conv(x, self.seed, list(self.weight_shape), *self._distribution(), list(self.stride),
                           list(self.padding), list(self.dilation), self.groups)
        bias = self._bias(x.dtype, x.device)
        return y if bias is None else y + bias.to(y.dtype).reshape(-1, *[1] * (y.dim() - 2))


class RandomConvTranspose(_RandomLayer):
    """A ConvTranspose1d/2d/3d (zero padding, ``groups=1``) whose weight is regenerated from ``seed`` on every use:
    the weight is materialized for the call (no fused kernel exists for a transposed convolution) and dropped after,
    so nothing is stored between calls.

    Args:
        weight_shape: the canonical ``(out_channels, in_channels, *kernel)``; the layer convolves with its
            transpose ``(in_channels, out_channels, *kernel)``, the stored layout of ``nn.ConvTranspose{n}d``.
        stride, padding, output_padding, dilation: as ``nn.ConvTranspose{n}d`` (tuples of ``len(kernel)`` ints).
        seed, init, bias, dtype: as :class:`RandomLinear`; fans are those PyTorch's ``ConvTranspose`` init uses
            (``fan_in = out_channels * kernel``).

    Input ``(N, C_in, *spatial)``; output ``(N, C_out, *spatial_out)``, dtype of the input.
    """

    def __init__(self, weight_shape: tuple[int, ...], stride: tuple[int, ...], padding: tuple[int, ...],
                 output_padding: tuple[int, ...], dilation: tuple[int, ...], seed: int, init: str,
                 bias: nn.Parameter | int | None, dtype: torch.dtype = torch.float32):
        receptive = math.prod(weight_shape[2:])
        super().__init__(tuple(weight_shape), weight_shape[0] * receptive, weight_shape[1] * receptive, seed, init,
                         bias, dtype, transposed=True)
        self.stride, self.padding, self.output_padding, self.dilation = stride, padding, output_padding, dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = autocast_input(x)
        conv = (nn.functional.conv_transpose1d, nn.functional.conv_transpose2d,
                nn.functional.conv_transpose3d)[len(self.weight_shape) - 3]
        weight = self.regenerate("weight", x.dtype, x.device).transpose(0, 1)
        bias = self._bias(x.dtype, x.device)
        return conv(x, weight, None if bias is None else bias.to(x.dtype), self.stride, self.padding,
                    self.output_padding, 1, self.dilation)


class RandomEmbedding(_RandomLayer):
    """An embedding table regenerated from ``seed``: a lookup regenerates only the rows it reads, so neither the
    table nor a gradient for it ever exists.

    Args:
        num_embeddings, embedding_dim: the table's shape; row ``r`` holds Philox counters
            ``r * embedding_dim .. (r + 1) * embedding_dim - 1``.
        seed: the table's Philox key.
        init: an init name; fans as ``torch.nn.init`` computes them for the table (``fan_in = embedding_dim``).
        padding_idx: a row that reads as zeros (as ``nn.Embedding`` initializes it), or ``None``.
        dtype: dtype of the output (the replaced table's); follows ``module.to(dtype)``.

    Input: integer indices of any shape ``S``; output ``(*S, embedding_dim)``.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, seed: int, init: str, padding_idx: Optional[int],
                 dtype: torch.dtype = torch.float32):
        super().__init__((num_embeddings, embedding_dim), embedding_dim, num_embeddings, seed, init, None, dtype)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = None if padding_idx is None else padding_idx % num_embeddings

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        stream = self.streams["weight"]
        offsets = indices.unsqueeze(-1) * self.embedding_dim + torch.arange(self.embedding_dim,
                                                                            device=indices.device)
        rows = sample_at(stream.seed, offsets, stream.kind, stream.scale, self.dtype)
        if self.padding_idx is None:
            return rows
        return rows.masked_fill((indices == self.padding_idx).unsqueeze(-1), 0.0)


class RandomTensor(Regenerating):
    """A whole weight tensor regenerated from its Philox key on every call (``random`` on a layer of layout
    ``"tensors"``, whose own forward reads the tensor: attention in-projections, mixture-of-experts weights): stored
    nowhere, materialized per forward.

    Args:
        stream: the tensor's key, distribution and shape; element ``j`` (row-major) is Philox counter ``j``.
        dtype: the replaced parameter's dtype (follows ``module.to(dtype)``).

    ``forward()`` takes no input and returns the tensor: ``stream.shape``, the module's dtype and device; no gradient.
    """

    def __init__(self, stream: Stream, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.register_dtype(dtype)
        self.streams["value"] = stream

    def forward(self) -> torch.Tensor:
        stream = self.streams["value"]
        return sample(stream.seed, stream.shape, stream.kind, stream.scale, self.dtype, self.dtype_probe.device)

    def extra_repr(self) -> str:
        stream = self.streams["value"]
        return f"shape={stream.shape}, {stream.kind}({stream.scale:.4g}), seed={stream.seed}"


def _random_tensors(gm: fx.GraphModule, target: Target, spec: LayerSpec) -> None:
    """``random`` on a layer of layout ``"tensors"``: each of its weights becomes a :class:`RandomTensor`, read
    where the parameter was: by the module's own forward (a leaf of a symbolic trace, and the kept model: a computed
    attribute) or by the exported graph's ops. Philox key ``derive_seed(seed, qualname, name)``; fans those of one
    ``(out, in)`` matrix (an expert's, in a stack).

    Raises:
        PolicyError: a bias mode other than ``keep`` (the layer's biases stay as they are), the module has none of
            the weights, or the traced forward never reads one.
    """
    if target.rule.params.bias != "keep":
        raise target.error("random on this layer regenerates its weight tensors only: bias must be keep")
    owner = gm.get_submodule(target.qualname)
    called = any(n.op == "call_module" and n.target == target.qualname for n in gm.graph.nodes)
    names = [name for name in spec.weights if isinstance(getattr(owner, name, None), torch.Tensor)]
    if not names:
        raise target.error(f"it has none of the weights {', '.join(spec.weights)}")
    for name in names:
        value = getattr(owner, name)
        rows, cols = value.shape[-2:][::-1] if spec.transposed else value.shape[-2:]
        kind, scale = init_distribution(target.rule.params.init or spec.init, cols, rows)
        module = RandomTensor(Stream(derive_seed(target.seed, target.qualname, name), kind, scale,
                                     tuple(value.shape)), value.dtype)
        if called:
            compute_attribute(owner, name, module)
        elif not substitute_tensor(gm, f"{target.qualname}.{name}", module):
            raise target.error(f"its {name} is never used by the traced forward")


def _bias(target: Target, stored: Optional[torch.Tensor]) -> nn.Parameter | int | None:
    mode = target.rule.params.bias
    if mode == "zero" or (stored is None and mode in ("keep", "trainable")):
        return None
    if mode == "random":
        return derive_seed(target.seed, target.qualname, "bias")
    return nn.Parameter(stored.detach().clone(), requires_grad=mode == "trainable")


def _linear(gm: fx.GraphModule, target: Target, lay: Layout, seed: int, init: str, bias, dtype) -> nn.Module:
    return RandomLinear(lay.shape[1], lay.shape[0], seed, init, bias, dtype=dtype, transposed=lay.transposed)


def _conv(gm: fx.GraphModule, target: Target, lay: Layout, seed: int, init: str, bias, dtype) -> nn.Module:
    h = _conv_settings(gm, target, lay)
    return RandomConv(lay.shape, h["stride"], h["padding"], h["dilation"], h["groups"], seed, init, bias, dtype)


def _conv_transpose(gm: fx.GraphModule, target: Target, lay: Layout, seed: int, init: str, bias,
                    dtype) -> nn.Module:
    h = _conv_settings(gm, target, lay)
    return RandomConvTranspose(lay.shape, h["stride"], h["padding"], h["output_padding"], h["dilation"], seed, init,
                               bias, dtype)


def _embedding(gm: fx.GraphModule, target: Target, lay: Layout, seed: int, init: str, bias, dtype) -> nn.Module:
    return RandomEmbedding(*lay.shape, seed, init, _padding_idx(gm, target), dtype)


# per layout (seedrand.layers.LAYOUTS): the regenerated layer replacing a registered layer of that layout
_REPLACEMENTS = {"linear": _linear, "conv": _conv, "conv_transpose": _conv_transpose, "embedding": _embedding}


def _replacement(gm: fx.GraphModule, target: Target, lay: Layout, bias: nn.Parameter | int | None) -> nn.Module:
    seed, init = derive_seed(target.seed, target.qualname, "weight"), lay.init(target.rule.params.init)
    return _REPLACEMENTS[lay.kind](gm, target, lay, seed, init, bias, stored_weight(gm, target).dtype)


def _padding_idx(gm: fx.GraphModule, target: Target) -> Optional[int]:
    """The embedding's ``padding_idx``: from the leaf module (symbolic trace) or the ``aten.embedding`` call."""
    calls = [user for _, user in weight_readers(gm, target) if user.target == torch.ops.aten.embedding.default]
    if calls:
        padding_idx = full_args(calls[0])[2]
        return None if padding_idx == -1 else padding_idx
    module = gm.get_submodule(target.qualname)
    if getattr(module, "max_norm", None) is not None:
        raise target.error("random cannot regenerate an embedding with max_norm (it renormalizes the stored "
                           "table in place)")
    return getattr(module, "padding_idx", None)


def _conv_settings(gm: fx.GraphModule, target: Target, lay: Layout) -> dict[str, object]:
    """:func:`~seedrand.passes.layout.conv_hyperparameters` with every size as one int per spatial dim, and string
    padding as the numbers it means (``"valid"``: none; ``"same"``: ``dilation * (kernel - 1) / 2`` per side).

    Raises:
        PolicyError: ``padding="same"`` pads one side more than the other (an even effective kernel).
    """
    found, n = conv_hyperparameters(gm, target, lay), len(lay.shape) - 2
    settings = {k: (v if k == "groups" else _per_dim(v, n)) for k, v in found.items() if k != "padding"}
    padding = found["padding"]
    if padding == "valid":
        padding = 0
    elif padding == "same":
        total = [d * (k - 1) for d, k in zip(settings["dilation"], lay.shape[2:])]
        if any(t % 2 for t in total):
            raise target.error("random supports padding='same' where it pads both sides alike (an odd kernel "
                               f"extent); this one pads {total} in all")
        padding = [t // 2 for t in total]
    settings["padding"] = _per_dim(padding, n)
    return settings


def _per_dim(value, n: int) -> tuple[int, ...]:
    """An aten conv argument (an int, or a list of 1 or ``n`` ints) as ``n`` ints."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    return tuple(values * n if len(values) == 1 else values)


def random(gm: fx.GraphModule, target: Target) -> None:
    """Replace the registered layer ``target`` by the regenerated layer of its layout: :class:`RandomLinear`,
    :class:`RandomConv`, :class:`RandomConvTranspose` or :class:`RandomEmbedding` (see the module docstring).

    Raises:
        PolicyError: the module's class is not registered, its weight is shared with other ops, or its padding is
            not zeros on both sides alike (names the module, the rule and its YAML line).
    """
    spec = spec_of(target)
    if spec.layout == "tensors":
        return _random_tensors(gm, target, spec)
    try:
        stored_bias = gm.get_parameter(f"{target.qualname}.bias")
    except AttributeError:
        stored_bias = None
    lay = layout(gm, target)
    module = _replacement(gm, target, lay, _bias(target, stored_bias))
    sites = call_sites(gm, target, lay.kind)
    if not sites:
        raise target.error("its weight is never used by the traced forward")
    install(gm, target.qualname, module)
    for node, x in sites:
        if node.op != "call_module":
            with gm.graph.inserting_before(node):
                new = gm.graph.call_module(target.qualname, (x,))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            erase_with_dead_inputs(gm.graph, node)


_CAPTURED_CONVS = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}


def random_captured(gm: fx.GraphModule, target: Target, parameters: dict[str, fx.Node]) -> None:
    """``random`` on a graph Dynamo captured (the ``seedrand`` backend's ``policy`` option): every ``linear``, ``addmm``
    of a transformers ``Conv1D`` or ``conv{1,2,3}d`` reading the module's weight placeholder becomes
    ``seedrand::regen_matmul``/``regen_conv`` with
    the key, init and counters :func:`random` uses, so the compiled model computes what ``seedrand.rewrite`` with
    the same policy computes. The bias placeholder is detached (``keep``), used as is (``trainable``) or dropped
    (``zero``); the user's module is not changed.

    Raises:
        PolicyError: the module is not an ``nn.Linear``/``Conv1D``/``nn.Conv1d/2d/3d``, its weight was not captured or is read
            by another op, the convolution pads by name (``"same"``), or the rule asks ``bias: random`` (use
            ``seedrand.rewrite`` for those).
    """
    weight = parameters.get(f"{target.qualname}.weight")
    if weight is None:
        raise target.error("the captured graph has no weight parameter of this module")
    lay = layout_of(target, tuple(weight.meta["example_value"].shape))
    params = target.rule.params
    if lay.kind not in ("linear", "conv") or params.bias == "random":
        raise target.error("the backend applies random to linear and convolution layers with bias keep, trainable "
                           "or zero; use seedrand.rewrite for embeddings, transposed convolutions and regenerated "
                           "biases")
    seed = derive_seed(target.seed, target.qualname, "weight")
    kind, scale = init_distribution(lay.init(params.init), lay.fan_in, lay.fan_out)
    for user in list(weight.users):
        args = list(user.args) + [user.kwargs[k] for k in ("bias",) if k in user.kwargs]
        matmul = (seed, lay.shape[0], lay.shape[1], scale, kind == "normal", False, DEFAULT_CHUNK_BYTES)
        if user.target is nn.functional.linear and args[1] is weight:
            call = (torch.ops.seedrand.regen_matmul.default, (args[0], *matmul))
        elif lay.transposed and user.target is torch.addmm and len(args) == 3 and args[2] is weight and \
                not user.kwargs:  # Conv1D: addmm(bias, x, W_stored) with W_stored = W.T, so x @ W_stored = x @ W.T
            call = (torch.ops.seedrand.regen_matmul.default, (args[1], *matmul))
            args = [args[1], weight, args[0]]
        elif user.target in _CAPTURED_CONVS and args[1] is weight:
            n = _CAPTURED_CONVS[user.target]
            stride, padding, dilation, groups = (args[3:7] + [1, 0, 1, 1][len(args[3:7]):])[:4]
            if isinstance(padding, str):
                raise target.error(f"the backend's random supports numeric padding only, not padding={padding!r}")
            call = (torch.ops.seedrand.regen_conv.default, (args[0], seed, list(lay.shape), scale, kind == "normal", list(_per_dim(stride, n)),
                                 list(_per_dim(padding, n)), list(_per_dim(dilation, n)), groups))
        else:
            raise target.error(f"its weight is also read by {user.target} (tied or shared weights cannot be "
                               "regenerated without changing the other reader)")
        with gm.graph.inserting_before(user):
            new = gm.graph.call_function(*call)
            bias = args[2] if len(args) > 2 and params.bias != "zero" else None
            if bias is not None and params.bias == "keep":
                bias = gm.graph.call_function(torch.ops.aten.detach.default, (bias,))
            if bias is not None and user.target in _CAPTURED_CONVS:
                bias = gm.graph.call_method("view", (bias, -1, *[1] * _CAPTURED_CONVS[user.target]))
            if bias is not None:
                new = gm.graph.call_function(torch.add, (new, bias))
        user.replace_all_uses_with(new)
        gm.graph.erase_node(user)


register_action(ActionSpec("random", Random, per_module(random), owns_weight=True, captured=random_captured))
