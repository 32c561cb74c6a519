"""``seedrand.intrinsic_dimension``: the subspace-dimension sweep of Li et al. 2018 ("Measuring the intrinsic
dimension of objective landscapes"): train the model directly for a baseline, then with every matched parameter in a
random ``d``-dimensional subspace (the ``subspace`` action, ``scope: global``) for each ``d``, and report the smallest
``d`` whose score reaches ``threshold`` times the baseline (``d90`` for the default 0.9).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch.nn as nn
from tqdm import tqdm

from ._optional import pyplot
from .rewriter.rewrite import rewrite

__all__ = ["intrinsic_dimension", "IntrinsicDimension", "Task"]


@dataclass
class Task:
    """What a sweep trains and scores.

    Attributes:
        model_factory: ``() -> nn.Module``, a fresh model with the same initial weights on every call.
        train_fn: ``(model) -> None``, trains the model's ``requires_grad`` parameters in place.
        eval_fn: ``(model) -> float``, a score where higher is better (e.g. accuracy in [0, 1]).
        example_inputs: inputs to trace with (needed for models ``torch.fx`` cannot trace symbolically).
        match: the ``match`` selector of the subspace rule (default: every ``nn.Linear``).
    """

    model_factory: Callable[[], nn.Module]
    train_fn: Callable[[nn.Module], None]
    eval_fn: Callable[[nn.Module], float]
    example_inputs: Optional[tuple] = None
    match: dict = field(default_factory=lambda: {"types": ["Linear"]})


@dataclass
class IntrinsicDimension:
    """The result of a sweep.

    Attributes:
        baseline: the directly trained model's score.
        dims, scores: the subspace dimensions tried, ascending, and their scores.
        threshold: the fraction of the baseline that counts as solved.
        d_threshold: the smallest ``d`` whose score reaches ``threshold * baseline`` (``None`` if none did).
        csv_path, plot_path: where the table (columns ``d, score, fraction_of_baseline``) and the plot were written.
    """

    baseline: float
    dims: list[int]
    scores: list[float]
    threshold: float
    d_threshold: Optional[int]
    csv_path: Optional[Path] = None
    plot_path: Optional[Path] = None


def intrinsic_dimension(task: Task, dims: Sequence[int], threshold: float = 0.9, projection: str = "fastfood",
                        seed: int = 0, out_dir: Optional[str | Path] = None) -> IntrinsicDimension:
    """Run the sweep (see the module docstring), with a progress bar.

    Args:
        task: the model, training and scoring (:class:`Task`).
        dims: subspace dimensions to try (sorted ascending here).
        threshold: fraction of the baseline score (0.9 gives Li et al.'s ``d90``).
        projection: the ``subspace`` projection (``fastfood`` costs ``O(D log D)`` per step whatever ``d``).
        seed: the policy seed (the projection's Philox key derives from it).
        out_dir: if given, ``intrinsic_dimension.csv`` and ``intrinsic_dimension.png`` are written there.

    Returns:
        An :class:`IntrinsicDimension`.

    Raises:
        PolicyError: the subspace rule does not fit the model (e.g. ``d`` larger than ``D`` for fastfood).
    """
    dims = sorted(int(d) for d in dims)
    baseline_model = task.model_factory()
    task.train_fn(baseline_model)
    baseline = float(task.eval_fn(baseline_model))
    scores = []
    for d in tqdm(dims, desc="intrinsic dimension", unit="d"):
        policy = {"version": 1, "seed": seed, "rules": [{"name": f"subspace-{d}", "match": task.match, "subspace": {
            "dim": d, "projection": projection, "scope": "global"}}]}
        model = rewrite(task.model_factory(), policy, task.example_inputs)
        task.train_fn(model)
        scores.append(float(task.eval_fn(model)))
    reached = [d for d, s in zip(dims, scores) if s >= threshold * baseline]
    result = IntrinsicDimension(baseline, dims, scores, threshold, reached[0] if reached else None)
    if out_dir is not None:
        _write(result, Path(out_dir))
    return result


def _write(result: IntrinsicDimension, out_dir: Path) -> None:
    plt = pyplot("the intrinsic-dimension plot")

    out_dir.mkdir(parents=True, exist_ok=True)
    result.csv_path, result.plot_path = out_dir / "intrinsic_dimension.csv", out_dir / "intrinsic_dimension.png"
    with open(result.csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["d", "score", "fraction_of_baseline"])
        writer.writerows([d, f"{s:.6f}", f"{s / result.baseline:.6f}"] for d, s in zip(result.dims, result.scores))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(result.dims, result.scores, "o-", label="subspace training")
    ax.axhline(result.baseline, color="k", ls="--", label=f"direct training ({result.baseline:.3f})")
    ax.axhline(result.threshold * result.baseline, color="r", ls=":",
               label=f"{result.threshold:.0%} of direct")
    if result.d_threshold is not None:
        ax.axvline(result.d_threshold, color="r", alpha=0.4, label=f"d{round(100 * result.threshold)} = "
                   f"{result.d_threshold}")
    ax.set_xscale("log")
    ax.set_xlabel("subspace dimension d")
    ax.set_ylabel("score")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(result.plot_path, dpi=120)
    plt.close(fig)
