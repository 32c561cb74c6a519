"""``seedrand.collect_garbage``: remove dead channels from a rewritten model in place (Leclerc, Castro Fernandez &
Madden, ShrinkNets: dead channels are removed during training by propagating removal events through the graph).

The channel dependency graph (:class:`seedrand.rewriter.channels.ChannelGraph`) says which channels are provably
dead (gates with ``theta <= 0``, zero weight rows with zero bias, channels no layer reads) and which must go
together (through BatchNorm, activations, pooling, residual ``add``, ``mul`` (SE blocks), ``cat``, ``split``/``chunk``,
``flatten``/``view``/``reshape``, grouped and depthwise convolutions). Every other op is a barrier: the channels it
reads are kept and ``explain`` says which op kept them. Never guess.

Parameters shrink in place (values and ``.grad`` are sliced into the same ``Parameter`` objects with
``torch.utils.swap_tensors``), and when an optimizer is passed every per-parameter state tensor of the parameter's
shape (momentum, Adam moments; plain, foreach and fused variants keep state per parameter alike) is sliced the same
way, so training simply continues. The decision is made for the whole model before anything changes.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils.flop_counter import FlopCounterMode

from .errors import ModelError, SeedrandError, shown
from .layers import layer_spec, mro_lookup
from .passes.filter_gates import FilterGate
from .passes.grow import GrowingSlices
from .rewriter.channels import ChannelGraph, Ref
from .rewriter.kept import share_tensors, verify
from .rewriter.rewrite import graph_of, record_of

__all__ = ["collect_garbage", "drop_inactive", "GarbageReport", "replay_collections", "register_size_rule", "follow_tensors"]


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


def _keep(tensor: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    return tensor.index_select(dim, index.to(tensor.device))


def _shrink(param: nn.Parameter, dim: int, index: torch.Tensor, optimizer: Optional[torch.optim.Optimizer]) -> None:
    """Keep ``index`` along ``dim`` of ``param``, its gradient and its optimizer state, in place."""
    old_shape = param.shape
    if optimizer is not None and param in optimizer.state:
        state = optimizer.state[param]
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == old_shape:
                state[key] = _keep(value, dim, index)
    smaller = nn.Parameter(_keep(param.detach(), dim, index), requires_grad=param.requires_grad)
    if param.grad is not None:
        smaller.grad = _keep(param.grad, dim, index)
    # swap, not .data: the Python object (optimizer key, user references) stays, and autograd's cached gradient
    # accumulator, which remembers the old shape, goes with the old tensor. Swapping is refused while a previous
    # autograd graph (a loss kept from the last step) still holds that accumulator; then the data changes, and the
    # accumulator must be dropped by hand: setting .data keeps it unless the dtype or device changes, and the next
    # backward would check the new gradient against the old shape. Backward through that old graph fails, as it
    # would after any in-place resize.
    try:
        torch.utils.swap_tensors(param, smaller)
    except RuntimeError:
        other = torch.float64 if param.dtype != torch.float64 else torch.float32
        param.data = torch.empty(0, dtype=other, device=param.device)
        param.data, param.grad = smaller.data, smaller.grad


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
        _follow_sizes(trial)
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
    _follow_sizes(model)
    return report


def _collect(model: fx.GraphModule, record, optimizer: Optional[torch.optim.Optimizer],
             explain: bool) -> GarbageReport:
    """:func:`collect_garbage` on the rewritten graph ``model`` itself."""
    report = GarbageReport()
    report.parameters_before, report.bytes_before = _size(model)
    report.flops_before = _propagate(model, record.example_inputs)
    graph = ChannelGraph(model)
    removed, why = graph.removable()
    plan = _plan(model, graph, removed)
    _check_optimizer(model, optimizer, _shrinking(plan))
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
    _apply(model, plan, optimizer, report)
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
        plan = _plan(model, graph, set(removed))
        if not plan:
            raise SeedrandError(f"a recorded garbage collection removes nothing from this model (groups "
                                f"{removed[:8]}...): it was not rewritten by the same policy from the same architecture")
        _apply(model, plan, None, GarbageReport())
        record.collections.append(list(removed))
    if kept is not model:
        share_tensors(model, kept)
        _follow_sizes(kept)


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


def _shrinking(plan: list) -> list[nn.Parameter]:
    """The parameters ``plan`` slices."""
    return [step.args[0].tensor for step in plan if isinstance(step, functools.partial) and step.func is _slice
            and isinstance(step.args[0].tensor, nn.Parameter)]


def _check_optimizer(model: nn.Module, optimizer, shrinking: list[nn.Parameter]) -> None:
    """Refuse, before anything changes, an optimizer whose state :func:`_shrink` cannot keep consistent.

    Known layouts: per-parameter state made of tensors of the parameter's shape (sliced with it: momentum, Adam's
    moments), 0-d tensors and Python scalars (steps). Anything else (LBFGS's flat vectors over all parameters,
    factored or list-valued state) would no longer fit after the shrink.

    Raises:
        ModelError: ``optimizer`` is not a ``torch.optim.Optimizer``, holds none of the model's parameters, or
            keeps state of another layout (names the optimizer, the state entry and the parameter).
    """
    if optimizer is None:
        return
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ModelError(f"collect_garbage takes a torch.optim.Optimizer, not {type(optimizer).__name__}")
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    if not held & names.keys():
        raise ModelError(f"the {type(optimizer).__name__} holds none of this model's parameters (built for another "
                         "model, or for the original before seedrand.rewrite?); pass the optimizer that trains it")
    if not any(id(p) in held for p in shrinking):
        return
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ModelError("LBFGS keeps its history as flat vectors over all parameters, which no longer fit once "
                         "channels go; nothing was changed: collect garbage without the optimizer and build a new one")
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and (value.dim() == 0 or value.shape == param.shape):
                continue
            if value is None or isinstance(value, (bool, int, float)):
                continue
            what = f"a tensor of shape {tuple(value.shape)}" if torch.is_tensor(value) else type(value).__name__
            name = names.get(id(param), "(not in the model)")
            raise ModelError(
                f"{type(optimizer).__name__}'s state {shown(key)} of parameter {name} {tuple(param.shape)} is {what}: "
                "collect_garbage slices only per-parameter state tensors "
                "of the parameter's shape (SGD momentum, Adam, AdamW, RMSprop, Adagrad) and changed nothing; "
                "collect garbage without the optimizer and build a new one")


def _apply(model: fx.GraphModule, plan: list, optimizer: Optional[torch.optim.Optimizer],
           report: GarbageReport) -> None:
    for apply in plan:
        apply(optimizer, report)
    model.recompile()


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


def _plan(gm: fx.GraphModule, graph: ChannelGraph, removed: set[int]) -> list:
    """Closures that each slice one tensor, rewrite one argument or update one module's sizes; nothing changes until
    they run."""
    if not removed:
        return []
    keeps: dict[fx.Node, torch.Tensor] = {}

    def keep(node: fx.Node) -> torch.Tensor:
        if node not in keeps:
            keeps[node] = graph.keep(node, removed)
        return keeps[node]

    names = {id(m): name for name, m in gm.named_modules()}
    plan = []
    for s in graph.slices:
        kept, total = keep(s.node), len(graph.channels[s.node].ids)
        if len(kept) < total:
            name = names[id(s.ref.owner)] if s.output else None
            plan.append(functools.partial(_slice, s.ref, s.dim, kept, name, total - len(kept)))
    for size in graph.sizes:
        value = size.value(keep(size.node))
        if value != size.value(torch.arange(len(graph.channels[size.node].ids))):
            plan.append(functools.partial(lambda write, v, *_: write(v), size.write, value))
    resized = set()
    for node, module in graph.layers.items():
        if id(module) in resized:  # a module called more than once follows its tensors once
            continue
        resized.add(id(module))
        old = len(graph.channels[node].ids)
        if len(keep(node)) < old or (node.args[0] in graph.channels and
                                     len(keep(node.args[0])) < len(graph.channels[node.args[0]].ids)):
            plan.append(functools.partial(_resize, module, old))
    return plan


def _slice(ref: Ref, dim: int, keep: torch.Tensor, name: Optional[str], count: int,
           optimizer: Optional[torch.optim.Optimizer], report: GarbageReport) -> None:
    tensor = ref.tensor
    if isinstance(tensor, nn.Parameter):
        _shrink(tensor, dim, keep, optimizer)
    else:  # a buffer (BatchNorm statistics, a frozen weight)
        setattr(ref.owner, ref.name, _keep(tensor, dim, keep))
    if name is not None:
        report.removed[name] = count


def _resize(module: nn.Module, old_out: int, *_) -> None:
    """Keep a Linear/Conv/BatchNorm's size attributes true to its tensors after slicing (a conv's groups shrink in
    proportion: whole groups went)."""
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1:
        module.groups = module.groups * module.weight.shape[0] // old_out
    follow_tensors(module)


SizeRule = Callable[[nn.Module], None]
_SIZE_RULES: dict[Union[type, str], SizeRule] = {}


def register_size_rule(layer: Union[type, str], rule: SizeRule) -> None:
    """Register how the size attributes of a module class follow its tensors after garbage collection shrank them
    in a kept model (the attributes its own forward reads: a split size, a head count). A rule applies to
    subclasses too; the most derived class's rule wins. A registered layer's own sizes follow by its
    :class:`~seedrand.layers.LayerSpec` (``resize``); a size rule registered for the same class replaces that.

    Args:
        layer: the class, or its qualified name ``"package.module.Class"`` (a rule for an optional library's class
            then needs no import).
        rule: ``(module) -> None``, called once per module after its parameters shrank (its children's may not
            have followed yet: read tensor shapes, not their size attributes).

    Raises nothing. The trial on a copy still decides: where a module's forward does not follow, nothing changes.
    """
    _SIZE_RULES[layer] = rule


def _size_rule(module: nn.Module) -> Optional[SizeRule]:
    rule = mro_lookup(_SIZE_RULES, type(module))
    spec = layer_spec(type(module))
    return rule or (spec.follow if spec is not None else None)


def follow_tensors(module: nn.Module) -> None:
    """Set the size attributes of ``module`` (``out_features``, ``num_features``, a head count) from its tensors'
    shapes by its class's rule (:func:`register_size_rule`), if it has one. Raises nothing of its own."""
    rule = _size_rule(module)
    if rule is not None:
        rule(module)


