"""Fast CPU Philox4x32-10: numba-compiled, multi-threaded, bit-identical to the torch reference in
:mod:`seedrand.kernels.philox` (and so to Triton's ``tl.randint4x``/``tl.rand4x``): element ``i`` of a stream is word
``i & 3`` of the block at counter ``i >> 2``.

The reference spends most of its time allocating int64 temporaries (about 6 M values/s on 2 cores); here each
thread runs the ten rounds in registers on chunks of counters, 32x32-bit products as 64-bit multiplies of
zero-extended words (``vpmuludq`` on AVX2), and writes only the result. A range of consecutive elements costs one
block per four elements (uniforms: sixteen blocks at a time in LLVM vector IR, converted and transposed to stream
order in registers); arbitrary offsets one block each. Normals (:func:`randn`) apply Box-Muller to those uniforms in
loops LLVM vectorizes (``log``, ``sin``, ``cos`` as float64 polynomials, rounded to float32 where the reference
rounds), so they are within one float32 rounding of the torch reference's ``log``/``sin``/``cos`` (at most 7.2e-7
apart over 4 M values; uniform and integer words stay bit-identical).

:func:`usable` says when this path applies: CPU tensors of plain type (not fake or functional tensors) outside
``torch.compile`` tracing and ONNX export, which must see the torch ops.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .constants import PHILOX_KEY_BUMP, PHILOX_MULTIPLIERS, PHILOX_ROUNDS, UINT32_TO_UNIT
from .dispatch import is_functorch_wrapped_tensor

__all__ = ["usable", "randint", "rand", "randn", "symmetric_uniform", "covering_blocks"]

_A, _B = (np.uint64(m) for m in PHILOX_MULTIPLIERS)
_M = np.uint64(0xFFFFFFFF)
_S = np.uint64(32)
_TO_UNIT = UINT32_TO_UNIT
# blocks (counters) per task: large enough to amortize scheduling, small enough that a 1 MiB request still splits
# over both threads
_CHUNK = 1024


@njit(inline="always")
def _round(c0, c1, c2, c3, a, b):
    p0 = c0 * _A
    p1 = c2 * _B
    return (p1 >> _S) ^ c1 ^ a, p1 & _M, (p0 >> _S) ^ c3 ^ b, p0 & _M


@njit(inline="always")
def _block(counter, k):
    """The four output words of Philox4x32-10 at counter ``(counter lo, counter hi, 0, 0)``; ``k[r]``, ``k[10 + r]``:
    the round keys (uint32, zero-extended so that LLVM knows every product fits one ``vpmuludq``). Unrolled by hand:
    numba leaves a loop over rounds rolled, and then nothing vectorizes."""
    c0, c1, c2, c3 = counter & _M, counter >> _S, np.uint64(0), np.uint64(0)
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
    return c0, c1, c2, c3


@njit(inline="always")
def _word(offset, k):
    """Element ``offset`` of the stream: word ``offset & 3`` of the block at counter ``offset >> 2``."""
    c0, c1, c2, c3 = _block(offset >> np.uint64(2), k)
    word = offset & np.uint64(3)
    return c0 if word == 0 else (c1 if word == 1 else (c2 if word == 2 else c3))


@njit(inline="always")
def _affine(word, step, add, scale):
    """``(mul * u + add) * scale`` in float32, ``u`` Triton's uint32 -> [0, 1) map of ``word`` (the word as int32,
    negatives ``x`` to ``~x``, times ``_TO_UNIT``), given ``step = mul * _TO_UNIT``: scaling by a power of two
    ``mul`` commutes with rounding, so one multiply gives ``mul * u`` and the result equals the torch expression
    rounding for rounding: ``u`` for (1, 0, 1), ``(2 * u - 1) * scale`` of ``init.sample_at`` for (2, -1, scale)."""
    folded = word ^ ((word >> np.uint64(31)) * _M)
    return (np.float32(np.int32(folded)) * step + add) * scale


# blocks per vector of the IR kernel (two AVX2 registers of 64-bit lanes per word) and per call: two independent
# vectors hide the multiplies' latency (measured: 1.24 G values/s on one thread vs 1.21 with one)
_LANES = 8
_GROUP = 2 * _LANES


def _splat(builder, value):
    """``value`` in each of ``_LANES`` lanes (insert into lane 0, shuffle with an all-zero mask)."""
    undefined = ir.Constant(ir.VectorType(value.type, _LANES), ir.Undefined)
    one = builder.insert_element(undefined, value, ir.IntType(32)(0))
    return builder.shuffle_vector(one, undefined, ir.Constant(ir.VectorType(ir.IntType(32), _LANES), [0] * _LANES))


def _rounds_ir(builder, counters, keys):
    """IR of :func:`_block` on a ``<_LANES x i64>`` vector of counters: the words come back in the low halves of the
    lanes (the high halves hold bits the next multiply and the final truncation ignore, so no mask is spent on
    them); ``keys``: the 20 round keys, zero-extended and splatted."""
    vector = counters.type
    low, shift = ir.Constant(vector, 0xFFFFFFFF), ir.Constant(vector, 32)
    c0, c1, c2, c3 = builder.and_(counters, low), builder.lshr(counters, shift), vector(0), vector(0)
    for r in range(PHILOX_ROUNDS):
        p0 = builder.mul(builder.and_(c0, low), ir.Constant(vector, int(_A)))
        p1 = builder.mul(builder.and_(c2, low), ir.Constant(vector, int(_B)))
        # the key is folded in first, off the multiply's critical path
        c0, c1, c2, c3 = (builder.xor(builder.lshr(p1, shift), builder.xor(c1, keys[r])), p1,
                          builder.xor(builder.lshr(p0, shift), builder.xor(c3, keys[10 + r])), p0)
    return c0, c1, c2, c3


def _affine_ir(builder, words, step, add, scale):
    """IR of :func:`_affine` on the low halves of ``words`` (``<_LANES x i64>``), folded as int32 (``x ^ (x >> 31)``
    turns a negative ``x`` into ``~x``) -> ``<_LANES x float>``; ``step``, ``add``, ``scale`` splatted."""
    as_int32 = builder.trunc(words, ir.VectorType(ir.IntType(32), _LANES))
    folded = builder.xor(as_int32, builder.ashr(as_int32, ir.Constant(as_int32.type, 31)))
    unit = builder.sitofp(folded, ir.VectorType(ir.FloatType(), _LANES))
    return builder.fmul(builder.fadd(builder.fmul(unit, step), add), scale)


def _transpose_ir(builder, rows):
    """The 32 words of eight blocks block after block, as four ``<8 x float>``, from four rows (one per word): a 4x4
    transpose of 32-bit lanes, twelve shuffles (``vunpck*ps``/``vunpck*pd``/``vperm2f128`` on AVX2). Interleaved
    stores straight from numba's loops stay scalar and cost a quarter of the kernel."""
    def shuffle(x, y, mask):
        return builder.shuffle_vector(x, y, ir.Constant(ir.VectorType(ir.IntType(32), 8), mask))

    # pairs of words (0, 1) and (2, 3) interleaved within each 128-bit lane, then pairs of pairs: block b | b + 4
    low, high = [0, 8, 1, 9, 4, 12, 5, 13], [2, 10, 3, 11, 6, 14, 7, 15]
    w01, w01h, w23, w23h = (shuffle(rows[a], rows[a + 1], m) for a in (0, 2) for m in (low, high))
    low, high = [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15]
    b04, b15, b26, b37 = (shuffle(x, y, m) for x, y in ((w01, w23), (w01h, w23h)) for m in (low, high))
    low, high = [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]
    return [shuffle(x, y, m) for m in (low, high) for x, y in ((b04, b15), (b26, b37))]


