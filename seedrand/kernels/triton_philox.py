"""Triton's Philox streams: element ``i`` is ``tl.randint4x``/``tl.rand4x``/``tl.randn4x`` at counter ``i >> 2``,
word ``i & 3`` (:func:`stream_element`, used by every seedrand kernel), and a kernel that fills tensors with them.

They are the ground truth that :mod:`seedrand.kernels.philox` is tested against, and the building block of the
regenerate-into-a-buffer path for CUDA tensors. On a machine without a GPU they run on CPU tensors only under
``TRITON_INTERPRET=1`` (set before ``triton`` is first imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["triton_random", "stream_element", "stream_blocks", "interleave"]

_KINDS = ("randint", "rand", "randn")


@triton.jit
def stream_element(seed, offsets, KIND: tl.constexpr):
    """Elements ``offsets`` (int64 block) of the seedrand stream of key ``seed``: ``KIND`` 0 the uint32 word, 1 its
    uniform float32, 2 a standard normal float32. Each element takes its word of ``tl.randint4x(seed, offsets >> 2)``
    and applies Triton's own maps to it: ``tl.uint_to_uniform_float`` (``tl.rand4x``) or, on the pair of words
    0-1 or 2-3, ``tl.pair_uniform_to_normal``, cosine for even elements and sine for odd (``tl.randn4x``). Each
    element computes its whole block, so the cost equals ``tl.rand``'s; the CPU path shares a block among four."""
    a, b, c, d = tl.randint4x(seed, offsets >> 2)
    word = offsets & 3
    # one return: the compiler (unlike the interpreter) types every return statement, taken or not
    if KIND == 2:
        first = word < 2
        u = tl.uint_to_uniform_float(tl.where(first, a, c))
        v = tl.uint_to_uniform_float(tl.where(first, b, d))
        normal_cos, normal_sin = tl.pair_uniform_to_normal(u, v)
        value = tl.where((word & 1) == 0, normal_cos, normal_sin)
    else:
        value = tl.where(word == 0, a, tl.where(word == 1, b, tl.where(word == 2, c, d)))
        if KIND == 1:
            value = tl.uint_to_uniform_float(value)
    return value


@triton.jit
def stream_blocks(seed, blocks, KIND: tl.constexpr):
    """The four elements ``4 * blocks + 0..3`` (``blocks``: int64 Philox counters) of the stream, as four tensors
    of ``blocks``' shape: uint32 words (``KIND`` 0), uniform float32 (1) or standard normal float32 (2), exactly as
    :func:`stream_element` gives them; one ``tl.randint4x`` per four elements, a quarter of :func:`stream_element`'s
    rounds, where a tile's elements come in aligned groups of four consecutive counters (interleave them with
    :func:`interleave`)."""
    a, b, c, d = tl.randint4x(seed, blocks)
    if KIND == 0:
        return a, b, c, d
    a, b = tl.uint_to_uniform_float(a), tl.uint_to_uniform_float(b)
    c, d = tl.uint_to_uniform_float(c), tl.uint_to_uniform_float(d)
    if KIND == 2:
        a, b = tl.pair_uniform_to_normal(a, b)
        c, d = tl.pair_uniform_to_normal(c, d)
    return a, b, c, d


@triton.jit
def interleave(a, b, c, d):
    """``[m, 4 n]`` from four ``[m, n]`` tensors: element ``[i, 4 j + w]`` of the result is element ``[i, j]`` of
    the ``w``-th (the stream order of :func:`stream_blocks`' words)."""
    joined = tl.join(tl.join(a, c), tl.join(b, d))  # [m, n, 2, 2]: [i, j, q, p] is word 2 q + p
    return tl.reshape(joined, (a.shape[0], a.shape[1] * 4))


@triton.jit
def _fill_kernel(out_ptr, offsets_ptr, n, seed, KIND: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    offsets = tl.load(offsets_ptr + idx, mask=mask, other=0)
    value = stream_element(seed, offsets, KIND)
    if KIND == 0:
        value = value.to(tl.int64) & 0xFFFFFFFF
    tl.store(out_ptr + idx, value, mask=mask)


def triton_random(kind: str, seed: int, offsets: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """Run Triton's own Philox on ``offsets`` (int64 tensor, any shape) and return the values.

    Args:
        kind: ``"randint"`` (int64 holding uint32), ``"rand"`` or ``"randn"`` (float32).
        seed: Python int fitting int64 (Triton passes it as a 64-bit scalar).
        offsets: int64 tensor, contiguous or not; CUDA, or CPU under ``TRITON_INTERPRET=1``.
        block: elements per program.

    Returns:
        Tensor of ``offsets.shape``.

    Raises:
        ValueError: unknown ``kind``.
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    flat = offsets.reshape(-1).to(torch.int64).contiguous()
    out = torch.empty(flat.shape, dtype=torch.int64 if kind == "randint" else torch.float32, device=flat.device)
    grid = (triton.cdiv(flat.numel(), block),)
    _fill_kernel[grid](out, flat, flat.numel(), seed, KIND=_KINDS.index(kind), BLOCK=block)
    return out.reshape(offsets.shape)
