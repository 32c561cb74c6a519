"""Regenerate-and-multiply against multiply-by-a-stored-weight.

CUDA (when a GPU is present): ``seedrand::regen_matmul`` (weight tiles generated in registers, or in chunks of rows)
against ``torch.nn.functional.linear`` with a stored weight, for M in {1, 16, 256, 4096} and K = N in
{1024, 4096, 8192}, float16 and float32 (full precision, torch's default): time (ms, CUDA events via
``triton.testing.do_bench``), TFLOP/s (2 M N K / time), GB/s (bytes moved: x, y and, for the stored weight, W) and
the time ratio; both paths of the op at every M (it runs the fused kernel up to ``FUSED_MAX_ROWS`` rows, the
blockwise product above, a choice made from a count of issue rates that these figures test): the fused kernel with
the split-K slices it chose and without them, and the blockwise product (chunks of rows by the Triton fill, cuBLAS);
and ``seedrand::frozen_matmul`` for a ``freeze_fraction`` layer with 90% of its filters frozen (10% of the rows
loaded, the rest generated). Then ``P.T @ g`` of a subspace layer (the gradient of ``theta_d``: ``d`` outputs,
each a sum over ``D`` rows) against a stored ``P``, with and without split-K.

CPU (always): regeneration throughput of the numba Philox (G values/s, median and best of many 4 MiB blocks, the
path ``regen_matmul`` takes; beside it, the kernel alone writing into one preallocated block: the gap is Python, the
allocation and its first touch) and one training step (forward, backward, no weight gradient) of a 4096 x 4096
layer at batch 256: regenerated (``random``) against stored and frozen, and the same layer with ``freeze_fraction``
0.9 (``seedrand::frozen_matmul``; the gradient of its trainable 10%).

Run: python benchmarks/regen_matmul.py [--cpu-only]
"""

import argparse
import itertools
import statistics
import time

import numpy as np
import torch
import torch.nn as nn

import seedrand
from seedrand.kernels import cpu_philox
from seedrand.kernels.init import sample
from seedrand.kernels.ops import DEFAULT_CHUNK_BYTES, frozen_matmul, regen_matmul
from seedrand.passes.regenerated import Regenerating


def cuda_table() -> None:
    import triton.testing

    from seedrand.kernels.ops import FUSED_MAX_ROWS, regen_matmul_reference
    from seedrand.kernels.projection import subspace_project
    from seedrand.kernels.triton_regen import _sms, split_k, triton_project, triton_regen_matmul

    sms = _sms(torch.device("cuda"))
    print(f"regen_matmul runs the fused kernel up to {FUSED_MAX_ROWS} rows (M), the blockwise product above")
    print(f"{'dtype':>9}{'M':>6}{'K=N':>7}{'stored ms':>11}{'regen ms':>10}{'stored TFLOP/s':>16}"
          f"{'regen TFLOP/s':>15}{'stored GB/s':>13}{'regen GB/s':>12}{'regen/stored':>14}{'fused ms':>10}"
          f"{'slices':>8}{'1 slice ms':>12}{'blockwise ms':>14}{'ff90 ms':>9}{'ff90/stored':>13}")
    for dtype, kn in itertools.product((torch.float16, torch.float32), (1024, 4096, 8192)):
        w = torch.randn(kn, kn, device="cuda", dtype=dtype) * 0.01
        trained = torch.arange(0, kn, 10, device="cuda")  # every tenth filter trains
        source = torch.full((kn,), -1, device="cuda")
        source[trained] = torch.arange(len(trained), device="cuda")
        trainable = w[trained]
        size = w.element_size()
        for m in (1, 16, 256, 4096):
            x = torch.randn(m, kn, device="cuda", dtype=dtype)
            args = (7, kn, kn, 0.01, False, False)
            stored = triton.testing.do_bench(lambda: torch.nn.functional.linear(x, w))
            regen = triton.testing.do_bench(lambda: regen_matmul(x, *args, DEFAULT_CHUNK_BYTES))
            # both paths of the op at every M: the fused kernel with and without split-K, and the blockwise product
            fused = triton.testing.do_bench(lambda: triton_regen_matmul(x, *args))
            unsplit = triton.testing.do_bench(lambda: triton_regen_matmul(x, *args, 1))
            blockwise = triton.testing.do_bench(lambda: regen_matmul_reference(x, *args, DEFAULT_CHUNK_BYTES))
            frozen = triton.testing.do_bench(lambda: frozen_matmul(x, trainable, source, trained, 0, 7, 0.01,
                                                                   "uniform", False))
            flops, io = 2 * m * kn * kn, size * (2 * m * kn)
            print(f"{str(dtype)[6:]:>9}{m:>6}{kn:>7}{stored:>11.3f}{regen:>10.3f}{flops / stored / 1e9:>16.2f}"
                  f"{flops / regen / 1e9:>15.2f}{(io + size * kn * kn) / stored / 1e6:>13.1f}"
                  f"{io / regen / 1e6:>12.1f}{regen / stored:>14.2f}{fused:>10.3f}{split_k(m, kn, kn, sms):>8}"
                  f"{unsplit:>12.3f}{blockwise:>14.3f}{frozen:>9.3f}{frozen / stored:>13.2f}")
    print("\nsubspace P.T @ g (float32; P: D x d Gaussian, generated; stored: P in memory, torch.mv)")
    print(f"{'D':>10}{'d':>6}{'stored ms':>11}{'regen ms':>10}{'slices':>8}{'1 slice ms':>12}")
    for big, d in ((1 << 20, 1000), (1 << 24, 100)):
        g = torch.randn(big, device="cuda")
        p = torch.randn(big, d, device="cuda") / big ** 0.5
        stored = triton.testing.do_bench(lambda: torch.mv(p.T, g))
        del p
        regen = triton.testing.do_bench(lambda: subspace_project(g, 3, big, d, "gaussian", 0.0, True, 2**20))
        unsplit = triton.testing.do_bench(lambda: triton_project(g, 3, big, d, "gaussian", 0.0, True, 1))
        print(f"{big:>10}{d:>6}{stored:>11.3f}{regen:>10.3f}{split_k(1, d, big, sms):>8}{unsplit:>12.3f}")


