"""Policy files: the YAML schema (pydantic v2), loading with line numbers, and writing back.

A policy is ``{version: 1, seed: int, rules: [...]}``; each rule has a ``match`` selector and exactly one action
(``freeze``, ``freeze_fraction``, ``random``, ``insert_random``, ``filter_gates``, ``subspace``, ``grow``). The README's
"Policy files" section is the reference for every key. Only ``yaml.safe_load``/``yaml.compose`` are used.
"""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .errors import PolicyError
from .kernels.init import parse_init

__all__ = [
    "Policy", "Rule", "Match", "Freeze", "FreezeFraction", "Random", "InsertRandom", "FilterGates", "Subspace",
    "Grow", "Plateau",
    "ACTIONS", "load_policy", "parse_policy",
]

def _check_init(value: str) -> str:
    parse_init(value)  # raises ValueError naming the allowed inits
    return value


Init = Annotated[str, AfterValidator(_check_init)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)

    def __eq__(self, other: object) -> bool:
        # equal values are equal policies, wherever (file, line) they were written
        return type(self) is type(other) and self.model_dump() == other.model_dump()


class Freeze(_Strict):
    """``freeze: {}``: every parameter of the matched module becomes non-trainable; values are kept (stored)."""


class FreezeFraction(_Strict):
    """``freeze_fraction``: freeze ``fraction`` of the weight's filters (``dim: out``) or inputs (``dim: in``)."""

    fraction: float = Field(ge=0.0, lt=1.0)
    dim: Literal["out", "in"] = "out"
    select: Literal["first", "last", "random"] = "first"
    fixed: Literal["random", "zero", "keep"] = "random"
    init: Optional[Init] = None  # None: the layer's own default init (seedrand.passes.layout)


class Random(_Strict):
    """``random``: the weight becomes non-trainable and regenerated from its Philox key on every use."""

    init: Optional[Init] = None  # None: the layer's own default init (seedrand.passes.layout)
    bias: Literal["zero", "random", "keep", "trainable"] = "keep"


class InsertRandom(_Strict):
    """``insert_random``: ``count`` new random layers after the matched module (paper 000)."""

    width: Optional[int] = Field(default=None, ge=1)
    count: int = Field(default=1, ge=1)
    activation: Literal["relu", "gelu", "tanh", "sigmoid", "identity"] = "relu"
    residual: bool = False
    scale: Literal["none", "scalar", "per_channel"] = "none"
    init: Init = "kaiming_uniform"

    @model_validator(mode="after")
    def _scale_needs_residual(self):
        if self.scale != "none" and not self.residual:
            raise ValueError(f"scale: {self.scale} scales the residual branch x + s * f(W x); it needs residual: true")
        return self


class FilterGates(_Strict):
    """``filter_gates``: a per-channel gate ``y = x * max(0, theta)`` after the module, L1 weight ``lambda``."""

    lambda_: float = Field(default=0.0, ge=0.0, alias="lambda")
    init: Literal["ones", "uniform"] = "ones"
    placement: Literal["auto", "output"] = "auto"


class Subspace(_Strict):
    """``subspace``: weights become ``theta0 + P @ theta_d`` with a regenerated random projection ``P``."""

    dim: int = Field(ge=1)
    projection: Literal["gaussian", "orthogonal", "sparse", "very_sparse", "fastfood"] = "gaussian"
    scope: Literal["per_layer", "global"] = "per_layer"
    theta0: Literal["keep", "random"] = "keep"
    density: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    normalize: bool = False

    @model_validator(mode="after")
    def _density_only_for_very_sparse(self):
        if self.density is not None and self.projection != "very_sparse":
            raise ValueError(f"density applies to projection: very_sparse only, not {self.projection}")
        if self.normalize and self.projection in ("orthogonal", "fastfood"):
            raise ValueError(f"normalize applies to gaussian, sparse and very_sparse projections; {self.projection} "
                             "columns already have unit norm")
        return self


class Plateau(_Strict):
    """When a loss has plateaued: its moving average over ``window`` steps has not fallen by more than ``min_delta``
    below its best (lowest) value of the stage for ``window`` steps."""

    window: int = Field(default=10, ge=1)
    min_delta: float = Field(default=0.0, ge=0.0)


