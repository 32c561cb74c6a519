"""Registers, spills and shared memory of seedrand's Triton kernels on a GPU architecture, without a GPU.

Each kernel variant of :func:`seedrand.kernels.triton_aot.variants` is compiled ahead of time for ``sm_<arch>`` and
its cubin read by the ``cuobjdump`` that ships with Triton: registers per thread (255 at most; 65,536 per SM, so
``registers x 32 x warps`` bounds the programs resident on an SM), spill stores per thread (bytes, reported by the
``ptxas -v`` that Triton uses for the arch; to keep at 0), declared local memory, stack (bytes: spilled registers
and calls such as libdevice's ``sin``/``cos``) and Triton's shared memory per program (bytes, its pipelined ``x``
tiles). Generating a weight tile costs registers where loading one costs shared memory: this is the
figure to watch when changing the kernels or the autotuning configurations, and the only one this project can
measure while no GPU is lent.

Run (the interpreter must be off): python benchmarks/triton_resources.py [--arch 90] [--all]
(by default the float16 and float32 variants, each autotuning configuration among them; ``--all`` adds bfloat16)
"""

import argparse
import os
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor

import triton
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

from seedrand.kernels.triton_aot import Variant, build, variants

_CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def usage(job: tuple[Variant, int]) -> tuple[str, dict]:
    """``(name, {"REG", "LOCAL", "STACK", "SPILL": ints, "shared": bytes})`` of one variant compiled for one arch
    (``SPILL``: bytes of spill stores per thread, from ``ptxas -v`` on the variant's PTX, with the ptxas Triton
    uses for that arch)."""
    variant, arch = job
    kernel = build(variant, arch)
    with tempfile.TemporaryDirectory() as tmp:
        cubin, ptx = os.path.join(tmp, "kernel.cubin"), os.path.join(tmp, "kernel.ptx")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        dump = subprocess.run([_CUOBJDUMP, "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
        report = subprocess.run([get_ptxas(arch).path, "-v", "--gpu-name", sm_arch_from_capability(arch), ptx, "-o",
                                 os.path.join(tmp, "ptxas.cubin")], capture_output=True, text=True, check=True)
    figures = {key: int(value) for key, value in re.findall(r"(REG|LOCAL|STACK):(\d+)", dump)}
    spill = re.search(r"(\d+) bytes spill stores", report.stdout + report.stderr)
    return variant.name, {**figures, "SPILL": int(spill.group(1)), "shared": kernel.metadata.shared}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability as an integer (90: H100/H200)")
    parser.add_argument("--all", action="store_true", help="every variant, bfloat16 ones too")
    args = parser.parse_args()
    chosen = [v for v in variants() if args.all or v.signature.get("x_ptr", "*fp16") in ("*fp16", "*fp32")]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        rows = list(pool.map(usage, [(v, args.arch) for v in chosen]))
    width = max(len(name) for name, _ in rows)
    print(f"sm_{args.arch}, Triton {triton.__version__}")
    print(f"{'variant':<{width}}{'registers':>11}{'spill B':>9}{'local B':>9}{'stack B':>9}{'shared B':>10}")
    for name, u in rows:
        print(f"{name:<{width}}{u['REG']:>11}{u['SPILL']:>9}{u['LOCAL']:>9}{u['STACK']:>9}{u['shared']:>10}")


if __name__ == "__main__":
    main()
