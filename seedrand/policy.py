"""Policy files: the YAML schema (pydantic v2), loading with line numbers, and writing back.

A policy is ``{version: 1, seed: int, rules: [...]}``; each rule has a ``match`` selector and exactly one action,
one of those registered in :data:`seedrand.actions.ACTIONS` by their modules of ``seedrand.passes`` (``freeze``,
``freeze_fraction``, ``random``, ``insert_random``, ``filter_gates``, ``subspace``, ``grow``), whose parameters are the
action's own pydantic model. ``docs/policies.md`` is the reference for every key (its table of parameters is
:func:`reference_table`). Only ``yaml.safe_load``/``yaml.compose`` are used.
"""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import BaseModel, Field, PrivateAttr, ValidationError, create_model, field_validator, model_validator
from pydantic_core import PydanticUndefined

from . import passes  # noqa: F401 - registers the built-in actions, from which Rule's fields are made
from .actions import ACTIONS, StrictModel, check_init
from .errors import PolicyError, shown

__all__ = ["Policy", "Rule", "Match", "ACTIONS", "MAX_POLICY_BYTES", "MAX_DEPTH", "MAX_NODES", "load_policy",
           "parse_policy", "reference_table"]

class Match(StrictModel):
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
                    raise ValueError(f"invalid regular expression {shown(p)}: {e}") from None
        return patterns

    @model_validator(mode="after")
    def _selects_something(self):
        if not self.modules and not self.types:
            raise ValueError("match needs `modules` or `types` (use modules: ['re:.*'] to select every module)")
        return self


class _RuleBase(StrictModel):
    """One rule: a ``match`` selector, exactly one action (a field per registered action, ``seedrand.actions``),
    and options.

    ``optional: true`` lets the rule (and each of its patterns) match nothing without an error.
    """

    name: Optional[str] = None
    match: Match
    optional: bool = False
    _index: int = PrivateAttr(default=-1)
    _line: Optional[int] = PrivateAttr(default=None)
    _column: Optional[int] = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _exactly_one_action(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        # an action's value is its parameters, a mapping: `freeze: {}`; `freeze: false` or `freeze:` (null) is not
        # a switch. Unused actions set to None (model_dump() output) are left out.
        named = [a for a in ACTIONS if data.get(a) is not None]
        for action in named:
            if not isinstance(data[action], dict):
                raise ValueError(f"{action}: the value of an action is a mapping of its parameters (write "
                                 f"`{action}: {{}}` for the defaults), not {shown(data[action])}; leave the key out "
                                 "to leave the action out")
        if not named:
            if any(k not in cls.model_fields for k in data):
                return data  # the unknown key is reported where it stands, with a did-you-mean
            empty = [a for a in ACTIONS if a in data]
            if empty:
                raise ValueError(f"{empty[0]}: the value of an action is a mapping of its parameters; write "
                                 f"`{empty[0]}: {{}}` for the defaults")
            raise ValueError(f"a rule needs exactly one action, one of: {', '.join(ACTIONS)}")
        if len(named) > 1:
            raise ValueError(f"a rule names exactly one action, this one names {len(named)}: {', '.join(named)}")
        return {k: v for k, v in data.items() if k not in ACTIONS or k == named[0]}

    @property
    def action(self) -> str:
        """The action's key, e.g. ``"freeze_fraction"``."""
        return next(a for a in ACTIONS if getattr(self, a) is not None)

    @property
    def params(self) -> StrictModel:
        """The action's validated parameters."""
        return getattr(self, self.action)

    @property
    def label(self) -> str:
        """How errors and reports name the rule: ``'name' (rules[i])`` or ``rules[i]``."""
        where = f"rules[{self._index}]"
        return f"{self.name!r} ({where})" if self.name else where


Rule = create_model("Rule", __base__=_RuleBase, __module__=__name__,
                    **{name: (Optional[spec.params], None) for name, spec in ACTIONS.items()})
Rule.__doc__ = _RuleBase.__doc__


class Policy(StrictModel):
    """A validated policy: ``version``, global ``seed`` and an ordered list of ``rules``.

    Build one with :func:`load_policy` (from YAML, with line numbers in errors) or :meth:`from_dict`; write it back
    with :meth:`to_yaml`. Both raise :class:`~seedrand.errors.PolicyError` on malformed input (pydantic's own
    ``model_validate`` raises ``pydantic.ValidationError``).
    """

    version: Literal[1]
    seed: int = Field(default=0, ge=-(2**63), lt=2**63)
    rules: list[Rule] = Field(default_factory=list)
    _path: Optional[str] = PrivateAttr(default=None)

    @field_validator("version", mode="before")
    @classmethod
    def _integer_version(cls, value: Any) -> Any:
        if type(value) is not int:  # Literal[1] alone accepts True and 1.0
            raise ValueError(f"version must be the integer 1, not {shown(value)}")
        return value

    def model_post_init(self, _context: Any) -> None:
        for i, rule in enumerate(self.rules):
            rule._index = i

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> "Policy":
        """Validate a policy given as Python data (the dict a YAML file would load to).

        Args:
            data: ``{"version": 1, "seed": ..., "rules": [...]}``.
            source: how errors name where the policy came from.

        Raises:
            PolicyError: the same messages as for a file (``source`` and the rule, without line numbers).
        """
        if not isinstance(data, dict):
            raise PolicyError(f"a policy is a mapping with keys version, seed, rules, not {type(data).__name__}",
                              path=source)
        try:
            policy = cls.model_validate(data)
        except ValidationError as e:
            raise _from_validation_error(e, None, source, data) from None
        policy._path = source
        return policy

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
        if len(loc) == 3 and loc[0] == "rules":  # a rule's key: an action, perhaps misspelled
            allowed = [*allowed[:3], *ACTIONS, *allowed[3:]]
            allowed = list(dict.fromkeys(allowed))
        close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown key {shown(key)}{hint} (allowed here: {', '.join(allowed)})"
    msg = err["msg"].removeprefix("Value error, ")
    inside_rule = len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int)
    field = ".".join(map(str, loc[2:] if inside_rule else loc))
    described = _parameter(loc) if inside_rule else None
    if described is not None and described.description:
        msg = f"{msg} ({loc[3]}: {described.description})"
    return f"{field}: {msg}" if field else msg


