"""Random projections ``P`` (``D x d``) for subspace training, ``theta = theta0 + P @ theta_d``, regenerated from a
Philox key and never materialized whole (Minut 2023; Li et al. 2018, "Measuring the intrinsic dimension of objective
landscapes").

Scaling: ``P`` maps the ``d``-dimensional subspace to the ``D`` parameters, so (Minut 2023, section 2.3: "swap D and
d") every projection is scaled for that direction: its columns have unit norm in expectation, as in Li et al.
(entries of variance ``1/D``):

* ``gaussian``: ``N(0, 1/D)``; element ``(i, j)`` is ``randn(key, i * d + j) / sqrt(D)``.
* ``sparse`` (Achlioptas 2003): ``sqrt(3/D) * {+1, 0, -1}`` with probabilities ``1/6, 2/3, 1/6``, from
  ``u = rand(key, i * d + j)``: ``+1`` if ``u < 1/6``, ``-1`` if ``u >= 5/6``.
* ``very_sparse`` (Li, Hastie & Church 2006): ``{+1, 0, -1} / sqrt(density * D)`` with probabilities
  ``density/2, 1 - density, density/2``; ``density`` defaults to ``1/sqrt(D)``.
* ``orthogonal``: exactly orthonormal columns, built blockwise (so no ``D x d`` factorization is ever needed): the
  ``D`` rows are cut into ``k = max(1, D // (4 d))`` blocks of near-equal size (each at least ``4 d`` rows when
  ``D >= 4 d``), block ``b`` is the ``Q`` factor of the QR decomposition of its Gaussian rows (signs fixed so that
  ``diag(R) > 0``), and ``P = [Q_1; ...; Q_k] / sqrt(k)``, so ``P^T P = I``. Needs ``D >= d``.
* ``fastfood`` (Le et al. 2013, as Li et al. use it): ``P x = (H G Pi H B pad(x))[:D] / (sqrt(L * sum(G**2)) *
  sqrt(D / L))`` with ``L = 2**ceil(log2 D)``, ``H`` the unnormalized Walsh-Hadamard transform, ``B`` random signs,
  ``Pi`` a random permutation, ``G`` Gaussian (all length ``L``, regenerated from the key): ``O(D log D)`` time and
  ``O(D)`` memory for any ``d <= D``.

The first four are the custom op ``seedrand::subspace_project``: ``P`` is regenerated in blocks of rows of at most
``chunk_bytes`` (float32; an orthogonal block is one QR block) in forward and again in backward (``P^T g``), so
memory is bounded by the block, never by ``D x d``. Fastfood is plain torch ops (its operands are ``O(D)``).
"""

from __future__ import annotations

import math

import torch

from . import philox
from .ops import register_transposed_autograd

__all__ = ["PROJECTIONS", "subspace_project", "fastfood", "project", "leading_rows", "column_norms", "materialized",
           "DEFAULT_CHUNK_BYTES"]

PROJECTIONS = ("gaussian", "orthogonal", "sparse", "very_sparse", "fastfood")
DEFAULT_CHUNK_BYTES = 2**20  # 1 MiB of float32 projection per block


