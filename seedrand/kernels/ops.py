"""Custom ops that multiply by a weight regenerated from its Philox key, never stored (paper 000, appendix 7.1).

``seedrand::regen_matmul(x, seed, out_features, in_features, scale, normal, transpose, chunk_bytes)`` computes
``x @ W.T`` (``transpose=False``; ``x[..., in_features]`` -> ``[..., out_features]``) or ``x @ W``
(``transpose=True``; ``[..., out_features]`` -> ``[..., in_features]``) for the ``(out_features, in_features)``
weight ``W = seedrand.kernels.init.regenerate(...)`` with the given distribution: ``U(-scale, scale)`` or, with
``normal``, ``N(0, scale**2)``. ``W`` is produced in blocks of rows of at most ``chunk_bytes`` (float32) and dropped
after each block, so memory is bounded by the chunk, not by the weight. Its gradient with respect to ``x`` is the same
op with ``transpose`` flipped: backward regenerates ``W`` instead of saving it, and autograd saves no tensor. It has
a fake (meta) kernel, so it works under ``torch.compile`` and ``torch.export``.
"""

from __future__ import annotations

import torch

from .init import sample

__all__ = ["regen_matmul", "regen_conv", "register_transposed_autograd", "DEFAULT_CHUNK_BYTES"]

# 1 MiB of float32 weight per block: on the CPU, generation writes only the block; smaller blocks make matmuls of a
# few rows that run well below peak (256 KiB cost 60% more time per step of a 4096 x 4096 layer), larger ones add to
# the transient peak (4 MiB: 5% of the weights' bytes for benchmarks/random_mlp.py). The torch Philox path (other
# devices) holds about 16 int64 temporaries per element while it generates, about 32 x this
DEFAULT_CHUNK_BYTES = 2**20


def _rows_per_chunk(in_features: int, chunk_bytes: int) -> int:
    return max(1, chunk_bytes // (4 * in_features))


def _weight_rows(seed: int, rows: range, in_features: int, scale: float, normal: bool, dtype, device) -> torch.Tensor:
    return sample(seed, (len(rows), in_features), "normal" if normal else "uniform", scale, dtype, device,
                  start=rows.start * in_features)


@torch.library.custom_op("seedrand::regen_matmul", mutates_args=())
def regen_matmul(x: torch.Tensor, seed: int, out_features: int, in_features: int, scale: float, normal: bool,
                 transpose: bool, chunk_bytes: int) -> torch.Tensor:
    """``x @ W.T`` (or ``x @ W`` with ``transpose``) for a regenerated ``(out_features, in_features)`` weight.

    Args:
        x: ``(..., in_features)`` (or ``(..., out_features)`` with ``transpose``), float32/float16/bfloat16/float64.
        seed: the weight's Philox key, in ``[0, 2**63)``.
        out_features, in_features: the weight's shape.
        scale: uniform bound, or normal standard deviation (must be positive).
        normal: normal instead of uniform.
        transpose: multiply by ``W`` instead of ``W.T``.
        chunk_bytes: bytes of float32 weight regenerated at a time (at least one row).

    Returns:
        ``(..., out_features)`` (or ``(..., in_features)``), dtype and device of ``x``.

    Raises:
        ValueError: ``x``'s last dimension does not fit the weight.
    """
    k = out_features if transpose else in_features
    if x.shape[-1] != k:
        raise ValueError(f"regen_matmul: x has last dimension {x.shape[-1]}, the weight needs {k}")
    step = _rows_per_chunk(in_features, chunk_bytes)
    if transpose:
        out = x.new_zeros(*x.shape[:-1], in_features)
        for r in range(0, out_features, step):
            rows = range(r, min(r + step, out_features))
            w = _weight_rows(seed, rows, in_features, scale, normal, x.dtype, x.device)
            out += x[..., rows.start:rows.stop] @ w
        return out
    blocks = [x @ _weight_rows(seed, range(r, min(r + step, out_features)), in_features, scale, normal, x.dtype,
                               x.device).T
              for r in range(0, out_features, step)]
    return torch.cat(blocks, dim=-1)


@regen_matmul.register_fake
def _(x, seed, out_features, in_features, scale, normal, transpose, chunk_bytes):
    return x.new_empty(*x.shape[:-1], in_features if transpose else out_features)


def register_transposed_autograd(op, transpose_at: int) -> None:
    """Register autograd for a custom op that is linear in its first input ``x`` and whose boolean argument number
    ``transpose_at`` selects ``P`` or ``P^T``: the gradient is the same op on ``grad`` with that flag flipped, so
    backward regenerates instead of saving (autograd keeps only the non-tensor arguments)."""
    def setup_context(ctx, inputs, output):
        ctx.args = list(inputs[1:])

    def backward(ctx, grad):
        args = list(ctx.args)
        args[transpose_at - 1] = not args[transpose_at - 1]
        return (op(grad.contiguous(), *args), *[None] * len(args))

    op.register_autograd(backward, setup_context=setup_context)


register_transposed_autograd(regen_matmul, 6)


_CONV = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}
_CONV_INPUT_GRAD = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input, 3: torch.nn.grad.conv3d_input}


