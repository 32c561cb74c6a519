"""The kept model: the user's own model (same class, same code) with seedrand's modules placed in its module tree.

Passes rewrite the traced graph; :func:`transplant` then puts every seedrand module the graph holds at the same
qualified name of a copy of the user's model, in one of three ways, chosen by what the model has at that name:

* a module (a replaced layer: ``random``, a plain ``freeze_fraction`` Linear): the seedrand module takes its place;
* a parameter or buffer (a tensor computed by ``freeze_fraction``, ``grow`` or ``subspace``): the tensor becomes a
  computed attribute (:func:`compute_attribute`), so the module's own forward reads ``self.weight`` as before;
* nothing (a gate, an inserted random layer): the module is added there and a forward hook on the module whose
  output the graph feeds it applies it to that output (:class:`AppliedAfter`).

Every other tensor of the kept model is the graph's own object (:func:`share_tensors`), so what changes one (an
optimizer step, ``requires_grad``, garbage collection's in-place shrinking) changes both. The graph stays beside the
model for analysis (garbage collection) and :func:`verify` compares the two on the example inputs.
"""

from __future__ import annotations

import copy
import copyreg
import itertools
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils import _pytree as pytree

from ..errors import ModelError, SeedrandError
from .trace import in_mode

__all__ = ["is_seedrand_module", "top_seedrand_modules", "compute_attribute", "add_module_hidden", "AppliedAfter",
           "PerForward", "transplant", "share_tensors",
           "difference", "verify"]


def is_seedrand_module(module: nn.Module) -> bool:
    """Whether ``module`` is one of seedrand's own modules (a pass installed it). Raises nothing."""
    return type(module).__module__.startswith(("seedrand.passes.", "seedrand.rewriter.kept"))


