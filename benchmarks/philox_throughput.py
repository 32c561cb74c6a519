"""Throughput (values/s) of seedrand's Philox on this machine's CPU: the numba path that ``philox.rand``/``randn``/
``randint`` take for CPU tensors, the pure-torch reference (what ``torch.compile`` tracing and ONNX export see), and
torch.rand/torch.randn for scale. The first call of each (numba compilation) is not timed.

Run: python benchmarks/philox_throughput.py [--n 4194304] [--repeat 3]
"""

import argparse
import time
from unittest import mock

import torch

from seedrand.kernels import cpu_philox, philox


def best_seconds(fn, repeat: int) -> float:
    """Best wall time of ``repeat`` calls, seconds."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def reference_randn(elements: range) -> torch.Tensor:
    """``philox.randn`` with Box-Muller in torch ops on numba uniforms: what the CPU path ran before its vectorized
    Box-Muller (``randn`` is refused the numba path, the ``rand`` it calls is not)."""
    with mock.patch.object(cpu_philox, "usable", side_effect=[False, True]):
        return philox.randn(1234, elements)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1 << 22)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    offsets = torch.arange(args.n, dtype=torch.int64)
    generator = torch.Generator().manual_seed(0)
    rows = [
        ("philox.rand (numba)", lambda: philox.rand(1234, offsets)),
        ("philox.rand (numba, range)", lambda: philox.rand(1234, range(args.n))),
        ("philox.randn (numba)", lambda: philox.randn(1234, offsets)),
        ("philox.randn (numba, range)", lambda: philox.randn(1234, range(args.n))),
        ("randn, torch Box-Muller (range)", lambda: reference_randn(range(args.n))),
        ("philox.randint (numba)", lambda: philox.randint(1234, offsets)),
        ("torch reference rand", lambda: philox._uint32_to_uniform(philox._words(1234, offsets))),
        ("torch reference rand (range)", lambda: philox._uint32_to_uniform(philox._words(1234, range(args.n)))),
        ("torch.rand", lambda: torch.rand(args.n, generator=generator)),
        ("torch.randn", lambda: torch.randn(args.n, generator=generator)),
    ]
    print(f"{'generator':<32}{'G values/s':>12}   (n = {args.n:,}, {torch.get_num_threads()} threads)")
    speed = {}
    for name, fn in rows:
        fn()
        speed[name] = args.n / best_seconds(fn, args.repeat) / 1e9
        print(f"{name:<32}{speed[name]:>12.3f}")
    print(f"philox.randn / torch.randn: range {speed['philox.randn (numba, range)'] / speed['torch.randn']:.2f}x, "
          f"offsets {speed['philox.randn (numba)'] / speed['torch.randn']:.2f}x")


if __name__ == "__main__":
    main()
