"""The action registry: one :class:`ActionSpec` per policy action, registered by the action's own module of
``seedrand.passes`` (its parameters, its pass, whether it owns the module's weight, whether the ``seedrand``
torch.compile backend can apply it). The policy schema (``Rule`` has one optional field per registered action), the
conflict check of ``seedrand.rewriter.match``, the backend's refusals and the reference table of the documentation
(:func:`seedrand.policy.reference_table`) all derive from it.

Also the base of every action's parameters (:class:`StrictModel`: strict, no coercion, no unknown keys) and the
``Init`` type of an ``init`` parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Callable, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict

from .kernels.init import parse_init

__all__ = ["StrictModel", "ActionSpec", "Init", "check_init", "ACTIONS", "register_action", "per_module"]


def check_init(value: str) -> str:
    """``value`` if it is an init name ``seedrand.kernels.init`` knows. Raises ValueError naming the allowed ones."""
    parse_init(value)
    return value


Init = Annotated[str, AfterValidator(check_init)]


class StrictModel(BaseModel):
    """Base of a policy's models: strict (``seed: true`` is not 1, ``residual: "no"`` is not False), no unknown keys,
    no infinities or NaNs; equal values are equal, wherever (file, line) they were written."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True, strict=True,
                              allow_inf_nan=False)

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.model_dump() == other.model_dump()


@dataclass(frozen=True)
class ActionSpec:
    """One policy action.

    Attributes:
        name: the action's key in a rule (``freeze_fraction``).
        params: its parameters, an :class:`StrictModel` subclass whose every field has a ``description`` (used in
            error messages and in :func:`seedrand.policy.reference_table`).
        apply: the pass, ``(gm, targets) -> None``: rewrites the GraphModule for one rule given the (module, rule)
            :class:`~seedrand.rewriter.match.Target` pairs it selected, in model order (:func:`per_module` makes one
            from a per-module pass).
        owns_weight: the action replaces the module's weight; two such actions on one module are a policy error.
        once_per_module: the action may not apply twice to one module (two gates would multiply).
        check: ``(model, targets) -> None``, run on a private copy of the model before tracing; raises
            ``PolicyError`` for what the pass would change silently. ``None``: nothing to check.
        captured: the pass on graphs Dynamo captured for the ``seedrand`` backend, ``(gm, target, parameters) ->
            None`` with ``parameters`` mapping parameter names to placeholder nodes; ``None``: the backend refuses
            the action for the reason ``not_captured``.
        not_captured: why the backend cannot apply it (required when ``captured`` is ``None``).

    Raises:
        ValueError: a parameter without a description, or ``captured`` and ``not_captured`` both or neither given.
    """

    name: str
    params: type[StrictModel]
    apply: Callable[..., None]
    owns_weight: bool = False
    once_per_module: bool = False
    check: Optional[Callable[..., None]] = None
    captured: Optional[Callable[..., None]] = None
    not_captured: str = ""

    def __post_init__(self):
        undocumented = [n for n, f in self.params.model_fields.items() if not f.description]
        if undocumented:
            raise ValueError(f"action {self.name}: parameters {', '.join(undocumented)} have no description")
        if (self.captured is None) == (not self.not_captured):
            raise ValueError(f"action {self.name}: give either captured (the backend's pass) or not_captured (why "
                             "the backend cannot apply it)")

    def conflicts_with(self, other: "ActionSpec") -> bool:
        """Whether this action and ``other`` cannot both apply to one module."""
        return (self.owns_weight and other.owns_weight) or (self is other and self.once_per_module)


ACTIONS: dict[str, ActionSpec] = {}


def register_action(spec: ActionSpec) -> ActionSpec:
    """Add ``spec`` to :data:`ACTIONS` (in registration order: the order of a rule's fields and of the reference
    table) and return it. The policy schema is built from the registry when ``seedrand.policy`` is imported, so an
    action is registered by its module of ``seedrand.passes`` at import. Raises nothing."""
    ACTIONS[spec.name] = spec
    return spec


def per_module(fn: Callable[[Any, Any], None]) -> Callable[[Any, list], None]:
    """The rule-level pass that applies the per-module pass ``fn(gm, target)`` to each target in order."""
    def apply(gm, targets: list) -> None:
        for target in targets:
            fn(gm, target)
    apply.__doc__ = fn.__doc__
    return apply
