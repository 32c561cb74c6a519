"""Equivalence harnesses for seedrand's rewrites, for users' own models as much as for seedrand's tests.

:func:`check_garbage_collection` gates a model, kills a random subset of its gates, runs
:func:`seedrand.collect_garbage` with an Adam optimizer that has taken a step, and checks in float64 that the outputs
are unchanged in eval and in train mode, that parameters kept their identity, that the optimizer state matches the
new shapes, and that training continues.
"""

from __future__ import annotations

import copy
from typing import Callable, Optional

import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves

from .garbage import GarbageReport, collect_garbage
from .passes.filter_gates import gate_parameters
from .rewriter.rewrite import rewrite

__all__ = ["check_garbage_collection", "kill_gates"]

LAYER_TYPES = ["Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d"]


def kill_gates(model: nn.Module, fraction: float = 0.5, seed: int = 0) -> int:
    """Set each gate channel's ``theta`` to a negative value with probability ``fraction``, keeping at least one
    channel of every gate alive; a local generator (seeded by ``seed``) decides. Returns how many were killed."""
    generator = torch.Generator().manual_seed(seed)
    killed = 0
    with torch.no_grad():
        for theta in gate_parameters(model):
            dead = torch.rand(theta.shape, generator=generator) < fraction
            dead[torch.randint(len(dead), (1,), generator=generator)] = False
            theta[dead] = -torch.rand(int(dead.sum()), generator=generator, dtype=theta.dtype) - 0.1
            killed += int(dead.sum())
    return killed


def _outputs(model: nn.Module, inputs: tuple, train: bool) -> list[torch.Tensor]:
    model = copy.deepcopy(model).train(train)  # train mode updates BatchNorm statistics: leave the model as it is
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        return [t for t in tree_leaves(model(*inputs)) if torch.is_tensor(t) and t.is_floating_point()]


def check_garbage_collection(model: nn.Module, example_inputs: tuple, match: Optional[dict] = None,
                             fraction: float = 0.5, seed: int = 0, rtol: float = 1e-6,
                             kill: Optional[Callable[[nn.Module], None]] = None, graph: bool = False) -> GarbageReport:
    """Gate ``model`` (a copy), kill gates, collect garbage, and check that nothing observable changed.

    Args:
        model: any model ``seedrand.rewrite`` can trace; it is not modified.
        example_inputs: a tuple of inputs (floating ones are cast to float64).
        match: the ``filter_gates`` rule's ``match`` (default: every Linear and Conv).
        fraction: probability that a gate channel is killed.
        seed: seeds the choice of killed channels.
        rtol: relative tolerance on every floating output (absolute: ``rtol`` times the output's largest magnitude).
        kill: ``(gated model) -> None`` that kills gates its own way, instead of :func:`kill_gates`.
        graph: collect on the rewritten GraphModule instead of the kept model (whose own code must follow the
            smaller tensors, else nothing changes and ``report.not_applied`` says why).

    Returns:
        The :class:`GarbageReport` of the collection.

    Raises:
        AssertionError: outputs changed (eval or train mode; dropout is set to ``p = 0`` because a smaller mask draws
            other random numbers), a parameter was replaced by a new object, or the optimizer state does not match
            the new shapes.
    """
    policy = {"version": 1, "rules": [{"match": match or {"types": LAYER_TYPES}, "optional": match is None,
                         "filter_gates": {"init": "uniform"}}]}
    inputs = tuple(x.double() if torch.is_tensor(x) and x.is_floating_point() else x for x in example_inputs)
    model = copy.deepcopy(model).double()  # before tracing: an exported graph holds dtypes and p as constants
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
    gm = rewrite(model, policy, inputs, graph=graph)
    optimizer = torch.optim.Adam(gm.parameters(), lr=1e-3)
    _step(gm, inputs, optimizer)
    kill(gm) if kill is not None else kill_gates(gm, fraction, seed)
    before = {train: _outputs(gm, inputs, train) for train in (False, True)}
    identities = {name: id(p) for name, p in gm.named_parameters()}
    report = collect_garbage(gm, optimizer)
    for train in (False, True):
        for new, old in zip(_outputs(gm, inputs, train), before[train], strict=True):
            scale = old.abs().max().clamp_min(1e-30)
            torch.testing.assert_close(new, old, rtol=rtol, atol=rtol * scale.item(),
                                       msg=lambda m: f"{'train' if train else 'eval'} mode output changed: {m}")
    assert {name: id(p) for name, p in gm.named_parameters()} == identities, "a parameter was replaced"
    for p in gm.parameters():
        for key, value in optimizer.state[p].items():
            assert not torch.is_tensor(value) or value.dim() == 0 or value.shape == p.shape, key
        assert p.grad is None or p.grad.shape == p.shape
    _step(gm, inputs, optimizer)  # training continues with the same optimizer
    return report


def _step(gm: nn.Module, inputs: tuple, optimizer: torch.optim.Optimizer) -> None:
    gm.train()
    optimizer.zero_grad()
    loss = sum(t.square().mean() for t in tree_leaves(gm(*inputs)) if torch.is_tensor(t) and t.is_floating_point())
    loss.backward()
    optimizer.step()
