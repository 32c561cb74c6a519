"""``seedrand reproduce shrinknets``: Leclerc, Castro Fernandez & Madden, *ShrinkNets*, section 4, figure 1.

The paper trains a one-hidden-layer network with one Filter layer (``y = x * max(0, theta)``, loss
``+ lambda * |theta|``) on the hidden units, from 10,000 units, on MNIST, for several lambda, and finds that (1) for a
given lambda the number of hidden units converges, (2) a larger lambda gives a smaller network, and (3) the loss
spikes when units are disabled, less as their number levels off. It gives no numbers for figure 1 but the initial
width; its claims are checked as such.

Departures (printed in the report): scikit-learn's digits (8x8, 1,347 training images) for MNIST, which is not
bundled; 2,000 initial units for 10,000 (the digits need far fewer, and 2 CPU cores); full-batch Adam (lr 1e-2) for
the paper's unstated optimizer; garbage collection every 25 steps with the optimizer kept (the paper removes units
during training too).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import zoo
from ..garbage import collect_garbage
from ..rewriter.rewrite import rewrite
from .common import accuracy, figure, fit, mlp

__all__ = ["Settings", "run"]

PAPER = {
    "source": "Leclerc, Castro Fernandez & Madden, ShrinkNets, section 4 and figure 1",
    "dataset": "MNIST", "initial_units": 10000,
    "claims": ["for a given lambda the number of hidden units converges",
               "a larger lambda gives a smaller network",
               "a unit whose theta reaches 0 is disabled for good (removed)"],
}


@dataclass(frozen=True)
class Settings:
    """One run's sizes: initial hidden units, full-batch Adam steps, the L1 weights, steps between collections."""

    width: int = 2000
    steps: int = 1000
    lambdas: tuple = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3)
    collect_every: int = 25

    @classmethod
    def quick(cls) -> "Settings":
        """A smoke run of every output (seconds)."""
        return cls(width=64, steps=160, lambdas=(1e-2, 1e-1), collect_every=20)


def _train(data: zoo.Digits, s: Settings, lam: float, seed: int) -> dict:
    """One gated MLP 64-width-10 trained with ``lambda = lam`` from init seed ``seed``: its live-unit and loss curves,
    how many units came back to life, final width and test accuracy."""
    policy = {"version": 1, "seed": seed, "rules": [{"match": {"modules": ["0"]},
                                                     "filter_gates": {"lambda": lam, "init": "ones"}}]}
    model = rewrite(mlp(64, s.width, 10, seed=seed), policy, (data.x_train[:2],))
    live, loss, revived = [], [], 0

    def on_step(step: int, value: float, optimizer) -> None:
        nonlocal revived
        now = int(model.get_submodule("0_gate").live.sum())
        revived += max(0, now - live[-1]) if live else 0
        live.append(now)
        loss.append(value)
        if (step + 1) % s.collect_every == 0:
            collect_garbage(model, optimizer)  # the same Adam trains on, its moments sliced

    fit(model, data.x_train, data.y_train, s.steps, gated=True, seed=seed, on_step=on_step)
    collect_garbage(model)
    return {"live": live, "loss": loss, "revived": revived, "final_width": model.get_submodule("0").out_features,
            "accuracy": accuracy(model, data.x_test, data.y_test)}


def _converged(live: list[int], tail: float = 0.2, tolerance: float = 0.05) -> bool:
    """The live count moved by at most ``tolerance`` of its final value over the last ``tail`` of training."""
    last = live[int(len(live) * (1 - tail)):]
    return max(last) - min(last) <= max(1, tolerance * live[-1])