@intrinsic
def _uniform_group(typingctx, keys, counter, step, add, scale, out, start):
    """``out[start : start + 4 * _GROUP]`` = :func:`_affine` of the words of the ``_GROUP`` blocks from ``counter``
    (uint64), block after block, unchecked: :func:`_block` written as LLVM vector IR, since numba's vectorizer
    leaves the words in four planar streams and their interleaving scalar. Arguments as :func:`_uniform_blocks`'s;
    ``start``: an element index of float32 ``out``."""
    if (not isinstance(keys, types.Array) or keys.dtype != types.uint32 or counter != types.uint64
            or out != types.Array(types.float32, 1, "C") or not isinstance(start, types.Integer)
            or any(v != types.float32 for v in (step, add, scale))):
        return None

    def codegen(context, builder, sig, args):
        keys_value, counter, step, add, scale, out_value, start = args
        start = context.cast(builder, start, sig.args[6], types.intp)
        key_data = context.make_array(sig.args[0])(context, builder, keys_value).data
        out_data = context.make_array(sig.args[5])(context, builder, out_value).data
        round_keys = [_splat(builder, builder.zext(builder.load(builder.gep(key_data, [start.type(r)])),
                                                    counter.type)) for r in range(20)]
        step, add, scale = (_splat(builder, v) for v in (step, add, scale))
        vector = ir.VectorType(counter.type, _LANES)
        for group in range(0, _GROUP, _LANES):
            counters = builder.add(_splat(builder, counter), ir.Constant(vector, list(range(group, group + _LANES))))
            rows = [_affine_ir(builder, w, step, add, scale) for w in _rounds_ir(builder, counters, round_keys)]
            for k, value in enumerate(_transpose_ir(builder, rows)):
                at = builder.gep(out_data, [builder.add(start, start.type(4 * group + 8 * k))])
                builder.store(value, builder.bitcast(at, value.type.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(keys, counter, step, add, scale, out, start), codegen


@njit(parallel=True, cache=True)
def _uniform_blocks(keys, first, out, step, add, scale):
    """All four words of blocks ``first, first + 1, ...`` into ``out`` (``4 * blocks`` float32, interleaved):
    ``_GROUP`` blocks at a time by :func:`_uniform_group`, the last few of the last task one by one."""
    blocks = out.shape[0] // 4
    for task in prange((blocks + _CHUNK - 1) // _CHUNK):
        lo, hi = task * _CHUNK, min(blocks, (task + 1) * _CHUNK)
        whole = lo + (hi - lo) // _GROUP * _GROUP
        for j in range(lo, whole, _GROUP):
            _uniform_group(keys, np.uint64(first + j), step, add, scale, out, 4 * j)
        for j in range(whole, hi):
            words = _block(np.uint64(first + j), keys)
            for k in range(4):
                out[4 * j + k] = _affine(words[k], step, add, scale)


@njit(parallel=True, cache=True)
def _uniform_at(keys, offsets, out, step, add, scale):
    n = out.shape[0]
    for task in prange((n + _CHUNK - 1) // _CHUNK):
        for i in range(task * _CHUNK, min(n, (task + 1) * _CHUNK)):
            out[i] = _affine(_word(np.uint64(offsets[i]), keys), step, add, scale)


@njit(parallel=True, cache=True)
def _randint_blocks(keys, first, out):
    for j in prange(out.shape[0] // 4):
        c0, c1, c2, c3 = _block(np.uint64(first + j), keys)
        out[4 * j], out[4 * j + 1], out[4 * j + 2], out[4 * j + 3] = c0, c1, c2, c3


@njit(parallel=True, cache=True)
def _randint_at(keys, offsets, out):
    for i in prange(out.shape[0]):
        out[i] = np.int64(_word(np.uint64(offsets[i]), keys))


# Box-Muller of the reference (philox.randn): the float32 angle factor and the clamp of u
_TWO_PI = np.float32(6.283185307179586)
_TINY = np.float32(1.0e-7)
_MINUS_TWO = np.float32(-2.0)
_LN2, _SQRT2 = 0.6931471805599453, 1.4142135623730951
_PI_2, _2_PI = 1.5707963267948966, 0.6366197723675814
_PAIRS = 2048  # pairs per task: their temporaries stay in L1/L2
_TO_UNIT_F32, _ZERO_F32, _ONE_F32 = np.float32(_TO_UNIT), np.float32(0.0), np.float32(1.0)  # rand's affine map


@njit(inline="always", error_model="numpy")
def _log(mantissa: np.float32, exponent: np.int32) -> float:
    """``log(mantissa * 2**exponent)`` in float64 for ``mantissa`` in ``[1, 2)``: ``2 atanh(s)``, ``s = f / (2 + f)``
    after folding the mantissa into ``[sqrt(1/2), sqrt(2))`` (``|s| < 0.172``: seven terms leave < 1e-9 relative)."""
    m, e = np.float64(mantissa), np.float64(exponent)
    big = m > _SQRT2
    m = m * 0.5 if big else m
    e = e + 1.0 if big else e
    f = m - 1.0
    s = f / (2.0 + f)
    z = s * s
    series = 2.0 + z * (2 / 3 + z * (2 / 5 + z * (2 / 7 + z * (2 / 9 + z * (2 / 11 + z * (2 / 13))))))
    return e * _LN2 + s * series


@njit(inline="always", error_model="numpy")
def _sin_cos(theta: float) -> tuple[float, float]:
    """``(sin, cos)`` of ``theta`` in ``[0, 2 pi)``, float64: reduced by the nearest multiple ``q`` of ``pi / 2`` to
    ``|x| <= pi / 4``, Taylor series to the 13th/14th power (< 1e-13), the quadrant applied by selects."""
    q = np.int32(theta * _2_PI + 0.5)
    x = theta - np.float64(q) * _PI_2
    z = x * x
    sin = x * (1.0 + z * (-1 / 6 + z * (1 / 120 + z * (-1 / 5040 + z * (1 / 362880 + z * (
        -1 / 39916800 + z * (1 / 6227020800)))))))
    cos = 1.0 + z * (-0.5 + z * (1 / 24 + z * (-1 / 720 + z * (1 / 40320 + z * (-1 / 3628800 + z * (
        1 / 479001600 + z * (-1 / 87178291200)))))))
    a, b = (cos, sin) if (q & 1) == 1 else (sin, cos)
    return (-a if (q & 2) == 2 else a), (-b if ((q + 1) & 2) == 2 else b)


@njit(inline="always", error_model="numpy")
def _split(u, mantissa, exponent, n):
    """Mantissa (as float32 bits in ``[1, 2)``) and exponent of the float32s ``u[:n]``, by integer ops on their bits."""
    bits = u.view(np.int32)
    for i in range(n):
        mantissa[i] = (bits[i] & 0x7FFFFF) | 0x3F800000
        exponent[i] = (bits[i] >> 23) - 127


@njit(inline="always", error_model="numpy")
def _polar(mantissa, exponent, v):
    """``(r cos(2 pi v), r sin(2 pi v))`` in float32, ``r = sqrt(-2 log u)`` for ``u = mantissa * 2**exponent``:
    float32 where the reference rounds (``log``, ``-2 log``, ``sqrt``, the angle, the products)."""
    r = np.float32(np.sqrt(_MINUS_TWO * np.float32(_log(mantissa, exponent))))
    sin, cos = _sin_cos(np.float64(_TWO_PI * v))
    return r * np.float32(cos), r * np.float32(sin)


@njit(parallel=True, cache=True, error_model="numpy")
def _box_muller(u_in, v_in, cos_out, sin_out):
    """``r cos(2 pi v)`` and ``r sin(2 pi v)``, ``r = sqrt(-2 log max(1e-7, u))``, per element of the float32
    arrays ``u_in``, ``v_in`` (any strides), into ``cos_out``, ``sin_out``. Per task, contiguous copies first, so
    that the main loop is contiguous, branch-free and vectorized."""
    n = u_in.shape[0]
    for task in prange((n + _PAIRS - 1) // _PAIRS):
        lo = task * _PAIRS
        k = min(n, lo + _PAIRS) - lo
        u, v, c, s = (np.empty(_PAIRS, np.float32), np.empty(_PAIRS, np.float32), np.empty(_PAIRS, np.float32),
                      np.empty(_PAIRS, np.float32))
        mantissa, exponent = np.empty(_PAIRS, np.int32), np.empty(_PAIRS, np.int32)
        for i in range(k):
            u[i] = max(u_in[lo + i], _TINY)
            v[i] = v_in[lo + i]
        _split(u, mantissa, exponent, k)
        m = mantissa.view(np.float32)
        for i in range(k):
            c[i], s[i] = _polar(m[i], exponent[i], v[i])
        for i in range(k):
            cos_out[lo + i] = c[i]
            sin_out[lo + i] = s[i]


@njit(parallel=True, cache=True, error_model="numpy")
def _normal_at(keys, offsets, out):
    """The normal of each element ``offsets[i]``: its pair's uniforms are words 0, 1 or 2, 3 of one Philox block
    (``offset >> 2``), so one block per element; then Box-Muller as :func:`_box_muller`, keeping the cosine of an
    even element and the sine of an odd one."""
    n = offsets.shape[0]
    for task in prange((n + _PAIRS - 1) // _PAIRS):
        lo = task * _PAIRS
        k = min(n, lo + _PAIRS) - lo
        u, v = np.empty(_PAIRS, np.float32), np.empty(_PAIRS, np.float32)
        odd, mantissa, exponent = (np.empty(_PAIRS, np.int32), np.empty(_PAIRS, np.int32),
                                   np.empty(_PAIRS, np.int32))
        for i in range(k):
            offset = np.uint64(offsets[lo + i])
            c0, c1, c2, c3 = _block(offset >> np.uint64(2), keys)
            high = (offset & np.uint64(2)) != 0
            u[i] = max(_affine(c2 if high else c0, _TO_UNIT_F32, _ZERO_F32, _ONE_F32), _TINY)
            v[i] = _affine(c3 if high else c1, _TO_UNIT_F32, _ZERO_F32, _ONE_F32)
            odd[i] = np.int32(offset & np.uint64(1))
        _split(u, mantissa, exponent, k)
        m = mantissa.view(np.float32)
        for i in range(k):
            cos, sin = _polar(m[i], exponent[i], v[i])
            out[lo + i] = sin if odd[i] == 1 else cos


@functools.lru_cache(maxsize=256)
def _round_keys(key64: int) -> np.ndarray:
    """The 20 round keys of ``key64`` (uint32, read-only; cached: a layer asks for the same key block after block)."""
    k0, k1 = key64 & 0xFFFFFFFF, key64 >> 32
    keys = np.array([(k0 + r * PHILOX_KEY_BUMP[0]) & 0xFFFFFFFF for r in range(PHILOX_ROUNDS)] +
                    [(k1 + r * PHILOX_KEY_BUMP[1]) & 0xFFFFFFFF for r in range(PHILOX_ROUNDS)], dtype=np.uint32)
    keys.flags.writeable = False
    return keys


def usable(offsets: torch.Tensor | range) -> bool:
    """Whether this module may compute these offsets: a plain CPU tensor or a step-1 range from ``>= 0``, outside
    ``torch.compile`` tracing and ONNX export (which must see the torch ops)."""
    if torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export() or (
            isinstance(offsets, torch.Tensor) and is_functorch_wrapped_tensor(offsets)):
        return False
    if isinstance(offsets, range):
        return offsets.step == 1 and offsets.start >= 0
    return type(offsets) is torch.Tensor and offsets.device.type == "cpu"


def covering_blocks(elements: range) -> tuple[int, int, int]:
    """``(first, last, head)``: the blocks ``first .. last - 1`` hold the consecutive ``elements`` (step 1, from
    ``>= 0``), which start at word ``head`` of the first block (an empty range covers no block)."""
    return elements.start >> 2, max(elements.start, elements.stop + 3) >> 2, elements.start & 3


def _fill(key64: int, offsets: torch.Tensor | range, dtype, blocks_kernel, at_kernel, *params) -> torch.Tensor:
    """Run ``blocks_kernel`` over the whole blocks that cover a range (then slice), or ``at_kernel`` per offset."""
    keys = _round_keys(key64)
    if isinstance(offsets, range):
        first, last, head = covering_blocks(offsets)
        out = np.empty(4 * (last - first), dtype)
        blocks_kernel(keys, np.int64(first), out, *params)
        return torch.from_numpy(out[head:head + len(offsets)])
    flat = offsets.reshape(-1).contiguous().numpy()
    out = np.empty(flat.shape[0], dtype)
    at_kernel(keys, flat, out, *params)
    return torch.from_numpy(out).reshape(offsets.shape)


def symmetric_uniform(key64: int, offsets: torch.Tensor | range, scale: float) -> torch.Tensor:
    """``U(-scale, scale)`` as ``(2 * rand - 1) * scale`` in float32, bit for bit what the torch expression gives,
    in one pass. ``key64``: the Philox key in ``[0, 2**64)``; ``offsets``: an int64 CPU tensor (any shape) or a
    ``range`` of consecutive elements (step 1, from ``>= 0``; four times faster: one block gives four elements).
    Returns float32 shaped like ``offsets`` (1-D for a range)."""
    params = np.float32(2 * _TO_UNIT), np.float32(-1.0), np.float32(scale)
    return _fill(key64, offsets, np.float32, _uniform_blocks, _uniform_at, *params)


def rand(key64: int, offsets: torch.Tensor | range) -> torch.Tensor:
    """Triton's uniform float32 of each element's word (``philox.rand``); arguments as :func:`symmetric_uniform`."""
    return _fill(key64, offsets, np.float32, _uniform_blocks, _uniform_at, _TO_UNIT_F32, _ZERO_F32, _ONE_F32)


def randint(key64: int, offsets: torch.Tensor | range) -> torch.Tensor:
    """Each element's Philox word as int64 in ``[0, 2**32)`` (``philox.randint``); arguments as
    :func:`symmetric_uniform`."""
    return _fill(key64, offsets, np.int64, _randint_blocks, _randint_at)


def randn(key64: int, offsets: torch.Tensor | range) -> torch.Tensor:
    """Triton's standard normal of each element (``philox.randn``): elements ``2j`` and ``2j + 1`` are
    ``r cos(2 pi v)`` and ``r sin(2 pi v)`` of the uniforms ``u = rand(2j)``, ``v = rand(2j + 1)``, by
    :func:`_box_muller` (Box & Muller, "A Note on the Generation of Random Normal Deviates", on the Philox4x32-10
    words of Salmon et al., "Parallel Random Numbers: As Easy as 1, 2, 3"; one float32 rounding from the torch
    reference, at most 7.2e-7 apart; a range and its offsets give the same bits). Raises nothing of its own.
    Arguments as :func:`symmetric_uniform` (a range generates the pairs covering it). Returns float32 shaped like
    ``offsets``."""
    if isinstance(offsets, range):
        base, stop = offsets.start & ~1, max(offsets.start, offsets.stop + 1) & ~1
        uv = rand(key64, range(base, stop)).numpy()
        out = np.empty(stop - base, np.float32)
        _box_muller(uv[0::2], uv[1::2], out[0::2], out[1::2])
        return torch.from_numpy(out[offsets.start - base:offsets.stop - base])
    return _fill(key64, offsets, np.float32, None, _normal_at)