def _parameter(loc: tuple):
    """The pydantic field of the action parameter at ``loc`` (``("rules", i, action, name, ...)``), else ``None``."""
    if len(loc) < 4 or loc[2] not in ACTIONS:
        return None
    return {f.alias or n: f for n, f in ACTIONS[loc[2]].params.model_fields.items()}.get(loc[3])


def _from_validation_error(e: ValidationError, root: Optional[yaml.Node], path: str, data: Any) -> PolicyError:
    """The first of pydantic's errors as a :class:`PolicyError` at its YAML node (``root`` is ``None`` for dicts)."""
    # an unknown key first: a misspelled key also makes the field it was meant for missing
    err = sorted(e.errors(), key=lambda x: x["type"] != "extra_forbidden")[0]
    loc = err["loc"]
    rule = None
    if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
        raw = data["rules"][loc[1]] if isinstance(data.get("rules"), list) else {}
        name = raw.get("name") if isinstance(raw, dict) else None
        rule = f"{shown(name)} (rules[{loc[1]}])" if isinstance(name, str) else f"rules[{loc[1]}]"
    more = f" (and {len(e.errors()) - 1} more error(s))" if len(e.errors()) > 1 else ""
    line = column = None
    if root is not None:
        mark = _node_at(root, loc, at_key=err["type"] == "extra_forbidden").start_mark
        line, column = mark.line + 1, mark.column + 1
    return PolicyError(_error_message(err, loc) + more, path=path, line=line, column=column, rule=rule)


MAX_POLICY_BYTES = 1 << 20  # a policy is a few hundred bytes; 1 MiB bounds the time and memory of reading one
MAX_DEPTH = 32  # nesting levels of YAML collections (a policy needs 5)
MAX_NODES = 100_000  # YAML nodes once aliases are expanded ("billion laughs" files have 10**9)


class _Limit(yaml.YAMLError):
    def __init__(self, problem: str, mark: Optional[yaml.Mark], rule: Optional[str] = None):
        super().__init__(problem)
        self.problem, self.problem_mark, self.rule = problem, mark, rule


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that stops composing past :data:`MAX_DEPTH` nesting levels (PyYAML's composer recurses
    per level, and would otherwise end in a ``RecursionError``)."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Limit(f"nested deeper than {MAX_DEPTH} levels", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _check_tree(root: yaml.Node) -> None:
    """Refuse duplicate keys, recursive aliases, and more than :data:`MAX_NODES` nodes with aliases expanded.

    Each distinct node is visited once (aliases share nodes), so this is linear in the file."""
    size: dict[int, int] = {}
    busy: set[int] = set()

    def visit(node: yaml.Node, rule: Optional[str]) -> int:
        if id(node) in size:
            return size[id(node)]
        if id(node) in busy:
            raise _Limit("an alias refers to a node that contains it (recursive alias)", node.start_mark, rule)
        busy.add(id(node))
        total = 1
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, yaml.Node] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    if key.value in seen:
                        line = seen[key.value].start_mark.line + 1
                        raise _Limit(f"duplicate key {shown(key.value)} (first at line {line}); a key may appear "
                                     "once per mapping", key.start_mark, rule)
                    seen[key.value] = key
                inner = rule
                if node is root and key.value == "rules" and isinstance(value, yaml.SequenceNode):
                    inner = "rules"
                total += visit(key, rule) + visit(value, inner)
        elif isinstance(node, yaml.SequenceNode):
            labels = [f"rules[{i}]" if rule == "rules" else rule for i in range(len(node.value))]
            total += sum(visit(item, label) for item, label in zip(node.value, labels))
        if total > MAX_NODES:
            raise _Limit(f"more than {MAX_NODES:,} YAML nodes once aliases are expanded", node.start_mark, rule)
        busy.discard(id(node))
        size[id(node)] = total
        return total

    visit(root, None)


