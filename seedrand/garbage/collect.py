"""``seedrand.collect_garbage`` and what it reports; replaying recorded collections (``seedrand.load``); and
``drop_inactive`` for grown layers."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils.flop_counter import FlopCounterMode

from ..errors import ModelError, SeedrandError
from ..passes.filter_gates import FilterGate
from ..passes.grow import GrowingSlices
from ..rewriter.kept import share_tensors, verify
from ..rewriter.rewrite import graph_of, record_of
from .graph import ChannelGraph
from .plan import apply_plan, plan_removal, shrinking
from .sizes import follow_sizes
from .surgery import check_optimizer

__all__ = ["GarbageReport", "collect_garbage", "replay_collections", "drop_inactive"]


@dataclass
class GarbageReport:
    """What :func:`collect_garbage` did.

    Attributes:
        removed: module name -> number of its output channels removed (layers, BatchNorms, gates).
        blocked: gate module name -> why some of its dead channels were kept (the op or reader that kept them).
        parameters_before, parameters_after: parameter element counts of the whole model.
        bytes_before, bytes_after: parameter bytes of the whole model.
        flops_before, flops_after: FLOPs of one forward on the rewrite's example inputs (``torch.utils.flop_counter``).
        not_applied: for a kept model, why nothing changed although channels were dead (its own code does not
            follow the smaller tensors: a literal size in a forward); ``graph=True`` can remove them. Else ``None``.
    """

    removed: dict[str, int] = field(default_factory=dict)
    blocked: dict[str, str] = field(default_factory=dict)
    parameters_before: int = 0
    parameters_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    not_applied: Optional[str] = None


def _module(gm: fx.GraphModule, node: fx.Node) -> Optional[nn.Module]:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def collect_garbage(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    explain: bool = False) -> GarbageReport:
    """Remove dead channels from ``model`` in place (see the module docstring).

    Args:
        model: a model returned by ``seedrand.rewrite`` with example inputs (with which shapes are propagated):
            the kept model or the GraphModule (``graph=True``). The analysis runs on the graph; a kept model's
            modules shrink in place too (the same ``Parameter`` objects; the size attributes their forwards read:
            ``in/out_features``, ``in/out_channels``, ``groups``, ``num_features``, LayerNorm's
            ``normalized_shape``, ``Conv1D.nf``), after a trial on a copy showed its outputs unchanged.
        optimizer: its optimizer, whose state is sliced to match; training continues without rebuilding it.
        explain: print which op kept which gate's dead channels.

    Returns:
        A :class:`GarbageReport`.

    Raises:
        SeedrandError: ``model`` was not returned by ``seedrand.rewrite`` (a ``DistributedDataParallel`` wrapper:
            pass ``ddp.module``, then wrap again), was rewritten without example inputs, or is an unpickled kept model (``torch.save(model)`` does not keep the graph; ``seedrand.save``/``load`` do).
        ModelError: the optimizer holds none of the model's parameters, or keeps state seedrand cannot slice
            (LBFGS, flat or factored state); checked before anything changes, so the model is untouched.
    """
    record = _record(model)
    gm = graph_of(model)
    if gm is None:
        raise SeedrandError("this kept model has no rewritten graph beside it (unpickled: torch.save does not keep "
                            "it); collect_garbage analyses that graph: save and load with seedrand.save/seedrand.load")
    if gm is model:
        return _collect(gm, record, optimizer, explain)
    share_tensors(model, gm)  # the model's tensors now (after .to(), load_state_dict, a collection)
    trial = copy.deepcopy(model)
    trial_report = _collect(graph_of(trial), record_of(trial), None, False)
    if trial_report.removed:
        share_tensors(graph_of(trial), trial)
        follow_sizes(trial)
        try:
            verify(trial, graph_of(trial), record.example_inputs, record.trace.locked_mode)
        except ModelError as e:
            trial_report.removed, trial_report.not_applied = {}, f"{e} (garbage collection changed nothing)"
            trial_report.parameters_after, trial_report.flops_after = (trial_report.parameters_before,
                                                                       trial_report.flops_before)
            trial_report.bytes_after = trial_report.bytes_before
            return trial_report
    report = _collect(gm, record, optimizer, explain)
    share_tensors(gm, model)  # buffers are replaced, not shrunk in place
    follow_sizes(model)
    return report


def _collect(model: fx.GraphModule, record, optimizer: Optional[torch.optim.Optimizer],
             explain: bool) -> GarbageReport:
    """:func:`collect_garbage` on the rewritten graph ``model`` itself."""
    report = GarbageReport()
    report.parameters_before, report.bytes_before = _size(model)
    report.flops_before = _propagate(model, record.example_inputs)
    graph = ChannelGraph(model)
    removed, why = graph.removable()
    plan = plan_removal(model, graph, removed)
    check_optimizer(model, optimizer, shrinking(plan))
    for node in model.graph.nodes:
        gate = _module(model, node)
        if not isinstance(gate, FilterGate) or gate.live.all():
            continue
        if node not in graph.channels:
            report.blocked[node.target] = "its input's channels are not tracked (they come from a barrier)"
            continue
        dead = (~gate.live).tolist()
        kept = [graph.root(s) for s, d in zip(graph.channels[node].ids.tolist(), dead) if d]
        kept = [r for r in kept if r not in removed]
        if kept:
            report.blocked[node.target] = why.get(kept[0], "no layer reads them")
    apply_plan(model, plan, optimizer, report)
    if plan:
        record.collections.append(sorted(removed))
    report.parameters_after, report.bytes_after = _size(model)
    report.flops_after = _propagate(model, record.example_inputs) if plan else report.flops_before
    if explain:
        for name, reason in report.blocked.items():
            print(f"{name}: dead channels kept: {reason}")
    return report


def replay_collections(model: nn.Module, collections: list[list[int]]) -> None:
    """Remove from a freshly rewritten ``model``, in place, the channel groups that earlier
    :func:`collect_garbage` calls removed from a model rewritten by the same policy from the same architecture (its
    ``RewriteRecord.collections``), so that its tensors take their shapes again; ``seedrand.load`` does this before
    loading them. Which channels are dead does not matter: the groups are given.

    Raises:
        SeedrandError: ``model`` was not returned by ``seedrand.rewrite`` with example inputs, or a collection
            removes nothing from it (it does not come from this policy and architecture).
    """
    if not collections:  # a model rewritten without example inputs has none, and nothing to replay
        return
    record = _record(model)
    kept, model = model, graph_of(model)
    share_tensors(kept, model)
    for removed in collections:
        _propagate(model, record.example_inputs)
        graph = ChannelGraph(model)
        plan = plan_removal(model, graph, set(removed))
        if not plan:
            raise SeedrandError(f"a recorded garbage collection removes nothing from this model (groups "
                                f"{removed[:8]}...): it was not rewritten by the same policy from the same architecture")
        apply_plan(model, plan, None, GarbageReport())
        record.collections.append(list(removed))
    if kept is not model:
        share_tensors(model, kept)
        follow_sizes(kept)


def _record(model: nn.Module):
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise SeedrandError("collect_garbage takes the rewritten model inside DistributedDataParallel: call "
                            "collect_garbage(ddp.module, optimizer) on every rank, then wrap it again "
                            "(DDP(ddp.module)): DDP's gradient buckets hold the old sizes")
    record = record_of(model)
    if record is None:
        raise SeedrandError("collect_garbage needs a model returned by seedrand.rewrite")
    if record.example_inputs is None:
        raise SeedrandError("collect_garbage propagates shapes with the rewrite's example inputs: pass example_inputs "
                            "to seedrand.rewrite")
    return record


def _size(model: nn.Module) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def _propagate(model: fx.GraphModule, example_inputs: tuple) -> int:
    """Record shapes on every node (eval mode, no grad: train mode would update BatchNorm statistics and use the RNG)
    and return the forward's FLOPs."""
    dtype = next(model.parameters()).dtype  # shapes only: the model's dtype may have changed since the rewrite
    inputs = [x.to(dtype) if x.is_floating_point() else x for x in example_inputs]
    was_training = model.training
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        ShapeProp(model.eval()).propagate(*inputs)
    model.train(was_training)
    return counter.get_total_flops()


