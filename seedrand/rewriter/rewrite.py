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
    """A :class:`Policy` from a Policy, a YAML path or a dict. Raises ``PolicyError``/``ValidationError``."""
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, dict):
        return Policy.model_validate(policy)
    return load_policy(policy)


def rewrite(model: nn.Module, policy: Union[Policy, str, Path, dict], example_inputs: Optional[tuple] = None
            ) -> fx.GraphModule:
    """Apply ``policy`` to a deep copy of ``model`` and return the rewritten graph.

    Args:
        model: any ``nn.Module``; never modified, also when an error is raised.
        policy: a :class:`Policy`, a path to a YAML policy, or a dict.
        example_inputs: positional example inputs (tuple, or one tensor). Required for models that ``torch.fx``
            cannot trace symbolically (most ``transformers`` models), which are captured with ``torch.export``;
            use a batch of at least 2 so the batch dimension stays dynamic.

    Returns:
        A ``torch.fx.GraphModule`` whose parameters are copies of the model's, in the model's train/eval mode, with
        ``gm.meta["seedrand"]`` holding a :class:`RewriteRecord`. With an empty policy its outputs equal the model's
        bit for bit and it trains like the model.

    Raises:
        PolicyError: the policy is malformed or does not fit the model (names the rule and YAML line).
        TraceError: no strategy could trace the model (names the code line).
    """
    from ..passes import PASSES  # passes import the rewriter's helpers

    policy = as_policy(policy)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    model = copy.deepcopy(model)
    targets = resolve(policy, model)
    gm, info = trace(model, {t.qualname for t in targets}, example_inputs)
    for _, group in itertools.groupby(targets, key=lambda t: id(t.rule)):  # resolve lists them rule by rule
        group = list(group)
        PASSES[group[0].rule.action](gm, group)
    gm.graph.lint()
    gm.recompile()
    gm.meta[RECORD_KEY] = RewriteRecord(policy, targets, info, example_inputs)
    return gm
