"""Growing capacity on sine regression (the dynamic network capacity thesis, section 5.1, table 5.2): one hidden layer
of up to 500 tanh units fits sin(x) on [-2 pi, 2 pi]; static networks of 100 and 500 units against one that starts at
100 and grows by a fifth, freezing what it trained, whenever its training loss plateaus
(``examples/policies/sine_grow.yaml``).

Each run trains with Adam (lr 1e-3, the paper's optimizer) on fresh uniform batches and records the test MSE on a
fixed grid of 1,000 points after every epoch (one "sample" of the paper's curves); "final-10" is the mean and
standard deviation of the last 10 epochs' errors, as in the paper's table. The scheduler sees every batch's loss
(window 10). Runs repeat over ``--seeds`` seeds (data, init and policy seed).

    python examples/grow_sine.py            # the full table (about 3 minutes on 2 CPU cores)
    python examples/grow_sine.py --quick    # a smoke run

Writes ``examples/results/grow_sine.md`` and ``grow_sine.png`` (or ``--out``).
"""

import argparse
import math
import statistics
from pathlib import Path

import matplotlib
import torch
import torch.nn as nn

import seedrand

from report import show_table  # examples/report.py

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
PAPER = {"static 100": (0.00138, 0.000389), "static 500": (0.00234, 0.003261), "adaptive": (0.00024, 0.000084)}


def network(hidden: int, seed: int) -> nn.Sequential:
    """1-hidden-1 tanh network with PyTorch's default Linear init (weights and biases ``U(+-1/sqrt(fan_in))``), drawn
    from a generator seeded with ``seed`` (the global RNG is untouched)."""
    generator = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, 1))
    for layer in (model[0], model[2]):
        nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
        bound = 1 / math.sqrt(layer.in_features)
        nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
    return model


def run(method: str, seed: int, epochs: int, batches: int, batch: int) -> tuple[list[float], list[int]]:
    """Train one network; returns the test MSE after each epoch and the epochs after which it grew."""
    grid = torch.linspace(-2 * math.pi, 2 * math.pi, 1000).unsqueeze(1)
    if method == "adaptive":
        policy = seedrand.load_policy(HERE / "policies" / "sine_grow.yaml").model_copy(update={"version": 1, "seed": seed})
        model = seedrand.rewrite(network(500, seed), policy, grid[:2])
    else:
        model = network(int(method.split()[1]), seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = seedrand.CapacityScheduler(model, optimizer) if method == "adaptive" else None
    data = torch.Generator().manual_seed(10_000 + seed)
    errors = []
    for _ in range(epochs):
        for _ in range(batches):
            x = (torch.rand(batch, 1, generator=data) * 2 - 1) * 2 * math.pi
            loss = (model(x) - torch.sin(x)).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if scheduler:  # per batch: "after it fails to [fall] within the last 10 batches"
                scheduler.step(loss)
        with torch.no_grad():
            errors.append(float((model(grid) - torch.sin(grid)).square().mean()))
    grown = [t.step / batches for t in scheduler.transitions if t.group.startswith("'hidden")] if scheduler else []
    return errors, grown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batches", type=int, default=50, help="batches per epoch")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="2 seeds, 25 epochs of 10 batches")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.batches = 2, 25, 10
    torch.set_num_threads(1)
    curves, growth = {}, {}
    for method in PAPER:
        runs = [run(method, seed, args.epochs, args.batches, args.batch) for seed in range(args.seeds)]
        curves[method] = [errors for errors, _ in runs]
        growth[method] = [steps for _, steps in runs]

    title = (f"Sine regression, final-10 test MSE ({args.seeds} seeds, {args.epochs} epochs of {args.batches} x "
             f"{args.batch})")
    head = ["network", "final-10 mean", "final-10 std", "best seed", "worst seed", "paper mean", "paper std"]
    rows = []
    for method, runs in curves.items():
        means = [statistics.mean(r[-10:]) for r in runs]
        stds = [statistics.pstdev(r[-10:]) for r in runs]
        rows.append([method, f"{statistics.mean(means):.5f}", f"{statistics.mean(stds):.5f}", f"{min(means):.5f}",
                     f"{max(means):.5f}", f"{PAPER[method][0]:.5f}", f"{PAPER[method][1]:.6f}"])
    lines = show_table(title, head, rows)
    stages = [f"seed {s}: epochs {', '.join(f'{t:.1f}' for t in g)}"
              for s, g in enumerate(growth["adaptive"])]
    print("adaptive growth (hidden units 100 -> 500):", "; ".join(stages))

    args.out.mkdir(parents=True, exist_ok=True)
    command = "python examples/grow_sine.py" + (" --quick" if args.quick else "")
    (args.out / "grow_sine.md").write_text("\n".join([
        f"# Growing capacity: sine regression (`{command}`)", "", title, "", *lines, "",
        "Growth of the adaptive network (epoch of each step to the next fifth): " + "; ".join(stages), ""]))
    fig, ax = plt.subplots(figsize=(6, 4))
    for (method, runs), color in zip(curves.items(), ("tab:blue", "tab:orange", "tab:green")):
        epochs = range(1, len(runs[0]) + 1)
        ax.plot(epochs, [statistics.median(e) for e in zip(*runs)], label=f"{method} (median of seeds)", color=color)
    ax.set(yscale="log", xlabel="epoch", ylabel="test MSE",
           title="sin(x) on [-2 pi, 2 pi] (dynamic network capacity thesis, fig. 5.1)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "grow_sine.png", dpi=120)
    print(f"wrote {args.out / 'grow_sine.md'} and {args.out / 'grow_sine.png'}")


if __name__ == "__main__":
    main()
