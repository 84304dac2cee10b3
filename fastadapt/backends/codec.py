"""Codec core of compressed optimizer state (design #13): bfloat16 and 8-bit blockwise.

Two storage formats for float32 state, both decoded into float32 scratch before a rule runs
and encoded back after it (rules never change):

* **bfloat16**, stored as ``uint16``: decode is ``bits << 16``; encode rounds to nearest even,
  or *stochastically* with 16 random bits per element from :func:`sr_bits`, a counter-based
  hash of (seed, step, global element index) in pure 32-bit integer arithmetic, so a CUDA
  kernel reproduces it bit for bit and results do not depend on threading.
* **int8 blockwise** (Dettmers et al., "8-bit Optimizers via Block-wise Quantization"), stored
  as ``uint8`` codes plus one ``float32`` absmax per block of ``BLOCK`` elements (or any block
  length, e.g. a row of a sparse table): decode is ``qmap[code] * absmax``; encode divides by
  the block's absmax and takes the code of the *nearest* entry of the dynamic map
  (:func:`dynamic_map`; signed for first moments, unsigned for second moments).

Exact nearest code, fast
    ``y = x / absmax`` lies in [-1, 1].  Code ``c(y)`` is the number of midpoints
    ``(q[i] + q[i+1]) / 2`` (exact reals) strictly below ``y``: the nearest entry, ties to the
    lower index (what a binary search over the midpoints gives).  For a float32 ``y`` the test
    ``y > midpoint`` equals ``y > thr[i]``, ``thr[i]`` the midpoint rounded *down* to float32
    (if it is not a float32 it lies strictly between two adjacent floats, and ``y`` exceeds it iff
    ``y`` exceeds the lower one).  A lookup table indexed by the sign and the top 16 bits of
    ``|bits(y)|`` (exponent and 7 mantissa bits; magnitudes below ``2**-23`` folded into the
    lowest cell) holds, per cell, the code of the cell's lowest ``y`` and the low 16 bits of the
    one threshold inside the cell, if any (checked when the table is built: the map's entries
    are further apart than a cell is wide).  So ``code = cand + (key(y) > T)``: one table load
    (a vector gather) and one integer comparison, the exact nearest code for every float32
    ``y`` in [-1, 1] (tests/test_codec.py checks every cell at its ends and around its
    threshold, which covers all floats since both sides are monotone step functions, and,
    with ``FASTADAPT_EXHAUSTIVE=1``, every float32 in [-1, 1]).  The tables are module
    globals, which numba freezes into the code as constants: functions take ``signed`` and
    pick the table, and LLVM, knowing the table cannot alias the codes being written,
    vectorises the lookup as a gather.

Non-finite values
    bfloat16: NaN stays NaN (quiet bit forced, the sign kept), +-inf stays +-inf.  Round to
    nearest rounds finite values from ``0x7f7f8000`` (half an ulp above the largest bfloat16,
    3.3961e38) on to inf, as IEEE does.  Stochastic rounding rounds magnitudes above the
    largest finite bfloat16 (3.3895e38) to nearest instead, so it reaches inf exactly where
    round to nearest does, never elsewhere (the only place where it is not unbiased).
    int8: a block holding a NaN or inf stores absmax NaN (codes of 0.0), so the whole block
    decodes to NaN: a non-finite state stays non-finite.  A block of zeros stores absmax 0.

The ``*_block`` functions are ``inline="always"`` for the loops of the CPU backend: they decode
into / encode from a float32 scratch indexed from 0 while the codes are indexed from
``start``; the ``*_span`` functions walk several int8 blocks.  The
array-level functions (:func:`bf16_encode`, :func:`bf16_decode`, :func:`q8_encode`,
:func:`q8_decode`) serve state_dict export/import and tests.
"""

from typing import Any, NamedTuple, Optional, Tuple

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .. import config

_OPTS = config.NJIT_OPTIONS

__all__ = ["BLOCK", "dynamic_map", "Q8Tables", "q8_tables", "sr_key", "sr_bits", "fmix32",
           "bf16_decode_block", "bf16_encode_block", "q8_decode_block", "q8_encode_block",
           "q8_decode_span", "q8_encode_span", "bf16_encode", "bf16_decode", "q8_encode", "q8_decode",
           "q8_blocks"]

#: Elements per block of int8 blockwise state (one float32 absmax each).
BLOCK = 256

_M32 = np.uint64(0xFFFFFFFF)
_U16 = np.uint64(16)
_U13 = np.uint64(13)
_C1 = np.uint64(0x85EBCA6B)
_C2 = np.uint64(0xC2B2AE35)
_GOLDEN = np.uint64(0x9E3779B9)
_HI_MUL = np.uint64(0x27D4EB2F)


