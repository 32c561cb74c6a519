"""Counter-based Philox4x32-10 in plain torch, reproducing Triton's ``tl.randint``/``tl.rand``/``tl.randn``.

Algorithm (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011; Random123; and
``triton/language/random.py`` in Triton 3.x, which this module matches):

* Key ``(k0, k1)``: the seed as a 64-bit two's-complement integer, ``k0`` its low 32 bits, ``k1`` its high 32 bits.
* Counter ``(c0, c1, c2, c3)``: ``c0`` = offset's low 32 bits, ``c1`` = offset's high 32 bits, ``c2 = c3 = 0``.
* Ten rounds of ``c0' = hi(B*c2) ^ c1 ^ k0; c2' = hi(A*c0) ^ c3 ^ k1; c1' = lo(B*c2); c3' = lo(A*c0)`` with
  ``A = 0xD2511F53``, ``B = 0xCD9E8D57``, and the key bumped by ``(0x9E3779B9, 0xBB67AE85)`` after every round.
* ``randint`` is ``c0``; ``rand`` reinterprets ``c0`` as int32, maps negative ``x`` to ``~x`` and multiplies the
  float32 conversion by ``4.6566127342e-10`` (range ``[0, 1 - 2**-24]``); ``randn`` is Box-Muller on ``c0, c1``:
  ``sqrt(-2 log max(1e-7, u0)) * cos(2 pi u1)``, in float32.

Every 32x32-bit product is one int64 multiply: the product of two values below 2**32 wraps modulo 2**64 in int64,
and ``(p >> 32) & 0xFFFFFFFF`` still recovers its high word (an arithmetic shift of the wrapped value differs from the
true quotient by exactly 2**32). All arithmetic is element-wise, so outputs are a pure function of (seed, offset) on
any device; nothing touches the global torch RNG. On the CPU, outside ``torch.compile`` tracing and ONNX export,
the same function is computed by the numba kernels of :mod:`seedrand.kernels.cpu_philox` (bit for bit; about 100
times faster); :func:`philox4x32` is always the torch reference.
"""

from __future__ import annotations

import hashlib

import torch

from . import cpu_philox

__all__ = ["philox4x32", "randint", "rand", "randn", "derive_seed", "check_seed", "check_offsets", "PHILOX_ROUNDS"]

PHILOX_ROUNDS = 10
_A = 0xD2511F53
_B = 0xCD9E8D57
_KEY_BUMP = (0x9E3779B9, 0xBB67AE85)
_MASK32 = 0xFFFFFFFF
_UINT_TO_FLOAT = 4.6566127342e-10
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
        k0 = (k0 + _KEY_BUMP[0]) & _MASK32
        k1 = (k1 + _KEY_BUMP[1]) & _MASK32
    return c0, c1, c2, c3


def _philox(seed: int, offsets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    key64 = check_seed(seed)
    off = check_offsets(offsets)
    if isinstance(off, range):
        off = torch.arange(off.start, off.stop, off.step, dtype=torch.int64)
    zero = torch.zeros_like(off)
    return philox4x32((off & _MASK32, (off >> 32) & _MASK32, zero, zero), (key64 & _MASK32, key64 >> 32))


def _uint32_to_uniform(x: torch.Tensor) -> torch.Tensor:
    signed = torch.where(x >= 2**31, x - 2**32, x)  # reinterpret the uint32 word as int32
    signed = torch.where(signed < 0, -signed - 1, signed)
    return signed.to(torch.float32) * torch.tensor(_UINT_TO_FLOAT, dtype=torch.float32, device=x.device)


def randint(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """Triton's ``tl.randint(seed, offsets)``: the first Philox output word for each offset.

    Args:
        seed: Python int in ``[-2**63, 2**64)`` (negative seeds are taken as their 64-bit two's complement).
        offsets: integer tensor of any shape and device, values 64-bit element indices (``>= 0``); or a ``range``
            of consecutive counters (faster on the CPU: nothing to load).

    Returns:
        int64 tensor of ``offsets.shape`` on ``offsets.device`` holding uint32 values in ``[0, 2**32)``.

    Raises:
        TypeError: ``seed`` is not an int or ``offsets`` is not an integer tensor.
        ValueError: ``seed`` does not fit in 64 bits.
    """
    if cpu_philox.usable(offsets):
        return cpu_philox.words(check_seed(seed), check_offsets(offsets), "randint")[0]
    return _philox(seed, offsets)[0]


def rand(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """Triton's ``tl.rand(seed, offsets)``, bit for bit: uniform float32 in ``[0, 1 - 2**-24]``.

    Args and errors as :func:`randint`. Returns a float32 tensor of ``offsets.shape``.
    """
    if cpu_philox.usable(offsets):
        return cpu_philox.words(check_seed(seed), check_offsets(offsets), "rand")[0]
    return _uint32_to_uniform(_philox(seed, offsets)[0])


def randn(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """Triton's ``tl.randn(seed, offsets)``: standard normal float32 by Box-Muller on two Philox words.

    Matches Triton within about 1e-6 (libm's ``log``/``cos`` may differ in the last bit). Args and errors as
    :func:`randint`. Returns a float32 tensor of ``offsets.shape``.
    """
    if cpu_philox.usable(offsets):
        u0, u1 = cpu_philox.words(check_seed(seed), check_offsets(offsets), "rand2")
    else:
        c0, c1, _, _ = _philox(seed, offsets)
        u0, u1 = _uint32_to_uniform(c0), _uint32_to_uniform(c1)
    u0 = torch.clamp_min(u0, 1.0e-7)
    return torch.sqrt(-2.0 * torch.log(u0)) * torch.cos(6.283185307179586 * u1)


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
