"""``seedrand.rewrite``: YAML -> validated policy -> traced graph -> passes -> the user's model with seedrand's modules
in its tree (the kept model), or the rewritten GraphModule (``graph=True``)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional, Union

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import ModelError, PolicyError
from ..layers import layer_spec
from ..passes import ACTIONS
from ..policy import Policy, load_policy
from .graph import reads_module
from .kept import transplant, verify
from .match import Target, resolve
from .trace import TraceInfo, trace

__all__ = ["rewrite", "as_policy", "RewriteRecord", "RECORD_KEY", "KEPT_RECORD_KEY", "record_of", "kept_record", "graph_of"]

RECORD_KEY = "seedrand"
KEPT_RECORD_KEY = "_seedrand_record"  # the kept model's instance attribute holding its RewriteRecord


@dataclass
class RewriteRecord:
    """What :func:`rewrite` did, kept in ``gm.meta["seedrand"]`` of the graph and in the kept model (read both with
    :func:`record_of`); survives ``copy.deepcopy``.

    Attributes:
        policy: the policy applied.
        targets: every (module, rule) pair, in the order the passes ran.
        trace: how the model was captured.
        example_inputs: the example inputs it was traced with (``None`` if none were given).
        collections: per :func:`seedrand.collect_garbage` call that removed channels, in order, the channel groups
            it removed (root ids of the model's ``ChannelGraph`` at that time); ``seedrand.load`` replays them.
        graph: for a kept model, the rewritten graph beside it (sharing its tensors), which garbage collection
            analyses; ``None`` in the graph's own record, and after pickling (``torch.save(model)``): a graph with
            export's guards does not pickle, and ``seedrand.save``/``load`` keep what collection needs.
        originals: for a kept model, per layer a seedrand module replaced, that layer on the ``meta`` device (no
            data): what ``seedrand.merge`` rebuilds.
        skipped: per module an ``optional: true`` rule selected but the traced forward never reads (a head a
            checkpoint holds that this forward does not use), why it was skipped; those are not in ``targets``.
    """

    policy: Policy
    targets: list[Target]
    trace: TraceInfo
    example_inputs: Optional[tuple] = None
    collections: list[list[int]] = field(default_factory=list)
    graph: Optional[fx.GraphModule] = None
    originals: dict[str, nn.Module] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "graph": None}

    def __deepcopy__(self, memo: dict) -> "RewriteRecord":
        new = object.__new__(RewriteRecord)
        memo[id(self)] = new
        for f in fields(self):  # with the memo: the copied graph shares the copied model's tensors
            setattr(new, f.name, copy.deepcopy(getattr(self, f.name), memo))
        return new


def record_of(model: nn.Module) -> Optional[RewriteRecord]:
    """The :class:`RewriteRecord` of a model :func:`rewrite` returned (kept model or graph), else ``None``."""
    if isinstance(model, fx.GraphModule) and RECORD_KEY in model.meta:
        return model.meta[RECORD_KEY]
    return model.__dict__.get(KEPT_RECORD_KEY)


def kept_record(model: nn.Module, what: str) -> RewriteRecord:
    """The :class:`RewriteRecord` of a kept model (what ``what``, a public function's name, needs).

    Raises:
        ModelError: ``model`` is a GraphModule (``graph=True``) or a model :func:`rewrite` did not return.
    """
    record = record_of(model)
    if record is None:
        raise ModelError(f"{what} takes a model seedrand.rewrite returned; this {type(model).__name__} was not "
                         "rewritten")
    if isinstance(model, fx.GraphModule) and record.graph is None:
        raise ModelError(f"{what} takes the kept model (seedrand.rewrite without graph=True), not the rewritten "
                         "GraphModule of graph=True")
    return record


def graph_of(model: nn.Module) -> Optional[fx.GraphModule]:
    """The rewritten graph of a model :func:`rewrite` returned: the model itself with ``graph=True``, else the graph
    kept beside it (``None`` when there is none: not rewritten, or unpickled). Raises nothing."""
    record = record_of(model)
    if record is None:
        return None
    return model if isinstance(model, fx.GraphModule) and record.graph is None else record.graph


def as_policy(policy: Union[Policy, str, Path, dict]) -> Policy:
    """A :class:`Policy` from a Policy, a YAML path or a dict.

    Raises:
        PolicyError: the policy is malformed (the same messages for dicts as for files), or ``policy`` is none of
            these types.
    """
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, dict):
        return Policy.from_dict(policy)
    if isinstance(policy, (str, Path)):
        return load_policy(policy)
    raise PolicyError(f"a policy is a seedrand.Policy, a path to a YAML file or a dict, not {type(policy).__name__}")


def rewrite(model: nn.Module, policy: Union[Policy, str, Path, dict], example_inputs: Optional[tuple] = None, *,
            graph: bool = False, dynamic_shapes: Optional[tuple] = None) -> Union[nn.Module, fx.GraphModule]:
    """Apply ``policy`` to a deep copy of ``model`` and return it, of the model's own class (the kept model), or,
    with ``graph=True``, the rewritten ``torch.fx.GraphModule``.

    The model is traced (``torch.fx``, or ``torch.export`` with example inputs) and the passes rewrite the graph;
    the kept model is then a deep copy of ``model`` with the same seedrand modules at the same qualified names
    (``seedrand.rewriter.kept``): replaced layers in place, computed weights as attributes its own forward reads,
    gates and inserted layers applied by forward hooks. Its code, config, keyword inputs, ``generate``, hooks and
    dtype changes are the model's own; its other tensors are the graph's, which stays beside it for garbage
    collection. With example inputs, its outputs are checked against the graph's before it is returned.

    Args:
        model: any ``nn.Module``; never modified, also when an error is raised.
        policy: a :class:`Policy`, a path to a YAML policy, or a dict.
        example_inputs: positional example inputs (tuple, or one tensor). Required for models that ``torch.fx``
            cannot trace symbolically (most ``transformers`` models), which are captured with ``torch.export``;
            use a batch of at least 2 so the batch dimension stays dynamic.
        graph: return the rewritten GraphModule (graph-level work: its nodes, ``torch.export``-captured forwards
            that the model's own code cannot reproduce) instead of the kept model.
        dynamic_shapes: which dimensions of ``example_inputs`` an exported graph accepts at other sizes, in
            ``torch.export``'s ``dynamic_shapes`` form (per input a dict ``{dim: torch.export.Dim.AUTO}`` or
            ``None``); by default the batch, and the sequence of integer (token) inputs. Image sizes are static
            unless asked for here (they made tracing a Swin 40 times slower).

    Returns:
        The kept model (``type(out) is type(model)``), or with ``graph=True`` a ``torch.fx.GraphModule``, holding
        copies of the model's tensors, in the model's train/eval mode; :func:`record_of` gives its
        :class:`RewriteRecord`. A ``transformers`` model whose config has ``use_cache=True`` (the default) is traced
        with the cache off (the graph returns no key/value cache; the kept model keeps the config and its cache).
        With an empty policy its outputs equal the model's bit for bit and it trains like the model.

    Raises:
        PolicyError: the policy is malformed or does not fit the model (names the rule and YAML line).
        ModelError: ``model`` is not an ``nn.Module``, already holds seedrand modules (rewrite the original with one
            policy instead: a second rewrite would inline the regenerated layers and lose their seeds), or its own
            forward fails on ``example_inputs`` (wrong shape or dtype; names the model code line).
        TraceError: no strategy could trace the model (names the code line).
        ModelError: (kept model) a seedrand module has no place in the model's tree, or the kept model's outputs
            differ from the graph's on the example inputs; ``graph=True`` gives the graph.
    """
    policy = as_policy(policy)
    example_inputs = _check_arguments(model, example_inputs)
    original, model = model, copy.deepcopy(model)
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", None) is True:  # transformers' default: a DynamicCache output cannot be exported
        config.use_cache = False  # the copy's config only: the graph computes without a key/value cache
    targets = _delegated(resolve(policy, model), model)
    groups = [list(g) for _, g in itertools.groupby(targets, key=lambda t: id(t.rule))]  # listed rule by rule
    for group in groups:
        check = ACTIONS[group[0].rule.action].check
        if check is not None:
            check(model, group)
    gm, info = trace(model, {t.qualname for t in targets}, example_inputs, dynamic_shapes)
    skipped = {t.qualname: f"rule {t.rule.label} (optional): the traced forward never reads it"
               for t in targets if t.rule.optional and not reads_module(gm, t.qualname)}
    targets = [t for t in targets if t.qualname not in skipped or not t.rule.optional]
    for group in groups:
        applied = [t for t in group if t in targets]
        if applied:
            ACTIONS[group[0].rule.action].apply(gm, applied)
    gm.graph.lint()
    gm.recompile()
    record = RewriteRecord(policy, targets, info, example_inputs, skipped=skipped)
    gm.meta[RECORD_KEY] = record
    if graph:
        return gm
    kept = copy.deepcopy(original)
    record.originals = transplant(gm, kept)
    if example_inputs is not None:
        with _cache_off(kept):
            verify(kept, gm, example_inputs, info.locked_mode)
    record.graph = gm
    kept.__dict__[KEPT_RECORD_KEY] = record
    return kept


def _delegated(targets: list[Target], model: nn.Module) -> list[Target]:
    """``targets``, where an action that owns the weight selects a wrapper (``LayerSpec.delegate``: PEFT's LoRA
    layers), retargeted to the wrapped child that holds the weight, under the same rule.

    Raises:
        PolicyError: two rules' weight actions reach one layer, one through its wrapper (names both rules).
    """
    owners: dict[str, Target] = {}
    result = []
    for target in targets:
        spec = layer_spec(target.cls)
        while ACTIONS[target.rule.action].owns_weight and spec is not None and spec.delegate is not None:
            qualname = f"{target.qualname}.{spec.delegate}" if target.qualname else spec.delegate
            target = dataclasses.replace(target, qualname=qualname, cls=type(model.get_submodule(qualname)))
            spec = layer_spec(target.cls)
        if ACTIONS[target.rule.action].owns_weight:
            other = owners.setdefault(target.qualname, target)
            if other.rule is not target.rule:
                raise target.error(f"{target.rule.action} and rule {other.rule.label}'s {other.rule.action} both "
                                   "own its weight (one selects the wrapper around it)")
        result.append(target)
    return result


@contextlib.contextmanager
def _cache_off(model: nn.Module):
    """``model.config.use_cache`` off inside (the graph was traced without a key/value cache), restored after."""
    config = getattr(model, "config", None)
    cached = getattr(config, "use_cache", None)
    if cached is True:
        config.use_cache = False
    try:
        yield
    finally:
        if cached is True:
            config.use_cache = True


def _check_arguments(model: nn.Module, example_inputs) -> Optional[tuple]:
    """``example_inputs`` as a tuple (or ``None``), once ``model`` and they are known to be what rewrite takes."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"seedrand.rewrite takes an nn.Module as the model, not {type(model).__name__}")
    if record_of(model) is not None:
        raise ModelError("this model was returned by seedrand.rewrite already; rewrite the original model with one "
                         "policy holding every rule (a second rewrite would inline its regenerated layers and lose "
                         "their seeds and fingerprints)")
    for name, module in model.named_modules():
        if type(module).__module__.startswith(("seedrand.passes.", "seedrand.ensemble")):
            raise ModelError(f"{name or 'the root module'} is a seedrand {type(module).__name__}: this model was "
                             "rewritten already; rewrite the original model with one policy holding every rule (a "
                             "second rewrite would inline its regenerated layers and lose their seeds)")
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    if example_inputs is not None and not isinstance(example_inputs, tuple):
        raise ModelError(f"example_inputs are the forward's positional inputs: a tuple (or one tensor), not "
                         f"{type(example_inputs).__name__}")
    return example_inputs
