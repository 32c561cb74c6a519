"""``seedrand.summary``: which modules a policy touched and where every parameter went, in the spirit of PEFT's
``print_trainable_parameters``: trainable, frozen but stored, and regenerated (stored as a seed: zero bytes)."""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.nn as nn
from rich.console import Console
from rich.table import Table

from .passes.regenerated import Regenerating
from .rewriter.graph import own_parameters
from .rewriter.rewrite import record_of

__all__ = ["summary", "Summary", "Counts"]


@dataclass
class Counts:
    """Element counts and bytes of the three kinds of tensors seedrand distinguishes."""

    trainable: int = 0
    trainable_bytes: int = 0
    frozen: int = 0
    frozen_bytes: int = 0
    regenerated: int = 0
    regenerated_bytes: int = 0  # what storing them would take; seedrand stores only seeds

    def add(self, kind: str, numel: int, nbytes: int) -> None:
        """Add ``numel`` elements and ``nbytes`` bytes to ``kind`` (``trainable``/``frozen``/``regenerated``)."""
        setattr(self, kind, getattr(self, kind) + numel)
        setattr(self, f"{kind}_bytes", getattr(self, f"{kind}_bytes") + nbytes)


@dataclass
class Row:
    """One affected module: its name, class, the rules and actions that selected it, and its own tensors."""

    module: str
    type: str
    rules: list[str]
    actions: list[str]
    counts: Counts


@dataclass
class Summary:
    """The result of :func:`summary`. Print it (rich table) or call :meth:`to_dict` (JSON-ready).

    Attributes:
        rows: one per module a rule selected, in the order the passes ran.
        total: over the whole model (parameters deduplicated; buffers are not counted, except the frozen weight
            slices seedrand modules keep, counted as frozen).
        unaccounted_trainable: trainable parameter elements owned by no selected module.
        strategy: how the model was traced, or ``None`` for a model seedrand did not rewrite.
        stored_parameters: parameter elements the model stores, trainable or not (buffers and regenerated tensors
            excluded): the denominator of PEFT's ``print_trainable_parameters``.
    """

    rows: list[Row] = field(default_factory=list)
    total: Counts = field(default_factory=Counts)
    unaccounted_trainable: int = 0
    strategy: str | None = None
    stored_parameters: int = 0

    @property
    def trainable_share(self) -> float:
        """Trainable elements over all elements the model computes with: stored (parameters and frozen buffers) and
        regenerated. seedrand's own figure: a random layer counts as the weights it stands for."""
        return self.total.trainable / max(1, self.total.trainable + self.total.frozen + self.total.regenerated)

    @property
    def peft_trainable_share(self) -> float:
        """Trainable elements over stored parameter elements, as PEFT's ``print_trainable_parameters`` divides (a
        regenerated weight, stored as a seed, is not in the denominator)."""
        return self.total.trainable / max(1, self.stored_parameters)

    def to_dict(self) -> dict:
        """Plain dict of ints, floats and strings (the two trainable shares included)."""
        return {**asdict(self), "trainable_share": self.trainable_share,
                "peft_trainable_share": self.peft_trainable_share}

    def __rich__(self) -> Table:
        table = Table(title="seedrand summary" + (f" (traced with {self.strategy})" if self.strategy else ""))
        for col in ("module", "type", "rule", "action", "trainable", "frozen (stored)", "regenerated"):
            numeric = col in ("trainable", "frozen (stored)", "regenerated")
            table.add_column(col, justify="right" if numeric else "left", overflow="fold", no_wrap=numeric)

        def cells(c: Counts) -> list[str]:
            return [f"{getattr(c, k):,} ({_human(getattr(c, k + '_bytes'))})" for k in ("trainable", "frozen",
                                                                                      "regenerated")]
        empty = 0
        for r in self.rows:
            if not (r.counts.trainable or r.counts.frozen or r.counts.regenerated):
                empty += 1  # activations, dropouts, containers: selected, but nothing to account for
                continue
            table.add_row(r.module or "(root)", r.type, ", ".join(r.rules), ", ".join(r.actions), *cells(r.counts))
        table.add_section()
        table.add_row("total", "", "", "", *cells(self.total))
        table.caption = (f"trainable: {self.trainable_share:.2%} of all weight elements, stored and regenerated "
                         f"(PEFT's figure, of the {self.stored_parameters:,} stored parameter elements: "
                         f"{self.peft_trainable_share:.2%}); trainable parameters no rule accounts for: "
                         f"{self.unaccounted_trainable:,}; selected modules that own no parameters: {empty}")
        return table

    def __str__(self) -> str:
        console = Console(file=io.StringIO(), width=160, color_system=None)
        console.print(self)
        return console.file.getvalue()


