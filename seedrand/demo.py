"""``seedrand demo``: every part of seedrand on real data (scikit-learn's bundled digits, no download), reproducing the
papers' headline experiments at laptop scale, through the public API and the policy files in ``examples/policies/``.

1. Freeze fraction (Rosenfeld & Tsotsos 2018, figure 1): a small CNN learning a fraction of each conv layer's filters,
   the rest fixed at their seed-regenerated random init or zeroed; test accuracy against learned parameters.
2. Random layers (van den Heuvel & Sladek 2020): an MLP whose hidden layers are regenerated from their seed in every
   forward and backward, against the same MLP fully trained and with its hidden layers frozen but stored: accuracy,
   stored bytes, peak training memory.
3. ShrinkNets (Leclerc et al., ShrinkNets, figure 1): a one-hidden-layer MLP with far too many units, gated, trained
   with several L1 weights lambda; ``collect_garbage`` removes dead units during training with the optimizer kept.
4. Subspace training (Minut 2023): accuracy against the subspace dimension ``d`` and ``d90``.
5. Deployment: the shrunk model of part 3 compiled with ``backend="seedrand"`` and exported to ONNX; the random MLP
   of part 2 exported in both weight modes; onnxruntime accuracy against PyTorch's, file sizes.

Results go to ``--out`` (default ``./seedrand-demo/``): ``results.json``, ``results.md`` and one plot per part.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from . import zoo
from ._optional import pyplot, require
from .errors import SeedrandError
from .garbage import collect_garbage
from .intrinsic import Task, intrinsic_dimension
from .policy import Policy, load_policy
from .reproduce.common import accuracy, fit, mlp
from .rewriter.rewrite import rewrite
from .summary import summary

__all__ = ["run_demo", "DemoSettings", "PARTS"]

POLICIES = Path(__file__).resolve().parents[1] / "examples" / "policies"


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of one demo run (``full()`` for the committed results, ``quick()`` for a run under a minute).

    Attributes:
        cnn_steps: Adam steps (batch 64) per CNN of part 1.
        learned_fractions: fractions of filters learned per conv layer in part 1 (``None``: a single filter).
        random_width, random_steps: hidden width and full-batch steps of part 2's MLPs.
        gated_width, gated_steps, lambdas, collect_every: part 3's initial hidden width, steps, L1 weights, and how
            often (steps) garbage is collected.
        subspace_dims, subspace_steps: part 4's sweep.
    """

    cnn_steps: int
    learned_fractions: tuple
    random_width: int
    random_steps: int
    gated_width: int
    gated_steps: int
    lambdas: tuple
    collect_every: int
    subspace_dims: tuple
    subspace_steps: int

    @classmethod
    def full(cls) -> "DemoSettings":
        """The committed run (a few minutes on 2 CPU cores)."""
        return cls(400, (1.0, 0.7, 0.4, 0.1, None), 1024, 150, 2000, 1000, (1e-5, 1e-4, 1e-3), 25,
                   (10, 25, 50, 100, 200, 400, 800), 300)

    @classmethod
    def quick(cls) -> "DemoSettings":
        """A smoke run: every part and every output file, on tiny sizes."""
        return cls(20, (1.0, 0.4, None), 256, 10, 200, 150, (1e-2, 1e-1), 25, (20, 200), 30)


def _policy(name: str, policies: Path) -> Policy:
    path = policies / name
    if not path.is_file():
        raise SeedrandError(f"demo policy {path} not found; run the demo from a source checkout of seedrand or pass "
                            "--policies DIR")
    return load_policy(path)


def _with_action(policy: Policy, **changes) -> Policy:
    """``policy`` with its first rule's action settings updated (the demo's sweeps vary one setting)."""
    data = policy.model_dump(by_alias=True, exclude_none=True)
    action = next(k for k in data["rules"][0] if k not in ("name", "match", "optional"))
    data["rules"][0][action].update(changes)
    return Policy.from_dict(data)