def _blocks(kind: str, rows: int, cols: int, chunk_bytes: int) -> list[range]:
    """Row blocks of ``P``: QR blocks for ``orthogonal`` (independent of ``chunk_bytes``), else chunks."""
    if kind == "orthogonal":
        k = max(1, rows // (4 * cols))
        bounds = [rows * b // k for b in range(k + 1)]
    else:
        step = max(1, chunk_bytes // (4 * cols))
        bounds = list(range(0, rows, step)) + [rows]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def _block(seed: int, kind: str, block: range, rows: int, cols: int, density: float, n_blocks: int) -> torch.Tensor:
    """Rows ``block`` of ``P`` (``rows x cols``), float32 ``(len(block), cols)``, on the CPU."""
    offsets = torch.arange(block.start * cols, block.stop * cols, dtype=torch.int64).reshape(len(block), cols)
    if kind == "gaussian":
        return philox.randn(seed, offsets) / math.sqrt(rows)
    if kind == "orthogonal":
        q, r = torch.linalg.qr(philox.randn(seed, offsets).double())
        q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, 1.0)
        return (q / math.sqrt(n_blocks)).float()
    u = philox.rand(seed, offsets)
    p = 1 / 3 if kind == "sparse" else density
    signs = (u < p / 2).float() - (u >= 1 - p / 2).float()
    return signs / math.sqrt(p * rows)


@torch.library.custom_op("seedrand::subspace_project", mutates_args=())
def subspace_project(x: torch.Tensor, seed: int, rows: int, cols: int, kind: str, density: float, transpose: bool,
                     chunk_bytes: int) -> torch.Tensor:
    """``P @ x`` (``x``: ``(cols,)`` -> ``(rows,)``) or, with ``transpose``, ``P.T @ x`` (``(rows,)`` -> ``(cols,)``)
    for the ``rows x cols`` projection ``kind`` (``gaussian``, ``orthogonal``, ``sparse``, ``very_sparse``) of
    Philox key ``seed`` (see the module docstring). Computed in float32; returns ``x``'s dtype. On CUDA the
    Triton kernel generates tiles of ``P`` in registers (``orthogonal``: QR blocks made on the CPU and moved).
    ``density`` is used by ``very_sparse`` only.

    Raises:
        ValueError: ``x`` has the wrong length, or ``orthogonal`` with ``rows < cols``.
    """
    _check(x, rows, cols, kind, transpose)
    return _project_blocks(x, seed, rows, cols, kind, density, transpose, chunk_bytes)


def _check(x: torch.Tensor, rows: int, cols: int, kind: str, transpose: bool) -> None:
    if x.shape != ((rows,) if transpose else (cols,)):
        raise ValueError(f"subspace_project: x has shape {tuple(x.shape)}, expected ({rows if transpose else cols},)")
    if kind == "orthogonal" and rows < cols:
        raise ValueError(f"orthogonal projection needs D >= d, got D={rows}, d={cols}")


def _project_blocks(x: torch.Tensor, seed: int, rows: int, cols: int, kind: str, density: float, transpose: bool,
                    chunk_bytes: int) -> torch.Tensor:
    """The torch implementation of :func:`subspace_project`: ``P`` made on the CPU in row blocks."""
    blocks = _blocks(kind, rows, cols, chunk_bytes)
    x32 = x.float()
    out = x32.new_zeros(cols) if transpose else x32.new_empty(rows)
    for block in blocks:
        p = _block(seed, kind, block, rows, cols, density, len(blocks)).to(x.device)
        if transpose:
            out += p.T @ x32[block.start:block.stop]
        else:
            out[block.start:block.stop] = p @ x32
    return out.to(x.dtype)


@subspace_project.register_kernel("cuda")
def _(x, seed, rows, cols, kind, density, transpose, chunk_bytes):
    """On CUDA, ``gaussian``/``sparse``/``very_sparse`` tiles of ``P`` are generated in registers by the Triton
    regenerate-and-multiply kernel (``chunk_bytes`` does not apply); ``orthogonal`` needs QR blocks (above)."""
    _check(x, rows, cols, kind, transpose)
    if kind == "orthogonal":
        return _project_blocks(x, seed, rows, cols, kind, density, transpose, chunk_bytes)
    from .triton_regen import triton_project

    return triton_project(x.float(), seed, rows, cols, kind, density, transpose).to(x.dtype)


@subspace_project.register_fake
def _(x, seed, rows, cols, kind, density, transpose, chunk_bytes):
    return x.new_empty(cols if transpose else rows)


register_transposed_autograd(subspace_project, 6)


def _hadamard(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized fast Walsh-Hadamard transform of a length-``2**n`` vector (``O(L log L)``)."""
    length, h = x.shape[0], 1
    while h < length:
        pairs = x.reshape(-1, 2, h)
        x = torch.stack((pairs[:, 0] + pairs[:, 1], pairs[:, 0] - pairs[:, 1]), dim=1).reshape(length)
        h *= 2
    return x


def fastfood(x: torch.Tensor, seed: int, rows: int) -> torch.Tensor:
    """Fastfood ``P @ x`` for ``x`` of shape ``(d,)``, ``d <= rows``: returns ``(rows,)`` float32 (see the module
    docstring). Differentiable with respect to ``x`` by autograd (memory ``O(rows)``).

    Raises:
        ValueError: ``x`` is longer than ``rows``.
    """
    if x.shape[0] > rows:
        raise ValueError(f"fastfood needs d <= D, got d={x.shape[0]}, D={rows}")
    length = 1 << max(0, math.ceil(math.log2(rows)))
    counters = torch.arange(3 * length, dtype=torch.int64, device=x.device).reshape(3, length)
    signs = 1.0 - 2.0 * (philox.randint(seed, counters[0]) & 1).float()
    gauss = philox.randn(seed, counters[1])
    perm = torch.argsort(philox.randint(seed, counters[2]), stable=True)
    padded = torch.nn.functional.pad(x.float(), (0, length - x.shape[0]))
    v = _hadamard(signs * padded)[perm] * gauss
    divisor = torch.sqrt(length * gauss.square().sum()) * math.sqrt(rows / length)
    return _hadamard(v)[:rows] / divisor


def project(theta_d: torch.Tensor, seed: int, rows: int, kind: str, density: float | None = None,
            chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> torch.Tensor:
    """``P @ theta_d`` for any projection ``kind`` of :data:`PROJECTIONS`: ``(d,)`` -> ``(rows,)`` float32.

    Args:
        theta_d: the subspace coordinates, ``(d,)``.
        seed: the projection's Philox key.
        rows: ``D``, the number of parameters.
        kind: one of :data:`PROJECTIONS`.
        density: ``very_sparse`` only; default ``1/sqrt(D)``.
        chunk_bytes: block size of the regenerated ``P`` (float32 bytes).

    Raises:
        ValueError: an unknown ``kind``, ``d > D`` for ``orthogonal``/``fastfood``.
    """
    if kind == "fastfood":
        return fastfood(theta_d, seed, rows)
    if kind not in PROJECTIONS:
        raise ValueError(f"unknown projection {kind!r}; expected one of {', '.join(PROJECTIONS)}")
    return subspace_project(theta_d.float(), seed, rows, theta_d.shape[0], kind, _density(rows, density), False,
                            chunk_bytes)


def _density(rows: int, density: float | None) -> float:
    return density if density is not None else 1 / math.sqrt(rows)


def leading_rows(seed: int, rows: int, cols: int, kind: str, density: float | None = None,
                 count: int = 16) -> torch.Tensor:
    """``(P @ ones(cols))[:count]``, float32, computing only what those rows need (one block, or one fastfood
    transform): a cheap fingerprint of the projection. Needs ``rows >= cols`` for
    ``orthogonal`` and ``fastfood`` (as :func:`project`); raises ``ValueError`` from :func:`fastfood` otherwise."""
    if kind == "fastfood":
        return fastfood(torch.ones(cols), seed, rows)[:count]
    blocks = _blocks(kind, rows, cols, DEFAULT_CHUNK_BYTES)
    first = blocks[0] if kind == "orthogonal" else range(0, min(count, rows))
    return _block(seed, kind, first, rows, cols, _density(rows, density), len(blocks)).sum(1)[:count]


def column_norms(seed: int, rows: int, cols: int, kind: str, density: float | None = None,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> torch.Tensor:
    """The Euclidean norm of each column of ``P`` (``gaussian``, ``sparse``, ``very_sparse``), ``(cols,)`` float32,
    in one blockwise pass over ``P``.

    Raises:
        ValueError: another ``kind`` (``orthogonal`` columns are unit already; ``fastfood`` has no row blocks).
    """
    if kind not in ("gaussian", "sparse", "very_sparse"):
        raise ValueError(f"column_norms applies to gaussian, sparse and very_sparse projections, not {kind!r}")
    blocks = _blocks(kind, rows, cols, chunk_bytes)
    squares = torch.zeros(cols, dtype=torch.float64)
    for block in blocks:
        squares += _block(seed, kind, block, rows, cols, _density(rows, density), len(blocks)).double().square().sum(0)
    return squares.sqrt().float()


def materialized(seed: int, rows: int, cols: int, kind: str, density: float | None = None) -> torch.Tensor:
    """The whole ``rows x cols`` projection as one tensor of plain torch ops (for ONNX export, where the runtime
    regenerates it; small sizes in tests). ``orthogonal`` needs a QR decomposition that ONNX lacks.

    Raises:
        ValueError: ``orthogonal`` or ``fastfood`` (not a dense block).
    """
    if kind in ("orthogonal", "fastfood"):
        raise ValueError(f"projection {kind} has no dense plain-op form; export it with weights='materialize'")
    return _block(seed, kind, range(0, rows), rows, cols, _density(rows, density), 1)
