"""``seedrand.rewrite``: YAML -> validated policy -> traced graph -> passes -> rewritten GraphModule."""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import ModelError, PolicyError
from ..policy import Policy, load_policy
from .match import Target, resolve
from .trace import TraceInfo, trace

__all__ = ["rewrite", "as_policy", "RewriteRecord", "RECORD_KEY"]

RECORD_KEY = "seedrand"


@dataclass
class RewriteRecord:
    """What :func:`rewrite` did, kept in ``gm.meta["seedrand"]`` (survives ``copy.deepcopy``).

    Attributes:
        policy: the policy applied.
        targets: every (module, rule) pair, in the order the passes ran.
        trace: how the model was captured.
        example_inputs: the example inputs it was traced with (``None`` if none were given).
        collections: per :func:`seedrand.collect_garbage` call that removed channels, in order, the channel groups
            it removed (root ids of the model's ``ChannelGraph`` at that time); ``seedrand.load`` replays them.
    """

    policy: Policy
    targets: list[Target]
    trace: TraceInfo
    example_inputs: Optional[tuple] = None
    collections: list[list[int]] = field(default_factory=list)


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
            dynamic_shapes: Optional[tuple] = None) -> fx.GraphModule:
    """Apply ``policy`` to a deep copy of ``model`` and return the rewritten graph.

    Args:
        model: any ``nn.Module``; never modified, also when an error is raised.
        policy: a :class:`Policy`, a path to a YAML policy, or a dict.
        example_inputs: positional example inputs (tuple, or one tensor). Required for models that ``torch.fx``
            cannot trace symbolically (most ``transformers`` models), which are captured with ``torch.export``;
            use a batch of at least 2 so the batch dimension stays dynamic.
        dynamic_shapes: which dimensions of ``example_inputs`` an exported graph accepts at other sizes, in
            ``torch.export``'s ``dynamic_shapes`` form (per input a dict ``{dim: torch.export.Dim.AUTO}`` or
            ``None``); by default the batch, and the sequence of integer (token) inputs. Image sizes are static
            unless asked for here (they made tracing a Swin 40 times slower).

    Returns:
        A ``torch.fx.GraphModule`` whose parameters are copies of the model's, in the model's train/eval mode, with
        ``gm.meta["seedrand"]`` holding a :class:`RewriteRecord`. A ``transformers`` model whose config has
        ``use_cache=True`` (the default) is traced with the cache off: the graph returns no key/value cache. With an empty policy its outputs equal the model's
        bit for bit and it trains like the model.

    Raises:
        PolicyError: the policy is malformed or does not fit the model (names the rule and YAML line).
        ModelError: ``model`` is not an ``nn.Module``, already holds seedrand modules (rewrite the original with one
            policy instead: a second rewrite would inline the regenerated layers and lose their seeds), or its own
            forward fails on ``example_inputs`` (wrong shape or dtype; names the model code line).
        TraceError: no strategy could trace the model (names the code line).
    """
    from ..passes import CHECKS, PASSES  # passes import the rewriter's helpers

    policy = as_policy(policy)
    example_inputs = _check_arguments(model, example_inputs)
    model = copy.deepcopy(model)
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", None) is True:  # transformers' default: a DynamicCache output cannot be exported
        config.use_cache = False  # the copy's config only: the graph computes without a key/value cache
    targets = resolve(policy, model)
    groups = [list(g) for _, g in itertools.groupby(targets, key=lambda t: id(t.rule))]  # listed rule by rule
    for group in groups:
        CHECKS.get(group[0].rule.action, lambda *_: None)(model, group)
    gm, info = trace(model, {t.qualname for t in targets}, example_inputs, dynamic_shapes)
    for group in groups:
        PASSES[group[0].rule.action](gm, group)
    gm.graph.lint()
    gm.recompile()
    gm.meta[RECORD_KEY] = RewriteRecord(policy, targets, info, example_inputs)
    return gm


def _check_arguments(model: nn.Module, example_inputs) -> Optional[tuple]:
    """``example_inputs`` as a tuple (or ``None``), once ``model`` and they are known to be what rewrite takes."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"seedrand.rewrite takes an nn.Module as the model, not {type(model).__name__}")
    if isinstance(model, fx.GraphModule) and RECORD_KEY in model.meta:
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
