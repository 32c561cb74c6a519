"""The ``freeze_fraction`` action: freeze a fraction of a layer's output filters (``dim: out``) or input channels
(``dim: in``) and train the rest (Rosenfeld & Tsotsos 2018, section 3: the frozen set ``W_f`` is fixed at its random
init or zeroed; the dynamic network capacity thesis, listing 4.1: slice the weight, stop the gradient on the fixed
slice, re-assemble).

Of the ``n`` filters along the chosen dimension, ``n_frozen = min(floor(fraction * n + 1/2), n - 1)`` are frozen
(round half up; at least one stays trainable), chosen by ``select``: the first ones, the last ones, or ``random``
(the ``n_frozen`` smallest of Philox ``randint(derive_seed(seed, qualname, "select"), 0..n-1)``, so the choice is a
pure function of the seed). Only the trainable slice is an ``nn.Parameter``, so gradients and optimizer state shrink
with it. The frozen slice is, by ``fixed``:

* ``random``: the same slice of the weight the ``random`` action would regenerate (Philox key
  ``derive_seed(seed, qualname, "weight")``, the counters of ``seedrand.passes.layout``, the rule's ``init`` or the
  layer's own), regenerated on every use and never stored;
* ``zero``: zeros;
* ``keep``: its current values, stored as a buffer.

With ``dim: out`` the bias follows its filters: the frozen filters' bias entries are regenerated (``U(-1/sqrt(fan_in),
1/sqrt(fan_in))``, PyTorch's default bias init, key ``derive_seed(seed, qualname, "bias")``), zero, or kept. The
module's ``weight`` (and ``bias``) become :class:`FrozenFraction` submodules that assemble the full tensor, and the
graph reads them in place of the stored tensors; any layer type whose forward reads ``self.weight`` works the same.
An ``nn.Linear`` called as a module becomes a :class:`FrozenFractionLinear` holding those submodules, whose matmul
never assembles the weight on CUDA (``seedrand::frozen_matmul``: frozen rows generated inside the Triton kernel).
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch
import torch.fx as fx
import torch.nn as nn
from pydantic import Field

from ..actions import StrictModel, ActionSpec, Init, per_module, register_action
from ..kernels import philox
from ..kernels.dispatch import autocast_input, plain_torch_ops
from ..kernels.init import sample, sample_at
from ..kernels.ops import frozen_matmul
from ..kernels.philox import derive_seed
from ..rewriter.graph import install
from ..rewriter.match import Target
from .layout import (layout, layout_of, row_major_strides, slice_counters, stored_weight, substitute_weight,
                     weight_readers)
from .regenerated import Regenerating, Stream

__all__ = ["FreezeFraction", "FrozenSlice", "FrozenFraction", "FrozenFractionLinear", "freeze_fraction", "freeze_fraction_captured",
           "frozen_indices"]


class FreezeFraction(StrictModel):
    """``freeze_fraction``: freeze ``fraction`` of the weight's filters (``dim: out``) or inputs (``dim: in``)."""

    fraction: float = Field(ge=0.0, lt=1.0, description="the fraction of filters (or inputs) frozen, in [0, 1)")
    dim: Literal["out", "in"] = Field("out", description="`out`: output filters (rows, with their biases); `in`: "
                                                         "input channels (columns)")
    select: Literal["first", "last", "random"] = Field("first", description="which are frozen: the first, the last, "
                                                                            "or a seeded random choice")
    fixed: Literal["random", "zero", "keep"] = Field("random", description="what the frozen slice holds: an init "
                                                     "regenerated from the seed (never stored), zeros, or the "
                                                     "layer's own values (stored)")
    init: Optional[Init] = Field(None, description="the init of `fixed: random`; none: the layer's own")


def frozen_indices(n: int, fraction: float, select: str, seed: int) -> list[int]:
    """The indices (ascending) of the frozen filters among ``n`` (see the module docstring for the rounding).

    Args:
        n: the number of filters along the frozen dimension (at least 1).
        fraction: in ``[0, 1)``.
        select: ``"first"``, ``"last"`` or ``"random"``.
        seed: the Philox key of the ``random`` choice.
    """
    count = min(math.floor(fraction * n + 0.5), n - 1)
    if select == "first":
        return list(range(count))
    if select == "last":
        return list(range(n - count, n))
    keys = philox.randint(seed, torch.arange(n, dtype=torch.int64))
    return sorted(torch.argsort(keys, stable=True)[:count].tolist())