def _conv_weight(seed: int, weight_shape: list[int], scale: float, normal: bool, dtype, device) -> torch.Tensor:
    return sample(seed, tuple(weight_shape), "normal" if normal else "uniform", scale, dtype, device)


@torch.library.custom_op("seedrand::regen_conv", mutates_args=())
def regen_conv(x: torch.Tensor, seed: int, weight_shape: list[int], scale: float, normal: bool, stride: list[int],
               padding: list[int], dilation: list[int], groups: int) -> torch.Tensor:
    """Convolution (1d/2d/3d, by ``len(weight_shape) - 2``) by a regenerated weight, without bias.

    The ``weight_shape`` weight (``(out_channels, in_channels / groups, *kernel)``) is regenerated into a transient
    buffer (``U(-scale, scale)`` or ``N(0, scale**2)``, element ``i`` from Philox offset ``i``), used, and dropped;
    backward regenerates it again for the input gradient, and autograd saves no tensor (only ``x``'s shape).

    Args:
        x: ``(N, in_channels, *spatial)``, a float dtype. Other arguments as ``torch.nn.functional.conv{n}d``.

    Returns:
        ``(N, out_channels, *spatial_out)``, dtype of ``x``.

    Raises:
        RuntimeError: from ``torch.nn.functional.conv{n}d`` when ``x`` does not fit the weight.
    """
    w = _conv_weight(seed, weight_shape, scale, normal, x.dtype, x.device)
    return _CONV[len(weight_shape) - 2](x, w, None, stride, padding, dilation, groups)


@regen_conv.register_fake
def _(x, seed, weight_shape, scale, normal, stride, padding, dilation, groups):
    w = torch.empty(weight_shape, dtype=x.dtype, device="meta")
    return _CONV[len(weight_shape) - 2](x.to("meta"), w, None, stride, padding, dilation, groups).to(x.device)


def _conv_setup_context(ctx, inputs, output):
    x, ctx.seed, ctx.weight_shape, ctx.scale, ctx.normal, ctx.stride, ctx.padding, ctx.dilation, ctx.groups = inputs
    ctx.input_shape = x.shape


def _conv_backward(ctx, grad):
    w = _conv_weight(ctx.seed, ctx.weight_shape, ctx.scale, ctx.normal, grad.dtype, grad.device)
    grad_x = _CONV_INPUT_GRAD[len(ctx.weight_shape) - 2](ctx.input_shape, w, grad, ctx.stride, ctx.padding,
                                                        ctx.dilation, ctx.groups)
    return grad_x, None, None, None, None, None, None, None, None


regen_conv.register_autograd(_conv_backward, setup_context=_conv_setup_context)
