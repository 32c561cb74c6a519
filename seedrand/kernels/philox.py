"""Counter-based Philox4x32-10 in plain torch, reproducing Triton's ``tl.randint4x``/``tl.rand4x``/``tl.randn4x``.

Algorithm (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011; Random123; and
``triton/language/random.py`` in Triton 3.x, which this module matches):

* Key ``(k0, k1)``: the seed as a 64-bit two's-complement integer, ``k0`` its low 32 bits, ``k1`` its high 32 bits.
* Counter ``(c0, c1, c2, c3)``: ``c0`` = offset's low 32 bits, ``c1`` = offset's high 32 bits, ``c2 = c3 = 0``.
* Ten rounds of ``c0' = hi(B*c2) ^ c1 ^ k0; c2' = hi(A*c0) ^ c3 ^ k1; c1' = lo(B*c2); c3' = lo(A*c0)`` with
  ``A = 0xD2511F53``, ``B = 0xCD9E8D57``, and the key bumped by ``(0x9E3779B9, 0xBB67AE85)`` after every round.
* The stream: element ``i`` (a 64-bit index, e.g. the row-major position in a weight) is word ``i & 3`` of the
  block at counter ``i >> 2``, so one block gives four consecutive elements (four times cheaper than one block per
  element, as ``tl.rand`` would spend); in Triton, ``tl.randint4x(seed, i >> 2)`` and a select.
* ``randint`` is that word; ``rand`` reinterprets it as int32, maps negative ``x`` to ``~x`` and multiplies the
  float32 conversion by ``4.6566127342e-10`` (range ``[0, 1 - 2**-24]``); ``randn`` is Box-Muller on the pairs of
  words ``(0, 1)`` and ``(2, 3)``, cosine then sine, exactly ``tl.randn4x``.

Every 32x32-bit product is one int64 multiply: the product of two values below 2**32 wraps modulo 2**64 in int64,
and ``(p >> 32) & 0xFFFFFFFF`` still recovers its high word (an arithmetic shift of the wrapped value differs from the
true quotient by exactly 2**32). All arithmetic is element-wise, so outputs are a pure function of (seed, offset) on
any device; nothing touches the global torch RNG. On the CPU, outside ``torch.compile`` tracing and ONNX export,
the same function is computed by the numba kernels of :mod:`seedrand.kernels.cpu_philox` (bit for bit; about 100
times faster). Compiled graphs call the opaque op ``seedrand::philox_words`` (numba on the CPU, Triton on CUDA);
ONNX export sees the torch ops, which it translates. :func:`philox4x32` is always the torch reference.
"""

from __future__ import annotations

import hashlib

import torch

from . import cpu_philox
from .constants import PHILOX_KEY_BUMP, PHILOX_MULTIPLIERS, PHILOX_ROUNDS, UINT32_TO_UNIT

__all__ = ["philox4x32", "randint", "rand", "randn", "philox_words", "derive_seed", "check_seed", "check_offsets",
           "PHILOX_ROUNDS"]

_A, _B = PHILOX_MULTIPLIERS
_MASK32 = 0xFFFFFFFF
_SEED_RANGE = (-(2**63), 2**64)


def check_seed(seed: int) -> int:
    """``seed`` as the unsigned 64-bit Philox key. Raises TypeError (not an int) or ValueError (not 64 bits)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"Philox seed must be a Python int, got {type(seed).__name__}")
    if not _SEED_RANGE[0] <= seed < _SEED_RANGE[1]:
        raise ValueError(f"Philox seed {seed} is outside [-2**63, 2**64): it must fit in 64 bits")
    return seed & (2**64 - 1)


def check_offsets(offsets: torch.Tensor | range) -> torch.Tensor | range:
    """``offsets`` as an int64 tensor, or the ``range`` itself. Raises TypeError for anything but an integer tensor
    or a range."""
    if isinstance(offsets, range):
        return offsets
    if not isinstance(offsets, torch.Tensor) or offsets.dtype.is_floating_point or offsets.dtype.is_complex:
        raise TypeError("Philox offsets must be an integer torch.Tensor")
    if offsets.dtype == torch.bool:
        raise TypeError("Philox offsets must be an integer torch.Tensor, not bool")
    return offsets.to(torch.int64)


def philox4x32(
    counter: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    key: tuple[int, int],
    rounds: int = PHILOX_ROUNDS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Philox4x32 block function on int64 tensors that hold uint32 values.

    Args:
        counter: four int64 tensors of one broadcastable shape, each holding values in ``[0, 2**32)``.
        key: ``(k0, k1)``, Python ints in ``[0, 2**32)``.
        rounds: number of rounds (10 for Philox4x32-10).

    Returns:
        Four int64 tensors (broadcast shape) holding the uint32 output words, the Random123 known-answer vectors'
        convention: ``philox4x32((0, 0, 0, 0), (0, 0))`` gives ``(0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)``.
    """
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(rounds):
        p0 = c0 * _A  # wraps modulo 2**64; see the module docstring
        p1 = c2 * _B
        c0, c1, c2, c3 = (
            ((p1 >> 32) & _MASK32) ^ c1 ^ k0,
            p1 & _MASK32,
            ((p0 >> 32) & _MASK32) ^ c3 ^ k1,
            p0 & _MASK32,
        )
        k0 = (k0 + PHILOX_KEY_BUMP[0]) & _MASK32
        k1 = (k1 + PHILOX_KEY_BUMP[1]) & _MASK32
    return c0, c1, c2, c3