class Grow(_Strict):
    """``grow``: the layer's output units (``dim: out``) or inputs (``dim: in``) split into ``stages`` equal slices,
    ``start`` of them active at first; :class:`seedrand.CapacityScheduler` activates the next one on a plateau of the
    loss (paper 001, section 5.1), freezing the slices trained so far when ``freeze_previous``."""

    stages: int = Field(default=5, ge=2)
    start: int = Field(default=1, ge=1)
    freeze_previous: bool = True
    dim: Literal["out", "in"] = "out"
    plateau: Plateau = Field(default_factory=Plateau)
    init: Optional[Init] = None  # None: the layer's own default init (seedrand.passes.layout)

    @model_validator(mode="after")
    def _start_within_stages(self):
        if self.start >= self.stages:
            raise ValueError(f"start: {self.start} must be below stages: {self.stages} (start is how many of the "
                             "stages are active before the first plateau; with all of them active nothing can grow)")
        return self


ACTIONS: dict[str, type[BaseModel]] = {
    "freeze": Freeze,
    "freeze_fraction": FreezeFraction,
    "random": Random,
    "insert_random": InsertRandom,
    "filter_gates": FilterGates,
    "subspace": Subspace,
    "grow": Grow,
}


class Match(_Strict):
    """Which modules a rule selects.

    ``modules``: exact qualified names, or ``re:PATTERN`` (full match). ``types``: class names matched along each
    module's class hierarchy (``Conv2d``, ``GPT2Attention``) or dotted paths (``transformers.pytorch_utils.Conv1D``).
    A module is selected when it matches ``modules`` (if given) and ``types`` (if given), and neither ``exclude``
    (names) nor ``exclude_types``.
    """

    modules: list[str] = Field(default_factory=list)
    types: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)
    exclude_types: list[str] = Field(default_factory=list)

    @field_validator("modules", "exclude")
    @classmethod
    def _valid_patterns(cls, patterns: list[str]) -> list[str]:
        for p in patterns:
            if p.startswith("re:"):
                try:
                    re.compile(p[3:])
                except re.error as e:
                    raise ValueError(f"invalid regular expression {p!r}: {e}") from None
        return patterns

    @model_validator(mode="after")
    def _selects_something(self):
        if not self.modules and not self.types:
            raise ValueError("match needs `modules` or `types` (use modules: ['re:.*'] to select every module)")
        return self


class Rule(_Strict):
    """One rule: a ``match`` selector, exactly one action, and options.

    ``optional: true`` lets the rule (and each of its patterns) match nothing without an error.
    """

    name: Optional[str] = None
    match: Match
    optional: bool = False
    freeze: Optional[Freeze] = None
    freeze_fraction: Optional[FreezeFraction] = None
    random: Optional[Random] = None
    insert_random: Optional[InsertRandom] = None
    filter_gates: Optional[FilterGates] = None
    subspace: Optional[Subspace] = None
    grow: Optional[Grow] = None
    _index: int = PrivateAttr(default=-1)
    _line: Optional[int] = PrivateAttr(default=None)
    _column: Optional[int] = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _exactly_one_action(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        # `freeze:` with no value (null) names the action with default parameters, unless another action has
        # a value (as in model_dump() output, where the unused actions are None)
        named = [a for a in ACTIONS if data.get(a) is not None] or [a for a in ACTIONS if a in data]
        if not named:
            raise ValueError(f"a rule needs exactly one action, one of: {', '.join(ACTIONS)}")
        if len(named) > 1:
            raise ValueError(f"a rule names exactly one action, this one names {len(named)}: {', '.join(named)}")
        return {**{k: v for k, v in data.items() if k not in ACTIONS}, named[0]: data[named[0]] or {}}

    @property
    def action(self) -> str:
        """The action's key, e.g. ``"freeze_fraction"``."""
        return next(a for a in ACTIONS if getattr(self, a) is not None)

    @property
    def params(self) -> BaseModel:
        """The action's validated parameters."""
        return getattr(self, self.action)

    @property
    def label(self) -> str:
        """How errors and reports name the rule: ``'name' (rules[i])`` or ``rules[i]``."""
        where = f"rules[{self._index}]"
        return f"{self.name!r} ({where})" if self.name else where


class Policy(_Strict):
    """A validated policy: ``version``, global ``seed`` and an ordered list of ``rules``.

    Build one with :func:`load_policy` (from YAML, with line numbers in errors) or ``Policy.model_validate(dict)``;
    write it back with :meth:`to_yaml`. Raises :class:`~seedrand.errors.PolicyError` (``load_policy``) or
    ``pydantic.ValidationError`` (``model_validate``) on malformed input.
    """

    version: Literal[1] = 1
    seed: int = Field(default=0, ge=-(2**63), lt=2**63)
    rules: list[Rule] = Field(default_factory=list)
    _path: Optional[str] = PrivateAttr(default=None)

    def model_post_init(self, _context: Any) -> None:
        for i, rule in enumerate(self.rules):
            rule._index = i

    @property
    def path(self) -> Optional[str]:
        """The YAML file this policy was loaded from, or ``None``."""
        return self._path

    def error(self, message: str, rule: Optional[Rule] = None) -> PolicyError:
        """A :class:`PolicyError` located at ``rule``'s YAML line (when loaded from a file)."""
        return PolicyError(
            message, path=self._path, line=rule._line if rule else None, column=rule._column if rule else None,
            rule=rule.label if rule else None,
        )

    def to_yaml(self) -> str:
        """The policy as YAML text that :func:`load_policy` reads back to an equal policy."""
        data = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        return yaml.safe_dump(data, sort_keys=False)


def _node_at(node: yaml.Node, loc: tuple, at_key: bool = False) -> yaml.Node:
    """The deepest YAML node along a pydantic error location (the last key itself when ``at_key``)."""
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == key]
            if not match:
                break
            k, v = match[0]
            node = k if at_key and key == loc[-1] else v
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            break
    return node


