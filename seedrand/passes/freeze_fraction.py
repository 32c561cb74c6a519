"""The ``freeze_fraction`` action: freeze a fraction of a layer's output filters (``dim: out``) or input channels
(``dim: in``) and train the rest (paper 002, section 3: the frozen set ``W_f`` is fixed at its random init or zeroed;
paper 001, listing 4.1: slice the weight, stop the gradient on the fixed slice, re-assemble).

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
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn

from ..kernels import philox
from ..kernels.philox import derive_seed
from ..rewriter.match import Target
from .layout import layout, row_major_strides, slice_counters, stored_weight, substitute_weight
from .regenerated import Regenerating, Stream

__all__ = ["FrozenFraction", "freeze_fraction", "frozen_indices"]


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


class FrozenFraction(Regenerating):
    """A tensor assembled along ``dim`` from a trainable slice (the parameter ``trainable``) and a frozen one.

    Args:
        value: the current tensor, any shape and float dtype; the trainable slice starts at its values.
        dim: the dimension that is sliced.
        frozen: ascending indices along ``dim`` of the frozen slice (fewer than ``value.shape[dim]``).
        fixed: ``"random"`` (regenerated from ``stream``), ``"zero"`` or ``"keep"`` (buffer ``frozen``).
        stream: for ``fixed="random"``: the Philox key and distribution of the whole tensor (its ``shape`` is
            replaced by the frozen slice's).
        counter_strides: per dimension of ``value``, the Philox counter step (element ``idx`` of the whole tensor
            has counter ``sum(idx[d] * counter_strides[d])``); row-major by default.

    ``forward()`` takes no input and returns the assembled tensor: shape, dtype and device of ``value``'s; the frozen
    slice gets no gradient.
    """

    def __init__(self, value: torch.Tensor, dim: int, frozen: list[int], fixed: str,
                 stream: Optional[Stream] = None, counter_strides: Optional[tuple[int, ...]] = None):
        super().__init__()
        n, value = value.shape[dim], value.detach()
        trainable = [i for i in range(n) if i not in set(frozen)]
        self.dim, self.fixed = dim, fixed
        self.trainable = nn.Parameter(_take(value, dim, trainable))
        self.frozen_shape = frozen_shape = tuple(len(frozen) if d == dim else s for d, s in enumerate(value.shape))
        self.register_buffer("frozen_index", torch.tensor(frozen, dtype=torch.int64), persistent=False)
        if fixed == "keep":
            self.register_buffer("frozen", _take(value, dim, frozen))
        elif fixed == "random":
            self.streams["frozen"] = Stream(stream.seed, stream.kind, stream.scale, frozen_shape)
            self.counter_strides = counter_strides or row_major_strides(value.shape)
        # cat the two slices, frozen first unless it is the last block; reorder only if neither is in place
        self.frozen_first = trainable + frozen != list(range(n))
        order = frozen + trainable if self.frozen_first else trainable + frozen
        inverse = None if order == list(range(n)) else torch.argsort(torch.tensor(order))
        self.register_buffer("order", inverse, persistent=False)

    def offsets(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """The whole tensor's Philox counters at the frozen slice (see :class:`Regenerating`)."""
        return slice_counters(self.frozen_shape, self.counter_strides, self.dim, self.frozen_index.to(device))

    def _frozen(self) -> torch.Tensor:
        like = self.trainable
        if self.fixed == "keep":
            return self.frozen
        if self.fixed == "zero":
            return torch.zeros(self.frozen_shape, dtype=like.dtype, device=like.device)
        return self.regenerate("frozen", like.dtype, like.device)

    def forward(self) -> torch.Tensor:
        frozen = self._frozen()
        parts = (frozen, self.trainable) if self.frozen_first else (self.trainable, frozen)
        whole = torch.cat(parts, self.dim)
        return whole if self.order is None else whole.index_select(self.dim, self.order)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, frozen={len(self.frozen_index)} of {self.frozen_shape}, fixed={self.fixed}"


def _take(value: torch.Tensor, dim: int, index: list[int]) -> torch.Tensor:
    return value.index_select(dim, torch.tensor(index, dtype=torch.int64, device=value.device)).clone()


def freeze_fraction(gm: fx.GraphModule, target: Target) -> None:
    """Replace the weight (and, with ``dim: out``, the bias) of the Linear/Conv1D/Conv/Embedding ``target`` by
    :class:`FrozenFraction` modules (see the module docstring).

    Raises:
        PolicyError: the module is of another type, has no weight the forward reads, shares its weight (tied), or
            the rule asks ``dim: in`` of an embedding (names the module, the rule and its YAML line).
    """
    params, qualname = target.rule.params, target.qualname
    lay, weight = layout(gm, target), stored_weight(gm, target)
    if lay.kind == "embedding" and params.dim == "in":
        raise target.error("dim: in on an nn.Embedding: its rows are tokens, not filters over input channels; "
                           "use dim: out to freeze a fraction of the rows")
    dim = lay.stored_dim(params.dim)
    frozen = frozen_indices(weight.shape[dim], params.fraction, params.select,
                            derive_seed(target.seed, qualname, "select"))
    replaced = {"weight": FrozenFraction(weight, dim, frozen, params.fixed, lay.stream(target, "weight", params.init),
                                         lay.counter_strides())}
    bias = dict(gm.named_parameters()).get(f"{qualname}.bias")
    if params.dim == "out" and bias is not None:
        replaced["bias"] = FrozenFraction(bias, 0, frozen, params.fixed, lay.stream(target, "bias"))
    substitute_weight(gm, target, replaced)