class _Computed:
    """A class attribute (non-data descriptor) that reads a tensor by calling the submodule of the same name."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, obj: Optional[nn.Module], cls: type):
        if obj is None:
            return self
        return obj._modules[self.name]()


_CLASSES: dict[tuple[type, tuple[str, ...]], type] = {}


def _computed_class(base: type, names: tuple[str, ...]) -> type:
    """The subclass of ``base`` whose attributes ``names`` are computed (one class per base and names); for an
    ``nn.Sequential`` or ``nn.ModuleList``, iteration, ``len`` and indexing also skip the modules seedrand added
    (:func:`add_module_hidden`), so the container's own forward and the user's loops see what they saw."""
    key = (base, names)
    if key not in _CLASSES:
        namespace = {name: _Computed(name) for name in names}
        namespace.update(__module__=base.__module__, __reduce_ex__=_reduce_ex, _seedrand_base=base,
                         _seedrand_computed=names)
        if issubclass(base, (nn.Sequential, nn.ModuleList)):
            namespace.update(__iter__=lambda self: iter(_visible(self)), __len__=lambda self: len(_visible(self)),
                             __getitem__=_getitem)
        _CLASSES[key] = type(f"Seedrand{base.__name__}", (base,), namespace)
    return _CLASSES[key]


def _visible(container: nn.Module) -> list[nn.Module]:
    added = container.__dict__.get("_seedrand_added", ())
    return [m for name, m in container._modules.items() if name not in added]


def _getitem(self, index):
    modules = _visible(self)
    if isinstance(index, slice):
        return type(self)._seedrand_base(*modules[index]) if isinstance(self, nn.Sequential) else \
            nn.ModuleList(modules[index])
    return modules[index]


def _swap_class(module: nn.Module, computed: tuple[str, ...] = ()) -> None:
    """Give ``module`` the generated class of its original class with ``computed`` added to its computed names."""
    base = getattr(type(module), "_seedrand_base", type(module))
    names = tuple(sorted(set(getattr(type(module), "_seedrand_computed", ())) | set(computed)))
    module.__class__ = _computed_class(base, names)


def add_module_hidden(parent: nn.Module, name: str, module: nn.Module) -> None:
    """Register ``module`` as ``parent.name`` (in the state dict, ``.to()``, ``modules()``); if ``parent`` is an
    ``nn.Sequential`` or ``nn.ModuleList``, hidden from its iteration, ``len`` and indexing (its class becomes the
    generated subclass). Raises nothing."""
    if isinstance(parent, (nn.Sequential, nn.ModuleList)):
        _swap_class(parent)
        parent.__dict__["_seedrand_added"] = (*parent.__dict__.get("_seedrand_added", ()), name)
    parent._modules[name] = module


def _new_computed(base: type, names: tuple[str, ...]) -> nn.Module:
    return object.__new__(_computed_class(base, names))


def _reduce_ex(self, protocol):
    # pickle and deepcopy find the generated class through its base (importable) and the computed names
    _, _, *rest = object.__reduce_ex__(self, protocol)
    return (_new_computed, (type(self)._seedrand_base, type(self)._seedrand_computed), *rest)


copyreg.constructor(_new_computed)


def compute_attribute(module: nn.Module, name: str, provider: nn.Module) -> None:
    """Replace the parameter or buffer ``module.name`` by ``provider`` (a module whose forward takes no input and
    returns the tensor), registered as the submodule ``name``: ``module.name`` then returns ``provider()``, so the
    module's own forward computes with it. The module's class becomes a generated subclass (``Seedrand{Class}``,
    an instance of the original class) that pickles and deep-copies through the original; its state-dict keys are
    ``{name}.{provider's keys}``, as in the rewritten graph. Whether ``name`` was a parameter, and its
    ``requires_grad``, are kept in ``module.__dict__["_seedrand_replaced"]`` (what :func:`seedrand.merge` restores).

    Raises:
        ValueError: ``module`` has no parameter or buffer ``name``.
    """
    if name not in module._parameters and name not in module._buffers:
        raise ValueError(f"{type(module).__name__} has no parameter or buffer {name!r}")
    tensor = getattr(module, name)
    replaced = module.__dict__.setdefault("_seedrand_replaced", {})
    replaced[name] = (name in module._parameters, tensor is not None and tensor.requires_grad)
    delattr(module, name)
    _swap_class(module, (name,))
    module._modules[name] = provider


class AppliedAfter:
    """A forward hook that applies ``module`` (a gate, an inserted random layer) to the hooked module's output, as
    the rewritten graph does after that module's call. Picklable and deep-copyable with the model."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, hooked: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return self.module(output)


class PerForward:
    """The value of an input-less module (subspace's ``P @ theta_d``) computed once per forward of the model, as the
    rewritten graph computes it once, however many tensors read it: :meth:`start` and :meth:`stop` are the model's
    forward pre-hook and (always called) forward hook; outside a forward of the model every call computes anew.
    Holds no tensor between forwards (the model deep-copies and pickles as before)."""

    def __init__(self, module: nn.Module):
        self.module, self.active, self.value = module, False, None

    def __call__(self) -> torch.Tensor:
        if not self.active:
            return self.module()
        if self.value is None:
            self.value = self.module()
        return self.value

    def start(self, *_) -> None:
        self.active, self.value = True, None

    def stop(self, *_) -> None:
        self.active, self.value = False, None


def top_seedrand_modules(gm: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every seedrand module of ``gm`` that no other seedrand module holds, in module order."""
    found, inside = [], ()
    for name, module in gm.named_modules():
        if inside and name.startswith(inside):
            continue
        if is_seedrand_module(module):
            found.append((name, module))
            inside = (*inside, f"{name}.")
    return found


def _owner(node: fx.Node) -> str:
    """The qualified name of the module whose output ``node`` is: the called module, or the innermost module of an
    exported op's ``nn_module_stack``."""
    if node.op == "call_module":
        return node.target
    stack = node.meta.get("nn_module_stack")
    if not stack:
        raise ModelError(f"the rewritten graph applies a seedrand module after {node.format_node()}, which no "
                         "module computes; the kept model cannot hold it: pass graph=True to seedrand.rewrite")
    return list(stack.values())[-1][0].split("@")[0]


def _placement(kept: nn.Module, name: str) -> tuple[nn.Module, str, str]:
    """``(parent, attribute, kind)`` of ``name`` in ``kept``, kind ``"module"``, ``"tensor"`` or ``"new"``."""
    parent_name, _, leaf = name.rpartition(".")
    try:
        parent = kept.get_submodule(parent_name)
    except AttributeError:
        raise ModelError(f"the rewritten graph holds {name}, whose parent {parent_name} the model does not have; "
                         "pass graph=True to seedrand.rewrite") from None
    if leaf in parent._modules:
        return parent, leaf, "module"
    if leaf in parent._parameters or leaf in parent._buffers:
        return parent, leaf, "tensor"
    return parent, leaf, "new"


def transplant(gm: fx.GraphModule, kept: nn.Module) -> dict[str, nn.Module]:
    """Place every seedrand module of the rewritten ``gm`` in ``kept`` (a copy of the model ``gm`` was traced
    from), as the module docstring says, then :func:`share_tensors`.

    Returns:
        per replaced layer's qualified name, a copy of the layer on the ``meta`` device (its class, hyperparameters
        and ``requires_grad`` flags, no data), from which :func:`seedrand.merge` rebuilds it.

    Raises:
        ModelError: a seedrand module has no place in ``kept`` (its parent is missing, or the op it follows belongs
            to no module); nothing is a clear fix but ``graph=True``.
    """
    calls: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    placed = [(name, module, *_placement(kept, name)) for name, module in top_seedrand_modules(gm)]
    originals, shared = {}, {}
    for name, module, parent, leaf, kind in placed:  # replaced modules first: computed tensors and hooks read them
        if kind == "module":
            originals[name] = copy.deepcopy(parent._modules[leaf]).to("meta")
            setattr(parent, leaf, module)
        elif kind == "new" and not any(a for n in calls.get(name, []) for a in n.args):
            add_module_hidden(parent, leaf, module)  # called without inputs (subspace's coordinates)
    for name, module, parent, leaf, kind in placed:
        if kind == "tensor":
            inputs = {tuple(n.args) for n in calls.get(name, [])}
            args = next(iter(inputs), ())
            if len(inputs) > 1 or (args and not hasattr(module, "bind_inputs")) or any(
                    not isinstance(a, fx.Node) or a.op != "call_module" or a.args for a in args):
                raise ModelError(f"the rewritten graph computes {name} from other values; the kept model cannot "
                                 "read it as an attribute: pass graph=True to seedrand.rewrite")
            if args:  # reads values computed once per forward (subspace's P @ theta_d)
                module.bind_inputs([_per_forward(kept, a.target, shared) for a in args])
            compute_attribute(parent, leaf, module)
        elif kind == "new" and any(n.args for n in calls.get(name, [])):
            add_module_hidden(parent, leaf, module)
            for owner in {_owner(n.args[0]) for n in calls.get(name, []) if n.args}:
                kept.get_submodule(owner).register_forward_hook(AppliedAfter(module))
    share_tensors(gm, kept)
    return originals


def _per_forward(kept: nn.Module, name: str, shared: dict[str, PerForward]) -> PerForward:
    """The one :class:`PerForward` of module ``name`` of ``kept``, its hooks registered on ``kept``."""
    if name not in shared:
        shared[name] = cache = PerForward(kept.get_submodule(name))
        kept.register_forward_pre_hook(cache.start)
        kept.register_forward_hook(cache.stop, always_call=True)
    return shared[name]


def _tensors(tree: nn.Module):
    """``(qualified name, tensor)`` of every parameter and buffer of ``tree`` outside seedrand modules."""
    inside = tuple(f"{n}." for n, _ in top_seedrand_modules(tree))
    for name, tensor in itertools.chain(tree.named_parameters(remove_duplicate=False),
                                        tree.named_buffers(remove_duplicate=False)):
        if not name.startswith(inside):
            yield name, tensor


def share_tensors(source: nn.Module, target: nn.Module) -> None:
    """Make every parameter and buffer of ``target`` that ``source`` has under the same name (outside seedrand
    modules) ``source``'s own tensor object, keeping ``target``'s registration (parameter or buffer, persistence).
    Raises nothing; names only one of them has are left as they are."""
    for name, tensor in _tensors(source):
        parent_name, _, leaf = name.rpartition(".")
        try:
            parent = target.get_submodule(parent_name)
        except AttributeError:
            continue
        if is_seedrand_module(parent):
            continue
        if leaf in parent._parameters and isinstance(tensor, nn.Parameter):
            parent._parameters[leaf] = tensor
        elif leaf in parent._buffers:
            parent._buffers[leaf] = tensor


def _outputs(model: nn.Module, inputs: tuple, training: bool) -> list[torch.Tensor]:
    """The tensors ``model(*inputs)`` returns, flattened, computed without changing the model or the global RNG."""
    buffers = [(b, b.clone()) for b in model.buffers()]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            out = in_mode(model, training, lambda: model(*inputs))
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
    return [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]


def difference(reference: nn.Module, model: nn.Module, example_inputs: tuple, training: bool = False
               ) -> Optional[float]:
    """``None`` if ``model`` computes what ``reference`` computes on ``example_inputs`` (in mode ``training``; no
    gradient, buffers and the global RNG restored), else the largest difference of their outputs (``nan`` where
    they do not match in number or shape). Tolerance: ``torch.allclose`` with ``rtol=1e-4, atol=1e-5`` (both run
    the same ops, an exported graph in decomposed form). Exceptions of ``model`` propagate."""
    expected = _outputs(reference, example_inputs, training)
    got = _outputs(model, example_inputs, training)
    same = len(got) == len(expected) and all(
        a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-5, equal_nan=True)
        for a, b in zip(got, expected))
    if same:
        return None
    diffs = [(a.double() - b.double()).abs().max().item() for a, b in zip(got, expected) if a.shape == b.shape]
    return max(diffs, default=float("nan")) if len(got) == len(expected) else float("nan")


def verify(kept: nn.Module, gm: fx.GraphModule, example_inputs: tuple, locked_mode: Optional[bool]) -> None:
    """Check that ``kept`` computes what ``gm`` computes on ``example_inputs`` (:func:`difference`, in eval mode
    or the mode the graph is locked to).

    Raises:
        ModelError: ``kept`` fails or its outputs differ (says by how much, and that ``graph=True`` keeps the graph).
    """
    try:
        diff = difference(gm, kept, example_inputs, False if locked_mode is None else locked_mode)
    except SeedrandError:
        raise
    except Exception as e:
        raise ModelError(f"the rewritten model, kept as {type(kept).__name__}, fails on the example inputs "
                         f"({type(e).__name__}: {e}); pass graph=True to seedrand.rewrite for the rewritten graph") from e
    if diff is not None:
        raise ModelError(f"the rewritten model, kept as {type(kept).__name__}, does not compute what the rewritten "
                         f"graph computes on the example inputs (largest difference {diff:.3g}); "
                         "pass graph=True to seedrand.rewrite for the rewritten graph")
