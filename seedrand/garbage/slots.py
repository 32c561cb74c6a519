"""Slots and dependency groups: the union-find under the channel dependency graph (Leclerc et al.'s ShrinkNets'
removal events; Torch-Pruning's dependency groups). A slot is one channel of one tensor; slots joined are one
dependency group, which goes as a whole or not at all. Each slot carries whether it is provably zero; a slot is
*pinned* (with the reason) when a barrier reads it, and a *sink* when a layer reads it (its removal exact or not)."""

from __future__ import annotations

import torch

__all__ = ["Slots"]


class Slots:
    """Union-find over slots with zero flags, pins and sinks; :class:`~seedrand.garbage.graph.ChannelGraph` builds
    on it. Slot ids are ints; a tensor's slots are an int64 tensor ``(channels,)``."""

    def __init__(self):
        self._parent: list[int] = []
        self._zero: list[bool] = []
        self._pinned: dict[int, str] = {}  # slot -> why it cannot be removed
        self._read: dict[int, str] = {}  # sink slot -> "" if its removal is exact, else the reading layer

    def _new(self, zero: torch.Tensor) -> torch.Tensor:
        start = len(self._parent)
        self._parent.extend(range(start, start + len(zero)))
        self._zero.extend(bool(z) for z in zero)
        return torch.arange(start, start + len(zero))

    def root(self, slot: int) -> int:
        """The dependency group (its representative slot) of ``slot``."""
        parent = self._parent
        while parent[slot] != slot:
            parent[slot] = parent[parent[slot]]
            slot = parent[slot]
        return slot

    def _join(self, a: torch.Tensor, b: torch.Tensor) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = self.root(x), self.root(y)
            if rx != ry:
                self._parent[ry] = rx

    def zero(self, ids: torch.Tensor) -> torch.Tensor:
        """Whether each slot is provably zero: bool, like ``ids``."""
        return torch.tensor([self._zero[i] for i in ids.tolist()], dtype=torch.bool)

    def _pin(self, ids: torch.Tensor, why: str) -> None:
        for i in ids.tolist():
            self._pinned.setdefault(i, why)

    def _sink(self, ids: torch.Tensor, exact: torch.Tensor, reader: str) -> None:
        for slot, ok in zip(ids.tolist(), exact.tolist()):
            if not ok:
                self._read[slot] = f"{reader} reads them while they are non-zero"
            else:
                self._read.setdefault(slot, "")