def _batch_norm(module: nn.modules.batchnorm._NormBase) -> None:
    module.num_features = (module.weight if module.affine else module.running_mean).shape[0]


def _layer_norm(module: nn.LayerNorm) -> None:
    if module.weight is not None:
        module.normalized_shape = tuple(module.weight.shape)


def _gpt2_attention(module: nn.Module) -> None:
    """GPT-2 splits ``c_attn``'s output (queries, keys, values) by ``split_size``: whole heads went from each."""
    width = module.q_attn.weight.shape[1] if module.is_cross_attention else module.c_attn.weight.shape[1] // 3
    module.split_size = module.embed_dim = width
    module.num_heads = width // module.head_dim


_SIZE_RULES.update({nn.modules.batchnorm._NormBase: _batch_norm, nn.LayerNorm: _layer_norm,
                    "transformers.models.gpt2.modeling_gpt2.GPT2Attention": _gpt2_attention})


def _follow_sizes(kept: nn.Module) -> None:
    """:func:`follow_tensors` on every module of a kept model, whose tensors garbage collection shrank in the
    graph; a grouped convolution's ``groups`` shrink with whole groups (its ``out_channels`` tells the old width)."""
    for module in kept.modules():
        if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and \
                module.weight.shape[0] != module.out_channels:
            module.groups = module.groups * module.weight.shape[0] // module.out_channels
        follow_tensors(module)


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