def _human(nbytes: float) -> str:
    if nbytes < 1024:
        return f"{nbytes:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        nbytes /= 1024
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.1f} {unit}"


def _regenerated(module: nn.Module) -> list[tuple[tuple, int, int]]:
    """(identity, numel, float32 bytes) of each tensor a seedrand module regenerates; the identity (Philox key,
    distribution, shape) is the same for the same tensor in ensemble members that share it."""
    if not isinstance(module, Regenerating):
        return []
    return [((s.seed, s.kind, s.scale, s.shape), math.prod(s.shape), 4 * math.prod(s.shape))
            for s in module.streams.values()]


def _stored_frozen_buffers(module: nn.Module) -> list[torch.Tensor]:
    """Persistent buffers of a seedrand module: frozen weight slices it keeps (``freeze_fraction`` with ``keep``)."""
    if not isinstance(module, Regenerating):
        return []
    return [b for n, b in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set]


def _count(params, counts: Counts, seen: set[int]) -> None:
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            counts.add("trainable" if p.requires_grad else "frozen", p.numel(), p.numel() * p.element_size())


def _account(module: nn.Module, counts: Counts, seen: set) -> None:
    """Add what seedrand ``module`` regenerates and the frozen slices it stores; its parameters are counted apart."""
    for identity, numel, nbytes in _regenerated(module):
        if identity not in seen:
            seen.add(identity)
            counts.add("regenerated", numel, nbytes)
    for b in _stored_frozen_buffers(module):
        if id(b) not in seen:
            seen.add(id(b))
            counts.add("frozen", b.numel(), b.numel() * b.element_size())


# where a pass installs the modules it adds for module NAME: as its children (weight/bias assemblers of
# freeze_fraction, grow and subspace; a per-layer subspace's coordinates), or beside it (insert_random, filter_gates)
_CHILDREN = ("weight", "bias", "subspace")
_SIBLINGS = {"insert_random": "{}_random", "filter_gates": "{}_gate"}


def _row_modules(model: nn.Module, qualname: str, actions: list[str]) -> tuple[Optional[nn.Module], list[nn.Module]]:
    """The module ``qualname`` (``None`` when the traced graph dropped it: exported graphs keep only modules that
    own tensors), and the seedrand modules the passes of ``actions`` installed for it."""
    module = _get(model, qualname)
    prefix = f"{qualname}." if qualname else ""
    names = [prefix + n for n in _CHILDREN] + [_SIBLINGS[a].format(qualname) for a in actions if a in _SIBLINGS]
    return module, [m for m in map(lambda n: _get(model, n), names) if m is not None and m is not module]


def _get(model: nn.Module, name: str):
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def summary(model: nn.Module) -> Summary:
    """Account for every parameter of ``model``: per module a policy selected, and in total.

    Args:
        model: a model returned by :func:`seedrand.rewrite`, kept or graph (rows per selected module), or any
            module (totals only).

    Returns:
        A :class:`Summary`; counts are elements, ``*_bytes`` are bytes. ``regenerated`` counts the weights seedrand
        modules regenerate (their Philox streams), each once however many modules share it (ensemble members);
        they occupy no memory. Raises nothing.
    """
    record = record_of(model)
    result = Summary(strategy=record.trace.strategy if record else None)
    owned: set[int] = set()
    if record:
        by_module: dict[str, Row] = {}
        for t in record.targets:
            row = by_module.setdefault(t.qualname, Row(t.qualname, t.cls.__name__, [], [], Counts()))
            row.rules.append(t.rule.name or t.rule.label)
            row.actions.append(t.rule.action)
        for row in by_module.values():
            module, installed = _row_modules(model, row.module, row.actions)
            params = [p for _, p in own_parameters(model, row.module)] + [p for m in installed for p in m.parameters()]
            _count(params, row.counts, set())
            seen: set = set()
            for m in [module, *(sub for m in installed for sub in m.modules())]:
                if m is not None:
                    _account(m, row.counts, seen)
            owned |= {id(p) for p in params}
        result.rows = list(by_module.values())
    _count(model.parameters(), result.total, set())
    result.stored_parameters = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    seen_buffers: set[int] = set()
    for m in model.modules():
        _account(m, result.total, seen_buffers)
    result.unaccounted_trainable = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()
                                       if p.requires_grad and id(p) not in owned)
    return result
