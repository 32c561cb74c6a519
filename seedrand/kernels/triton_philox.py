"""Triton kernels that fill tensors with ``tl.randint``/``tl.rand``/``tl.randn`` at given offsets.

They are the ground truth that :mod:`seedrand.kernels.philox` is tested against, and the building block of the
regenerate-into-a-buffer path for CUDA tensors. On a machine without a GPU they run on CPU tensors only under
``TRITON_INTERPRET=1`` (set before ``triton`` is first imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["triton_random"]

_KINDS = ("randint", "rand", "randn")


@triton.jit
def _fill_kernel(out_ptr, offsets_ptr, n, seed, KIND: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    offsets = tl.load(offsets_ptr + idx, mask=mask, other=0)
    if KIND == 0:
        value = tl.randint(seed, offsets).to(tl.int64) & 0xFFFFFFFF
    elif KIND == 1:
        value = tl.rand(seed, offsets)
    else:
        value = tl.randn(seed, offsets)
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
