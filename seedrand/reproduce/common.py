"""What the demo and the reproductions share: small models built under a local seed, Adam training loops that leave
the caller's RNG alone, accuracy, and plots (matplotlib, the ``demo`` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._optional import pyplot
from ..passes.filter_gates import gate_parameters, penalty

__all__ = ["mlp", "fit", "accuracy", "figure"]


def mlp(*widths: int, seed: int = 0) -> nn.Sequential:
    """``Linear-ReLU-...-Linear`` over ``widths`` (float32), initialized under the local seed ``seed`` (the caller's
    RNG is untouched). Raises nothing."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers = [m for a, b in zip(widths, widths[1:]) for m in (nn.Linear(a, b), nn.ReLU())]
        return nn.Sequential(*layers[:-1])


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float = 1e-2,
        batch: Optional[int] = None, gated: bool = False, seed: int = 0,
        on_step: Optional[Callable[[int, float, torch.optim.Optimizer], None]] = None) -> nn.Module:
    """Adam on cross-entropy (plus ``seedrand.penalty`` and a weight-decay-free gate group when ``gated``),
    full-batch or on ``batch``-sized random batches drawn under the local seed ``seed``; ``on_step(step, loss,
    optimizer)`` after each step. Returns ``model`` in eval mode. ``x``: float32 ``(N, features)``; ``y``: int64
    ``(N,)``. Raises nothing of its own."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    gates = {id(p) for p in gate_parameters(model)} if gated else set()
    optimizer = torch.optim.Adam([{"params": [p for p in trainable if id(p) not in gates]},
                                  {"params": [p for p in trainable if id(p) in gates], "weight_decay": 0.0}], lr=lr)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.train()
        for step in range(steps):
            index = torch.randint(len(x), (batch,)) if batch else slice(None)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x[index]), y[index]) + (penalty(model) if gated else 0.0)
            loss.backward()
            optimizer.step()
            if on_step is not None:
                on_step(step, loss.item(), optimizer)
    return model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``, a float in [0, 1]. Raises nothing of its own."""
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


def figure(path: Path, panels: list[Callable], size: tuple[float, float] = (6, 4)) -> None:
    """Draw one axes per callable of ``panels`` side by side (each ``draw(ax)`` sets its own labels) and save the
    figure as ``path`` (PNG, 120 dpi).

    Raises:
        SeedrandError: matplotlib is not installed (names the ``demo`` extra).
    """
    plt = pyplot("the plots")
    fig, axes = plt.subplots(1, len(panels), figsize=(size[0] * len(panels), size[1]), squeeze=False)
    for draw, ax in zip(panels, axes[0]):
        draw(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
