"""Compile every Triton kernel variant seedrand launches for a CUDA architecture, ahead of time and without a GPU.

The interpreter (``TRITON_INTERPRET=1``), which tests the kernels on machines without a GPU, runs them as Python and
accepts programs the compiler rejects (for example a ``return`` of another type in a ``constexpr`` branch that is
not taken). Triton also compiles for a target given by hand, ``GPUTarget("cuda", arch, 32)``, through its IRs to
PTX and, with its bundled ``ptxas``, to a cubin, with no driver or device; so each kernel is compiled here with each
combination of ``constexpr`` flags, pointer dtypes and scalar types that the launchers in
:mod:`seedrand.kernels.triton_regen` and :mod:`seedrand.kernels.triton_philox` use, and with each autotuning
configuration. This checks that the kernels build (layouts of ``tl.join``/``tl.reshape``/``tl.trans``, ``tl.dot``
operand types, register and shared-memory limits), not what they compute: that is the interpreter tests' job, and on
a GPU ``tests/test_triton_regen.py::test_cuda_ops_match_cpu``'s.

Run ``python -m seedrand.kernels.triton_aot [--arch 90]`` with the interpreter off: it prints one line per failure
and a count, and exits 1 if any variant fails to compile.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import NamedTuple

__all__ = ["Variant", "variants", "build", "compile_variant", "main"]

_FLOATS = ("fp32", "fp16", "bf16")
# the launchers' scalar arguments: Triton types a Python int as i32, i64 or u64 by its value (a Philox key spans
# [0, 2**64)), a Python float as fp32
_MATMUL_SCALARS = ("M", "N", "K", "K_SPLIT", "stride_xm", "stride_xk", "stride_ys", "stride_ym", "stride_yn",
                   "stride_t0", "stride_t1")


class Variant(NamedTuple):
    """One compilation: ``kernel`` (an attribute name of ``module``), its argument types (Triton's strings:
    ``"*fp16"``, ``"i64"``, ``"constexpr"``), ``constexprs`` values and launch options."""

    name: str
    module: str
    kernel: str
    signature: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3


def _matmul(dtype: str, dist: int, transpose: bool, aligned: bool, trained_dim: int, seed: str = "i64",
            trainable: str | None = None, block: tuple[int, int, int, int, int] = (64, 64, 32, 4, 3),
            partial: bool = False, tf32: bool = False) -> Variant:
    m, n, k, warps, stages = block
    flags = {"DIST": dist, "TRANSPOSE": transpose, "ALIGNED": aligned, "TRAINED_DIM": trained_dim, "SPLIT": partial,
             "UPCAST": False, "PRECISION": "tf32" if tf32 else "ieee", "BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}
    frozen = trained_dim >= 0  # without a trainable slice the launcher passes x for both pointers
    # split-K launches (SPLIT) write float32 partial sums whatever x's dtype
    signature = {"x_ptr": f"*{dtype}", "y_ptr": "*fp32" if partial else f"*{dtype}",
                 "t_ptr": f"*{trainable or dtype}",
                 "src_ptr": "*i64" if frozen else f"*{dtype}", **dict.fromkeys(_MATMUL_SCALARS, "i32"),
                 "seed": seed, "scale": "fp32", "lo": "fp32", "hi": "fp32", **dict.fromkeys(flags, "constexpr")}
    name = (f"matmul {dtype} DIST={dist} TRANSPOSE={transpose:d} ALIGNED={aligned:d} TRAINED_DIM={trained_dim}"
            + (f" trainable {trainable}" if trainable else "") + (f" seed {seed}" if seed != "i64" else "")
            + (" partial fp32" if partial else "") + (" tf32" if tf32 else "")
            + f" blocks {m}x{n}x{k} warps {warps} stages {stages}")
    return Variant(name, "seedrand.kernels.triton_regen", "_regen_matmul_kernel", signature, flags, warps, stages)


def variants() -> list[Variant]:
    """The variants the launchers can ask for: ``regen_matmul`` (uniform, normal), ``frozen_matmul`` (zero, uniform,
    normal; trainable rows or columns, of the input's dtype or float32), ``subspace_project`` (normal, ternary;
    float32), each both directions, aligned or not, in float32/float16/bfloat16 where the op takes them; a sample
    of them split-K (float32 partial sums); float32 in TF32; every autotuning configuration of 16-bit, float32
    and TF32 inputs once; the weight fill (``regen_conv``) and Triton's Philox fill."""
    from .triton_regen import _CONFIGS, _FP32_CONFIGS

    out = []
    for dtype, transpose, aligned in itertools.product(_FLOATS, (False, True), (False, True)):
        out += [_matmul(dtype, dist, transpose, aligned, -1) for dist in (1, 2)]
        out += [_matmul(dtype, dist, transpose, aligned, dim) for dist in (0, 1, 2) for dim in (0, 1)]
        if dtype == "fp32":
            out += [_matmul(dtype, dist, transpose, aligned, -1) for dist in (2, 3)]
        # split-K (small batches, P.T @ g): the loop bounds and output differ, not the tiles; a sample of the above
        out += [_matmul(dtype, dist, transpose, aligned, dim, partial=True)
                for dist, dim in ((1, -1), (2, -1), (1, 0), (2, 1)) + (((3, -1),) if dtype == "fp32" else ())]
    out += [_matmul("fp16", 1, False, True, 0, trainable="fp32")]
    out += [_matmul("fp16", 1, False, True, -1, seed=seed) for seed in ("i32", "u64")]
    for dtype, tf32, configs in (("fp16", False, _CONFIGS), ("fp32", False, _FP32_CONFIGS), ("fp32", True, _CONFIGS)):
        for config in configs:
            block = (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"], config.num_warps,
                     config.num_stages)
            out += [_matmul(dtype, 1, transpose, True, -1, block=block, tf32=tf32) for transpose in (False, True)]
    # float32 in TF32 (torch.set_float32_matmul_precision("high")): the tensor-core tiles, as float16
    for transpose, aligned in itertools.product((False, True), (False, True)):
        out += [_matmul("fp32", dist, transpose, aligned, dim, tf32=True) for dist in (1, 2) for dim in (-1, 0, 1)]
        out += [_matmul("fp32", dist, transpose, aligned, -1, tf32=True, partial=True) for dist in (1, 3)]
    for dtype, dist, aligned, start in itertools.product(_FLOATS, (1, 2), (False, True), ("i32", "i64")):
        signature = {"out_ptr": f"*{dtype}", "n": "i32", "start": start, "seed": "i64", "scale": "fp32",
                     "DIST": "constexpr", "ALIGNED": "constexpr", "BLOCK": "constexpr"}
        out.append(Variant(f"fill {dtype} DIST={dist} ALIGNED={aligned:d} start {start}",
                           "seedrand.kernels.triton_regen", "_fill_kernel", signature,
                           {"DIST": dist, "ALIGNED": aligned, "BLOCK": 1024}))
    for kind in range(3):
        signature = {"out_ptr": "*i64" if kind == 0 else "*fp32", "offsets_ptr": "*i64", "n": "i32", "seed": "i64",
                     "KIND": "constexpr", "BLOCK": "constexpr"}
        out.append(Variant(f"philox fill KIND={kind}", "seedrand.kernels.triton_philox", "_fill_kernel", signature,
                           {"KIND": kind, "BLOCK": 1024}))
    return list({variant.name: variant for variant in out}.values())  # an autotuning config may be the default


