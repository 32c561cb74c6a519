"""Time of one training step (forward, backward, Adam) of an MLP trained in a random subspace, per projection and
subspace dimension d, next to direct training (Li et al. 2018 measured, on their GPU: direct 2.7 ms, dense 11-18 ms
at d = 100-500, sparse 4.4-11 ms at d = 100-20k, Fastfood about 22 ms flat up to d = 1M).

The default MLP 784-1000-200-10 has D = 987,210 parameters. Dense projections regenerate all D x d entries of P twice
per step with the eager Philox reference (about 6 M values/s on 2 CPU cores), so they take minutes per step at that
size until the kernels issue's fast path lands; pass --hidden 100,100 (D = 89,610) for a quick run.

Run: python benchmarks/subspace_step.py [--hidden 1000,200] [--dims 100,1000] [--projections ...] [--steps 3]
"""

import argparse
import statistics
import time

import torch
import torch.nn as nn

import seedrand


def mlp(hidden: list[int]) -> nn.Sequential:
    """``784 -> hidden... -> 10`` with ReLUs, built under a fixed local seed."""
    widths = [784, *hidden, 10]
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(*layers[:-1])


def step_ms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    """Median wall time of one training step, milliseconds (after one warm-up step)."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if i:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", default="1000,200")
    parser.add_argument("--dims", default="100,1000")
    parser.add_argument("--projections", default="gaussian,sparse,very_sparse,orthogonal,fastfood")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    hidden = [int(h) for h in args.hidden.split(",")]
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(args.batch, 784, generator=gen), torch.randint(0, 10, (args.batch,), generator=gen)
    base = mlp(hidden)
    n_params = sum(p.numel() for p in base.parameters())
    print(f"MLP 784-{'-'.join(map(str, hidden))}-10, D = {n_params:,}, batch {args.batch}, "
          f"{torch.get_num_threads()} threads, median of {args.steps} steps")
    direct = step_ms(mlp(hidden).train(), x, y, args.steps)
    print(f"{'projection':<14}{'d':>8}{'step ms':>12}{'vs direct':>11}")
    print(f"{'direct':<14}{'-':>8}{direct:>12.1f}{1.0:>10.1f}x")
    for projection in args.projections.split(","):
        for d in (int(v) for v in args.dims.split(",")):
            policy = {"version": 1, "seed": 0, "rules": [{"match": {"types": ["Linear"]}, "subspace": {
                "dim": d, "projection": projection, "scope": "global"}}]}
            gm = seedrand.rewrite(base, policy, (x[:2],)).train()
            ms = step_ms(gm, x, y, args.steps)
            print(f"{projection:<14}{d:>8}{ms:>12.1f}{ms / direct:>10.1f}x", flush=True)


if __name__ == "__main__":
    main()