def _plot(path: Path, draw: Callable, xlabel: str, ylabel: str, title: str, log_x: bool = False) -> None:
    plt = pyplot("the demo's plots")

    fig, ax = plt.subplots(figsize=(6, 4))
    draw(ax)
    if log_x:
        ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _part_freeze_fraction(data: zoo.Digits, s: DemoSettings, out: Path, policies: Path) -> dict:
    """Part 1 (Rosenfeld & Tsotsos 2018, figure 1): test accuracy of the digits CNN learning a fraction of each conv's
    filters."""
    base = _policy("cnn_freeze_fraction.yaml", policies)
    images = lambda x: x.view(-1, 1, 8, 8)  # noqa: E731
    x, x_test = images(data.x_train), images(data.x_test)
    runs = [(f, fixed) for f in s.learned_fractions for fixed in ("random", "zero") if f != 1.0] + [(1.0, "random")]
    rows = []
    for learned, fixed in tqdm(runs, desc="1 freeze fraction", unit="model"):
        # n_frozen is capped at n - 1 filters, so a frozen fraction just under 1 leaves a single learned filter
        frozen = 0.999 if learned is None else round(1.0 - learned, 6)
        model = rewrite(zoo.cnn()[0], _with_action(base, fraction=frozen, fixed=fixed), (x[:2],))
        fit(model, x, data.y_train, s.cnn_steps, lr=3e-3, batch=64)
        label = "1 filter" if learned is None else ("all" if learned == 1.0 else f"{learned:.0%}")
        rows.append({"learned": label, "fixed": fixed if learned != 1.0 else "-",
                     "learned_parameters": summary(model).total.trainable,
                     "accuracy": accuracy(model, x_test, data.y_test)})

    def draw(ax):
        full = [r for r in rows if r["fixed"] == "-"]
        for fixed, style in (("random", "o-"), ("zero", "s--")):
            pts = sorted(full + [r for r in rows if r["fixed"] == fixed], key=lambda r: r["learned_parameters"])
            ax.plot([r["learned_parameters"] for r in pts], [r["accuracy"] for r in pts], style,
                    label=f"frozen filters {'at random init' if fixed == 'random' else 'zeroed'}")

    _plot(out / "part1_freeze_fraction.png", draw, "learned parameters", "test accuracy",
          "Learning a fraction of the filters (digits CNN)", log_x=True)
    return {"rows": rows}


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2: Kineto prints "profiler_start/stop" lines from C++ on every profile, and no
    setting turns them off."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _peak_training_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Peak bytes of one Adam training step: the tensors alive before it (parameters, buffers, optimizer state) plus
    the peak of the allocations the step makes (activations, regenerated weights, gradients), from the PyTorch
    profiler's CPU memory events in time order."""
    from torch.profiler import ProfilerActivity, profile

    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    step()  # creates the optimizer state
    optimizer.zero_grad(set_to_none=True)
    resident = sum(t.numel() * t.element_size() for t in itertools.chain(
        model.parameters(), model.buffers(),
        (v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))))
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    return resident + max(0, max(itertools.accumulate(e.self_cpu_memory_usage for e in events)))


def _part_random_layers(data: zoo.Digits, s: DemoSettings, out: Path, policies: Path) -> dict:
    """Part 2 (van den Heuvel & Sladek 2020): hidden layers regenerated from a seed vs stored frozen vs trained."""
    policy = _policy("mlp_random_hidden.yaml", policies)
    freeze = Policy.from_dict({**policy.model_dump(by_alias=True, exclude_none=True),
                                    "rules": [{"match": policy.rules[0].match.model_dump(), "freeze": {}}]})
    widths = (64, s.random_width, s.random_width, 10)
    variants = {"trained": lambda: mlp(*widths),
                "frozen, stored": lambda: rewrite(mlp(*widths), freeze),
                "random, regenerated": lambda: rewrite(mlp(*widths), policy)}
    rows, models = [], {}
    for name, build in tqdm(variants.items(), desc="2 random layers", unit="model"):
        model = build()
        start = time.perf_counter()
        fit(model, data.x_train, data.y_train, s.random_steps)
        seconds = time.perf_counter() - start
        stored = sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))
        rows.append({"model": name, "accuracy": accuracy(model, data.x_test, data.y_test),
                     "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
                     "stored_bytes": stored, "peak_training_bytes": _peak_training_bytes(
                         model, data.x_train, data.y_train), "seconds_per_step": seconds / s.random_steps})
        models[name] = model.eval()

    def draw(ax):
        names = [r["model"] for r in rows]
        ax.bar([i - 0.2 for i in range(3)], [r["stored_bytes"] / 2**20 for r in rows], 0.4, label="stored")
        ax.bar([i + 0.2 for i in range(3)], [r["peak_training_bytes"] / 2**20 for r in rows], 0.4,
               label="peak during a training step")
        ax.set_xticks(range(3), names)

    _plot(out / "part2_random_layers.png", draw, "", "MiB", f"Hidden layers {s.random_width} wide (digits MLP)")
    return {"rows": rows, "random_model": models["random, regenerated"]}


