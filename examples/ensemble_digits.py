"""Cheap ensembles on digits (Rosenfeld & Tsotsos 2018, section 4.3, table 4): five SmallCNNs that share a fraction R of
their convolution filters (frozen at their random init, regenerated from one Philox key: zero bytes, no copies) and
learn the rest, against ensembles that share all conv filters (only BatchNorm and the classifier learn, "FC") or none
("Full"). Members are built by ``seedrand.ensemble``; member m >= 1 re-draws its trainable weights from its own key.

Members train together from scratch on the same batches (Adam, lr 3e-3, batch 64; the sum of the members' losses,
so each member's gradient is its own). Unlike the paper, there is no shared pre-training epoch. Reported: the
members' mean test accuracy, the accuracy of the ensemble's mean logits, the learned parameters of the whole
ensemble (the paper's "No. Params") and the bytes it stores; mean over ``--seeds`` seeds.

    python examples/ensemble_digits.py            # the full table (about 5 minutes on 2 CPU cores)
    python examples/ensemble_digits.py --quick    # a smoke run

Writes ``examples/results/ensemble_digits.md`` (or ``--out``).
"""

import argparse
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

import seedrand
from seedrand import zoo

from report import show_table  # examples/report.py

HERE = Path(__file__).parent
PAPER = {"FC": (68.5, 70.25), "Share-Conv-0.9": (69.9, 71.14), "Share-Conv-0.6": (71.0, 73.54),
         "Share-Conv-0.3": (71.3, 75.47), "Full": (71.7, 76.35)}


def policy(name: str, seed: int) -> dict:
    """The conv rule of each ensemble type: the shared (frozen) part of every conv layer."""
    if name == "Full":
        rules = []
    elif name == "FC":
        rules = [{"match": {"types": ["Conv2d"]}, "random": {"bias": "random"}}]
    else:
        rules = [{"match": {"types": ["Conv2d"]}, "freeze_fraction": {"fraction": float(name.rsplit("-", 1)[1])}}]
    return {"version": 1, "seed": seed, "rules": rules}


def run(name: str, seed: int, members: int, steps: int, data: zoo.Digits) -> dict:
    x, x_test = data.x_train.view(-1, 1, 8, 8), data.x_test.view(-1, 1, 8, 8)
    ensemble = seedrand.ensemble(zoo.cnn()[0], policy(name, seed), members, (x[:2],)).train()
    optimizer = torch.optim.Adam([p for p in ensemble.parameters() if p.requires_grad], lr=3e-3)
    batches = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(len(x), (64,), generator=batches)
        _, each = ensemble(x[index], return_members=True)
        loss = sum(F.cross_entropy(out, data.y_train[index]) for out in each)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    ensemble.eval()
    with torch.no_grad():
        mean, each = ensemble(x_test, return_members=True)
    total = seedrand.summary(ensemble).total
    return {"members": statistics.mean((e.argmax(-1) == data.y_test).float().mean().item() for e in each),
            "ensemble": (mean.argmax(-1) == data.y_test).float().mean().item(),
            "learned": total.trainable, "stored_bytes": total.trainable_bytes + total.frozen_bytes,
            "regenerated": total.regenerated}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--quick", action="store_true", help="1 seed, 3 members, 20 steps")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.members, args.steps = 1, 3, 20
    data = zoo.digits_data()
    title = (f"Ensembles of {args.members} SmallCNNs on digits ({args.steps} steps, mean of {args.seeds} seeds; "
             "paper: DenseNet on CIFAR-10)")
    head = ["ensemble", "members' mean accuracy", "ensemble accuracy", "learned parameters", "stored bytes",
            "regenerated (0 bytes)", "paper: mean / ensemble (%)"]
    rows = []
    for name in PAPER:
        runs = [run(name, seed, args.members, args.steps, data) for seed in range(args.seeds)]
        row = {k: statistics.mean(r[k] for r in runs) for k in runs[0]}
        rows.append([name, f"{row['members']:.4f}", f"{row['ensemble']:.4f}", f"{row['learned']:,.0f}",
                     f"{row['stored_bytes']:,.0f}", f"{row['regenerated']:,.0f}", "{} / {}".format(*PAPER[name])])
    lines = show_table(title, head, rows)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python examples/ensemble_digits.py" + (" --quick" if args.quick else "")
    (args.out / "ensemble_digits.md").write_text("\n".join([f"# Cheap ensembles (`{command}`)", "", title, "",
                                                             *lines, ""]))
    print(f"wrote {args.out / 'ensemble_digits.md'}")


if __name__ == "__main__":
    main()