# --------------------------------------------------------------------------- bit casts
@intrinsic
def _f32_bits(typingctx, x):
    """The bit pattern of the float32 ``x`` as uint32."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.uint32))

    return types.uint32(x), codegen


@intrinsic
def _bits_f32(typingctx, b):
    """The float32 whose bit pattern is the low 32 bits of the integer ``b``."""
    if not isinstance(b, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        i32 = context.get_value_type(types.uint32)
        if v.type.width > 32:
            v = builder.trunc(v, i32)
        elif v.type.width < 32:
            v = builder.zext(v, i32)
        return builder.bitcast(v, context.get_value_type(types.float32))

    return types.float32(b), codegen


@intrinsic
def _absmax_bits(typingctx, m, x):
    """``max(m, |bits(x)| )`` in uint32 (an i32 reduction vectorises 8 wide; numba would widen
    it to 64 bits).  ``|bits|`` orders as the magnitudes, NaNs above inf."""
    if not (m == types.uint32 and x == types.float32):
        return None

    def codegen(context, builder, signature, args):
        mv, xv = args
        i32 = ir.IntType(32)
        a = builder.and_(builder.bitcast(xv, i32), i32(0x7FFFFFFF))
        return builder.select(builder.icmp_unsigned(">", a, mv), a, mv)

    return types.uint32(m, x), codegen


# --------------------------------------------------------------------------- the hash
@njit(inline="always", **_OPTS)
def fmix32(h):
    """murmur3's 32-bit finaliser of ``h`` (an integer < 2**32), as a uint64 < 2**32.

    ``h ^= h >> 16; h *= 0x85ebca6b; h ^= h >> 13; h *= 0xc2b2ae35; h ^= h >> 16`` in uint32
    arithmetic (products modulo 2**32): a bijection of 32-bit words with full avalanche.
    """
    h = np.uint64(h) & _M32
    h ^= h >> _U16
    h = (h * _C1) & _M32
    h ^= h >> _U13
    h = (h * _C2) & _M32
    h ^= h >> _U16
    return h


@njit(inline="always", **_OPTS)
def sr_key(seed, step):
    """The 32-bit key of stochastic rounding for one (seed, step) pair.

    ``key = fmix32(s ^ fmix32(t + 0x9e3779b9))`` with ``s`` and ``t`` the xor of the low and
    high 32-bit words of ``seed`` and ``step`` (non-negative integers < 2**64), all in uint32
    arithmetic.  Computed once per call of an encode function.
    """
    s = np.uint64(seed)
    t = np.uint64(step)
    s = (s ^ (s >> np.uint64(32))) & _M32
    t = (t ^ (t >> np.uint64(32))) & _M32
    return fmix32(s ^ fmix32((t + _GOLDEN) & _M32))


def _ir_fmix32(builder, h):
    """fmix32 in LLVM i32 arithmetic (products wrap modulo 2**32)."""
    i32 = h.type
    h = builder.xor(h, builder.lshr(h, i32(16)))
    h = builder.mul(h, i32(0x85EBCA6B))
    h = builder.xor(h, builder.lshr(h, i32(13)))
    h = builder.mul(h, i32(0xC2B2AE35))
    return builder.xor(h, builder.lshr(h, i32(16)))


@intrinsic
def _sr_mix(typingctx, k, index):
    """``fmix32(lo(index) * 0x9e3779b9 ^ k) >> 16`` in i32 arithmetic (numba would widen
    uint32 products to 64 bits; 64-bit vector multiplies cost three times as much).  Only the
    low 32 bits of ``index`` are used, so a loop's index vector stays 32 bits wide."""
    if not (isinstance(k, types.Integer) and isinstance(index, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        kv, i = args
        i32 = ir.IntType(32)
        kv = builder.trunc(kv, i32) if kv.type.width > 32 else builder.zext(kv, i32) if kv.type.width < 32 else kv
        lo = builder.trunc(i, i32) if i.type.width > 32 else builder.zext(i, i32) if i.type.width < 32 else i
        h = _ir_fmix32(builder, builder.xor(builder.mul(lo, i32(0x9E3779B9)), kv))
        return builder.lshr(h, i32(16))

    return types.uint32(k, index), codegen


@njit(inline="always", **_OPTS)
def _sr_key_hi(key, index):
    """``key ^ hi(index) * 0x27d4eb2f`` (uint32): the part of the hash input that changes only
    every 2**32 elements."""
    return np.uint32((np.uint64(key) ^ ((np.uint64(index) >> np.uint64(32)) * _HI_MUL)) & _M32)


@njit(inline="always", **_OPTS)
def _sr_hash(key, index):
    """16 random bits for element ``index`` under ``key`` (see :func:`sr_bits`)."""
    return _sr_mix(_sr_key_hi(key, index), index)


@njit(inline="always", **_OPTS)
def sr_bits(seed, step, index):
    """The 16 random bits (0..65535) that stochastic rounding adds to element ``index``.

    ``fmix32(lo(index) * 0x9e3779b9 ^ hi(index) * 0x27d4eb2f ^ sr_key(seed, step)) >> 16`` in
    uint32 arithmetic (``lo``/``hi``: the 32-bit words of the global element index).  Pure
    integer operations: a CUDA kernel computes the same bits; the same (seed, step, index)
    always gives the same bits, whatever the threading.
    """
    return _sr_hash(sr_key(seed, step), index)


# --------------------------------------------------------------------------- bfloat16
@njit(inline="always", **_OPTS)
def bf16_decode_block(codes, start, n, out):
    """``out[j] = float32(codes[start + j] << 16)`` for ``j < n`` (bfloat16 bits -> float32).

    Parameters
    ----------
    codes : ndarray of uint16
        bfloat16 bit patterns.
    start, n : int
        First code and number of codes.
    out : ndarray of float32
        Scratch of at least ``n`` elements, written from index 0.
    """
    c = codes[start:start + n]
    for j in range(n):
        out[j] = _bits_f32(np.uint32(c[j]) << np.uint32(16))


@intrinsic
def _bf16_round(typingctx, x, r, nearest):
    """bfloat16 bits (uint16) of float32 ``x`` rounded with increment ``r`` (uint32 < 2**16),
    or to nearest even where ``nearest`` (a compile-time-foldable bool) or ``|x|`` exceeds the
    largest finite bfloat16; NaN: truncated with the quiet bit forced.  i32 arithmetic."""
    if not (x == types.float32 and isinstance(r, types.Integer) and isinstance(nearest, types.Boolean)):
        return None

    def codegen(context, builder, signature, args):
        xv, rv, nv = args
        i32 = ir.IntType(32)
        rv = builder.trunc(rv, i32) if rv.type.width > 32 else builder.zext(rv, i32) if rv.type.width < 32 else rv
        b = builder.bitcast(xv, i32)
        a = builder.and_(b, i32(0x7FFFFFFF))
        hi = builder.lshr(b, i32(16))
        rne = builder.add(i32(0x7FFF), builder.and_(hi, i32(1)))
        use_rne = builder.or_(builder.trunc(nv, ir.IntType(1)) if nv.type.width > 1 else nv,
                              builder.icmp_unsigned(">", a, i32(0x7F7F0000)))
        h = builder.lshr(builder.add(b, builder.select(use_rne, rne, rv)), i32(16))
        h = builder.select(builder.icmp_unsigned(">", a, i32(0x7F800000)), builder.or_(hi, i32(0x40)), h)
        return builder.trunc(h, ir.IntType(16))

    return types.uint16(x, r, nearest), codegen


@njit(inline="always", **_OPTS)
def bf16_encode_block(src, codes, start, n, seed, step, index0, nearest):
    """Encode ``src[0:n]`` (float32) into ``codes[start:start + n]`` (bfloat16 bits, uint16).

    Parameters
    ----------
    src : ndarray of float32
        Values, read from index 0.
    codes : ndarray of uint16
        Written at ``start .. start + n - 1``.
    start, n : int
        First code and number of elements.
    seed, step : int
        Non-negative integers keying the random bits (:func:`sr_bits`): pass the optimizer's
        seed and step count, so each step rounds with fresh bits.
    index0 : int
        Global index (>= 0) of element 0 for the random bits: element ``j`` gets
        ``sr_bits(seed, step, index0 + j)``.  Usually the element's index in the whole state
        buffer (``start`` when ``codes`` is the whole buffer, not a view of a chunk of it).
    nearest : bool
        True: round to nearest even (``seed``, ``step``, ``index0`` unused).  False: stochastic
        rounding, ``bf16(x) = (bits(x) + sr_bits(seed, step, index0 + j)) >> 16``: unbiased.
    """
    c = codes[start:start + n]
    if nearest:
        for j in range(n):
            c[j] = _bf16_round(np.float32(src[j]), np.uint32(0), True)
    else:
        key = np.uint32(sr_key(seed, step))
        base = np.uint64(index0)
        if n > 0 and (base >> np.uint64(32)) == ((base + np.uint64(n - 1)) >> np.uint64(32)):
            kh = _sr_key_hi(key, base)      # the usual case: the block does not cross a 2**32 boundary
            for j in range(n):
                c[j] = _bf16_round(np.float32(src[j]), _sr_mix(kh, base + np.uint64(j)), False)
        else:
            for j in range(n):
                c[j] = _bf16_round(np.float32(src[j]), _sr_hash(key, base + np.uint64(j)), False)


# --------------------------------------------------------------------------- int8 maps and tables
def _torch_linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """``torch.linspace(start, end, n, dtype=torch.float32)`` bit for bit, in numpy.

    torch computes ``step = (end - start) / (n - 1)`` in float32, then element ``i`` as
    ``start + step * i`` for ``i < n // 2`` and ``end - step * (n - 1 - i)`` above, each a
    single fused multiply-add (one rounding).  Here the product and sum are exact in float64
    (24-bit step times an index < 2**8 plus an operand of the same scale), then rounded once.
    """
    s = np.float32(start)
    e = np.float32(end)
    step = np.float32((e - s) / np.float32(n - 1))
    i = np.arange(n)
    lo = np.float64(s) + np.float64(step) * i
    hi = np.float64(e) - np.float64(step) * (n - 1 - i)
    return np.where(i < n // 2, lo, hi).astype(np.float32)


def dynamic_map(signed: bool = True) -> np.ndarray:
    """The 256-entry dynamic-tree quantisation map (float32, ascending).

    Exactly the values of bitsandbytes' ``create_dynamic_map(signed, max_exponent_bits=7,
    total_bits=8)``: for decade ``i = 0..6``, ``2**i + 1`` (signed) or ``2**(i+1) + 1``
    (unsigned) float32 ``linspace(0.1, 1)`` boundaries, the float32 means of adjacent ones,
    times ``float32(10.0 ** (i - 6))`` in float32 (and their negatives when signed); plus 0
    and 1; sorted.  Signed: 127 positive, 127 negative values, 0 and 1 (no -1).  Unsigned:
    254 positive values, 0 and 1.

    Parameters
    ----------
    signed : bool
        True for first moments (values in [-1, 1]), False for second moments ([0, 1]).

    Returns
    -------
    ndarray of float32, shape (256,)
    """
    data = []
    for i in range(7):
        items = 2 ** (i + (0 if signed else 1)) + 1
        b = _torch_linspace_f32(0.1, 1.0, items)
        means = (b[:-1] + b[1:]) / np.float32(2.0)
        pos = np.float32(10.0 ** (i - 6)) * means       # torch: python scalar cast to float32
        data.append(pos)
        if signed:
            data.append(-pos)
    data.append(np.array([0.0, 1.0], np.float32))
    out = np.sort(np.concatenate(data)).astype(np.float32)
    if out.size < 256:      # bitsandbytes pads with zeros (never for 8 bits, 7 exponent bits)
        out = np.sort(np.concatenate([out, np.zeros(256 - out.size, np.float32)]))
    assert out.size == 256
    return out


# LUT geometry: cell = (min(max(|bits(y)|, _A_LO), _A_HI) >> 16) - _CELL_LO, plus _HALF if y < 0
_SHIFT = 16
_A_LO = 0x34000000          # 2**-23: no threshold of either map lies below it
_A_HI = 0x3F800000          # 1.0
_CELL_LO = _A_LO >> _SHIFT
_HALF = (_A_HI >> _SHIFT) - _CELL_LO + 1


class Q8Tables(NamedTuple):
    """Tables of one int8 map (:func:`q8_tables`), e.g. for a CUDA kernel to copy."""

    #: the 256 map values (float32, ascending)
    qmap: np.ndarray
    #: thr[i]: the midpoint of qmap[i] and qmap[i+1] rounded down to float32 (255 entries)
    thr: np.ndarray
    #: uint32 ``cand | T << 8`` per cell (see _build_tables): ``lut[_HALF + c]`` for cell ``c`` of
    #: y >= 0, ``lut[_HALF - 1 - c]`` for cell ``c`` of y < 0 (``c = (|bits| >> 16) - _CELL_LO``)
    lut: np.ndarray
    #: the code of 0.0
    zero: int


def _exact_midpoints(qmap: np.ndarray) -> np.ndarray:
    """The 255 midpoints of adjacent map entries, exact in float64."""
    q = qmap.astype(np.float64)
    return (q[:-1] + q[1:]) / 2.0


def nearest_code_reference(y: Any, qmap: np.ndarray) -> np.ndarray:
    """Exact nearest code of float32 ``y`` (ties to the lower index): the midpoints below ``y``."""
    return np.searchsorted(_exact_midpoints(qmap), np.asarray(y, np.float64), side="left").astype(np.uint8)


def _build_tables(signed: bool) -> Q8Tables:
    """The map, its thresholds and the cell table; checks that no cell holds two thresholds.

    A cell is the set of float32 ``y`` in [-1, 1] of one sign whose clamped magnitude bits
    ``min(max(|bits(y)|, _A_LO), _A_HI)`` share their top 16 bits.  Its entry holds ``cand``,
    the code of the cell's lowest ``y``, and ``T``, the 16-bit *key* of the cell's threshold,
    if any: ``code(y) = cand + (key(y) > T)`` with ``key = low16(|bits(y)|)`` for ``y >= 0``
    and ``0xffff - low16(|bits(y)|)`` for ``y < 0`` (the key grows with ``y`` on both sides);
    ``T = 0xffff`` (never exceeded) in a cell without threshold.  For ``y >= 0``, ``y > thr``
    iff ``key(y) > low16(bits(thr))`` when both are in the cell; for ``y < 0``, ``y > thr`` iff
    ``|y| < |thr|`` iff ``key(y) > 0xffff - low16(|bits(thr)|)``.
    """
    qmap = dynamic_map(signed)
    mid = _exact_midpoints(qmap)
    thr = mid.astype(np.float32)
    over = thr.astype(np.float64) > mid
    thr[over] = np.nextafter(thr[over], np.float32(-np.inf))
    tbits = thr.view(np.uint32).astype(np.int64) & 0x7FFFFFFF
    cells = np.arange(_CELL_LO, _CELL_LO + _HALF, dtype=np.int64)
    lo_bits = np.where(cells == _CELL_LO, 0, cells << _SHIFT)                  # the lowest cell
    hi_bits = np.minimum((cells << _SHIFT) | ((1 << _SHIFT) - 1), _A_HI)       # also takes |y| < 2**-23
    lo = lo_bits.astype(np.uint32).view(np.float32)
    hi = hi_bits.astype(np.uint32).view(np.float32)
    parts = []
    for part, (a, b) in enumerate([(lo, hi), (-hi, -lo)]):
        ca = nearest_code_reference(a, qmap).astype(np.int64)
        cb = nearest_code_reference(b, qmap).astype(np.int64)
        if np.any(cb - ca > 1):
            raise AssertionError("a cell of the int8 lookup table holds two thresholds")
        t = np.full(_HALF, 0xFFFF, np.int64)
        jump = np.nonzero(cb > ca)[0]
        tb = tbits[ca[jump]]
        if np.any((tb >> _SHIFT) != cells[jump]) or np.any(cells[jump] == _CELL_LO):
            raise AssertionError("a threshold outside its cell")
        t[jump] = (tb & 0xFFFF) if part == 0 else 0xFFFF - (tb & 0xFFFF)
        parts.append((ca | (t << 8)).astype(np.uint32))
    lut = np.concatenate([parts[1][::-1], parts[0]])      # y < 0 cells reversed, then y >= 0
    zero = int(nearest_code_reference(np.float32(0.0), qmap))
    for a in (qmap, thr, lut):
        a.setflags(write=False)
    return Q8Tables(qmap, thr, lut, zero)


_TABLES = {True: _build_tables(True), False: _build_tables(False)}
# module globals: numba freezes them into the code as constants, which lets LLVM vectorise the
# table lookups (gathers): an array argument might alias the codes being written
_QMAP_S, _QMAP_U = _TABLES[True].qmap, _TABLES[False].qmap
_LUT_S, _LUT_U = _TABLES[True].lut, _TABLES[False].lut
_ZERO_S, _ZERO_U = np.uint8(_TABLES[True].zero), np.uint8(_TABLES[False].zero)


def q8_tables(signed: bool) -> Q8Tables:
    """The (read-only) tables of the signed or unsigned dynamic map."""
    return _TABLES[bool(signed)]


# --------------------------------------------------------------------------- int8 blocks
@intrinsic
def _q8_code(typingctx, y, lut):
    """Exact nearest code of float32 ``y`` in [-1, 1] (see :func:`_build_tables`):
    ``e = lut[cell(y)]; code = (e & 0xff) + (key(y) > e >> 8)``, all in i32 arithmetic with a
    32-bit table index (so that the vectorised lookup is a dword gather)."""
    if not (y == types.float32 and isinstance(lut, types.Array) and lut.dtype == types.uint32):
        return None

    def codegen(context, builder, signature, args):
        yv, arr = args
        i32 = ir.IntType(32)
        data = context.make_array(signature.args[1])(context, builder, arr).data
        b = builder.bitcast(yv, i32)
        a = builder.and_(b, i32(0x7FFFFFFF))
        a = builder.select(builder.icmp_unsigned("<", a, i32(_A_LO)), i32(_A_LO), a)
        a = builder.select(builder.icmp_unsigned(">", a, i32(_A_HI)), i32(_A_HI), a)
        neg = builder.lshr(b, i32(31))
        # index from the table's middle: c for y >= 0, -1 - c (= ~c) for y < 0.  It may be
        # negative, so it stays a sign-extended i32 and the vectorised load is a dword gather
        # (a provably non-negative index is zero-extended to 64 bits: half as many lanes)
        cell = builder.sub(builder.lshr(a, i32(_SHIFT)), i32(_CELL_LO))
        cell = builder.xor(cell, builder.sub(i32(0), neg))
        mid = builder.gep(data, [ir.IntType(64)(_HALF)], inbounds=True)
        e = builder.load(builder.gep(mid, [builder.sext(cell, ir.IntType(64))], inbounds=True))
        key = builder.xor(builder.and_(a, i32(0xFFFF)), builder.mul(neg, i32(0xFFFF)))
        up = builder.zext(builder.icmp_unsigned(">", key, builder.lshr(e, i32(8))), i32)
        return builder.trunc(builder.add(builder.and_(e, i32(0xFF)), up), ir.IntType(8))

    return types.uint8(y, lut), codegen


@njit(inline="always", **_OPTS)
def _q8_decode_loop(c, s, n, qmap, out):
    for j in range(n):
        out[j] = qmap[c[j]] * s


@njit(inline="always", **_OPTS)
def q8_decode_block(codes, scales, block, start, n, signed, out):
    """``out[j] = qmap[codes[start + j]] * scales[block]`` for ``j < n``: one block.

    Parameters
    ----------
    codes : ndarray of uint8
    scales : ndarray of float32
        absmax per block.
    block : int
        The block's index in ``scales``.
    start, n : int
        The block's first code and length.
    signed : bool
        The map the block was encoded with (:func:`dynamic_map`).
    out : ndarray of float32
        Scratch, written from index 0.
    """
    c = codes[start:start + n]
    s = np.float32(scales[block])
    if signed:
        _q8_decode_loop(c, s, n, _QMAP_S, out)
    else:
        _q8_decode_loop(c, s, n, _QMAP_U, out)


@njit(inline="always", **_OPTS)
def _q8_encode_loop(src, c, n, absmax, lut):
    for j in range(n):
        c[j] = _q8_code(np.float32(src[j]) / absmax, lut)


@njit(inline="always", **_OPTS)
def q8_encode_block(src, codes, scales, block, start, n, signed):
    """Encode ``src[0:n]`` as one block: ``scales[block]`` and ``codes[start:start + n]``.

    ``absmax = max |src|``; ``codes = nearest code of src / absmax`` (correctly rounded
    float32 division, as bitsandbytes; ties to the lower code).  absmax 0: codes of 0.0.
    A NaN or inf in the block: absmax NaN, codes of 0.0.

    Parameters
    ----------
    src : ndarray of float32
        Values, read from index 0.
    codes : ndarray of uint8
    scales : ndarray of float32
    block : int
        The block's index in ``scales``.
    start, n : int
        The block's first code and length (``n == 0`` writes absmax 0).
    signed : bool
        Signed map (first moments) or unsigned map (second moments: negative values get
        the code of 0.0).
    """
    c = codes[start:start + n]
    m = np.uint32(0)
    for j in range(n):
        m = _absmax_bits(m, np.float32(src[j]))
    if m == 0 or m >= np.uint32(0x7F800000):
        zero = _ZERO_S if signed else _ZERO_U
        scales[block] = np.float32(0.0) if m == 0 else np.float32(np.nan)
        for j in range(n):
            c[j] = zero
        return
    absmax = _bits_f32(m)
    scales[block] = absmax
    if signed:
        _q8_encode_loop(src, c, n, absmax, _LUT_S)
    else:
        _q8_encode_loop(src, c, n, absmax, _LUT_U)


@njit(inline="always", **_OPTS)
def q8_decode_span(codes, scales, blocksize, start, n, signed, out):
    """Decode ``codes[start:start + n]`` into ``out[0:n]``, block by block.

    ``start`` must be a multiple of ``blocksize`` (block ``start // blocksize`` comes first);
    the span may end inside a block only where the state ends (its last, short block).
    """
    b0 = start // blocksize
    for k in range((n + blocksize - 1) // blocksize):
        o = k * blocksize
        q8_decode_block(codes, scales, b0 + k, start + o, min(blocksize, n - o), signed, out[o:])


@njit(inline="always", **_OPTS)
def q8_encode_span(src, codes, scales, blocksize, start, n, signed):
    """Encode ``src[0:n]`` into ``codes[start:start + n]`` and their blocks' absmax.

    ``start`` must be a multiple of ``blocksize``; a span that ends inside a block encodes
    that block from its first ``n % blocksize`` elements only (use it for the last block).
    """
    b0 = start // blocksize
    for k in range((n + blocksize - 1) // blocksize):
        o = k * blocksize
        q8_encode_block(src[o:], codes, scales, b0 + k, start + o, min(blocksize, n - o), signed)


@njit(**_OPTS)
def _q8_codes_of(y, out, signed):
    """``out[i]`` = nearest code of ``y[i]`` (float32 in [-1, 1], no scaling): for tests."""
    n = y.size
    if signed:
        for j in range(n):
            out[j] = _q8_code(y[j], _LUT_S)
    else:
        for j in range(n):
            out[j] = _q8_code(y[j], _LUT_U)


# --------------------------------------------------------------------------- array level
def q8_blocks(n: int, block: int = BLOCK) -> int:
    """Number of blocks (absmax entries) of ``n`` elements in blocks of ``block``."""
    return -(-int(n) // int(block))


def _blocks_per_unit(block: int) -> int:
    return max(1, config.PARALLEL_MIN_CHUNK // block)


@njit(**_OPTS)
def _bf16_encode_range(x, codes, lo, hi, seed, step, nearest):
    bf16_encode_block(x[lo:hi], codes, lo, hi - lo, seed, step, lo, nearest)


@njit(parallel=True, **_OPTS)
def _bf16_encode_parallel(x, codes, seed, step, nearest, chunk):
    n = x.size
    for u in prange((n + chunk - 1) // chunk):
        _bf16_encode_range(x, codes, u * chunk, min(n, (u + 1) * chunk), seed, step, nearest)


@njit(**_OPTS)
def _bf16_decode_range(codes, out, lo, hi):
    bf16_decode_block(codes, lo, hi - lo, out[lo:hi])


@njit(parallel=True, **_OPTS)
def _bf16_decode_parallel(codes, out, chunk):
    n = codes.size
    for u in prange((n + chunk - 1) // chunk):
        _bf16_decode_range(codes, out, u * chunk, min(n, (u + 1) * chunk))


@njit(**_OPTS)
def _q8_encode_range(x, codes, scales, block, lo, hi, signed):
    q8_encode_span(x[lo:hi], codes, scales, block, lo, hi - lo, signed)


@njit(parallel=True, **_OPTS)
def _q8_encode_parallel(x, codes, scales, block, unit, signed):
    n = x.size
    chunk = unit * block
    for u in prange((n + chunk - 1) // chunk):
        _q8_encode_range(x, codes, scales, block, u * chunk, min(n, (u + 1) * chunk), signed)


@njit(**_OPTS)
def _q8_decode_range(codes, scales, block, lo, hi, signed, out):
    q8_decode_span(codes, scales, block, lo, hi - lo, signed, out[lo:hi])


@njit(parallel=True, **_OPTS)
def _q8_decode_parallel(codes, scales, block, unit, signed, out):
    n = codes.size
    chunk = unit * block
    for u in prange((n + chunk - 1) // chunk):
        _q8_decode_range(codes, scales, block, u * chunk, min(n, (u + 1) * chunk), signed, out)


def _flat32(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype != np.float32:
        raise TypeError(f"expected float32 values, got {x.dtype}")
    return np.ascontiguousarray(x).reshape(-1)


def _use_prange(n: int, parallel: Optional[bool]) -> bool:
    return n >= config.PARALLEL_THRESHOLD if parallel is None else bool(parallel)


def _check_block(block: int) -> int:
    block = int(block)
    if block <= 0:
        raise ValueError(f"block must be positive, got {block}")
    return block


def bf16_encode(x: np.ndarray, seed: int = 0, step: int = 0, nearest: bool = True,
                parallel: Optional[bool] = None) -> np.ndarray:
    """Encode float32 values as bfloat16 bit patterns.

    Parameters
    ----------
    x : ndarray of float32
        Any shape (flattened in C order; element ``i`` of the flat array has global index ``i``).
    seed, step : int
        Keys of stochastic rounding's random bits (:func:`sr_bits`); non-negative.
    nearest : bool
        True: round to nearest even; False: stochastic rounding.
    parallel : bool, optional
        Force the parallel (prange) or serial loop; default: parallel from
        ``config.PARALLEL_THRESHOLD`` elements on.

    Returns
    -------
    ndarray of uint16
        Same shape as ``x``.
    """
    flat = _flat32(x)
    codes = np.empty(flat.size, np.uint16)
    seed, step, nearest = int(seed), int(step), bool(nearest)
    if seed < 0 or step < 0:
        raise ValueError("seed and step must be non-negative")
    if _use_prange(flat.size, parallel):
        _bf16_encode_parallel(flat, codes, seed, step, nearest, config.PARALLEL_MIN_CHUNK)
    else:
        _bf16_encode_range(flat, codes, 0, flat.size, seed, step, nearest)
    return codes.reshape(np.shape(x))


def bf16_decode(codes: np.ndarray, parallel: Optional[bool] = None) -> np.ndarray:
    """Decode bfloat16 bit patterns (uint16, any shape) to float32 of the same shape."""
    c = np.asarray(codes)
    if c.dtype != np.uint16:
        raise TypeError(f"expected uint16 codes, got {c.dtype}")
    flat = np.ascontiguousarray(c).reshape(-1)
    out = np.empty(flat.size, np.float32)
    if _use_prange(flat.size, parallel):
        _bf16_decode_parallel(flat, out, config.PARALLEL_MIN_CHUNK)
    else:
        _bf16_decode_range(flat, out, 0, flat.size)
    return out.reshape(c.shape)


def q8_encode(x: np.ndarray, signed: bool = True, block: int = BLOCK,
              parallel: Optional[bool] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Quantise float32 values blockwise to 8 bits with the dynamic map.

    Parameters
    ----------
    x : ndarray of float32
        Any shape, flattened in C order and cut into blocks of ``block`` elements (the last
        one shorter when ``block`` does not divide the size).
    signed : bool
        Signed map (first moments) or unsigned map (second moments; negative values then get
        code 0, the map's 0.0).
    block : int
        Block length.
    parallel : bool, optional
        Force the prange loop over groups of blocks or the serial loop; default: parallel
        from ``config.PARALLEL_THRESHOLD`` elements on.

    Returns
    -------
    codes : ndarray of uint8
        Same shape as ``x``.
    absmax : ndarray of float32
        One per block (``q8_blocks(x.size, block)``).
    """
    flat = _flat32(x)
    block = _check_block(block)
    signed = bool(signed)
    codes = np.empty(flat.size, np.uint8)
    scales = np.empty(q8_blocks(flat.size, block), np.float32)
    if _use_prange(flat.size, parallel):
        _q8_encode_parallel(flat, codes, scales, block, _blocks_per_unit(block), signed)
    else:
        _q8_encode_range(flat, codes, scales, block, 0, flat.size, signed)
    return codes.reshape(np.shape(x)), scales


def q8_decode(codes: np.ndarray, absmax: np.ndarray, signed: bool = True, block: int = BLOCK,
              parallel: Optional[bool] = None) -> np.ndarray:
    """Decode blockwise 8-bit codes: ``qmap[code] * absmax[i // block]`` (float32, codes' shape).

    Parameters
    ----------
    codes : ndarray of uint8
    absmax : ndarray of float32
        ``q8_blocks(codes.size, block)`` entries.
    signed : bool
        The map the codes were encoded with.
    block : int
        Block length.
    parallel : bool, optional
        As in :func:`q8_encode`.
    """
    c = np.asarray(codes)
    if c.dtype != np.uint8:
        raise TypeError(f"expected uint8 codes, got {c.dtype}")
    flat = np.ascontiguousarray(c).reshape(-1)
    block = _check_block(block)
    scales = np.ascontiguousarray(absmax, dtype=np.float32).reshape(-1)
    if scales.size != q8_blocks(flat.size, block):
        raise ValueError(f"{flat.size} codes in blocks of {block} need {q8_blocks(flat.size, block)} "
                         f"absmax values, got {scales.size}")
    out = np.empty(flat.size, np.float32)
    signed = bool(signed)
    if _use_prange(flat.size, parallel):
        _q8_decode_parallel(flat, scales, block, _blocks_per_unit(block), signed, out)
    else:
        _q8_decode_range(flat, scales, block, 0, flat.size, signed, out)
    return out.reshape(c.shape)