def _part_shrinknets(data: zoo.Digits, s: DemoSettings, out: Path, policies: Path) -> dict:
    """Part 3 (Leclerc et al., ShrinkNets, figure 1): live hidden units and loss over training for several lambdas."""
    policy = _policy("mlp_filter_gates.yaml", policies)
    rows, curves, shrunk = [], {}, None
    for lam in tqdm((0.0, *s.lambdas), desc="3 ShrinkNets", unit="lambda"):
        model = rewrite(mlp(64, s.gated_width, 10), _with_action(policy, **{"lambda": lam}), (data.x_train[:2],))
        gate = model.get_submodule(f"{policy.rules[0].match.modules[0]}_gate")
        curve = curves[lam] = {"step": [], "live": [], "loss": []}

        def on_step(step, loss, optimizer):
            if (step + 1) % s.collect_every == 0:
                collect_garbage(model, optimizer)  # the same Adam trains on, its moments sliced
            curve["step"].append(step + 1)
            curve["live"].append(int(gate.live.sum()))
            curve["loss"].append(loss)

        fit(model, data.x_train, data.y_train, s.gated_steps, gated=True, on_step=on_step)
        collect_garbage(model)
        width = model.get_submodule(policy.rules[0].match.modules[0]).out_features
        rows.append({"lambda": lam, "final_width": width, "accuracy": accuracy(model, data.x_test, data.y_test),
                     "parameters": sum(p.numel() for p in model.parameters())})
        if lam == s.lambdas[len(s.lambdas) // 2]:
            shrunk = model

    def draw(ax):
        for lam, c in curves.items():
            ax.plot(c["step"], c["live"], label=f"lambda = {lam:g}")

    _plot(out / "part3_shrinknets.png", draw, "training step", "live hidden units",
          f"ShrinkNets: {s.gated_width} gated units, garbage collected every {s.collect_every} steps")
    return {"rows": rows, "curves": {str(k): v for k, v in curves.items()}, "shrunk_model": shrunk}


def _part_subspace(data: zoo.Digits, s: DemoSettings, out: Path, policies: Path) -> dict:
    """Part 4 (Minut 2023): the intrinsic-dimension sweep with the policy's projection and match."""
    rule = _policy("mlp_subspace.yaml", policies).rules[0]
    task = zoo.digits_task(steps=s.subspace_steps)
    task = Task(task.model_factory, task.train_fn, task.eval_fn, task.example_inputs,
                rule.match.model_dump(exclude_defaults=True))
    result = intrinsic_dimension(task, s.subspace_dims, projection=rule.subspace.projection, out_dir=out)
    result.plot_path.rename(out / "part4_subspace.png")
    result.csv_path.rename(out / "part4_subspace.csv")
    return {"direct_accuracy": result.baseline, "dims": result.dims, "accuracy": result.scores,
            "d90": result.d_threshold, "parameters": sum(p.numel() for p in task.model_factory().parameters())}


def _part_deployment(data: zoo.Digits, out: Path, shrunk: nn.Module, random_model: nn.Module) -> dict:
    """Part 5: compile the shrunk model; export it and the random MLP to ONNX; onnxruntime accuracy vs PyTorch."""
    ort = require("onnxruntime", "the demo's ONNX part")

    from .export import export_onnx

    compiled = torch.compile(shrunk, backend="seedrand")
    with torch.no_grad():
        eager, fast = shrunk(data.x_test), compiled(data.x_test)
    rows = []
    for name, model, weights in (("shrunk gated MLP", shrunk, "materialize"),
                                 ("random MLP", random_model, "seed"), ("random MLP", random_model, "materialize")):
        report = export_onnx(model, (data.x_test,), out / f"{name.split()[0]}_{weights}.onnx", weights=weights)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: constant folding warns about CastLike nodes it leaves alone
        session = ort.InferenceSession(str(report.path), options)
        logits = session.run(None, {session.get_inputs()[0].name: data.x_test.numpy()})[0]
        rows.append({"model": name, "weights": weights, "bytes": report.bytes,
                     "onnxruntime_accuracy": (torch.from_numpy(logits).argmax(-1) == data.y_test).float().mean().item(),
                     "pytorch_accuracy": accuracy(model, data.x_test, data.y_test)})
    return {"compiled_max_abs_difference": (fast - eager).abs().max().item(), "rows": rows}


PARTS = {1: "freeze fraction", 2: "random layers", 3: "ShrinkNets", 4: "subspace", 5: "compile and ONNX"}


def run_demo(out: str | Path = "seedrand-demo", quick: bool = False, parts: Optional[list[int]] = None,
             policies: Optional[str | Path] = None) -> dict:
    """Run the demo (see the module docstring) and write ``results.json``, ``results.md`` and the plots to ``out``.

    Args:
        out: output directory (created).
        quick: tiny sizes (under a minute) instead of :meth:`DemoSettings.full`.
        parts: which parts to run (1-5; default all). Part 5 trains the models of parts 2 and 3 if they are not run.
        policies: directory holding the demo's policy files (``None``: ``examples/policies`` of the source tree).

    Returns:
        The results as a JSON-ready dict keyed by part number.

    Raises:
        SeedrandError: an unknown part, or the policy files are missing.
    """
    parts = sorted(set(parts or PARTS))
    if not set(parts) <= set(PARTS):
        raise SeedrandError(f"--part takes numbers in 1-5, got {parts}")
    s, out, policies = DemoSettings.quick() if quick else DemoSettings.full(), Path(out), Path(policies or POLICIES)
    out.mkdir(parents=True, exist_ok=True)
    data = zoo.digits_data()
    results, started = {}, time.perf_counter()
    if 1 in parts:
        results[1] = _part_freeze_fraction(data, s, out, policies)
    if 2 in parts or 5 in parts:
        results[2] = _part_random_layers(data, s, out, policies)
    if 3 in parts or 5 in parts:
        results[3] = _part_shrinknets(data, s, out, policies)
    if 4 in parts:
        results[4] = _part_subspace(data, s, out, policies)
    if 5 in parts:
        results[5] = _part_deployment(data, out, results[3]["shrunk_model"], results[2]["random_model"])
    results = {k: {n: v for n, v in r.items() if not isinstance(v, nn.Module)} for k, r in results.items()
               if k in parts}
    results["settings"] = {"quick": quick, "seconds": round(time.perf_counter() - started, 1), **s.__dict__}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "results.md").write_text(markdown(results))
    return results


