"""Fast CPU Philox4x32-10: numba-compiled, multi-threaded, bit-identical to the torch reference in
:mod:`seedrand.kernels.philox` (and so to Triton's ``tl.randint``/``tl.rand``).

The reference spends most of its time allocating int64 temporaries (about 6 M values/s on 2 cores); here each
thread runs the ten rounds in registers on chunks of counters, 32x32-bit products as 64-bit multiplies of
zero-extended words (which LLVM vectorizes with ``vpmuludq``), and writes only the result. Box-Muller for normals
stays in torch on these uniforms, so ``randn`` is bit-identical to the reference too.

:func:`usable` says when this path applies: CPU tensors of plain type (not fake or functional tensors) outside
``torch.compile`` tracing and ONNX export, which must see the torch ops.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange, types
from numba.extending import overload

__all__ = ["usable", "words", "symmetric_uniform"]

_A = np.uint64(0xD2511F53)
_B = np.uint64(0xCD9E8D57)
_M = np.uint64(0xFFFFFFFF)
_S = np.uint64(32)
_CHUNK = 4096  # counters per task: large enough to amortize scheduling, small enough to balance threads


@njit(inline="always")
def _round(c0, c1, c2, c3, a, b):
    p0 = c0 * _A
    p1 = c2 * _B
    return (p1 >> _S) ^ c1 ^ a, p1 & _M, (p0 >> _S) ^ c3 ^ b, p0 & _M


@njit(inline="always")
def _block(offset, k):
    """Output words 0 and 1 of Philox4x32-10 at counter ``(offset lo, offset hi, 0, 0)``; ``k[r]``, ``k[10 + r]``:
    the round keys (uint32, zero-extended so that LLVM knows every product fits one ``vpmuludq``). Unrolled by hand:
    numba leaves a loop over rounds rolled, and then nothing vectorizes."""
    c0, c1, c2, c3 = offset & _M, offset >> _S, np.uint64(0), np.uint64(0)
    c0, c1, c2, c3 = _round(c0, c1, c2, c3, np.uint64(k[0]), np.uint64(k[10]))
    c0, c1, c2, c3 = _round(c0, c1, c2, c3, np.uint64(k[1]), np.uint64(k[11]))
    c0, c1, c2, c3 = _round(c0, c1, c2, c3, np.uint64(k[2]), np.uint64(k[12]))
    c0, c1, c2, c3 = _round(c0, c1, c2, c3, np.uint64(k[3]), np.uint64(k[13]))
    c0, c1, c2, c3 = _round(c0, c1, c2, c3, np.uint64(k[4]), np.uint64(k[14]))
    c0, c1, c2, c3 = _round(c0, c1, c2, c3, np.uint64(k[5]), np.uint64(k[15]))
    c0, c1, c2, c3 = _round(c0, c1, c2, c3, np.uint64(k[6]), np.uint64(k[16]))
    c0, c1, c2, c3 = _round(c0, c1, c2, c3, np.uint64(k[7]), np.uint64(k[17]))
    c0, c1, c2, c3 = _round(c0, c1, c2, c3, np.uint64(k[8]), np.uint64(k[18]))
    c0, c1, c2, c3 = _round(c0, c1, c2, c3, np.uint64(k[9]), np.uint64(k[19]))
    return c0, c1


@njit(inline="always")
def _to_uniform(word):
    """Triton's uint32 -> [0, 1) map: the word as int32, negatives ``x`` to ``~x``, times 2**-31 (float32)."""
    folded = word ^ ((word >> np.uint64(31)) * _M)
    return np.float32(np.int32(folded)) * np.float32(4.6566127342e-10)


def _counter(offsets, i):
    """Counter ``i``: ``offsets[i]`` for an array, ``offsets + i`` for a start (a range; about 30% faster, as
    nothing is loaded). Compiled per argument type by the overload below."""


@overload(_counter, inline="always")
def _counter_impl(offsets, i):
    if isinstance(offsets, types.Array):
        return lambda offsets, i: np.uint64(offsets[i])
    return lambda offsets, i: np.uint64(offsets + i)


