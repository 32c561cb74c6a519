"""``seedrand.ensemble``: cheap ensembles whose members share every frozen or regenerated weight and differ only in
their trainable slices (Rosenfeld & Tsotsos 2018, section 4.3, "Share-Conv-R": "keeping a fixed backbone subset of
parameters and re-training only a small set ... cheap ensemble models which are nevertheless diverse enough to
outperform a single model").

The policy is applied once; each member is a copy of the rewritten model in which

* the frozen parameters and the tensors seedrand modules keep (``freeze_fraction`` with ``fixed: keep``) are the
  *same* tensor objects in every member (one storage), and regenerated tensors have the same Philox key (no storage
  at all), so the shared weights cost their memory once;
* trainable parameters, gradients, optimizer state and running statistics (BatchNorm buffers) are per member.

Members differ from the start: member 0 is the rewritten model itself; in member ``m >= 1`` every trainable tensor
of two or more dimensions (a weight, or the trainable slice of a ``freeze_fraction`` weight) is re-drawn from
PyTorch's default Linear/Conv init ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, ``fan_in`` of the whole weight, by Philox
with key ``derive_seed(seed, owner, "member{m}/{name}")`` at the elements' row-major counters in the whole weight, so
a member is a pure function of the policy's seed. Biases and normalization parameters start as in the model.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

from .kernels.init import sample_at
from .kernels.philox import derive_seed
from .passes.freeze_fraction import FrozenFraction
from .passes.layout import row_major_strides, slice_counters
from .passes.regenerated import Regenerating
from .policy import Policy
from .rewriter.rewrite import as_policy, rewrite

__all__ = ["Ensemble", "ensemble"]


class Ensemble(nn.Module):
    """Members evaluated on the same inputs; the prediction is their mean.

    Args:
        members: the member models (GraphModules from :func:`ensemble`, one architecture, shared tensors).
        batched: evaluate the members in one ``torch.func.vmap`` over their stacked per-member tensors (the shared
            ones enter once, unbatched) in eval mode; in train mode, or when an op has no batching rule, members run
            one after the other. In train mode they always do: BatchNorm statistics and dropout are per member.

    ``forward(*inputs, return_members=False)``: the mean of the members' outputs (each the model's output shape,
    e.g. ``(N, classes)`` float32); with ``return_members=True``, ``(mean, stacked)`` where ``stacked`` has a leading
    member dimension ``(members, *output_shape)``. The members' outputs must be single tensors.
    """

    def __init__(self, members: list[nn.Module], batched: bool = True):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.batched = batched
        shared = {id(t) for t in _shared(members[0])}
        self._own = [n for n, t in [*members[0].named_parameters(), *members[0].named_buffers()]
                     if id(t) not in shared]

    def _vmapped(self, inputs: tuple) -> torch.Tensor:
        tensors = [{**dict(m.named_parameters()), **dict(m.named_buffers())} for m in self.members]
        stacked = {name: torch.stack([t[name] for t in tensors]) for name in self._own}
        call = lambda own, *x: torch.func.functional_call(self.members[0], own, x)  # noqa: E731
        return torch.func.vmap(call, in_dims=(0, *[None] * len(inputs)))(stacked, *inputs)

    def forward(self, *inputs, return_members: bool = False):
        stacked = None
        if self.batched and not self.training:
            try:
                stacked = self._vmapped(inputs)
            except RuntimeError:  # an op without a batching rule (a custom op): fall back for good
                self.batched = False
        if stacked is None:
            stacked = torch.stack([member(*inputs) for member in self.members])
        mean = stacked.mean(0)
        return (mean, stacked) if return_members else mean


def _shared(gm: nn.Module) -> list[torch.Tensor]:
    """The tensors every member reads unchanged: frozen parameters and the buffers of seedrand modules."""
    frozen = [p for p in gm.parameters() if not p.requires_grad]
    kept = [b for m in gm.modules() if isinstance(m, Regenerating) for b in m.buffers(recurse=False)]
    return frozen + kept


@torch.no_grad()
def _redraw(member: nn.Module, seed: int, index: int) -> None:
    """Re-draw member ``index``'s trainable weights (see the module docstring)."""
    for owner_name, owner in member.named_modules():
        for name, p in owner.named_parameters(recurse=False):
            if not p.requires_grad or p.dim() < 2:
                continue
            key = derive_seed(seed, owner_name, f"member{index}/{name}")
            if isinstance(owner, FrozenFraction):
                dim, frozen = owner.dim, owner.frozen_index
                whole = tuple(s + len(frozen) if d == dim else s for d, s in enumerate(p.shape))
                kept = torch.ones(whole[dim], dtype=torch.bool)
                kept[frozen] = False
                counters = slice_counters(tuple(p.shape), row_major_strides(whole), dim,
                                          torch.arange(whole[dim])[kept])
            else:
                whole, counters = tuple(p.shape), torch.arange(p.numel()).reshape(p.shape)
            p.copy_(sample_at(key, counters, "uniform", 1 / math.sqrt(math.prod(whole[1:])), p.dtype))


def ensemble(model: nn.Module, policy: Union[Policy, str, Path, dict], members: int = 5,
             example_inputs: Optional[tuple] = None, batched: bool = True) -> Ensemble:
    """An :class:`Ensemble` of ``members`` copies of ``model`` rewritten by ``policy`` that share its frozen and
    regenerated weights (see the module docstring).

    Args:
        model: any ``nn.Module``; never modified.
        policy: a :class:`Policy`, YAML path or dict, as for :func:`seedrand.rewrite` (for Share-Conv-R:
            ``freeze_fraction`` rules with ``fraction: R`` on the convolutions).
        members: how many members (at least 1).
        example_inputs: as for :func:`seedrand.rewrite`.
        batched: see :class:`Ensemble`.

    Returns:
        An :class:`Ensemble` in ``model``'s train/eval mode. ``seedrand.summary`` counts shared tensors once.

    Raises:
        ValueError: ``members < 1``.
        PolicyError, TraceError: as :func:`seedrand.rewrite`.
    """
    if members < 1:
        raise ValueError(f"an ensemble needs at least one member, got members={members}")
    policy = as_policy(policy)
    first = rewrite(model, policy, example_inputs, graph=True)  # members share tensors: one graph each
    shared = {id(t): t for t in _shared(first)}
    copies = [first]
    for index in range(1, members):
        member = copy.deepcopy(first, memo=dict(shared))
        _redraw(member, policy.seed, index)
        copies.append(member)
    return Ensemble(copies, batched)