def _cells(row: dict) -> list[str]:
    def fmt(key, v):
        if isinstance(v, float) and not math.isnan(v):
            return f"{v:.3f}" if "accuracy" in key else (f"{v:.4f}" if "seconds" in key else f"{v:g}")
        return f"{v:,}" if isinstance(v, int) else str(v)

    return [fmt(k, v) for k, v in row.items()]


def _table(rows: list[dict]) -> list[str]:
    head = list(rows[0])
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(_cells(r)) + " |"
                                                                        for r in rows]


def markdown(results: dict) -> str:
    """The demo's results as Markdown: one section and table per part (what ``results.md`` holds)."""
    lines = [f"# seedrand demo results ({'quick' if results['settings']['quick'] else 'full'} run, "
             f"{results['settings']['seconds']:.0f} s)", ""]
    for part, name in PARTS.items():
        if part not in results:
            continue
        r = results[part]
        lines += [f"## Part {part}: {name}", ""]
        if part == 4:
            lines += [f"Direct training: {r['direct_accuracy']:.3f} test accuracy with {r['parameters']:,} parameters; "
                      f"d90 = {r['d90']}.", ""]
            r = {"rows": [{"d": d, "accuracy": a} for d, a in zip(r["dims"], r["accuracy"])]}
        if part == 5:
            lines += [f"Compiled (`backend=\"seedrand\"`) vs eager, largest absolute difference in the logits: "
                      f"{r['compiled_max_abs_difference']:.2e}.", ""]
        lines += _table(r["rows"]) + [""]
    return "\n".join(lines)
