"""``seedrand.merge`` and ``seedrand.load_base_state_dict``: from a kept model back to the original architecture, and
an original architecture's weights (a pretrained checkpoint) into a kept model.

:func:`merge` is PEFT's ``merge_and_unload`` for seedrand: every regenerated, frozen, sliced or projected tensor is
materialized as a plain parameter of the module that owned it, every replaced layer is the model's own layer class
again, and every filter gate ``max(0, theta)`` is folded into the weights of the layer whose outputs it scales, so the
result is the model's own class with its own ``state_dict`` keys and computes what the kept model computes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.nn as nn

from .errors import ModelError
from .garbage import follow_tensors
from .layers import layer_spec
from .passes.filter_gates import FilterGate
from .rewriter.kept import AppliedAfter, PerForward, difference, is_seedrand_module, top_seedrand_modules
from .rewriter.rewrite import KEPT_RECORD_KEY, RewriteRecord, kept_record, rewrite

__all__ = ["merge", "load_base_state_dict", "BaseLoadReport"]


def _copy_without_record(model: nn.Module, what: str) -> tuple[nn.Module, RewriteRecord]:
    """A deep copy of the kept ``model`` without its record (and the graph in it), and the record."""
    record = kept_record(model, what)
    copied = copy.deepcopy(model, {id(record): None})
    copied.__dict__.pop(KEPT_RECORD_KEY, None)
    return copied, record


def _materialize_computed(model: nn.Module) -> None:
    """Every computed attribute (``seedrand.rewriter.kept.compute_attribute``) a plain tensor again: a parameter
    (``requires_grad`` as the replaced one's) or a buffer. All are read before any is changed (subspace tensors
    of one group read the same coordinates)."""
    values = []
    for module in model.modules():
        for name in getattr(type(module), "_seedrand_computed", ()):
            with torch.no_grad():
                values.append((module, name, getattr(module, name).detach().clone()))
    for module, name, value in values:
        parameter, requires_grad = module.__dict__["_seedrand_replaced"][name]
        del module._modules[name]
        if parameter:
            module._parameters[name] = nn.Parameter(value, requires_grad=requires_grad)
        else:
            module._buffers[name] = value


def _restore_layers(model: nn.Module, record: RewriteRecord) -> None:
    """Every replaced layer (``random``, ``freeze_fraction`` on a Linear) its original class again: the skeleton
    the record kept, with the tensors the seedrand module materializes (:meth:`merged`) and its forward hooks."""
    for name, skeleton in record.originals.items():
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        current = parent._modules[leaf]
        layer = copy.deepcopy(skeleton)
        for key, value in current.merged().items():
            flag = layer._parameters.get(key)
            requires_grad = True if flag is None else flag.requires_grad
            layer._parameters[key] = None if value is None else nn.Parameter(value.detach().clone(), requires_grad)
        follow_tensors(layer)
        layer._forward_hooks.update(current._forward_hooks)
        parent._modules[leaf] = layer


def _scale_outputs(owner: nn.Module, scale: torch.Tensor, name: str) -> None:
    """Multiply the output features of ``owner`` by ``scale`` (``(features,)``, ``>= 0``), folding a gate into it.

    Raises:
        ModelError: ``owner`` is neither a registered layer (``seedrand.register_layer``) nor an affine
            BatchNorm/LayerNorm: the gate cannot be folded.
    """
    spec = layer_spec(type(owner))
    spec = spec if spec is not None and spec.layout is not None else None  # a wrapper's output is not its weight's
    if spec is not None:
        dim = spec.output_dim
    elif isinstance(owner, (nn.modules.batchnorm._NormBase, nn.LayerNorm)) and owner.weight is not None:
        dim = 0
    else:
        raise ModelError(f"seedrand.merge cannot fold the gate after {name} ({type(owner).__name__}) into its "
                         "weights: only registered layers' (seedrand.register_layer) and affine BatchNorm/LayerNorm "
                         "outputs are folded")
    with torch.no_grad():
        weight = owner.weight
        shape = [1] * weight.dim()
        shape[dim] = -1
        weight.mul_(scale.to(weight.dtype).reshape(shape))
        if getattr(owner, "bias", None) is not None and (spec is None or spec.layout != "embedding"):
            owner.bias.mul_(scale.to(owner.bias.dtype))


def _fold_hooks(model: nn.Module, fold: bool) -> None:
    """Remove every hook that applies a seedrand module after a module's output; with ``fold``, fold each gate into
    that module's weights first.

    Raises:
        ModelError: (``fold``) a hook applies an inserted random layer, or a gate follows a module it cannot be
            folded into; the original class has no place for either.
    """
    for module in model.modules():  # the per-forward caches of subspace's P @ theta_d
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, h in hooks.items() if isinstance(getattr(h, "__self__", None), PerForward)]:
                del hooks[key]
                module._forward_hooks_always_called.pop(key, None)
    for name, module in model.named_modules():
        for key, hook in list(module._forward_hooks.items()):
            if not isinstance(hook, AppliedAfter):
                continue
            if fold and not isinstance(hook.module, FilterGate):
                raise ModelError(f"seedrand.merge cannot fold the {type(hook.module).__name__} inserted after {name} "
                                 "into the original class (it is a new layer); keep the kept model, or export it")
            if fold:
                gate = hook.module
                _scale_outputs(module, torch.relu(gate.theta.detach()) * gate.alive, name)
            del module._forward_hooks[key]


def _remove_added(model: nn.Module) -> None:
    """Remove the seedrand modules added beside the model's own (gates, inserted layers, subspace coordinates) and
    give every module its original class."""
    for module in list(model.modules()):
        for name, child in list(module._modules.items()):
            if child is not None and is_seedrand_module(child):
                del module._modules[name]
        base = getattr(type(module), "_seedrand_base", None)
        if base is not None:
            module.__class__ = base
        for key in ("_seedrand_added", "_seedrand_replaced"):
            module.__dict__.pop(key, None)


def _original(model: nn.Module, fold: bool, what: str) -> tuple[nn.Module, RewriteRecord]:
    """A copy of the kept ``model`` as its original architecture: tensors materialized, layers restored, seedrand's
    hooks and added modules gone (gates folded into the weights with ``fold``, dropped without)."""
    copied, record = _copy_without_record(model, what)
    _materialize_computed(copied)
    _restore_layers(copied, record)
    _fold_hooks(copied, fold)
    _remove_added(copied)
    return copied, record


def merge(model: nn.Module) -> nn.Module:
    """A plain model of the original class computing what the kept ``model`` computes, for any downstream tool
    (PEFT's ``merge_and_unload``): regenerated and frozen tensors materialized as parameters (dtype and device of
    the model's), replaced layers of their original class again (sizes following garbage collection), filter gates
    folded into the weights (and bias) of the layer they follow, no seedrand module, hook or class left. Its
    ``state_dict`` has the original architecture's keys; parameters keep the ``requires_grad`` of the tensors they
    replaced. ``model`` is not changed.

    Where the model was rewritten with example inputs, the merged model's outputs on them are checked against the
    kept model's (eval mode, no gradient).

    Raises:
        ModelError: ``model`` is not a kept model (a GraphModule from ``graph=True``, or a model seedrand did not
            rewrite); it holds an inserted random layer (a new layer, which the original class cannot hold) or a
            gate after a module whose weights cannot absorb it; or the merged outputs differ.
    """
    merged, record = _original(model, True, "seedrand.merge")
    if record.example_inputs is not None:
        diff = difference(model, merged, record.example_inputs)
        if diff is not None:
            raise ModelError(f"seedrand.merge: the merged model does not compute what the kept model computes on the "
                             f"example inputs (largest difference {diff:.3g}); keep the kept model")
    return merged


@dataclass
class BaseLoadReport:
    """What :func:`load_base_state_dict` loaded.

    Attributes:
        kept: keys of the state dict whose values the rewritten model now holds (stored, trainable slices,
            ``fixed: keep``, ``theta0: keep``).
        not_kept: keys whose values the policy does not keep (regenerated, zeroed or projected away): loading them
            changed nothing, as the policy says.
        missing_keys, unexpected_keys: with ``strict=False``, as ``nn.Module.load_state_dict`` reports them for
            the original architecture.
    """

    kept: list[str]
    not_kept: list[str]
    missing_keys: list[str]
    unexpected_keys: list[str]


def load_base_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True
                         ) -> BaseLoadReport:
    """Load a ``state_dict`` of the original architecture (pretrained weights) into the kept ``model``, in place
    (same parameter objects: an optimizer built on ``model`` goes on): the original model with these weights is
    rewritten with the same policy, and ``model`` takes every tensor that rewrite keeps from them; what seedrand
    added (gates, inserted layers, ``theta_d``) keeps its values.

    Args:
        model: a kept model :func:`seedrand.rewrite` returned, before garbage collection.
        state_dict: keys and shapes of the original architecture's ``state_dict()``.
        strict: refuse keys missing from or unexpected in ``state_dict``, as ``nn.Module.load_state_dict``.

    Returns:
        :class:`BaseLoadReport`: which keys were kept and which the policy regenerates (not kept).

    Raises:
        ModelError: ``model`` is not a kept model, channels were garbage-collected since the rewrite (load the
            weights first), or ``state_dict`` does not fit the original architecture (names the keys: missing and
            unexpected ones with ``strict``, and any of another shape). ``model`` is then unchanged.
    """
    base, record = _original(model, False, "seedrand.load_base_state_dict")
    if record.collections:
        raise ModelError("seedrand.load_base_state_dict: garbage collection removed channels from this model since "
                         "the rewrite, so the original architecture's tensors no longer fit; load them first")
    try:
        missing, unexpected = base.load_state_dict(state_dict, strict=strict)
    except RuntimeError as e:
        raise ModelError(f"seedrand.load_base_state_dict: the state dict does not fit {type(base).__name__}: {e}"
                         ) from None
    rewritten = rewrite(base, record.policy, record.example_inputs)
    merged, _ = _original(rewritten, False, "seedrand.load_base_state_dict")
    after = merged.state_dict()
    kept, not_kept = [], []
    for key, value in state_dict.items():
        if key in after:
            (kept if torch.equal(after[key].to(value.dtype), value) else not_kept).append(key)
    ours = model.state_dict()
    added = _added_prefixes(model, base)
    with torch.no_grad():
        for key, value in rewritten.state_dict().items():
            if key in ours and not key.startswith(added):
                ours[key].copy_(value)
    return BaseLoadReport(kept, not_kept, list(missing), list(unexpected))


def _added_prefixes(model: nn.Module, base: nn.Module) -> tuple[str, ...]:
    """``"{name}."`` of every seedrand module of the kept ``model`` at a name the original architecture ``base``
    does not have (gates, inserted layers, subspace coordinates): what the policy added, not what it replaced."""
    names = set(dict(base.named_modules())) | set(base.state_dict())
    return tuple(f"{name}." for name, _ in top_seedrand_modules(model) if name not in names)
