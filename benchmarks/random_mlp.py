"""Peak memory and step time of training an MLP 784-4096-4096-4096-10 whose hidden layers are `random`
(regenerated, never stored) against the same model with those layers frozen but stored, and with 90% of their
filters frozen by `freeze_fraction` (the frozen rows regenerated, ``seedrand::frozen_matmul``).

Each variant runs in its own process. Peak memory is the process's resident set size (RSS, bytes), sampled every
millisecond during the timed training steps (forward, backward, Adam step), minus the RSS right after imports: it
includes the stored weights. Memory is measured in a separate run whose large allocations return their pages when freed
(``MALLOC_MMAP_THRESHOLD_``), so RSS follows live tensors; time in a run with the default allocator. Step time is the median over the timed steps (seconds).

Run: python benchmarks/random_mlp.py [--batch 256] [--steps 5]
"""

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch
import torch.nn as nn

WIDTHS = (784, 4096, 4096, 4096, 10)
PAGE = 4096
# glibc otherwise keeps freed multi-MiB blocks in its heap after raising its mmap threshold, so RSS would show
# allocator caching rather than live tensors; a fixed threshold returns every large tensor's pages when freed
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
VARIANTS = ("stored", "seedrand", "freeze_fraction")


def rss_bytes() -> int:
    """Resident set size of this process, bytes (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakSampler(threading.Thread):
    """Samples RSS every millisecond until stopped; ``peak`` is the largest sample (bytes)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.running = rss_bytes(), True

    def run(self):
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)


def build(variant: str) -> nn.Module:
    import seedrand

    layers = []
    for i, (a, b) in enumerate(zip(WIDTHS, WIDTHS[1:])):
        layers += [nn.Linear(a, b), nn.ReLU()] if i < len(WIDTHS) - 2 else [nn.Linear(a, b)]
    model = nn.Sequential(*layers)
    hidden = {"modules": ["0", "2", "4"]}
    action = {"seedrand": {"random": {"bias": "trainable"}}, "stored": {"freeze": {}},
              "freeze_fraction": {"freeze_fraction": {"fraction": 0.9, "select": "random"}}}[variant]
    gm = seedrand.rewrite(model, {"version": 1, "rules": [{"match": hidden, **action}]})
    if variant == "stored":  # freeze only the weights; biases train in both variants
        for name in ("0", "2", "4"):
            gm.get_parameter(f"{name}.bias").requires_grad_(True)
    return gm


def run_variant(variant: str, batch: int, steps: int) -> dict:
    import transformers.pytorch_utils  # noqa: F401 - seedrand's Linear pass imports it; keep it out of the peak

    from seedrand.kernels.init import sample

    sample(0, (1,), "uniform", 1.0)  # loads the compiled CPU Philox (LLVM, threads): code, not tensors; keep it out
    torch.manual_seed(0)
    baseline = rss_bytes()
    model = build(variant)
    gc.collect()
    x, y = torch.randn(batch, WIDTHS[0]), torch.randint(0, WIDTHS[-1], (batch,))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step():
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    step()  # warm-up: allocates Adam state
    sampler = PeakSampler()
    sampler.start()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    sampler.running = False
    sampler.join()
    stored = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return {"variant": variant, "peak_bytes": sampler.peak - baseline, "step_seconds": statistics.median(times),
            "stored_bytes": stored}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.batch, args.steps)))
        return
    results = {}
    for variant in VARIANTS:
        def measure(steps: int, env: dict) -> dict:
            out = subprocess.run([sys.executable, __file__, "--variant", variant, "--batch", str(args.batch),
                                  "--steps", str(steps)], capture_output=True, text=True, check=True,
                                 env={**os.environ, **env}).stdout
            return json.loads(out.strip().splitlines()[-1])

        # memory with pages returned on free (one step suffices: every step allocates the same); time without
        results[variant] = {**measure(args.steps, {}), "peak_bytes": measure(1, MALLOC_ENV)["peak_bytes"]}
    random_weight_bytes = 4 * sum(a * b for a, b in zip(WIDTHS[:3], WIDTHS[1:4]))
    s, r, f = results["stored"], results["seedrand"], results["freeze_fraction"]
    mib = 2**20
    print(f"MLP {'-'.join(map(str, WIDTHS))}, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"median of {args.steps} steps")
    print(f"{'variant':<16}{'stored MiB':>12}{'peak MiB':>12}{'step ms':>10}")
    for v in (s, r, f):
        print(f"{v['variant']:<16}{v['stored_bytes'] / mib:>12.1f}{v['peak_bytes'] / mib:>12.1f}"
              f"{v['step_seconds'] * 1e3:>10.1f}")
    saved = s["peak_bytes"] - r["peak_bytes"]
    print(f"random layers' weight bytes: {random_weight_bytes / mib:.1f} MiB; peak saved: {saved / mib:.1f} MiB "
          f"({saved / random_weight_bytes:.1%} of them; target >= 95%)")
    print(f"step time ratio seedrand / stored: {r['step_seconds'] / s['step_seconds']:.2f}x (kernels target 1.3x); "
          f"freeze_fraction / stored: {f['step_seconds'] / s['step_seconds']:.2f}x")


if __name__ == "__main__":
    main()