def run(out: Path, seeds: int = 3, quick: bool = False) -> dict:
    """Train every lambda with ``seeds`` init seeds, judge the paper's claims, write ``shrinknets.{json,md,png}``
    to ``out``, and return the JSON-ready results (``seeds``, ``paper``, ``verdict``, ``final_width`` and
    ``revived_units`` per lambda per seed, ``accuracy``, ``claims``, ``departures``).

    Raises:
        SeedrandError: scikit-learn or matplotlib is missing (names the extra).
    """
    s = Settings.quick() if quick else Settings()
    data = zoo.digits_data()
    runs = {lam: [_train(data, s, lam, seed) for seed in range(seeds)] for lam in s.lambdas}
    widths = {lam: [r["final_width"] for r in rs] for lam, rs in runs.items()}
    means = [statistics.mean(widths[lam]) for lam in s.lambdas]
    spreads = [statistics.pstdev(widths[lam]) for lam in s.lambdas]
    # smaller with each larger lambda, beyond the spread over seeds of the two arms compared
    rises = [(a, b) for a, b, sa, sb in zip(s.lambdas, s.lambdas[1:], spreads, spreads[1:])
             if means[s.lambdas.index(b)] > means[s.lambdas.index(a)] + max(sa, sb)]
    unconverged = sorted({lam for lam, rs in runs.items() for r in rs if not _converged(r["live"])})
    claims = {
        PAPER["claims"][0]: not unconverged,
        PAPER["claims"][1]: not rises and means[-1] < means[0],
        PAPER["claims"][2]: all(r["revived"] == 0 for rs in runs.values() for r in rs),
    }
    held = sum(claims.values())
    verdict = "reproduced" if held == len(claims) else "partly" if held else "contradicts"
    smallest = s.lambdas[means.index(min(means))]
    notes = [f"lambda = {lam:g}: the live count still moved by more than 5% over the last fifth of training"
             for lam in unconverged]
    notes += [f"the width rises from lambda = {a:g} ({means[s.lambdas.index(a)]:.1f} units) to {b:g} "
              f"({means[s.lambdas.index(b)]:.1f}); it is smallest at lambda = {smallest:g} ({min(means):.1f})"
              for a, b in rises]
    results = {
        "name": "shrinknets", "seeds": seeds, "quick": quick, "settings": asdict(s), "paper": PAPER,
        "verdict": verdict, "claims": claims, "notes": notes,
        "final_width": {str(lam): w for lam, w in widths.items()},
        "revived_units": {str(lam): [r["revived"] for r in rs] for lam, rs in runs.items()},
        "accuracy": {str(lam): [round(r["accuracy"], 4) for r in rs] for lam, rs in runs.items()},
        "final_loss": {str(lam): [round(r["loss"][-1], 5) for r in rs] for lam, rs in runs.items()},
        "departures": ["digits (8x8, 1,347 training images) for MNIST, which is not bundled",
                       f"{s.width:,} initial hidden units for 10,000",
                       "full-batch Adam, lr 1e-2; gates start at 1",
                       f"garbage collected every {s.collect_every} steps, the optimizer kept"],
    }
    _plot(out / "shrinknets.png", s, runs)
    return results


def _plot(path: Path, s: Settings, runs: dict) -> None:
    steps = range(1, s.steps + 1)

    def units(ax):
        for lam, rs in runs.items():
            ax.plot(steps, [statistics.mean(c) for c in zip(*(r["live"] for r in rs))], label=f"lambda = {lam:g}")
        ax.set(yscale="log", xlabel="training step (full batch)", ylabel="live hidden units",
               title=f"hidden units, from {s.width} (mean of {len(next(iter(runs.values())))} seeds)")
        ax.legend()

    def loss(ax):
        for lam, rs in runs.items():
            ax.plot(steps, [statistics.mean(c) for c in zip(*(r["loss"] for r in rs))], label=f"lambda = {lam:g}")
        ax.set(yscale="log", xlabel="training step (full batch)", ylabel="loss (cross-entropy + L1)", title="loss")
        ax.legend()

    def width(ax):
        lams = list(runs)
        finals = [[r["final_width"] for r in runs[lam]] for lam in lams]
        ax.errorbar(lams, [statistics.mean(f) for f in finals], yerr=[statistics.pstdev(f) for f in finals],
                    marker="o", capsize=3)
        ax.set(xscale="log", yscale="log", xlabel="lambda", ylabel="final hidden units",
               title="final width (mean, std over seeds)")

    figure(path, [units, loss, width], size=(5, 4))


def markdown(results: dict) -> str:
    """The report: the paper's claims beside ours with the verdict, and final width, revivals and accuracy per
    lambda (mean and spread over seeds)."""
    lines = [f"## ShrinkNets: {results['verdict']}", "", f"Paper: {results['paper']['source']} "
             f"({results['paper']['dataset']}, {results['paper']['initial_units']:,} initial units). Ours: "
             f"{results['settings']['width']:,} initial units, {results['seeds']} seeds"
             f"{' (quick run)' if results['quick'] else ''}.", "",
             "| the paper's claim | here |", "|---|---|"]
    lines += [f"| {claim} | {'holds' if held else 'does not hold'} |" for claim, held in results["claims"].items()]
    lines += ["", "| lambda | final width (mean ± std) | per seed | revived units | test accuracy (mean) |",
              "|---|---|---|---|---|"]
    for lam, widths in results["final_width"].items():
        spread = statistics.pstdev(widths)
        lines.append(f"| {float(lam):g} | {statistics.mean(widths):,.1f} ± {spread:.1f} | "
                     f"{', '.join(map(str, widths))} | {sum(results['revived_units'][lam])} | "
                     f"{statistics.mean(results['accuracy'][lam]):.3f} |")
    lines += ["", *[f"- {note}" for note in results["notes"]], "",
              "Departures from the paper's set-up: " + "; ".join(results["departures"]) + ".", ""]
    return "\n".join(lines)