def _allowed_keys(loc: tuple) -> list[str]:
    """Field names (aliases) of the pydantic model that holds the key at ``loc`` (for did-you-mean)."""
    model: Any = Policy
    for key in loc[:-1]:
        if isinstance(key, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or key not in model.model_fields:
            return []
        model = _model_in(model.model_fields[key].annotation)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return []
    return [f.alias or n for n, f in model.model_fields.items()]


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _error_message(err: dict, loc: tuple) -> str:
    if err["type"] == "extra_forbidden":
        key = str(loc[-1])
        allowed = _allowed_keys(loc)
        close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown key {key!r}{hint} (allowed here: {', '.join(allowed)})"
    msg = err["msg"].removeprefix("Value error, ")
    field = ".".join(map(str, loc[2:] if loc[:1] == ("rules",) else loc))
    return f"{field}: {msg}" if field else msg


def _from_validation_error(e: ValidationError, root: yaml.Node, path: str, data: Any) -> PolicyError:
    err = e.errors()[0]
    loc = err["loc"]
    node = _node_at(root, loc, at_key=err["type"] == "extra_forbidden")
    rule = None
    if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
        raw = data["rules"][loc[1]] if isinstance(data.get("rules"), list) else {}
        name = raw.get("name") if isinstance(raw, dict) else None
        rule = f"{name!r} (rules[{loc[1]}])" if name else f"rules[{loc[1]}]"
    more = f" (and {len(e.errors()) - 1} more error(s))" if len(e.errors()) > 1 else ""
    mark = node.start_mark
    return PolicyError(_error_message(err, loc) + more, path=path, line=mark.line + 1, column=mark.column + 1,
                       rule=rule)


def load_policy(path: str | Path) -> Policy:
    """Read and validate a YAML policy file (``yaml.safe_load`` only).

    Args:
        path: the ``.yaml`` file.

    Returns:
        A :class:`Policy` whose rules remember their YAML line, so later errors (a rule matching no module,
        incompatible actions) point at it.

    Raises:
        PolicyError: unreadable file, YAML syntax error, or a schema violation; the message names the file, the
            line and column, the rule and, for an unknown key, the closest allowed key.
    """
    path = str(path)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise PolicyError(f"cannot read policy file: {e.strerror}", path=path) from None
    return parse_policy(text, path)


def parse_policy(text: str, path: str = "<policy>") -> Policy:
    """Validate YAML policy ``text`` as :func:`load_policy` does; ``path`` names its source in errors.

    Raises:
        PolicyError: YAML syntax error or schema violation (names ``path``, the line and column, and the rule).
    """
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise PolicyError(f"invalid YAML: {getattr(e, 'problem', e)}", path=path,
                          line=mark.line + 1 if mark else None, column=mark.column + 1 if mark else None) from None
    if data is None:
        data, root = {}, yaml.MappingNode("tag:yaml.org,2002:map", [])
    if not isinstance(data, dict):
        raise PolicyError("a policy is a mapping with keys version, seed, rules", path=path, line=1, column=1)
    try:
        policy = Policy.model_validate(data)
    except ValidationError as e:
        raise _from_validation_error(e, root, path, data) from None
    policy._path = path
    rules_node = _node_at(root, ("rules",))
    for rule, node in zip(policy.rules, getattr(rules_node, "value", [])):
        rule._line, rule._column = node.start_mark.line + 1, node.start_mark.column + 1
    return policy