def drop_inactive(model: fx.GraphModule, explain: bool = False) -> tuple[fx.GraphModule, GarbageReport]:
    """A copy of ``model`` for inference with the inactive units of grown layers removed: every
    :class:`GrowingSlices` becomes one plain, frozen parameter holding the assembled tensor, then
    :func:`seedrand.collect_garbage` drops the zero units (a zero row with zero bias whose activation keeps 0, or
    inputs whose weights are zero) through the channel dependency graph, consumers included.

    Args:
        model: a GraphModule from :func:`seedrand.rewrite` with ``grow`` rules, rewritten with example inputs
            (shapes are propagated with them); never modified.
        explain: passed to ``collect_garbage`` (reasons for units that could not be removed).

    Returns:
        ``(pruned copy, collect_garbage report)``; outputs equal ``model``'s.

    Raises:
        SeedrandError: ``model`` was not rewritten by ``seedrand.rewrite`` with example inputs.
    """
    gm = copy.deepcopy(model)
    for name, module in list(gm.named_modules()):
        if isinstance(module, GrowingSlices):
            calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == name]
            owner, _, leaf = name.rpartition(".")
            delattr(gm.get_submodule(owner), leaf)
            gm.get_submodule(owner).register_parameter(leaf, nn.Parameter(module().detach(), requires_grad=False))
            for node in calls:
                node.op = "get_attr"
    gm.recompile()
    return gm, collect_garbage(gm, explain=explain)