@njit(parallel=True, cache=True)
def _uniform(keys, offsets, out):
    n = out.shape[0]
    for task in prange((n + _CHUNK - 1) // _CHUNK):
        for i in range(task * _CHUNK, min(n, (task + 1) * _CHUNK)):
            c0, _ = _block(_counter(offsets, i), keys)
            out[i] = _to_uniform(c0)


@njit(parallel=True, cache=True)
def _symmetric(keys, offsets, out, scale):
    """``(2 u - 1) * scale`` in float32, the same three roundings as the torch expression in ``init.sample_at``."""
    n = out.shape[0]
    for task in prange((n + _CHUNK - 1) // _CHUNK):
        for i in range(task * _CHUNK, min(n, (task + 1) * _CHUNK)):
            c0, _ = _block(_counter(offsets, i), keys)
            out[i] = (np.float32(2.0) * _to_uniform(c0) - np.float32(1.0)) * scale


@njit(parallel=True, cache=True)
def _uniform2(keys, offsets, out0, out1):
    n = out0.shape[0]
    for task in prange((n + _CHUNK - 1) // _CHUNK):
        for i in range(task * _CHUNK, min(n, (task + 1) * _CHUNK)):
            c0, c1 = _block(_counter(offsets, i), keys)
            out0[i] = _to_uniform(c0)
            out1[i] = _to_uniform(c1)


@njit(parallel=True, cache=True)
def _randint(keys, offsets, out):
    n = out.shape[0]
    for task in prange((n + _CHUNK - 1) // _CHUNK):
        for i in range(task * _CHUNK, min(n, (task + 1) * _CHUNK)):
            c0, _ = _block(_counter(offsets, i), keys)
            out[i] = np.int64(c0)


def _round_keys(key64: int) -> np.ndarray:
    k0, k1 = key64 & 0xFFFFFFFF, key64 >> 32
    return np.array([(k0 + r * 0x9E3779B9) & 0xFFFFFFFF for r in range(10)] +
                    [(k1 + r * 0xBB67AE85) & 0xFFFFFFFF for r in range(10)], dtype=np.uint32)


def usable(offsets: torch.Tensor | range) -> bool:
    """Whether :func:`words` may compute these offsets: a plain CPU tensor or a step-1 range from ``>= 0``, outside
    ``torch.compile`` tracing and ONNX export (which must see the torch ops)."""
    if torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export():
        return False
    if isinstance(offsets, range):
        return offsets.step == 1 and offsets.start >= 0
    return type(offsets) is torch.Tensor and offsets.device.type == "cpu"


def _counters(offsets: torch.Tensor | range) -> tuple[tuple[int, ...], np.ndarray | np.int64]:
    if isinstance(offsets, range):
        return (len(offsets),), np.int64(offsets.start)
    return tuple(offsets.shape), offsets.reshape(-1).contiguous().numpy()


def symmetric_uniform(key64: int, offsets: torch.Tensor | range, scale: float) -> torch.Tensor:
    """``U(-scale, scale)`` as ``(2 * rand - 1) * scale`` in float32, bit for bit what the torch expression gives,
    in one pass (offsets as in :func:`words`). Returns float32 shaped like ``offsets``."""
    shape, counters = _counters(offsets)
    out = np.empty(int(np.prod(shape)), np.float32)
    _symmetric(_round_keys(key64), counters, out, np.float32(scale))
    return torch.from_numpy(out).reshape(shape)


def words(key64: int, offsets: torch.Tensor | range, kind: str) -> tuple[torch.Tensor, ...]:
    """Philox for the 64-bit key ``key64`` (in ``[0, 2**64)``) at ``offsets``: an int64 CPU tensor (any shape) or a
    ``range`` of consecutive counters (step 1, from a non-negative start).

    Args:
        kind: ``"randint"`` (word 0 as int64 in ``[0, 2**32)``), ``"rand"`` (word 0 as Triton's float32 uniform) or
            ``"rand2"`` (words 0 and 1 as uniforms, for Box-Muller).

    Returns:
        One tensor (two for ``"rand2"``) shaped like ``offsets`` (1-D for a range): int64 or float32, on the CPU.
    """
    shape, counters = _counters(offsets)
    n, keys = int(np.prod(shape)), _round_keys(key64)
    outputs = [np.empty(n, np.int64 if kind == "randint" else np.float32) for _ in range(2 if kind == "rand2" else 1)]
    {"randint": _randint, "rand": _uniform, "rand2": _uniform2}[kind](keys, counters, *outputs)
    return tuple(torch.from_numpy(out).reshape(shape) for out in outputs)
