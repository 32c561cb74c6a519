"""Custom ops that multiply by a weight regenerated from its Philox key, never stored (van den Heuvel & Sladek 2020,
appendix 7.1).

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

import math

import torch

from .init import sample
from .shapes import frozen_weight_shape

__all__ = ["regen_matmul", "regen_matmul_reference", "frozen_matmul", "frozen_matmul_reference", "frozen_weight",
           "frozen_weight_shape", "regen_conv", "register_transposed_autograd", "DEFAULT_CHUNK_BYTES",
           "FUSED_MAX_ROWS"]

# 4 MiB of float32 weight per block: on the CPU, generation writes only the block; smaller blocks make matmuls of a
# few rows that run below peak (training step of a 4096 x 4096 layer at batch 256, benchmarks/regen_matmul.py: 1.41x
# the stored layer's time with 1 MiB blocks, 1.32x with 2 MiB, 1.25x with 4 MiB), larger ones add to the transient
# peak, which this bounds whatever the layer's size. The torch Philox path (other devices) holds about 16 int64
# temporaries per element while it generates, about 32 x this
DEFAULT_CHUNK_BYTES = 2**22


# On CUDA the matmuls run the Triton kernel that generates weight tiles in registers for up to this many rows of x,
# and the blockwise product above it (each chunk of rows of W written once by a Triton fill, then cuBLAS). The
# fused kernel regenerates every weight tile once per BLOCK_M rows of x (16-128), and generating costs about 18
# integer instructions per weight (ten Philox rounds per four) against BLOCK_M / 2048 cycles of tensor-core work:
# by a count of H100 issue rates (64 integer instructions per cycle per SM, 4096 float16 FLOPs), the fused kernel
# is bound by generation, about 0.28 cycles per weight per row tile, while the blockwise product pays one
# generation plus a write and a read of each chunk. The crossover is two to four row tiles; 256 is a design choice
# from that count, not a measurement: benchmarks/regen_matmul.py times both paths on a GPU
FUSED_MAX_ROWS = 256


def _rows_per_chunk(in_features: int, chunk_bytes: int) -> int:
    return max(1, chunk_bytes // (4 * in_features))


def _transient_weight(seed: int, shape: tuple[int, ...], kind: str, scale: float, dtype: torch.dtype, device,
                      start: int = 0) -> torch.Tensor:
    """Elements ``start .. start + prod(shape)`` of the regenerated weight of ``init.sample`` (``kind``: uniform or
    normal), written by the Triton fill on CUDA (float32, float16, bfloat16) and by ``sample`` elsewhere: the
    transient weights of the blockwise products and of the convolutions."""
    if torch.device(device).type == "cuda" and dtype != torch.float64:
        from .triton_regen import triton_regen_weight

        return triton_regen_weight(seed, shape, scale, kind == "normal", dtype, device, start=start)
    return sample(seed, shape, kind, scale, dtype, device, start=start)


def _weight_rows(seed: int, rows: range, in_features: int, scale: float, normal: bool, dtype, device) -> torch.Tensor:
    return _transient_weight(seed, (len(rows), in_features), "normal" if normal else "uniform", scale, dtype, device,
                             start=rows.start * in_features)


def _fused(x: torch.Tensor) -> bool:
    """Whether a CUDA matmul of ``x`` runs the fused Triton kernel (see ``FUSED_MAX_ROWS``)."""
    return x.dtype != torch.float64 and math.prod(x.shape[:-1]) <= FUSED_MAX_ROWS


def _blockwise_matmul(x: torch.Tensor, weight_rows, out_features: int, in_features: int, transpose: bool,
                      chunk_bytes: int, op: str) -> torch.Tensor:
    """``x @ W.T`` (``x @ W`` with ``transpose``) for an ``(out_features, in_features)`` weight ``W`` that is never
    whole: ``weight_rows(rows)`` gives its rows ``rows`` (a ``range`` of at most ``chunk_bytes`` of float32) in
    ``x``'s dtype and device, and the product is taken block by block, so that the transient weight is one block of
    a few MiB (``benchmarks/random_mlp.py``: 58 MiB less peak for three 4096 x 4096 ``freeze_fraction`` layers).

    Raises:
        ValueError: ``x``'s last dimension does not fit ``W`` (the message names ``op``).
    """
    k = out_features if transpose else in_features
    if x.shape[-1] != k:
        raise ValueError(f"{op}: x has last dimension {x.shape[-1]}, the weight needs {k}")
    step = _rows_per_chunk(in_features, chunk_bytes)
    x2 = x.reshape(-1, k)
    if transpose:  # x @ W: accumulate x[:, rows] @ W[rows] in place (no temporary per block)
        out = x.new_zeros(x2.shape[0], in_features)
        for r in range(0, out_features, step):
            rows = range(r, min(r + step, out_features))
            out.addmm_(x2[:, rows.start:rows.stop], weight_rows(rows))
        return out.reshape(*x.shape[:-1], in_features)
    # x @ W.T: one block of output columns per block of rows of W (a single block is the whole result; writing the
    # blocks in place into (x @ W.T).T measured no faster and needs a transposing copy)
    blocks = [x2 @ weight_rows(range(r, min(r + step, out_features))).T for r in range(0, out_features, step)]
    out = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=-1)
    return out.reshape(*x.shape[:-1], out_features)


def regen_matmul_reference(x: torch.Tensor, seed: int, out_features: int, in_features: int, scale: float,
                           normal: bool, transpose: bool, chunk_bytes: int) -> torch.Tensor:
    """The torch implementation of :func:`regen_matmul` (CPU and float64; the reference the Triton kernel is tested
    against): the weight is generated by :func:`seedrand.kernels.init.sample` in blocks of rows of at most
    ``chunk_bytes`` and multiplied block by block. Arguments, result and errors as :func:`regen_matmul`."""
    return _blockwise_matmul(x, lambda rows: _weight_rows(seed, rows, in_features, scale, normal, x.dtype, x.device),
                             out_features, in_features, transpose, chunk_bytes, "regen_matmul")


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
    return regen_matmul_reference(x, seed, out_features, in_features, scale, normal, transpose, chunk_bytes)


@regen_matmul.register_kernel("cuda")
def _regen_matmul_cuda(x, seed, out_features, in_features, scale, normal, transpose, chunk_bytes):
    """On CUDA, up to ``FUSED_MAX_ROWS`` rows of ``x``: the Triton kernel that generates weight tiles in registers
    (``chunk_bytes`` does not apply); more rows, and float64: the blockwise reference, its chunks of rows written by
    the Triton fill."""
    from .triton_regen import triton_regen_matmul

    if not _fused(x):
        return regen_matmul_reference(x, seed, out_features, in_features, scale, normal, transpose, chunk_bytes)
    return triton_regen_matmul(x, seed, out_features, in_features, scale, normal, transpose)


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


def _frozen_rows(trainable: torch.Tensor, source: torch.Tensor, trained: torch.Tensor, trained_dim: int, seed: int,
                 scale: float, kind: str, dtype: torch.dtype, rows: range) -> torch.Tensor:
    """Rows ``rows`` of :func:`frozen_weight`: regenerated as one counter range (``cpu_philox``'s block path on the
    CPU beats gathering the frozen part's counters), then the trained part overwritten."""
    shape = (len(rows), frozen_weight_shape(trainable, source, trained_dim)[1])
    if kind == "zero":
        w = torch.zeros(shape, dtype=dtype, device=trainable.device)
    else:
        w = _transient_weight(seed, shape, kind, scale, dtype, trainable.device, start=rows.start * shape[1])
    if trained_dim == 1:
        return w.index_copy_(1, trained, trainable[rows.start:rows.stop].to(dtype))
    block_source = source[rows.start:rows.stop]
    kept = (block_source >= 0).nonzero().squeeze(1)
    return w.index_copy_(0, kept, trainable.index_select(0, block_source[kept]).to(dtype))


def frozen_weight(trainable: torch.Tensor, source: torch.Tensor, trained: torch.Tensor, trained_dim: int, seed: int,
                  scale: float, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """The whole ``(out_features, in_features)`` weight of :func:`frozen_matmul`, assembled (its torch reference):
    the ``trained`` rows (columns) from ``trainable``, the others regenerated at their row-major counters of the
    whole weight (``kind`` ``"uniform"``/``"normal"``) or zero (``"zero"``), in ``dtype``. Arguments as
    :func:`frozen_matmul`; returns a new tensor on ``trainable``'s device (Rosenfeld & Tsotsos 2018, section 3).

    Raises:
        ValueError: ``kind`` is not ``"uniform"``, ``"normal"`` or ``"zero"`` (from ``init.sample``)."""
    out_features = frozen_weight_shape(trainable, source, trained_dim)[0]
    return _frozen_rows(trainable, source, trained, trained_dim, seed, scale, kind, dtype, range(out_features))


def frozen_matmul_reference(x: torch.Tensor, trainable: torch.Tensor, source: torch.Tensor, trained: torch.Tensor,
                            trained_dim: int, seed: int, scale: float, kind: str, transpose: bool,
                            chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> torch.Tensor:
    """The torch implementation of :func:`frozen_matmul` (CPU and float64): ``x @ frozen_weight(...).T`` with the
    weight assembled and multiplied in blocks of rows of at most ``chunk_bytes`` (never whole). Arguments, result
    and errors as :func:`frozen_matmul` (Rosenfeld & Tsotsos 2018, section 3)."""
    out_features, in_features = frozen_weight_shape(trainable, source, trained_dim)
    return _blockwise_matmul(
        x, lambda rows: _frozen_rows(trainable, source, trained, trained_dim, seed, scale, kind, x.dtype, rows),
        out_features, in_features, transpose, chunk_bytes, "frozen_matmul")


@torch.library.custom_op("seedrand::frozen_matmul", mutates_args=())
def frozen_matmul(x: torch.Tensor, trainable: torch.Tensor, source: torch.Tensor, trained: torch.Tensor,
                  trained_dim: int, seed: int, scale: float, kind: str, transpose: bool) -> torch.Tensor:
    """``x @ W.T`` (or ``x @ W`` with ``transpose``) for a ``freeze_fraction`` weight ``W`` of which only the trained
    rows (``trained_dim`` 0, frozen filters) or columns (1, frozen inputs) are stored (Rosenfeld & Tsotsos 2018,
    section 3): on CUDA, for up to ``FUSED_MAX_ROWS`` rows of ``x``, one Triton launch loads them and generates the
    frozen ones in registers (:func:`seedrand.kernels.triton_regen.triton_frozen_matmul`); otherwise :func:`frozen_matmul_reference`
    assembles ``W`` a few MiB of rows at a time.

    Args:
        x: ``(..., in_features)`` (``(..., out_features)`` with ``transpose``), a float dtype.
        trainable: the trained slice, 2-d, ``W``'s shape but ``len(trained)`` along ``trained_dim``; gets gradients.
        source: int64 ``(W.shape[trained_dim],)``, per row (column) its index in ``trainable`` or ``-1`` (frozen).
        trained: int64, the ascending indices where ``source >= 0`` (so that backward has static shapes).
        trained_dim: 0 or 1.
        seed, scale, kind: the frozen values: the whole weight's Philox key and ``U(-scale, scale)`` (``"uniform"``)
            or ``N(0, scale**2)`` (``"normal"``) at row-major counter ``o * in_features + i``, or ``"zero"``.
        transpose: multiply by ``W`` instead of ``W.T``.

    Returns:
        ``(..., out_features)`` (``(..., in_features)``), dtype and device of ``x``.

    Raises:
        ValueError: ``x``'s last dimension does not fit ``W``.
    """
    return frozen_matmul_reference(x, trainable, source, trained, trained_dim, seed, scale, kind, transpose)


@frozen_matmul.register_kernel("cuda")
def _frozen_matmul_cuda(x, trainable, source, trained, trained_dim, seed, scale, kind, transpose):
    """On CUDA as ``regen_matmul``: the one-launch Triton kernel up to ``FUSED_MAX_ROWS`` rows of ``x``, the
    blockwise reference (Triton fill, trained rows copied in, cuBLAS) above and for float64."""
    from .triton_regen import triton_frozen_matmul

    if not _fused(x):
        return frozen_matmul_reference(x, trainable, source, trained, trained_dim, seed, scale, kind, transpose)
    return triton_frozen_matmul(x, trainable, source, trained_dim, seed, scale, kind, transpose)


@frozen_matmul.register_fake
def _(x, trainable, source, trained, trained_dim, seed, scale, kind, transpose):
    features = frozen_weight_shape(trainable, source, trained_dim)[int(transpose)]
    return x.new_empty(*x.shape[:-1], features)


def _frozen_setup_context(ctx, inputs, output):
    x, trainable, source, trained, *ctx.args = inputs
    ctx.save_for_backward(x, trainable, source, trained)


def _frozen_backward(ctx, grad):
    """``dx`` is the op with ``transpose`` flipped; ``dW = grad.T @ x`` (``x.T @ grad`` transposed), of which only
    the trained rows (columns) are computed."""
    x, trainable, source, trained = ctx.saved_tensors
    trained_dim, seed, scale, kind, transpose = ctx.args
    grad_x = grad_t = None
    if ctx.needs_input_grad[0]:
        grad_x = frozen_matmul(grad.contiguous(), trainable, source, trained, trained_dim, seed, scale, kind,
                               not transpose)
    if ctx.needs_input_grad[1]:
        a, b = (x, grad) if transpose else (grad, x)
        a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
        if trained_dim == 0:
            a = a.index_select(1, trained)
        else:
            b = b.index_select(1, trained)
        grad_t = (a.T @ b).to(trainable.dtype)
    return grad_x, grad_t, None, None, None, None, None, None, None


frozen_matmul.register_autograd(_frozen_backward, setup_context=_frozen_setup_context)


_CONV = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}
_CONV_INPUT_GRAD = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input, 3: torch.nn.grad.conv3d_input}


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
    w = _transient_weight(seed, tuple(weight_shape), "normal" if normal else "uniform", scale, x.dtype, x.device)
    return _CONV[len(weight_shape) - 2](x, w, None, stride, padding, dilation, groups)


@regen_conv.register_fake
def _(x, seed, weight_shape, scale, normal, stride, padding, dilation, groups):
    w = torch.empty(weight_shape, dtype=x.dtype, device="meta")
    return _CONV[len(weight_shape) - 2](x.to("meta"), w, None, stride, padding, dilation, groups).to(x.device)


def _conv_setup_context(ctx, inputs, output):
    x, ctx.seed, ctx.weight_shape, ctx.scale, ctx.normal, ctx.stride, ctx.padding, ctx.dilation, ctx.groups = inputs
    ctx.input_shape = x.shape


def _conv_backward(ctx, grad):
    w = _transient_weight(ctx.seed, tuple(ctx.weight_shape), "normal" if ctx.normal else "uniform", ctx.scale,
                          grad.dtype, grad.device)
    grad_x = _CONV_INPUT_GRAD[len(ctx.weight_shape) - 2](ctx.input_shape, w, grad, ctx.stride, ctx.padding,
                                                        ctx.dilation, ctx.groups)
    return grad_x, None, None, None, None, None, None, None, None


regen_conv.register_autograd(_conv_backward, setup_context=_conv_setup_context)


# vmap (ensembles of members that share a regenerated weight, torch.func): the weight's arguments are numbers, so
# only ``x`` can be batched; the batch dimension folds into the leading dimensions the ops already accept
@regen_matmul.register_vmap
def _(info, in_dims, x, *args):
    return regen_matmul(x.movedim(in_dims[0], 0), *args), 0


@regen_conv.register_vmap
def _(info, in_dims, x, *args):
    x = x.movedim(in_dims[0], 0)
    return regen_conv(x.flatten(0, 1), *args).unflatten(0, x.shape[:2]), 0


@frozen_matmul.register_vmap
def _(info, in_dims, x, trainable, source, trained, *args):
    """A batch of inputs folds into the leading dimensions; a batch of trainable slices (ensemble members, each
    its own slice of one frozen weight) runs member by member."""
    if in_dims[2] is not None or in_dims[3] is not None:
        raise ValueError("frozen_matmul: the index maps source and trained cannot be batched")
    if in_dims[1] is None:
        return frozen_matmul(x.movedim(in_dims[0], 0), trainable, source, trained, *args), 0
    members = trainable.movedim(in_dims[1], 0)
    xs = x.movedim(in_dims[0], 0) if in_dims[0] is not None else [x] * len(members)
    return torch.stack([frozen_matmul(xi, ti, source, trained, *args) for xi, ti in zip(xs, members)]), 0
