"""The ``grow`` action: capacity that grows in stages while the capacity trained so far is frozen (the dynamic network
capacity thesis, section 5.1: "split the network into fifths ... after it fails to [improve] within the last 10 batches,
we proceed to increase the capacity of the network by a fifth, but also freeze the existing capacity"; listing 4.1:
slice the weight, stop the gradient on the fixed slice, re-assemble).

The ``n`` output units (``dim: out``) or inputs (``dim: in``) of a matched layer are split into ``stages`` slices of
equal size (the first ``n % stages`` one larger, as ``torch.tensor_split``). Each slice is its own ``nn.Parameter``,
allocated up front so that an optimizer built over ``model.parameters()`` holds them all and never needs rebuilding:

* an *inactive* slice is zero and has ``requires_grad=False``, so it contributes nothing (with ``dim: in`` for any
  producer; with ``dim: out`` when the activation maps 0 to 0) and has no gradient, hence no optimizer state;
* when :class:`seedrand.CapacityScheduler` activates it, it is set to the layer's own init (or the rule's ``init``)
  computed for the *full* layer (its full fan-in and fan-out): the values the ``random`` action would regenerate
  there, Philox key ``derive_seed(seed, qualname, "weight")``, a pure function of the seed;
* with ``freeze_previous``, the slices trained before are frozen at that moment (``requires_grad=False``).

The ``start`` slices active at first keep the layer's current values. With ``dim: out`` the bias is sliced with its
units (PyTorch's default bias init on activation, key ``derive_seed(seed, qualname, "bias")``); with ``dim: in`` it
stays one trainable parameter. Pair a ``dim: out`` rule on a layer with a ``dim: in`` rule on its consumer (same
stages) to grow the hidden units of a network as the paper does. :func:`drop_inactive` removes inactive units for
inference.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.fx as fx
import torch.nn as nn
from pydantic import Field, model_validator

from ..actions import StrictModel, ActionSpec, Init, per_module, register_action
from ..kernels.init import sample_at
from ..rewriter.match import Target
from .layout import layout, row_major_strides, slice_counters, stored_weight, substitute_weight
from .regenerated import Stream

__all__ = ["Grow", "Plateau", "GrowingSlices", "grow", "stage_bounds"]


class Plateau(StrictModel):
    """When a loss has plateaued: its moving average over ``window`` steps has not fallen by more than ``min_delta``
    below its best (lowest) value of the stage for ``window`` steps."""

    window: int = Field(default=10, ge=1, description="steps of the moving average, and of the wait (>= 1)")
    min_delta: float = Field(default=0.0, ge=0.0, description="how far below its best the average must fall to "
                                                              "count as progress (>= 0)")


class Grow(StrictModel):
    """``grow``: the layer's output units (``dim: out``) or inputs (``dim: in``) split into ``stages`` equal slices,
    ``start`` of them active at first; :class:`seedrand.CapacityScheduler` activates the next one on a plateau of the
    loss (the dynamic network capacity thesis, section 5.1), freezing the slices trained so far when
    ``freeze_previous``."""

    stages: int = Field(default=5, ge=2, description="equal slices of the units (>= 2)")
    start: int = Field(default=1, ge=1, description="slices active before the first plateau (< `stages`)")
    freeze_previous: bool = Field(True, description="freeze the slices trained so far when the next one starts")
    dim: Literal["out", "in"] = Field("out", description="grow output units (rows) or inputs (columns)")
    plateau: Plateau = Field(default_factory=Plateau, description="when the loss has plateaued: `window`, "
                                                                  "`min_delta`")
    init: Optional[Init] = Field(None, description="the slices' init; none: the layer's own")

    @model_validator(mode="after")
    def _start_within_stages(self):
        if self.start >= self.stages:
            raise ValueError(f"start: {self.start} must be below stages: {self.stages} (start is how many of the "
                             "stages are active before the first plateau; with all of them active nothing can grow)")
        return self


def stage_bounds(n: int, stages: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of each of ``stages`` slices of ``range(n)``, sized as ``torch.tensor_split`` sizes them
    (the first ``n % stages`` slices one larger). Raises ``ValueError`` when ``n < stages``."""
    if n < stages:
        raise ValueError(f"{n} units cannot be split into {stages} stages")
    base, extra = divmod(n, stages)
    stops = [sum(base + (i < extra) for i in range(k + 1)) for k in range(stages)]
    return list(zip([0] + stops[:-1], stops))


def _after_load(module: "GrowingSlices", _keys) -> None:
    module._set_requires_grad()  # a module-level function, not a lambda: the model pickles