def _compose(text: str, path: str) -> tuple[yaml.Node, Any]:
    """The YAML node tree (for error locations) and the data of ``text``, within the limits above."""
    if len(text) > MAX_POLICY_BYTES:
        raise PolicyError(f"{len(text):,} characters; a policy has at most {MAX_POLICY_BYTES:,}", path=path)
    loader = _BoundedLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            raise PolicyError("empty policy: a policy is a mapping with `version: 1` and `rules:` (a list of rules, "
                              "each a `match` and one action)", path=path, line=1, column=1)
        _check_tree(root)
        return root, loader.construct_document(root)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        rule = getattr(e, "rule", None)
        problem = e.problem if isinstance(e, _Limit) else f"invalid YAML: {getattr(e, 'problem', None) or e}"
        raise PolicyError(problem, path=path,
                          line=mark.line + 1 if mark else None, column=mark.column + 1 if mark else None,
                          rule=rule if rule != "rules" else None) from None
    finally:
        loader.dispose()


def load_policy(path: str | Path) -> Policy:
    """Read and validate a YAML policy file (PyYAML's safe loader only: no tags that build objects).

    Args:
        path: the ``.yaml`` file, UTF-8, at most :data:`MAX_POLICY_BYTES` bytes.

    Returns:
        A :class:`Policy` whose rules remember their YAML line, so later errors (a rule matching no module,
        incompatible actions) point at it.

    Raises:
        PolicyError: unreadable, too large or not UTF-8; a YAML syntax error, a duplicate key, nesting deeper than
            :data:`MAX_DEPTH` or more than :data:`MAX_NODES` nodes with aliases expanded; or a schema violation. The
            message names the file, the line and column, the rule and, for an unknown key, the closest allowed key.
    """
    path = str(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_POLICY_BYTES + 1)
    except OSError as e:
        raise PolicyError(f"cannot read policy file: {e.strerror}", path=path) from None
    if len(raw) > MAX_POLICY_BYTES:
        raise PolicyError(f"larger than {MAX_POLICY_BYTES:,} bytes; a policy file is a few hundred", path=path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise PolicyError(f"not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})", path=path, line=line,
                          column=column) from None
    return parse_policy(text, path)


def parse_policy(text: str, path: str = "<policy>") -> Policy:
    """Validate YAML policy ``text`` as :func:`load_policy` does; ``path`` names its source in errors.

    Raises:
        PolicyError: as :func:`load_policy` (names ``path``, the line and column, and the rule).
    """
    root, data = _compose(text, path)
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


def _values(annotation: Any, field) -> str:
    """A parameter's allowed values as the reference table shows them."""
    if any(getattr(m, "func", None) is check_init for m in field.metadata):
        return "init"
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if typing.get_origin(annotation) is typing.Annotated:
        return "init" if any(getattr(m, "func", None) is check_init for m in args[1:]) else _values(args[0], field)
    if args and type(None) in args:
        return _values(next(a for a in args if a is not type(None)), field)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    """A parameter's default as YAML writes it (``required`` when it has none)."""
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.get_default(call_default_factory=True)
    value = value.model_dump() if isinstance(value, BaseModel) else value
    return "none" if value is None else f"`{yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}`"


def reference_table() -> str:
    """The Markdown table of every registered action's parameters (action, parameter, values, default,
    description), generated from the registry; ``docs/policies.md`` shows it. Raises nothing."""
    rows = ["| action | parameter | values | default | description |", "| --- | --- | --- | --- | --- |"]
    for spec in ACTIONS.values():
        fields = spec.params.model_fields
        if not fields:
            summary = (spec.params.__doc__ or "").strip().splitlines()[0].replace("``", "`")
            rows.append(f"| `{spec.name}` | | | | {summary} |")
        for name, field in fields.items():
            rows.append(f"| `{spec.name}` | `{field.alias or name}` | {_values(field.annotation, field)} | "
                        f"{_default(field)} | {field.description} |")
    return "\n".join(rows)
