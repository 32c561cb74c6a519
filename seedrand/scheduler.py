"""``seedrand.CapacityScheduler``: grows the layers of ``grow`` rules when the training loss plateaus (the dynamic
network capacity thesis, section 5.1: track the moving average of the error; when it stops improving, add the next slice
of capacity and freeze the capacity trained so far).

Plateau, per rule (its ``plateau: {window, min_delta}``): after each step the moving average of the last ``window``
losses is compared with its lowest value since the stage began; when it has not fallen below that best by more than
``min_delta`` for ``window`` steps in a row, every layer of the rule activates its next slice. A constant loss thus
grows after ``2 * window`` steps of a stage (``window`` to fill the average, ``window`` without improvement); a loss
that keeps falling never does.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from typing import Optional

import torch
import torch.nn as nn

from .passes.grow import GrowingSlices

__all__ = ["CapacityScheduler", "Transition"]


@dataclass
class Transition:
    """One growth: at scheduler step ``step`` (1-based), rule ``group`` went to ``stage`` active slices."""

    step: int
    group: str
    stage: int


@dataclass
class _Plateau:
    window: int
    min_delta: float
    losses: deque = field(default_factory=deque)
    best: float = float("inf")
    since_best: int = 0

    def update(self, loss: float) -> bool:
        """Add one loss; ``True`` when the moving average has plateaued."""
        self.losses.append(loss)
        if len(self.losses) > self.window:
            self.losses.popleft()
        if len(self.losses) < self.window:
            return False
        average = sum(self.losses) / self.window
        if average < self.best - self.min_delta:
            self.best, self.since_best = average, 0
        else:
            self.since_best += 1
        return self.since_best >= self.window

    def reset(self) -> None:
        self.losses.clear()
        self.best, self.since_best = float("inf"), 0


class CapacityScheduler:
    """Grows the :class:`~seedrand.passes.grow.GrowingSlices` of ``model`` on loss plateaus, rule by rule, and keeps
    ``optimizer`` consistent: slices that stop training lose their gradient and optimizer state; a newly active slice
    starts with none (it never had a gradient); the state of slices that keep training is untouched, so the same
    optimizer goes on without being rebuilt.

    Args:
        model: a model rewritten with ``grow`` rules (``seedrand.rewrite``).
        optimizer: a ``torch.optim.Optimizer`` over the model's parameters, inactive slices included (they cost no
            state until active: optimizers skip parameters without a gradient).

    Attributes:
        transitions: every :class:`Transition` so far.
        step_count: how many times :meth:`step` was called.

    Raises:
        ValueError: the model has no ``grow`` layers, or the optimizer lacks one of their slices (names it).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.groups: dict[str, list[GrowingSlices]] = {}
        for module in model.modules():
            if isinstance(module, GrowingSlices):
                self.groups.setdefault(module.group, []).append(module)
        if not self.groups:
            raise ValueError("the model has no grow layers (rewrite it with a policy that has a grow rule)")
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        for name, module in model.named_modules():
            missing = [k for k, p in enumerate(module.slices) if id(p) not in held] if isinstance(
                module, GrowingSlices) else []
            if missing:
                raise ValueError(f"the optimizer does not hold slice(s) {missing} of {name}; build it over "
                                 "model.parameters() (inactive slices included: they get no state until active)")
        self.plateaus = {g: _Plateau(m[0].window, m[0].min_delta) for g, m in self.groups.items()}
        self.transitions: list[Transition] = []
        self.step_count = 0

    def stage(self, group: str) -> int:
        """How many slices of rule ``group`` (its label) are active."""
        return int(self.groups[group][0].active)

    def step(self, loss: torch.Tensor | float) -> list[str]:
        """Record one training loss (a float or a 0-d tensor; call after ``optimizer.step()``) and grow every rule
        whose loss has plateaued (see the module docstring).

        Returns:
            The labels of the rules that grew at this step (usually none).
        """
        self.step_count += 1
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        grown = []
        for group, modules in self.groups.items():
            if self.stage(group) < modules[0].stages and self.plateaus[group].update(value):
                self._grow(group)
                grown.append(group)
        return grown

    def grow(self, group: Optional[str] = None) -> list[str]:
        """Grow now, whatever the loss: rule ``group`` (its label), or every rule that can still grow. The optimizer
        is kept consistent as in :meth:`step`, and the plateau tracker of each grown rule starts anew.

        Returns:
            The labels of the rules that grew.

        Raises:
            ValueError: ``group`` is not a rule of this model, or all its stages are active already.
        """
        if group is not None and group not in self.groups:
            raise ValueError(f"no grow rule {group!r}; the rules are {', '.join(map(repr, self.groups))}")
        groups = [group] if group is not None else [g for g, m in self.groups.items() if self.stage(g) < m[0].stages]
        for g in groups:
            if self.stage(g) == self.groups[g][0].stages:
                raise ValueError(f"rule {g!r} has all its {self.stage(g)} stages active; it cannot grow")
            self._grow(g)
        return groups

    def _grow(self, group: str) -> None:
        for module in self.groups[group]:
            for p in module.grow():
                self.optimizer.state.pop(p, None)
        self.plateaus[group].reset()
        self.transitions.append(Transition(self.step_count, group, self.stage(group)))

    def state_dict(self) -> dict:
        """The plateau trackers, step count and transitions (the stages themselves are in the model's state
        dict)."""
        return {"step_count": self.step_count,
                "transitions": [vars(t).copy() for t in self.transitions],
                "plateaus": {g: {"losses": list(p.losses), "best": p.best, "since_best": p.since_best}
                             for g, p in self.plateaus.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned. Raises ``KeyError`` for a rule this model does not have."""
        self.step_count = state["step_count"]
        self.transitions = [Transition(**t) for t in state["transitions"]]
        for group, saved in state["plateaus"].items():
            plateau = self.plateaus[group]
            plateau.losses = deque(saved["losses"])
            plateau.best, plateau.since_best = saved["best"], saved["since_best"]