class GrowingSlices(nn.Module):
    """A tensor assembled along ``dim`` from ``stages`` slice parameters ``slice_0 .. slice_{stages-1}``, of which
    the first ``active`` are in use (see the module docstring).

    Args:
        value: the current tensor (any shape, float dtype); active slices start at its values, the others at zero.
        dim: the dimension that is sliced.
        stages, start, freeze_previous: the rule's settings (``2 <= stages``, ``1 <= start < stages``).
        init: the whole tensor's init as a Philox :class:`Stream` (its ``shape`` is ignored); a slice being
            activated takes its values at its own counters.
        counter_strides: per dimension of ``value``, the Philox counter step (row-major when ``None``).
        group: the name of the schedule this tensor follows (the rule's label); :class:`CapacityScheduler` grows
            every tensor of a group at once.
        window, min_delta: the rule's plateau settings, read by the scheduler.

    Attributes:
        active: 0-d int64 buffer (saved in the state dict), how many slices are in use.

    ``forward()`` takes no input and returns the assembled tensor: ``value``'s shape, dtype and device.

    Raises:
        ValueError: ``value.shape[dim] < stages``.
    """

    def __init__(self, value: torch.Tensor, dim: int, stages: int, start: int, freeze_previous: bool, init: Stream,
                 counter_strides: Optional[tuple[int, ...]] = None, group: str = "", window: int = 10,
                 min_delta: float = 0.0):
        super().__init__()
        value = value.detach()
        self.dim, self.stages, self.start, self.freeze_previous = dim, stages, start, freeze_previous
        self.group, self.window, self.min_delta = group, window, min_delta
        self.init, self.shape = init, tuple(value.shape)
        self.counter_strides = counter_strides or row_major_strides(value.shape)
        self.bounds = stage_bounds(value.shape[dim], stages)
        for k, (lo, hi) in enumerate(self.bounds):
            part = value.narrow(dim, lo, hi - lo).clone()
            self.register_parameter(f"slice_{k}", nn.Parameter(part if k < start else torch.zeros_like(part)))
        self.register_buffer("active", torch.tensor(start, dtype=torch.int64))
        self._set_requires_grad()
        self.register_load_state_dict_post_hook(_after_load)

    @property
    def slices(self) -> list[nn.Parameter]:
        """The slice parameters in order along ``dim``."""
        return [getattr(self, f"slice_{k}") for k in range(self.stages)]

    def trainable_stages(self) -> range:
        """The indices of the slices that train now: every active one, or with ``freeze_previous`` only the newest
        once the layer has grown."""
        active = int(self.active)
        grown = active > self.start
        return range(active - 1, active) if self.freeze_previous and grown else range(active)

    def _set_requires_grad(self) -> None:
        trainable = self.trainable_stages()
        for k, p in enumerate(self.slices):
            p.requires_grad_(k in trainable)

    @torch.no_grad()
    def grow(self) -> list[nn.Parameter]:
        """Activate the next slice (its init, see the module docstring) and, with ``freeze_previous``, freeze the
        earlier ones; their ``.grad`` is cleared so that no optimizer moves them again.

        Returns:
            The parameters that stopped training (their optimizer state can be dropped).

        Raises:
            RuntimeError: every slice is active already.
        """
        k = int(self.active)
        if k == self.stages:
            raise RuntimeError(f"all {self.stages} stages of this {self.group} tensor are active; it cannot grow")
        was = set(self.trainable_stages())
        lo, hi = self.bounds[k]
        new = self.slices[k]
        index = torch.arange(lo, hi, device=new.device)
        shape = tuple(hi - lo if d == self.dim else s for d, s in enumerate(self.shape))
        counters = slice_counters(shape, self.counter_strides, self.dim, index)
        new.copy_(sample_at(self.init.seed, counters, self.init.kind, self.init.scale, new.dtype))
        self.active.fill_(k + 1)
        self._set_requires_grad()
        stopped = [self.slices[j] for j in was - set(self.trainable_stages())]
        for p in stopped:
            p.grad = None
        return stopped

    def forward(self) -> torch.Tensor:
        return torch.cat(self.slices, self.dim)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, active={int(self.active)} of {self.stages} stages, trainable="
                f"{list(self.trainable_stages())}, group={self.group!r}")


def grow(gm: fx.GraphModule, target: Target) -> None:
    """Replace the weight (and, with ``dim: out``, the bias) of the registered layer ``target`` (not an embedding) by
    :class:`GrowingSlices` modules (see the module docstring).

    Raises:
        PolicyError: the module is of another type (an embedding included), shares its weight (tied), is frozen
            (``requires_grad=False``: grow would make it trainable), has fewer
            units along ``dim`` than ``stages``, or its traced forward never reads the weight (names the module, the
            rule and its YAML line).
    """
    params, qualname = target.rule.params, target.qualname
    lay, weight = layout(gm, target), stored_weight(gm, target)
    if lay.kind == "embedding":
        raise target.error("grow applies to the units of nn.Linear, transformers Conv1D and nn.Conv layers, not to "
                           "the rows of an nn.Embedding")
    dim = lay.stored_dim(params.dim)
    bias = dict(gm.named_parameters()).get(f"{qualname}.bias") if params.dim == "out" else None
    frozen = [name for name, p in (("weight", weight), ("bias", bias)) if p is not None and not p.requires_grad]
    if frozen:
        raise target.error(f"its {frozen[0]} has requires_grad=False (frozen by you, PEFT or an earlier rule); grow "
                           "trains slices of it: unfreeze it or exclude the module")
    if weight.shape[dim] < params.stages:
        raise target.error(f"its weight has {weight.shape[dim]} {'output units' if params.dim == 'out' else 'inputs'}"
                           f", fewer than stages: {params.stages}")
    settings = dict(stages=params.stages, start=params.start, freeze_previous=params.freeze_previous,
                    group=target.rule.label, window=params.plateau.window, min_delta=params.plateau.min_delta)
    replaced = {"weight": GrowingSlices(weight, dim, init=lay.stream(target, "weight", params.init),
                                        counter_strides=lay.counter_strides(), **settings)}
    if bias is not None:
        replaced["bias"] = GrowingSlices(bias, 0, init=lay.stream(target, "bias"), **settings)
    substitute_weight(gm, target, replaced)


register_action(ActionSpec("grow", Grow, per_module(grow), owns_weight=True,
                           not_captured="it adds trainable capacity stages"))
