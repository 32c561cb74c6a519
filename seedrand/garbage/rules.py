"""What each op does to channels, for the channel dependency graph: the public rules of element-wise, pooling and
reduction ops (:func:`register_channel_rule`, one registration for every spelling of an op), the module classes'
rules, and the registry of structural handlers (arithmetic, ``cat``, reshapes, layers...; ``seedrand.garbage.graph``
registers its own at import through :func:`handles`)."""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..layers import mro_lookup

__all__ = ["CHANNEL_RULES", "register_channel_rule", "op_spellings", "handles", "op_rule", "module_rule",
           "handler", "keeps_heads", "in_place"]

aten = torch.ops.aten
CHANNEL_RULES = ("keeps_zero", "elementwise", "pool", "reduce")
_OP_RULES: dict[object, str] = {}  # every spelling of an op -> its rule
_MODULE_RULES: dict[Union[type, str], str] = {}  # module classes (or qualified names) -> their rule


def op_spellings(op: Union[str, Callable], overloads: Optional[tuple[str, ...]] = None) -> list:
    """Every spelling under which a traced graph calls ``op``: for a name (``"relu"``) the ``torch``,
    ``torch.nn.functional`` and ``Tensor`` method spellings that exist and ``aten.<name>`` with its overloads (those
    named in ``overloads``, if given); for an op overload packet (``torch.ops.mylib.swish``) the packet and its
    overloads; else ``op`` itself. Raises nothing."""
    if isinstance(op, str):
        found = [op] if callable(getattr(torch.Tensor, op, None)) else []
        found += [f for f in (getattr(torch, op, None), getattr(F, op, None)) if callable(f)]
        packet = getattr(aten, op, None)
        return found + (op_spellings(packet, overloads) if isinstance(packet, torch._ops.OpOverloadPacket) else [])
    if isinstance(op, torch._ops.OpOverloadPacket):
        names = [name for name in op.overloads() if overloads is None or name in overloads]
        return [op] * (overloads is None) + [getattr(op, name) for name in names]
    return [op]


def register_channel_rule(op: Union[str, Callable, type], rule: str) -> None:
    """Say what ``op`` does to channels, for the channel dependency graph of garbage collection (an op without a
    rule is a barrier: the channels it reads are kept, and ``explain=True`` names it).

    Args:
        op: a name (``"relu"``: every spelling, see :func:`op_spellings`), a ``torch.ops`` overload packet (all its
            overloads) or overload, a function, or an ``nn.Module`` subclass (or its qualified name) called as a
            leaf module.
        rule: ``"keeps_zero"``: element-wise on its first argument with ``f(0) = 0`` (ReLU, GELU, dropout), so a
            dead channel stays dead; ``"elementwise"``: element-wise with ``f(0) != 0`` (sigmoid, exp), channels kept
            apart but a dead one becomes live; ``"pool"``: acts on the dims after the channel dim (1) only, zero
            preserving (max/average pooling); ``"reduce"``: reduces over the dims its second argument (or ``dim=``)
            names, channel-preserving unless they include the channel dim (``sum``, ``mean``, ``amax``).

    Raises:
        ValueError: an unknown rule, or ``"reduce"`` for a module class (its dims are not in its call).
        TypeError: ``op`` is none of the above.
    """
    if rule not in CHANNEL_RULES:
        raise ValueError(f"register_channel_rule: rule must be one of {', '.join(CHANNEL_RULES)}, not {rule!r}")
    if isinstance(op, type) and issubclass(op, nn.Module):
        if rule == "reduce":
            raise ValueError("register_channel_rule: a module's reduction dims are not in its call; give the "
                             "module a rule of its own kind, or register the function its forward calls")
        _MODULE_RULES[op] = rule
    elif isinstance(op, str) and "." in op:  # a module class by qualified name
        _MODULE_RULES[op] = rule
    elif isinstance(op, str) or callable(op):
        spellings = op_spellings(op)
        if not spellings:
            raise TypeError(f"register_channel_rule: no torch, functional, Tensor method or aten op is named "
                            f"{op!r}")
        _OP_RULES.update(dict.fromkeys(spellings, rule))
    else:
        raise TypeError(f"register_channel_rule takes an op, a function, a name or an nn.Module subclass, not {op!r}")


for _names, _rule in (
        (["relu", "relu6", "leaky_relu", "gelu", "silu", "tanh", "elu", "hardswish", "mish", "dropout",
          "contiguous", "clone", "abs", "neg", "square", "sin", "erf", aten.relu_, aten.silu_, aten.dropout_],
         "keeps_zero"),
        (["sigmoid", "hardsigmoid", "exp", "cos"], "elementwise"),
        ([f"{kind}_pool{n}d" for kind in ("max", "avg", "adaptive_avg", "adaptive_max") for n in (1, 2, 3)], "pool"),
        (["mean", "sum", "amax", "amin"], "reduce")):
    for _name in _names:
        register_channel_rule(_name, _rule)
for _modules, _rule in (
        ((nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.ELU, nn.Hardswish, nn.Mish, nn.Dropout,
          nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity), "keeps_zero"),
        ((nn.Sigmoid, nn.Hardsigmoid), "elementwise"),
        ((nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
          nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
          nn.AdaptiveMaxPool3d), "pool")):
    for _module in _modules:
        register_channel_rule(_module, _rule)


Handler = Callable[[Any, fx.Node], object]  # (ChannelGraph, node) -> True, a reason, or None
_HANDLERS: dict[object, Handler] = {}  # every spelling of a structural op -> its handler
_HEAD_SAFE: set = set()  # ops that keep attention heads apart (reshapes, permutes, attention itself)


def handles(ops: list, handler: Handler, overloads: Optional[tuple[str, ...]] = None, heads: bool = False) -> None:
    """Register ``handler`` for every spelling of each of ``ops`` (:func:`op_spellings`, aten overloads limited
    to ``overloads``); ``heads``: the op keeps attention heads apart."""
    for op in ops:
        for spelling in op_spellings(op, overloads):
            _HANDLERS[spelling] = handler
            if heads:
                _HEAD_SAFE.add(spelling)


# in-place spellings: handled as their op only when nothing else reads the tensor they change
_IN_PLACE = {s for name in ("add_", "sub_", "mul_", "div_", "relu_", "silu_", "dropout_", "hardtanh_")
             for s in op_spellings(name)}


def op_rule(target) -> Optional[str]:
    """The public rule registered for ``target`` (a node's target), else ``None``."""
    return _OP_RULES.get(target)


def module_rule(module: nn.Module) -> Optional[str]:
    """The rule registered for ``module``'s class (the most derived registered one), else ``None``."""
    return mro_lookup(_MODULE_RULES, type(module))


def handler(target) -> Optional[Handler]:
    """The structural handler registered for ``target``, else ``None``."""
    return _HANDLERS.get(target)


def keeps_heads(target) -> bool:
    """``target`` keeps attention heads apart (a reshape, a permute, attention, an element-wise op)."""
    return target in _HEAD_SAFE or _OP_RULES.get(target) in ("keeps_zero", "elementwise")


def in_place(target) -> bool:
    """``target`` changes its first input in place."""
    return target in _IN_PLACE