class FrozenSlice(Regenerating):
    """The frozen slice, along ``dim``, of a ``freeze_fraction`` tensor (Rosenfeld & Tsotsos 2018, section 3; the
    dynamic network capacity thesis, listing 4.1), and :meth:`forward` that writes it over a whole tensor (what the
    ``seedrand`` backend's captured graphs use: the user's parameter stays whole and only the frozen slice of it is
    replaced).

    Args:
        value: the current tensor, any shape and float dtype.
        dim: the dimension that is sliced.
        frozen: ascending indices along ``dim`` of the frozen slice (fewer than ``value.shape[dim]``).
        fixed: ``"random"`` (regenerated from ``stream``), ``"zero"`` or ``"keep"``.
        stream: for ``fixed="random"``: the Philox key and distribution of the whole tensor (its ``shape`` is
            replaced by the frozen slice's).
        counter_strides: per dimension of ``value``, the stream step (element ``idx`` of the whole tensor is stream
            element ``sum(idx[d] * counter_strides[d])``); row-major by default.
    """

    def __init__(self, value: torch.Tensor, dim: int, frozen: list[int], fixed: str,
                 stream: Optional[Stream] = None, counter_strides: Optional[tuple[int, ...]] = None):
        super().__init__()
        value = value.detach()
        self.dim, self.fixed, self.frozen_list = dim, fixed, tuple(frozen)
        self.whole_shape = tuple(value.shape)
        self.frozen_shape = frozen_shape = tuple(len(frozen) if d == dim else s for d, s in enumerate(value.shape))
        self.register_buffer("frozen_index", torch.tensor(frozen, dtype=torch.int64), persistent=False)
        if fixed == "random":
            self.streams["frozen"] = Stream(stream.seed, stream.kind, stream.scale, frozen_shape)
            self.counter_strides = counter_strides or row_major_strides(value.shape)

    def offsets(self, name: str, device: torch.device | str = "cpu", index: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        """The whole tensor's stream elements at the frozen slice (see :class:`Regenerating`); ``index``: the frozen
        indices as a tensor, ``frozen_index`` by default."""
        index = self.frozen_index.to(device) if index is None else index
        return slice_counters(self.frozen_shape, self.counter_strides, self.dim, index)

    def regenerate(self, name: str, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu") -> torch.Tensor:
        """The frozen slice (see :class:`Regenerating`). On the CPU it is cut from the whole tensor, generated as one
        counter range (``cpu_philox``'s block path): 90% of a 4096 x 4096 weight in 55-93 ms against 75-99 ms for
        gathering its counters (``benchmarks/regen_matmul.py``; both mostly page faults of the fresh tensors)."""
        if torch.device(device).type != "cpu":
            return super().regenerate(name, dtype, device)
        stream = self.streams[name]
        order = sorted(range(len(self.whole_shape)), key=lambda d: -self.counter_strides[d])  # stable: row-major
        canonical = sample(stream.seed, tuple(self.whole_shape[d] for d in order), stream.kind, stream.scale, dtype)
        whole = canonical.permute([order.index(d) for d in range(len(order))])
        return whole.index_select(self.dim, self.frozen_index).contiguous()

    def forward(self, whole: torch.Tensor) -> torch.Tensor:
        """``whole`` (the tensor's shape) with its frozen slice replaced; the gradient reaches only the rest.

        What the backend's captured graphs trace (with fake tensors, so the indices are made here, as constants of
        the graph, not read from buffers). With ``fixed="keep"`` the slice is ``whole``'s own, detached."""
        index = torch.tensor(self.frozen_list, dtype=torch.int64, device=whole.device)
        if self.fixed == "random":
            stream = self.streams["frozen"]
            frozen = sample_at(stream.seed, self.offsets("frozen", index=index), stream.kind, stream.scale,
                               whole.dtype)
        elif self.fixed == "zero":
            frozen = torch.zeros(self.frozen_shape, dtype=whole.dtype, device=whole.device)
        else:
            frozen = whole.detach().index_select(self.dim, index)
        return whole.index_copy(self.dim, index, frozen)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, frozen={len(self.frozen_index)} of {self.frozen_shape}, fixed={self.fixed}"


class FrozenFraction(FrozenSlice):
    """A tensor assembled along ``dim`` from a trainable slice (the parameter ``trainable``) and the frozen one of
    :class:`FrozenSlice` (same arguments; the trainable slice starts at ``value``'s values, and with
    ``fixed="keep"`` the frozen one is the buffer ``frozen``, its slice of ``value``).

    ``forward()`` takes no input and returns the assembled tensor: shape, dtype and device of ``value``'s; the frozen
    slice gets no gradient, and the trainable one is trainable only if ``value`` was (``requires_grad`` is kept).
    """

    def __init__(self, value: torch.Tensor, dim: int, frozen: list[int], fixed: str,
                 stream: Optional[Stream] = None, counter_strides: Optional[tuple[int, ...]] = None):
        super().__init__(value, dim, frozen, fixed, stream, counter_strides)
        n, requires_grad, value = value.shape[dim], value.requires_grad, value.detach()
        self.trained_list = trainable = [i for i in range(n) if i not in set(frozen)]
        # a tensor the user froze stays frozen (PEFT's frozen base weights): only its slices are rearranged
        self.trainable = nn.Parameter(_take(value, dim, trainable), requires_grad=requires_grad)
        if fixed == "keep":
            self.register_buffer("frozen", _take(value, dim, frozen))
        # cat the two slices, frozen first unless it is the last block; reorder only if neither is in place
        self.frozen_first = trainable + frozen != list(range(n))
        order = frozen + trainable if self.frozen_first else trainable + frozen
        inverse = None if order == list(range(n)) else torch.argsort(torch.tensor(order))
        self.register_buffer("order", inverse, persistent=False)

    def frozen_values(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The frozen slice, ``frozen_shape``, in ``dtype`` on ``device``; no gradient."""
        if self.fixed == "keep":
            return self.frozen
        if self.fixed == "zero":
            return torch.zeros(self.frozen_shape, dtype=dtype, device=device)
        return self.regenerate("frozen", dtype, device)

    def forward(self) -> torch.Tensor:
        frozen = self.frozen_values(self.trainable.dtype, self.trainable.device)
        parts = (frozen, self.trainable) if self.frozen_first else (self.trainable, frozen)
        whole = torch.cat(parts, self.dim)
        return whole if self.order is None else whole.index_select(self.dim, self.order)


class FrozenFractionLinear(nn.Module):
    """An ``nn.Linear`` whose weight is a :class:`FrozenFraction` (``dim: out`` or ``in``): ``y = x @ W.T + b``
    computed by ``seedrand::frozen_matmul`` (``seedrand.kernels.ops``), which on CUDA is one Triton launch that loads
    the trainable rows (columns) and generates the frozen ones in registers, so the whole weight is never written
    (``fixed: random`` and ``zero``; ``keep`` and ONNX export assemble it). The submodules ``weight`` and ``bias`` (a
    :class:`FrozenFraction`, the original ``Parameter`` or ``None``) keep the state-dict keys of the inlined form.

    Paper 002, section 3 (fractional layers). Input ``(..., in_features)``, a float dtype; output
    ``(..., out_features)``, same dtype. Raises ``ValueError`` (from the op) when the input's width does not fit.
    """

    def __init__(self, weight: FrozenFraction, bias: FrozenFraction | nn.Parameter | None):
        super().__init__()
        self.weight, self.bias = weight, bias
        trained = torch.tensor(weight.trained_list, dtype=torch.int64)
        n = len(weight.trained_list) + len(weight.frozen_list)
        source = torch.full((n,), -1, dtype=torch.int64)
        source[trained] = torch.arange(len(trained))
        self.register_buffer("source", source, persistent=False)
        self.register_buffer("trained", trained, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, x = self.weight, autocast_input(x)
        if w.fixed == "keep" or plain_torch_ops():
            y = nn.functional.linear(x, w())
        else:
            stream = w.streams.get("frozen", Stream(0, "zero", 0.0, ()))
            y = frozen_matmul(x, w.trainable, self.source, self.trained, w.dim, stream.seed, stream.scale,
                              stream.kind, False)
        bias = self._bias()
        return y if bias is None else y + bias.to(y.dtype)

    def _bias(self) -> Optional[torch.Tensor]:
        return self.bias() if isinstance(self.bias, FrozenFraction) else self.bias

    def merged(self) -> dict[str, Optional[torch.Tensor]]:
        """The replaced ``nn.Linear``'s ``weight`` and ``bias``, assembled (what :func:`seedrand.merge` puts back)."""
        return {"weight": self.weight(), "bias": self._bias()}


def _take(value: torch.Tensor, dim: int, index: list[int]) -> torch.Tensor:
    return value.index_select(dim, torch.tensor(index, dtype=torch.int64, device=value.device)).clone()


def _slices(target: Target, lay, weight: torch.Tensor, bias: Optional[torch.Tensor],
            cls: type[FrozenSlice]) -> dict[str, FrozenSlice]:
    """The ``cls`` modules of the weight and, with ``dim: out``, the bias of ``target`` (see the module docstring)."""
    params, qualname = target.rule.params, target.qualname
    if lay.kind == "embedding" and params.dim == "in":
        raise target.error("dim: in on an nn.Embedding: its rows are tokens, not filters over input channels; "
                           "use dim: out to freeze a fraction of the rows")
    dim = lay.stored_dim(params.dim)
    frozen = frozen_indices(weight.shape[dim], params.fraction, params.select,
                            derive_seed(target.seed, qualname, "select"))
    slices = {"weight": cls(weight, dim, frozen, params.fixed, lay.stream(target, "weight", params.init),
                            lay.counter_strides())}
    if params.dim == "out" and bias is not None:
        slices["bias"] = cls(bias, 0, frozen, params.fixed, lay.stream(target, "bias"))
    return slices


def freeze_fraction(gm: fx.GraphModule, target: Target) -> None:
    """Replace the weight (and, with ``dim: out``, the bias) of the registered layer ``target`` by
    :class:`FrozenFraction` modules (see the module docstring).

    Raises:
        PolicyError: the module is of another type, has no weight the forward reads, shares its weight (tied), or
            the rule asks ``dim: in`` of an embedding (names the module, the rule and its YAML line).
    """
    bias = dict(gm.named_parameters()).get(f"{target.qualname}.bias")
    slices = _slices(target, layout(gm, target), stored_weight(gm, target), bias, FrozenFraction)
    if _plain_linear(gm, target):
        install(gm, target.qualname, FrozenFractionLinear(slices["weight"], slices.get("bias", bias)))
    else:
        substitute_weight(gm, target, slices)


def _plain_linear(gm: fx.GraphModule, target: Target) -> bool:
    """The graph calls ``target``, an ``nn.Linear`` with the stock forward, as a module (a symbolic trace; an
    exported graph reads its weight with aten ops instead), so :class:`FrozenFractionLinear` can replace it."""
    return (target.cls.forward is nn.Linear.forward and not weight_readers(gm, target)
            and any(n.op == "call_module" and n.target == target.qualname for n in gm.graph.nodes))


def freeze_fraction_captured(gm: fx.GraphModule, target: Target, parameters: dict[str, fx.Node]) -> None:
    """``freeze_fraction`` on a graph Dynamo captured (the ``seedrand`` backend's ``policy`` option): every read of
    the module's weight (and, with ``dim: out``, bias) placeholder reads it with its frozen slice replaced by a
    :class:`FrozenSlice` that the graph calls (the values, frozen set and keys of :func:`freeze_fraction`), so the
    compiled model computes what ``seedrand.rewrite`` computes and no gradient reaches the frozen slice of the
    user's parameter, which is not changed. With ``fixed: keep`` the frozen slice is the parameter's own, detached:
    it gets no gradient, but an optimizer with weight decay still moves it (``seedrand.rewrite`` stores a copy).

    Raises:
        PolicyError: as :func:`freeze_fraction`, or the captured graph has no weight parameter of the module.
    """
    weight = parameters.get(f"{target.qualname}.weight")
    if weight is None:
        raise target.error("the captured graph has no weight parameter of this module")
    values = {name: parameters[f"{target.qualname}.{name}"].meta["example_value"]
              for name in ("weight", "bias") if f"{target.qualname}.{name}" in parameters}
    lay = layout_of(target, tuple(values["weight"].shape))
    for name, module in _slices(target, lay, values["weight"], values.get("bias"), FrozenSlice).items():
        node = parameters[f"{target.qualname}.{name}"]
        # called, not registered as a submodule: AOTAutograd wants a Dynamo source for every buffer of gm
        with gm.graph.inserting_after(node):
            replaced = gm.graph.call_function(module.forward, (node,))
        node.replace_all_uses_with(replaced, delete_user_cb=lambda user: user is not replaced)


register_action(ActionSpec("freeze_fraction", FreezeFraction, per_module(freeze_fraction), owns_weight=True,
                           captured=freeze_fraction_captured))
