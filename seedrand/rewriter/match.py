"""Resolve a policy's rules to the modules of a model.

Precedence (in the spirit of torch.ao's ``QConfigMapping``, but stricter):

1. Within a rule, ``exclude``/``exclude_types`` beat ``modules``/``types``.
2. A module is selected by a rule when it matches the rule's ``modules`` (if given) and ``types`` (if given).
3. Every selected (module, rule) pair is applied, rules in file order. Two actions that both own a module's weight
   (``ActionSpec.owns_weight``: ``freeze_fraction``, ``random``, ``subspace``, ``grow``, in any combination or
   twice), or an action twice that applies once per module (``filter_gates``), on one module are an error naming
   both rules.

Strictness: every ``modules``/``exclude`` pattern and every ``types``/``exclude_types`` entry must match at least one
module of the model, and every rule must select at least one, unless the rule says ``optional: true``. Misspellings
get a "did you mean" from the model's own names.
"""

from __future__ import annotations

import difflib
import re
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Optional, Union

import torch.nn as nn

from ..actions import ACTIONS
from ..errors import shown

if TYPE_CHECKING:  # the policy module builds its schema from the passes, which import this module
    from ..policy import Policy, Rule

__all__ = ["Target", "resolve"]


def _incompatible(a: str, b: str) -> bool:
    return ACTIONS[a].conflicts_with(ACTIONS[b])


@dataclass(frozen=True)
class Target:
    """One (module, rule) pair the passes will apply.

    Attributes:
        qualname: the module's qualified name in the model (``""`` for the root).
        cls: the module's class (``type(module)`` before tracing).
        rule: the policy rule that selected it.
        policy: the policy it comes from (its ``seed``; ``policy.error(message, rule)`` for located errors).
    """

    qualname: str
    cls: type
    rule: Rule
    policy: Policy

    @property
    def seed(self) -> int:
        """The policy's global seed (derive per-tensor Philox keys with ``kernels.philox.derive_seed``)."""
        return self.policy.seed

    def error(self, message: str) -> Exception:
        """A ``PolicyError`` naming this module, the rule and its YAML line."""
        shown = repr(self.qualname) if self.qualname else "the root module"
        return self.policy.error(f"{shown} ({self.cls.__name__}): {message}", self.rule)


def _name_matches(pattern: str, name: str) -> bool:
    return re.fullmatch(pattern[3:], name) is not None if pattern.startswith("re:") else pattern == name


def _resolve_type(entry: str, modules: dict[str, type], policy: Policy, rule: Rule):
    """A predicate on classes for one ``types`` entry: a dotted path, or a class name along the hierarchy."""
    if "." in entry:
        cls = _dotted_class(entry, modules)
        if cls is None:
            raise policy.error(f"type {shown(entry)} is neither a class in the model's hierarchy nor one of a module "
                               "already imported; seedrand never imports a module a policy names (a policy holds "
                               "no code): import it before applying the policy", rule)
        return lambda c: issubclass(c, cls)
    known = {c.__name__ for cls in modules.values() for c in cls.__mro__}
    known |= {n for n, v in vars(nn).items() if isinstance(v, type) and issubclass(v, nn.Module)}
    if entry not in known:
        close = difflib.get_close_matches(entry, sorted(known), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise policy.error(f"unknown type {shown(entry)}{hint}", rule)
    return lambda c: any(k.__name__ == entry for k in c.__mro__)


def _dotted_class(entry: str, modules: dict[str, type]) -> Optional[type]:
    """The class a dotted ``types`` entry names, looked up among the model's classes and then in the namespaces of
    modules already in ``sys.modules`` (read directly: no import, no lazy-module ``__getattr__``), or ``None``."""
    for cls in modules.values():
        for c in cls.__mro__:
            if f"{c.__module__}.{c.__qualname__}" == entry:
                return c
    parts = entry.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        namespace = sys.modules.get(".".join(parts[:cut]))
        if namespace is None:
            continue
        value = namespace
        for name in parts[cut:]:
            value = vars(value).get(name) if hasattr(value, "__dict__") else None
        return value if isinstance(value, type) else None
    return None


def _check_nonempty(kind: str, entry: str, hits: int, names: list[str], policy: Policy, rule: Rule) -> None:
    if hits or rule.optional:
        return
    hint = ""
    if not entry.startswith("re:") and kind in ("modules", "exclude"):
        close = difflib.get_close_matches(entry, names, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
    raise policy.error(f"{kind} entry {shown(entry)} matches no module of the model{hint} (set optional: true to allow)",
                       rule)


def _select(rule: Rule, modules: dict[str, type], policy: Policy) -> list[str]:
    names = list(modules)
    m = rule.match

    def union(entries: list[str], kind: str, predicate_of) -> set[str]:
        chosen: set[str] = set()
        for entry in entries:
            predicate = predicate_of(entry)
            hits = {n for n, mod in modules.items() if predicate(n, mod)}
            _check_nonempty(kind, entry, len(hits), names, policy, rule)
            chosen |= hits
        return chosen

    def by_name(pattern: str):
        return lambda name, _: _name_matches(pattern, name)

    def by_type(entry: str):
        is_type = _resolve_type(entry, modules, policy, rule)
        return lambda _, cls: is_type(cls)

    selected = set(names)
    if m.modules:
        selected &= union(m.modules, "modules", by_name)
    if m.types:
        selected &= union(m.types, "types", by_type)
    selected -= union(m.exclude, "exclude", by_name) | union(m.exclude_types, "exclude_types", by_type)
    if not selected and not rule.optional:
        raise policy.error("selects no module: its modules and types match, but never the same module "
                           "(or exclude removes them all); set optional: true to allow", rule)
    return [n for n in names if n in selected]


def resolve(policy: Policy, model: Union[nn.Module, Mapping[str, type]]) -> list[Target]:
    """Every (module, rule) pair the policy selects in ``model``, rules in file order, modules in model order.

    Args:
        policy: a validated :class:`~seedrand.policy.Policy`.
        model: the module the names refer to (``model.named_modules()``; ``""`` is the root), or a mapping of
            qualified names to module classes (for graphs whose modules are gone, as in a Dynamo capture).

    Returns:
        A list of :class:`Target`.

    Raises:
        PolicyError: a pattern, type or rule matches nothing (and the rule is not optional), a type is unknown, or
            two incompatible actions land on one module; the message names the rule(s) and YAML line.
    """
    modules = ({n: type(m) for n, m in model.named_modules(remove_duplicate=False)}
               if isinstance(model, nn.Module) else dict(model))
    targets: list[Target] = []
    owner: dict[tuple[str, str], Rule] = {}
    for rule in policy.rules:
        for name in _select(rule, modules, policy):
            for (other_name, other_action), other in owner.items():
                if other_name == name and _incompatible(other_action, rule.action):
                    shown = repr(name) if name else "the root module"
                    raise policy.error(
                        f"action {rule.action} on {shown} conflicts with action {other_action} of rule "
                        f"{other.label}" + (f" (line {other._line})" if other._line else "")
                        + "; one module can take only one of them", rule)
            owner[(name, rule.action)] = rule
            targets.append(Target(name, modules[name], rule, policy))
    return targets
