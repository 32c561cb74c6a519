"""Parameters, FLOPs and inference time of gated models before and after ``seedrand.collect_garbage``.

For each model (a VGG-style CNN and a ResNet-style CNN, 32x32 inputs, and an MLP), filter gates go after every
Linear/Conv, a fraction of each gate's channels is killed (``seedrand.testing.kill_gates``), and garbage is
collected. Inference time is the median over ``--repeats`` eval-mode forwards of a batch (seconds, no grad, the same
threads before and after); FLOPs are ``torch.utils.flop_counter`` counts of one forward on the example inputs.

Run: python benchmarks/garbage_collection.py [--kill 0.5] [--batch 64] [--repeats 20]
"""

import argparse
import statistics
import time

import torch
import torch.nn as nn
from rich.console import Console
from rich.table import Table

import seedrand
from seedrand.testing import kill_gates


def conv_bn(cin, cout, stride=1):
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


def vgg() -> nn.Module:
    layers, cin = [], 3
    for cout in (64, 64, "M", 128, 128, "M", 256, 256, "M"):
        layers += [nn.MaxPool2d(2)] if cout == "M" else conv_bn(cin, cout)
        cin = cout if cout != "M" else cin
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(256 * 4 * 4, 512), nn.ReLU(), nn.Linear(512, 10))


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.body = nn.Sequential(*conv_bn(cin, cout, stride), nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(cout))
        self.shortcut = nn.Sequential() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return torch.relu(self.body(x) + self.shortcut(x))


def resnet() -> nn.Module:
    return nn.Sequential(*conv_bn(3, 64), Block(64, 64, 1), Block(64, 64, 1), Block(64, 128, 2), Block(128, 128, 1),
                         Block(128, 256, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 10))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10))


MODELS = {"VGG-style CNN": (vgg, (3, 32, 32)), "ResNet-style CNN": (resnet, (3, 32, 32)), "MLP": (mlp, (784,))}


def seconds(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    with torch.no_grad():
        model(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kill", type=float, default=0.5, help="probability that a gate channel is killed")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    table = Table(title=f"collect_garbage, {args.kill:.0%} of gate channels killed, batch {args.batch}, "
                        f"{torch.get_num_threads()} threads")
    for col in ("model", "parameters before", "after", "FLOPs after / before", "time before (ms)", "after (ms)",
                "time after / before"):
        table.add_column(col, justify="right")
    for name, (build, shape) in MODELS.items():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = build().eval()
        x = torch.randn(args.batch, *shape, generator=torch.Generator().manual_seed(0))
        gm = seedrand.rewrite(model, {"version": 1, "rules": [{"match": {"types": ["Linear", "Conv2d"]}, "optional": True,
                                                "filter_gates": {}}]},
                              (x[:2],)).eval()
        kill_gates(gm, args.kill)
        before = seconds(gm, x, args.repeats)
        report = seedrand.collect_garbage(gm)
        after = seconds(gm, x, args.repeats)
        table.add_row(name, f"{report.parameters_before:,}", f"{report.parameters_after:,}",
                      f"{report.flops_after / report.flops_before:.3f}", f"{1e3 * before:.2f}", f"{1e3 * after:.2f}",
                      f"{after / before:.3f}")
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
