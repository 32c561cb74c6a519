"""Triton kernels that regenerate weight tiles in registers (paper 000: a regenerated weight costs no memory
traffic): a matmul with a weight that is never loaded, and a fill for the weights of convolutions.

* :func:`triton_regen_matmul` computes ``x @ W.T`` (``transpose=False``) or ``x @ W`` (``transpose=True``) for the
  ``(out_features, in_features)`` weight ``W[o, i] = U(-scale, scale)`` or ``N(0, scale**2)`` at stream element
  ``o * in_features + i``, the same tensor as :func:`seedrand.kernels.init.sample`. Each program owns a
  ``BLOCK_M x BLOCK_N`` output tile and walks the reduction in ``BLOCK_K`` steps: it loads the ``x`` tile and
  generates the weight tile with ``tl.rand4x``/``tl.randn4x`` instead of loading it; products accumulate in float32 and
  the result is stored in ``x``'s dtype. Backward (``dx = dy @ W``) is the same kernel with ``transpose`` flipped;
  ``dW`` is never needed. Any leading batch shape (flattened) and strides of ``x`` are handled; block sizes are
  autotuned on GPUs.
* :func:`triton_regen_weight` writes the weight itself (for the vendor convolution, forward and backward).

These are the CUDA kernels of the custom ops ``seedrand::regen_matmul`` and ``seedrand::regen_conv``
(:mod:`seedrand.kernels.ops`); their torch references are the CPU implementations of those ops. Without a GPU they
run on CPU tensors under ``TRITON_INTERPRET=1`` (set before ``triton`` is imported), which is how they are tested.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .triton_philox import stream_element

__all__ = ["triton_regen_matmul", "triton_regen_weight"]

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _weight(seed, counters, scale, NORMAL: tl.constexpr):
    """Weight values at stream elements ``counters``, in float32: ``(2 u - 1) * scale`` or ``n * scale`` (the
    roundings of the torch reference; launches disable FMA contraction so that ``2 u - 1`` is rounded as there)."""
    if NORMAL:
        return stream_element(seed, counters, 2) * scale
    return (2.0 * stream_element(seed, counters, 1) - 1.0) * scale


@triton.jit
def _regen_matmul_kernel(x_ptr, y_ptr, M, N, K, stride_xm, stride_xk, stride_ym, stride_yn, seed, scale,
                         NORMAL: tl.constexpr, TRANSPOSE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # y[m, n] = sum_k x[m, k] * Wt[k, n] with Wt = W.T (counter n * K + k) or, transposed, W (counter k * N + n)
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        if TRANSPOSE:
            counters = rk[:, None].to(tl.int64) * N + rn[None, :]
        else:
            counters = rn[None, :].to(tl.int64) * K + rk[:, None]
        w = _weight(seed, counters, scale, NORMAL)
        w = tl.where((rk[:, None] < K) & (rn[None, :] < N), w, 0.0)
        if UPCAST or x.dtype == tl.float32:  # full float32 products, as torch's matmul (no TF32)
            acc = tl.dot(x.to(tl.float32), w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in [(16, 64, 64, 4, 3), (64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3),
                                  (128, 128, 32, 8, 3), (128, 256, 32, 8, 3)]]
_regen_matmul_tuned = triton.autotune(configs=_CONFIGS, key=["M", "N", "K", "TRANSPOSE"])(_regen_matmul_kernel)


@triton.jit
def _fill_kernel(out_ptr, n, start, seed, scale, NORMAL: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    w = _weight(seed, start + idx, scale, NORMAL)
    tl.store(out_ptr + idx, w.to(out_ptr.dtype.element_ty), mask=idx < n)


def _options() -> dict:
    # the interpreter neither benchmarks (autotune) nor takes compiler options
    return {} if _INTERPRETED else {"enable_fp_fusion": False}


def triton_regen_matmul(x: torch.Tensor, seed: int, out_features: int, in_features: int, scale: float,
                        normal: bool, transpose: bool) -> torch.Tensor:
    """``x @ W.T`` (or ``x @ W`` with ``transpose``) with ``W`` regenerated in registers (see the module docstring).

    Args:
        x: ``(..., in_features)`` (``(..., out_features)`` with ``transpose``), float32, float16 or bfloat16; CUDA,
            or CPU under ``TRITON_INTERPRET=1``; any strides.
        seed: the weight's Philox key, in ``[0, 2**63)``.
        out_features, in_features: the weight's shape.
        scale: uniform bound or normal standard deviation.
        normal: normal instead of uniform.
        transpose: multiply by ``W`` instead of ``W.T``.

    Returns:
        ``(..., out_features)`` (``(..., in_features)``), ``x``'s dtype and device; accumulated in float32.

    Raises:
        ValueError: ``x``'s last dimension does not fit the weight, or its dtype is not float32/float16/bfloat16.
    """
    k, n = (out_features, in_features) if transpose else (in_features, out_features)
    if x.shape[-1] != k:
        raise ValueError(f"triton_regen_matmul: x has last dimension {x.shape[-1]}, the weight needs {k}")
    if x.dtype not in _TL_DTYPES:
        raise ValueError(f"triton_regen_matmul: dtype {x.dtype} is not float32, float16 or bfloat16")
    x2 = x.reshape(-1, k)
    y = torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device)
    args = (x2, y, x2.shape[0], n, k, x2.stride(0), x2.stride(1), y.stride(0), y.stride(1), seed, scale)
    if _INTERPRETED:
        blocks = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}
        grid = (triton.cdiv(x2.shape[0], 16), triton.cdiv(n, 32))
        # the interpreter's dot is wrong for bfloat16 (numpy has no such type): multiply in float32 there
        _regen_matmul_kernel[grid](*args, NORMAL=normal, TRANSPOSE=transpose, UPCAST=x.dtype == torch.bfloat16,
                                   **blocks)
    else:
        grid = lambda meta: (triton.cdiv(x2.shape[0], meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa
        _regen_matmul_tuned[grid](*args, NORMAL=normal, TRANSPOSE=transpose, UPCAST=False, **_options())
    return y.reshape(*x.shape[:-1], n)


def triton_regen_weight(seed: int, shape: tuple[int, ...], scale: float, normal: bool, dtype: torch.dtype,
                        device: torch.device | str, start: int = 0, block: int = 1024) -> torch.Tensor:
    """The weight ``init.sample(seed, shape, ...)`` written by Triton: elements ``start .. start + prod(shape)``.

    Args:
        seed: Philox key in ``[0, 2**63)``; shape: the weight's shape; scale, normal: as :func:`triton_regen_matmul`.
        dtype: float32, float16 or bfloat16 (values are computed in float32, then cast).
        device: CUDA, or CPU under ``TRITON_INTERPRET=1``.
        start: the first counter; block: elements per program.

    Returns:
        A new tensor of ``shape``.
    """
    out = torch.empty(shape, dtype=dtype, device=device)
    n = out.numel()
    _fill_kernel[(triton.cdiv(n, block),)](out, n, start, seed, scale, NORMAL=normal, BLOCK=block, **_options())
    return out
