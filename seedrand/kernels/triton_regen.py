"""Triton kernels that regenerate weight tiles in registers (van den Heuvel & Sladek 2020: a regenerated weight costs no
memory traffic): a matmul with a weight that is never loaded, and a fill for the weights of convolutions.

* :func:`triton_regen_matmul` computes ``x @ W.T`` (``transpose=False``) or ``x @ W`` (``transpose=True``) for the
  ``(out_features, in_features)`` weight ``W[o, i] = U(-scale, scale)`` or ``N(0, scale**2)`` at stream element
  ``o * in_features + i``, the same tensor as :func:`seedrand.kernels.init.sample`. Each program owns a
  ``BLOCK_M x BLOCK_N`` output tile and walks the reduction in ``BLOCK_K`` steps: it loads the ``x`` tile and
  generates the weight tile instead of loading it: where ``in_features`` is a multiple of 4, a row of ``W`` is whole
  Philox blocks and each ``tl.randint4x`` gives four weights (interleaved into the tile), else one block per weight;
  products accumulate in float32 and the result is stored in ``x``'s dtype; float32 inputs multiply in full
  precision, or in TF32 where torch's matmul is allowed to (``torch.backends.cuda.matmul.fp32_precision``).
  Backward (``dx = dy @ W``) is the same kernel with ``transpose`` flipped; ``dW`` is never needed. Any leading
  batch shape (flattened) and strides of ``x`` are handled; block sizes are autotuned on GPUs. Where the output has
  fewer tiles than the GPU has SMs (a small batch; ``P.T @ g``), the reduction is split over several programs
  (split-K, :func:`split_k`) whose float32 partial sums are added afterwards, in a fixed order. The ops use this
  kernel for up to ``seedrand.kernels.ops.FUSED_MAX_ROWS`` rows of ``x`` (it regenerates each weight tile once per
  ``BLOCK_M`` rows), a blockwise product with :func:`triton_regen_weight` above.
* :func:`triton_frozen_matmul`: the same kernel for a ``freeze_fraction`` weight, its trainable rows (columns) loaded
  and its frozen ones generated, in one launch.
* :func:`triton_project`: ``P @ x`` and ``P.T @ x`` for the subspace projections whose entries are i.i.d.
  (``gaussian``, ``sparse``, ``very_sparse``): the kernel with one row of ``x``, tiles of ``P`` generated.
* :func:`triton_regen_weight` writes the weight itself (for the vendor convolution, forward and backward).

These are the CUDA kernels of the custom ops ``seedrand::regen_matmul``, ``seedrand::frozen_matmul``,
``seedrand::subspace_project`` and ``seedrand::regen_conv``; their torch references are the CPU implementations of
those ops. Without a GPU they
run on CPU tensors under ``TRITON_INTERPRET=1`` (set before ``triton`` is imported), which is how they are tested.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .shapes import frozen_weight_shape
from .triton_philox import interleave, stream_blocks, stream_element

__all__ = ["triton_regen_matmul", "triton_frozen_matmul", "triton_project", "triton_regen_weight", "split_k"]

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


# the distributions a kernel generates (constexpr DIST): zero, U(-scale, scale), N(0, scale**2), and the ternary
# scale * {+1, 0, -1} of the sparse projections (+1 below ``lo``, -1 at or above ``hi``)
_DISTS = {"zero": 0, "uniform": 1, "normal": 2, "ternary": 3}


@triton.jit
def _scaled(value, scale, lo, hi, DIST: tl.constexpr):
    """Weights from stream values (uniform floats; normals for DIST 2), in float32, with the roundings of the torch
    references (launches disable FMA contraction so that ``2 u - 1`` is rounded as there)."""
    if DIST == 2:
        return value * scale
    if DIST == 1:
        return (2.0 * value - 1.0) * scale
    return ((value < lo).to(tl.float32) - (value >= hi).to(tl.float32)) * scale


@triton.jit
def _weight(seed, counters, scale, lo, hi, DIST: tl.constexpr):
    """Weight values at stream elements ``counters`` (any shape), one Philox block each."""
    if DIST == 0:
        return tl.zeros(counters.shape, dtype=tl.float32)
    return _scaled(stream_element(seed, counters, 2 if DIST == 2 else 1), scale, lo, hi, DIST)


@triton.jit
def _weight_rows(seed, first, scale, lo, hi, DIST: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """``[ROWS, COLS]`` weight values at counters ``first[r] + c`` (``first``: int64 ``[ROWS, 1]``, multiples of
    4): each Philox block gives four consecutive values, a quarter of :func:`_weight`'s rounds."""
    if DIST == 0:
        return tl.zeros((ROWS, COLS), dtype=tl.float32)
    blocks = (first + 4 * tl.arange(0, COLS // 4)[None, :]) >> 2
    a, b, c, d = stream_blocks(seed, blocks, 2 if DIST == 2 else 1)
    return interleave(_scaled(a, scale, lo, hi, DIST), _scaled(b, scale, lo, hi, DIST),
                      _scaled(c, scale, lo, hi, DIST), _scaled(d, scale, lo, hi, DIST))


@triton.jit
def _regen_matmul_kernel(x_ptr, y_ptr, t_ptr, src_ptr, M, N, K, K_SPLIT, stride_xm, stride_xk, stride_ys,
                         stride_ym, stride_yn, stride_t0, stride_t1, seed, scale, lo, hi, DIST: tl.constexpr,
                         TRANSPOSE: tl.constexpr, ALIGNED: tl.constexpr, TRAINED_DIM: tl.constexpr,
                         SPLIT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # y[m, n] = sum_k x[m, k] * Wt[k, n], Wt = W.T (transposed: W); W[o, i] is generated at counter o * in + i or,
    # along TRAINED_DIM (0: rows o, 1: columns i; -1: none) where src >= 0, loaded from t[src, i] (t[o, src])
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SPLIT:  # split-K: program (m, n, s) sums k in [s * K_SPLIT, (s + 1) * K_SPLIT) into y[s]
        k_lo = tl.program_id(2) * K_SPLIT
        k_hi = tl.minimum(k_lo + K_SPLIT, K)
        y_ptr += tl.program_id(2).to(tl.int64) * stride_ys
    else:  # constant bounds: a runtime start costs the unsplit kernel 10-50 registers per thread (sm_90)
        k_lo = 0
        k_hi = K
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        inside = (rk[:, None] < K) & (rn[None, :] < N)
        if TRANSPOSE:
            o, i, in_features = rk[:, None].to(tl.int64), rn[None, :].to(tl.int64), N
        else:
            o, i, in_features = rn[None, :].to(tl.int64), rk[:, None].to(tl.int64), K
        if ALIGNED and TRANSPOSE:  # counters k * N + n run along the tile's rows in aligned fours
            w = _weight_rows(seed, o * N + pid_n * BLOCK_N, scale, lo, hi, DIST, BLOCK_K, BLOCK_N)
        elif ALIGNED:  # counters n * K + k run down its columns: generate the transpose
            w = tl.trans(_weight_rows(seed, tl.trans(o) * K + k0, scale, lo, hi, DIST, BLOCK_N, BLOCK_K))
        else:
            w = _weight(seed, o * in_features + i, scale, lo, hi, DIST)
        if TRAINED_DIM >= 0:
            src = tl.load(src_ptr + tl.broadcast_to(o if TRAINED_DIM == 0 else i, (BLOCK_K, BLOCK_N)),
                          mask=inside, other=-1).to(tl.int64)
            trained = src >= 0
            offset = src * stride_t0 + i * stride_t1 if TRAINED_DIM == 0 else o * stride_t0 + src * stride_t1
            w = tl.where(trained, tl.load(t_ptr + offset, mask=inside & trained, other=0.0).to(tl.float32), w)
        w = tl.where(inside, w, 0.0)
        if UPCAST or x.dtype == tl.float32:  # float32 products, "ieee" or "tf32" as torch's matmul is set
            acc = tl.dot(x.to(tl.float32), w, acc, input_precision=PRECISION)
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def _configs(blocks: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in blocks]


# tensor-core tiles, for float16/bfloat16 inputs and float32 ones multiplied in TF32
_CONFIGS = _configs([(16, 64, 64, 4, 3), (64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3),
                     (128, 128, 32, 8, 3), (128, 256, 32, 8, 3)])
# float32 inputs multiply in full precision on the FMA units (input_precision="ieee"), where every tile above hits
# 255 registers and spills: 430-1,900 bytes of spill stores per thread for the two smallest, 1.9-5.3 KB of stack for
# the others (sm_80/sm_90, benchmarks/triton_resources.py). These K steps of 8-16 fit in 113-243 registers without
# spilling; the two smallest tiles above stay for the autotuner to compare
_FP32_CONFIGS = _CONFIGS[:2] + _configs([(16, 64, 16, 4, 3), (32, 64, 16, 4, 3), (64, 64, 16, 8, 3),
                                         (32, 128, 16, 8, 3), (64, 64, 8, 4, 3)])
_KEY = ["M", "N", "K", "K_SPLIT", "DIST", "TRANSPOSE", "ALIGNED", "TRAINED_DIM"]
_TUNED = {False: triton.autotune(configs=_CONFIGS, key=_KEY)(_regen_matmul_kernel),
          True: triton.autotune(configs=_FP32_CONFIGS, key=_KEY)(_regen_matmul_kernel)}
# a slice of the reduction is whole BLOCK_K steps of every configuration (the largest BLOCK_K of both sets)
_K_STEP = 64
# the interpreter neither benchmarks nor compiles: one configuration, small tiles
_INTERPRETER_CONFIG = _configs([(16, 32, 32, 4, 3)])[0]


def split_k(m: int, n: int, k: int, sms: int) -> int:
    """How many slices of the reduction (split-K) a launch with an ``m x n`` output and ``k`` reduction steps gets on
    a GPU with ``sms`` streaming multiprocessors: with fewer output tiles than SMs (64 x 64 tiles: a small batch,
    or ``P.T @ g`` of a subspace layer, ``d`` outputs summed over ``D`` rows), two programs per SM, each slice at
    least 256 steps so that the ``slices x m x n`` float32 partial sums stay small beside the generation; else 1.

    Without a slice, the grid of a GEMV-shaped launch is a few programs that each generate a whole ``k``-long strip
    of the weight while most SMs idle. The thresholds are a design choice from the kernel's resources (two or three
    4-warp programs fit an SM at 128-254 registers per thread, ``benchmarks/triton_resources.py``), not yet tuned on
    a GPU: ``benchmarks/regen_matmul.py`` prints the time with and without slices.

    Split-K as in CUTLASS's ``GemmSplitKParallel`` (partial sums written per slice, then reduced), here reduced by
    torch in a fixed order rather than by atomics, so that results do not change from run to run.

    Args:
        m, n: the output's rows and columns; k: the reduction's length; sms: the GPU's multiprocessor count.

    Returns:
        The number of slices, at least 1 (:func:`triton_regen_matmul` rounds each to whole ``BLOCK_K`` steps).
        Raises nothing: any non-negative sizes give an answer.
    """
    tiles = triton.cdiv(m, 64) * triton.cdiv(n, 64)
    if tiles == 0 or tiles >= sms:  # an empty output has nothing to split
        return 1
    return max(1, min(triton.cdiv(2 * sms, tiles), k // 256))


@functools.lru_cache(maxsize=None)
def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def _fill_kernel(out_ptr, n, start, seed, scale, DIST: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    if ALIGNED:  # start is a multiple of 4: whole Philox blocks
        first = tl.zeros((1, 1), dtype=tl.int64) + start + tl.program_id(0).to(tl.int64) * BLOCK
        w = tl.reshape(_weight_rows(seed, first, scale, 0.0, 0.0, DIST, 1, BLOCK), (BLOCK,))
    else:
        w = _weight(seed, start + idx, scale, 0.0, 0.0, DIST)
    tl.store(out_ptr + idx, w.to(out_ptr.dtype.element_ty), mask=idx < n)


def _options() -> dict:
    # the interpreter neither benchmarks (autotune) nor takes compiler options
    return {} if _INTERPRETED else {"enable_fp_fusion": False}


def _matmul(x: torch.Tensor, k: int, n: int, transpose: bool, seed: int, scale: float, dist: str,
            lo: float = 0.0, hi: float = 0.0, trainable: Optional[torch.Tensor] = None,
            source: Optional[torch.Tensor] = None, trained_dim: int = -1, splits: Optional[int] = None,
            config: Optional[triton.Config] = None) -> torch.Tensor:
    """Launch the kernel on ``x`` ``(..., k)`` -> ``(..., n)`` (checks as :func:`triton_regen_matmul`)."""
    if x.shape[-1] != k:
        raise ValueError(f"triton_regen_matmul: x has last dimension {x.shape[-1]}, the weight needs {k}")
    if x.dtype not in _TL_DTYPES:
        raise ValueError(f"triton_regen_matmul: dtype {x.dtype} is not float32, float16 or bfloat16")
    if splits is not None and splits < 1:
        raise ValueError(f"triton_regen_matmul: splits must be at least 1, got {splits}")
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if splits is None:
        splits = 1 if _INTERPRETED else split_k(m, n, k, _sms(x.device))
    k_split = _K_STEP * max(1, triton.cdiv(triton.cdiv(k, splits), _K_STEP))
    splits = max(1, triton.cdiv(k, k_split))
    # one output, or float32 partial sums per slice, added once all are written (the same order on every run)
    y = torch.empty(splits, m, n, dtype=x.dtype if splits == 1 else torch.float32, device=x.device)
    t = x2 if trainable is None else trainable
    args = (x2, y, t, x2 if source is None else source, m, n, k, k_split, x2.stride(0), x2.stride(1), y.stride(0),
            y.stride(1), y.stride(2), t.stride(0), t.stride(1), seed, scale, lo, hi)
    # float32 multiplies as torch's matmul is set (the flag Inductor reads): full precision on the FMA units by
    # default, TF32 tensor cores after torch.set_float32_matmul_precision("high")
    tf32 = x.dtype == torch.float32 and torch.backends.cuda.matmul.fp32_precision == "tf32"
    # the weight's rows are whole Philox blocks when in_features (n transposed, else k) is a multiple of 4
    flags = {"DIST": _DISTS[dist], "TRANSPOSE": transpose, "ALIGNED": (n if transpose else k) % 4 == 0,
             "TRAINED_DIM": trained_dim, "SPLIT": splits > 1, "PRECISION": "tf32" if tf32 else "ieee"}
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]), splits)  # noqa: E731
    if config is None and not _INTERPRETED:
        _TUNED[x.dtype == torch.float32 and not tf32][grid](*args, **flags, UPCAST=False, **_options())
    else:
        config = config or _INTERPRETER_CONFIG
        options = {} if _INTERPRETED else {"num_warps": config.num_warps, "num_stages": config.num_stages,
                                           **_options()}
        # the interpreter's dot is wrong for bfloat16 (numpy has no such type): multiply in float32 there
        _regen_matmul_kernel[grid](*args, **flags, UPCAST=_INTERPRETED and x.dtype == torch.bfloat16,
                                   **config.kwargs, **options)
    out = y[0] if splits == 1 else y.sum(0).to(x.dtype)
    return out.reshape(*x.shape[:-1], n)


def triton_regen_matmul(x: torch.Tensor, seed: int, out_features: int, in_features: int, scale: float,
                        normal: bool, transpose: bool, splits: Optional[int] = None,
                        config: Optional[triton.Config] = None) -> torch.Tensor:
    """``x @ W.T`` (or ``x @ W`` with ``transpose``) with ``W`` regenerated in registers (see the module docstring).

    Args:
        x: ``(..., in_features)`` (``(..., out_features)`` with ``transpose``), float32, float16 or bfloat16; CUDA,
            or CPU under ``TRITON_INTERPRET=1``; any strides.
        seed: the weight's Philox key, in ``[0, 2**63)``.
        out_features, in_features: the weight's shape.
        scale: uniform bound or normal standard deviation.
        normal: normal instead of uniform.
        transpose: multiply by ``W`` instead of ``W.T``.
        splits: slices of the reduction run as separate programs whose float32 partial sums are then added
            (split-K; each slice rounded to whole 64-step tiles); ``None``: :func:`split_k` on a GPU, 1 under the
            interpreter.
        config: tiles (``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K``; ``BLOCK_K`` a multiple of 4 dividing 64), warps and
            stages to launch with instead of the autotuned ones (benchmarks, and tests of each configuration's tiles
            under the interpreter); ``None``: autotuned on a GPU, 16 x 32 x 32 tiles under the interpreter.

    Returns:
        ``(..., out_features)`` (``(..., in_features)``), ``x``'s dtype and device; accumulated in float32.

    Raises:
        ValueError: ``x``'s last dimension does not fit the weight, its dtype is not float32/float16/bfloat16, or
            ``splits < 1``.
    """
    k, n = (out_features, in_features) if transpose else (in_features, out_features)
    return _matmul(x, k, n, transpose, seed, scale, "normal" if normal else "uniform", splits=splits, config=config)


def triton_frozen_matmul(x: torch.Tensor, trainable: torch.Tensor, source: torch.Tensor, trained_dim: int,
                         seed: int, scale: float, kind: str, transpose: bool,
                         splits: Optional[int] = None) -> torch.Tensor:
    """``x @ W.T`` (``x @ W``) for a ``freeze_fraction`` weight in one launch (Rosenfeld & Tsotsos 2018, section 3: a
    fraction of the filters fixed at their random init or zero): the trainable rows (``trained_dim`` 0) or columns (1)
    of ``W`` are loaded from ``trainable``, the frozen ones generated in registers at their counters ``o * in_features +
    i`` of the whole weight (``kind`` ``"uniform"``/``"normal"``) or zero (``"zero"``). The torch reference is
    :func:`seedrand.kernels.ops.frozen_matmul_reference`.

    Args:
        x: as :func:`triton_regen_matmul`.
        trainable: the trained slice of ``W``, 2-d, any float dtype and strides (read as float32).
        source: int64 ``(W.shape[trained_dim],)``: per row (column) of ``W``, its index in ``trainable``, or ``-1``
            where it is frozen.
        trained_dim: 0 or 1.
        seed, scale: the whole weight's Philox key and uniform bound (normal standard deviation).
        kind: ``"uniform"``, ``"normal"`` or ``"zero"``.
        transpose: multiply by ``W`` instead of ``W.T``.
        splits: as :func:`triton_regen_matmul`.

    Returns:
        ``(..., out_features)`` (``(..., in_features)``), ``x``'s dtype and device; accumulated in float32.

    Raises:
        ValueError: as :func:`triton_regen_matmul`.
    """
    shape = frozen_weight_shape(trainable, source, trained_dim)
    k, n = shape if transpose else shape[::-1]
    return _matmul(x, k, n, transpose, seed, scale, kind, trainable=trainable, source=source,
                   trained_dim=trained_dim, splits=splits)


def triton_project(x: torch.Tensor, seed: int, rows: int, cols: int, kind: str, density: float,
                   transpose: bool, splits: Optional[int] = None) -> torch.Tensor:
    """``P @ x`` (``P.T @ x`` with ``transpose``) for the ``rows x cols`` projection ``kind`` of
    :mod:`seedrand.kernels.projection` (``gaussian``, ``sparse``, ``very_sparse``; Li et al. 2018, Achlioptas 2003,
    Li, Hastie & Church 2006), its tiles generated in registers: ``P`` is never written to memory. Entries equal the
    torch reference's within float32 rounding (its ``1 / sqrt(D)`` scales divide, these multiply).

    Args:
        x: ``(cols,)`` (``(rows,)``), float32; CUDA, or CPU under ``TRITON_INTERPRET=1``.
        seed: the projection's Philox key; density: ``very_sparse`` only.
        splits: as :func:`triton_regen_matmul` (``P.T @ x`` sums over all ``rows``: :func:`split_k` spreads it
            over the GPU).

    Returns:
        ``(rows,)`` (``(cols,)``) float32.

    Raises:
        ValueError: another ``kind``, or ``x`` of the wrong length.
    """
    if kind == "gaussian":
        dist, scale, p = "normal", 1 / math.sqrt(rows), 0.0
    elif kind in ("sparse", "very_sparse"):
        dist, p = "ternary", 1 / 3 if kind == "sparse" else density
        scale = 1 / math.sqrt(p * rows)
    else:
        raise ValueError(f"triton_project generates gaussian, sparse and very_sparse projections, not {kind!r}")
    k, n = (rows, cols) if transpose else (cols, rows)
    return _matmul(x[None], k, n, transpose, seed, scale, dist, p / 2, 1 - p / 2, splits=splits)[0]


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
    dist = _DISTS["normal" if normal else "uniform"]
    _fill_kernel[(triton.cdiv(n, block),)](out, n, start, seed, scale, DIST=dist, ALIGNED=start % 4 == 0,
                                           BLOCK=block, **_options())
    return out