def _words(seed: int, offsets: torch.Tensor | range) -> torch.Tensor:
    """The torch reference: word ``offset & 3`` of the block at counter ``offset >> 2`` (int64 holding uint32), shaped
    like ``offsets``. A range computes each covering block once and slices its words."""
    key64 = check_seed(seed)
    key = (key64 & _MASK32, key64 >> 32)
    off = check_offsets(offsets)
    if isinstance(off, range):
        first, last, head = cpu_philox.covering_blocks(off)
        blocks = torch.arange(first, last, dtype=torch.int64)
        return torch.stack(philox4x32(_counter(blocks), key), dim=-1).reshape(-1)[head:head + len(off)]
    c0, c1, c2, c3 = philox4x32(_counter(off >> 2), key)
    word = off & 3
    return torch.where(word == 0, c0, torch.where(word == 1, c1, torch.where(word == 2, c2, c3)))


@torch.library.custom_op("seedrand::philox_words", mutates_args=())
def philox_words(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """:func:`randint` as one opaque op, what compiled graphs call: Inductor would otherwise inline the ten rounds
    into every consumer and spend minutes re-walking them (a Fastfood projection took over 5 minutes to compile).

    Args:
        seed: the key as a signed int64 (its two's complement is the 64-bit key).
        offsets: int64 tensor, any shape; CPU (numba), CUDA (Triton) or another device (the torch reference).

    Returns:
        int64 tensor of ``offsets.shape`` holding uint32 words (the stream of the module docstring: Philox4x32-10,
        Salmon et al. 2011, as Triton's ``tl.randint4x``).

    Raises:
        ValueError: ``seed`` is not a 64-bit integer (from :func:`check_seed`, on the CPU and reference paths).
    """
    if cpu_philox.usable(offsets):
        return cpu_philox.randint(check_seed(seed), offsets)
    return _words(seed, offsets)


@philox_words.register_kernel("cuda")
def _(seed, offsets):
    from .triton_philox import triton_random

    return triton_random("randint", seed, offsets)


@philox_words.register_fake
def _(seed, offsets):
    return torch.empty_like(offsets, dtype=torch.int64)


def _stream(seed: int, offsets: torch.Tensor | range) -> torch.Tensor:
    """The words of :func:`randint` without the numba shortcut: plain torch ops during ONNX export (which must
    translate them), the opaque op elsewhere (compiled graphs, devices other than the CPU)."""
    if torch.onnx.is_in_onnx_export():
        return _words(seed, offsets)
    if isinstance(offsets, range):
        offsets = torch.arange(offsets.start, offsets.stop, dtype=torch.int64)
    key64 = check_seed(seed)
    return philox_words(key64 - 2**64 if key64 >= 2**63 else key64, check_offsets(offsets))


def _counter(blocks: torch.Tensor) -> tuple[torch.Tensor, ...]:
    zero = torch.zeros_like(blocks)
    return blocks & _MASK32, (blocks >> 32) & _MASK32, zero, zero


def _uint32_to_uniform(x: torch.Tensor) -> torch.Tensor:
    signed = torch.where(x >= 2**31, x - 2**32, x)  # reinterpret the uint32 word as int32
    signed = torch.where(signed < 0, -signed - 1, signed)
    return signed.to(torch.float32) * torch.tensor(UINT32_TO_UNIT, dtype=torch.float32, device=x.device)


def randint(seed: int, offsets: torch.Tensor | range) -> torch.Tensor:
    """Element ``offsets`` of the Philox word stream: Triton's ``tl.randint4x(seed, offsets >> 2)[offsets & 3]``.

    Args:
        seed: Python int in ``[-2**63, 2**64)`` (negative seeds are taken as their 64-bit two's complement).
        offsets: integer tensor of any shape and device, values 64-bit element indices (``>= 0``); or a ``range``
            of consecutive elements (on the CPU four times faster: one block gives four elements).

    Returns:
        int64 tensor of ``offsets.shape`` on ``offsets.device`` (1-D on the CPU for a range) holding uint32 values
        in ``[0, 2**32)``.

    Raises:
        TypeError: ``seed`` is not an int or ``offsets`` is not an integer tensor.
        ValueError: ``seed`` does not fit in 64 bits.
    """
    if cpu_philox.usable(offsets):
        return cpu_philox.randint(check_seed(seed), check_offsets(offsets))
    return _stream(seed, offsets)


def rand(seed: int, offsets: torch.Tensor | range) -> torch.Tensor:
    """Triton's ``tl.rand4x(seed, offsets >> 2)[offsets & 3]``, bit for bit: uniform float32 in ``[0, 1 - 2**-24]``.

    Args and errors as :func:`randint`. Returns a float32 tensor of ``offsets.shape``.
    """
    if cpu_philox.usable(offsets):
        return cpu_philox.rand(check_seed(seed), check_offsets(offsets))
    return _uint32_to_uniform(_stream(seed, offsets))


def randn(seed: int, offsets: torch.Tensor | range) -> torch.Tensor:
    """Triton's ``tl.randn4x(seed, offsets >> 2)[offsets & 3]``: standard normal float32 by Box-Muller on pairs of
    uniforms. Elements ``2j`` and ``2j + 1`` share the uniforms ``u = rand(2j)``, ``v = rand(2j + 1)``:
    ``r = sqrt(-2 log max(1e-7, u))``, element ``2j`` is ``r cos(2 pi v)``, element ``2j + 1`` is ``r sin(2 pi v)``.

    Matches Triton within about 1e-6 (libm's ``log``/``cos``/``sin`` may differ in the last bit), as the CPU path
    (:func:`seedrand.kernels.cpu_philox.randn`: vectorized polynomials, one float32 rounding from these torch ops)
    does. Args and errors as :func:`randint`. Returns a float32 tensor of ``offsets.shape``.
    """
    off = check_offsets(offsets)
    if cpu_philox.usable(off):
        return cpu_philox.randn(check_seed(seed), off)
    if isinstance(off, range):  # uniforms of the covering pairs, one Box-Muller per pair
        base = off.start & ~1
        pairs = rand(seed, range(base, max(base, off.stop + 1) & ~1)).reshape(-1, 2)
        r, theta = _box_muller(pairs[:, 0], pairs[:, 1])
        normals = torch.stack((r * torch.cos(theta), r * torch.sin(theta)), dim=-1).reshape(-1)
        return normals[off.start - base:off.stop - base]
    r, theta = _box_muller(rand(seed, off & ~1), rand(seed, off | 1))
    return torch.where((off & 1) == 1, r * torch.sin(theta), r * torch.cos(theta))


def _box_muller(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Radius and angle of Triton's ``pair_uniform_to_normal``."""
    return torch.sqrt(-2.0 * torch.log(torch.clamp_min(u, 1.0e-7))), 6.283185307179586 * v


def derive_seed(global_seed: int, qualname: str, role: str) -> int:
    """The 64-bit Philox key of one regenerated tensor, derived from where it lives, never from traversal order.

    ``BLAKE2b-64(f"{global_seed}/{qualname}/{role}")`` read as a little-endian integer and cleared of its top bit,
    so it fits a signed int64 (custom-op schemas take ``int`` as int64). Stable across runs, Python versions,
    devices and processes (unlike ``hash``), and independent of the global torch RNG.

    Args:
        global_seed: the policy's ``seed``.
        qualname: the module's qualified name, e.g. ``"encoder.layer.0.attention.query"``.
        role: which tensor of the module, e.g. ``"weight"``, ``"bias"``, ``"select"``.

    Returns:
        int in ``[0, 2**63)``.
    """
    digest = hashlib.blake2b(f"{global_seed}/{qualname}/{role}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)