def _require_compiler() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compiling Triton kernels needs the interpreter off: unset TRITON_INTERPRET")


def build(variant: Variant, arch: int):
    """Compile ``variant`` for ``sm_<arch>`` down to a cubin: Triton's ``CompiledKernel`` (``asm``: the ``ttir``,
    ``ttgir``, ``llir``, ``ptx`` and ``cubin`` texts and bytes; ``metadata.shared``: bytes of shared memory).

    Raises:
        RuntimeError: ``TRITON_INTERPRET=1`` is set (kernels are then Python functions, not compilable).
        triton.CompilationError and others: what the compiler raises.
    """
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    _require_compiler()
    fn = getattr(importlib.import_module(variant.module), variant.kernel)
    options = {"num_warps": variant.num_warps, "num_stages": variant.num_stages, "enable_fp_fusion": False}
    return triton.compile(ASTSource(fn, variant.signature, variant.constexprs), target=GPUTarget("cuda", arch, 32),
                          options=options)


def compile_variant(variant: Variant, arch: int) -> str | None:
    """:func:`build` ``variant``; the compiler's error (its root cause) or ``None``.

    Raises:
        RuntimeError: ``TRITON_INTERPRET=1`` is set.
    """
    _require_compiler()
    try:
        build(variant, arch)
    except Exception as error:  # noqa: BLE001 - any compiler failure is the finding
        while error.__cause__ or error.__context__:  # the root cause: outer CompilationErrors only point at calls
            error = error.__cause__ or error.__context__
        return f"{type(error).__name__}: {str(error).strip()[:500]}"
    return None


def _compile(args: tuple[Variant, int]) -> tuple[str, str | None]:
    return args[0].name, compile_variant(*args)


def main(argv: list[str] | None = None) -> int:
    """Compile :func:`variants` for ``--arch`` (default 90, Hopper) on all CPU cores; print failures and a count.
    Returns the exit status: 0 if every variant compiled, 1 otherwise."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability as an integer: 80, 90, ...")
    args = parser.parse_args(argv)
    todo = [(variant, args.arch) for variant in variants()]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        failures = [(name, error) for name, error in pool.map(_compile, todo) if error]
    for name, error in failures:
        print(f"FAILED {name}: {error}")
    print(f"sm_{args.arch}: {len(todo) - len(failures)} of {len(todo)} kernel variants compiled")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