def step_ms(models: list[nn.Module], x: torch.Tensor, rounds: int = 8) -> list[float]:
    """Median time (ms) of one training step (forward, backward) of each model, measured in alternation so that
    both see the same machine load; one untimed warm-up step each."""
    times = [[] for _ in models]
    for r in range(rounds + 1):
        for model, t in zip(models, times):
            start = time.perf_counter()
            model(x).square().mean().backward()
            t.append(time.perf_counter() - start)
    return [1e3 * statistics.median(t[1:]) for t in times]


def best_ms(fn, repeats: int = 5) -> float:
    """The shortest of ``repeats`` timed calls of ``fn`` (ms), after one untimed call (kernel compilation/loading)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def block_rates(fns: dict, values: int, rounds: int = 300) -> dict:
    """``{name: (median, best)}`` G values/s of each zero-argument ``fn`` producing ``values`` values, called in
    alternation (so that all see the same machine load; this VM's speed drifts by 20-30% within minutes) after one
    untimed call each."""
    times = {name: [] for name in fns}
    for name, fn in fns.items():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: (values / statistics.median(t) / 1e9, values / min(t) / 1e9) for name, t in times.items()}


def cpu_figures() -> None:
    chunk = DEFAULT_CHUNK_BYTES // 4
    keys, out = cpu_philox._round_keys(3), np.empty(chunk, np.float32)
    params = np.float32(2 * cpu_philox._TO_UNIT), np.float32(-1.0), np.float32(0.1)
    blocks = iter(range(1 << 40))  # a new counter range per call, as the blocks of a weight
    rates = block_rates({
        "sample": lambda: sample(3, (chunk,), "uniform", 0.1, start=chunk * next(blocks)),
        "kernel": lambda: cpu_philox._uniform_blocks(keys, np.int64(0), out, *params)}, chunk)
    (median, best), (kernel_median, kernel_best) = rates["sample"], rates["kernel"]
    print(f"CPU regeneration (U(-a, a), float32, {DEFAULT_CHUNK_BYTES >> 20} MiB blocks, {torch.get_num_threads()} "
          f"threads): median {median:.3f}, best {best:.3f} G values/s (target 2); the kernel alone into a "
          f"preallocated block: median {kernel_median:.3f}, best {kernel_best:.3f}")
    x = torch.randn(256, 4096, requires_grad=True)
    layer = lambda: nn.Sequential(nn.Linear(4096, 4096))  # noqa: E731
    stored = seedrand.rewrite(layer(), {"version": 1, "rules": [{"match": {"modules": ["0"]}, "freeze": {}}]})
    regen = seedrand.rewrite(layer(), {"version": 1, "rules": [{"match": {"modules": ["0"]}, "random": {}}]})
    fraction = seedrand.rewrite(layer(), {"version": 1, "rules": [{"match": {"modules": ["0"]}, "freeze_fraction": {
        "fraction": 0.9, "select": "random"}}]})
    s, r, f = step_ms([stored, regen, fraction], x)
    print(f"training step, 4096 x 4096 layer, batch 256: stored {s:.1f} ms, regenerated {r:.1f} ms, "
          f"ratio {r / s:.2f}x (target 1.3x); freeze_fraction 0.9 (frozen rows regenerated, 10% trained) "
          f"{f:.1f} ms, {f / s:.2f}x")
    frozen = fraction.get_submodule("0").weight
    ranged = best_ms(lambda: frozen.regenerate("frozen"))
    gathered = best_ms(lambda: Regenerating.regenerate(frozen, "frozen"))
    print(f"its frozen slice (90% of 4096 x 4096), best of 5: cut from one counter range {ranged:.1f} ms, from "
          f"its gathered counters {gathered:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-only", action="store_true")
    args = parser.parse_args()
    if torch.cuda.is_available() and not args.cpu_only:
        cuda_table()
    else:
        print("no GPU: the CUDA table is skipped")
    cpu_figures()


if __name__ == "__main__":
    main()
