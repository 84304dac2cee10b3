"""CPU loops over compressed state: decode a block of state, run the rule, encode it back.

The rules of :mod:`fastadapt.algorithms` read and write float state ``s1[i]``; compressed
state (:mod:`fastadapt.backends.compressed`) is stored as bfloat16 bits or as 8-bit codes with
one float32 absmax per block.  These loops walk a parameter in sub-blocks of a few thousand
elements (a whole number of int8 blocks): each used slot is decoded into a float32 scratch
(in L1/L2), the same ``_run`` as the float loops (:mod:`fastadapt.backends.cpu`) applies the
compiled rule to the sub-block with the scratch as its state, and the scratch is encoded
back.  Nothing of size O(parameter) is allocated; the scratch is O(sub-block) per work unit.

The sparse loops (:mod:`fastadapt.backends.cpu_sparse`) use the same ``decode_span`` /
``encode_span`` per touched row (int8 blocks of tables are aligned to rows).
"""

from typing import Any

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .. import config
from .codec import bf16_decode_block, bf16_encode_block, q8_decode_span, q8_encode_span
from .cpu_loops import _run, fingerprint, work_unit
from .cpu_compile import direct

__all__ = ["decode_span", "encode_span", "codec_step", "packed_slots", "sub_block", "SUB_BLOCK"]

_OPTS = config.NJIT_OPTIONS

#: elements decoded at once (rounded up to a whole number of blocks): three float32 slots of
#: 2048 elements are 24 KiB of scratch, within L1/L2
SUB_BLOCK = 2048


def decode_span(codes: Any, scales: Any, bs: int, start: int, n: int, signed: bool, out: Any) -> None:
    """Decode ``n`` values of a compressed slot from flat element ``start`` (a multiple of ``bs``
    for int8) into ``out[0:n]``: bfloat16 (``codes`` uint16) or int8 blockwise (uint8)."""


def encode_span(src: Any, codes: Any, scales: Any, bs: int, start: int, n: int, signed: bool, seed: int,
                step: int, nearest: bool) -> None:
    """Encode ``src[0:n]`` into a compressed slot from flat element ``start`` (see :func:`decode_span`)."""


@overload(decode_span)
def _decode_span(codes, scales, bs, start, n, signed, out):
    if codes.dtype == types.uint16:
        def impl(codes, scales, bs, start, n, signed, out):
            bf16_decode_block(codes, start, n, out)
        return impl
    if codes.dtype == types.uint8:
        def impl(codes, scales, bs, start, n, signed, out):
            q8_decode_span(codes, scales, bs, start, n, signed, out)
        return impl
    return None


@overload(encode_span)
def _encode_span(src, codes, scales, bs, start, n, signed, seed, step, nearest):
    if codes.dtype == types.uint16:
        def impl(src, codes, scales, bs, start, n, signed, seed, step, nearest):
            bf16_encode_block(src, codes, start, n, seed, step, start, nearest)
        return impl
    if codes.dtype == types.uint8:
        def impl(src, codes, scales, bs, start, n, signed, seed, step, nearest):
            q8_encode_span(src, codes, scales, bs, start, n, signed)
        return impl
    return None


@njit(**_OPTS)
def _codec_range(rule, p, g, c1, c2, c3, a1, a2, a3, used, signed, bs, sub, e0, e1, k, seed, step, nearest):
    """Elements ``e0:e1`` (``e0`` a multiple of ``bs``) in sub-blocks of ``sub`` (a multiple of ``bs``)."""
    scratch = np.empty((3, sub), np.float32)
    x1, x2, x3 = scratch[0], scratch[1], scratch[2]
    isz = p.itemsize
    pa, ga = np.int64(p.ctypes.data), np.int64(g.ctypes.data)        # (addresses: int64 throughout)
    xa1, xa2, xa3 = np.int64(x1.ctypes.data), np.int64(x2.ctypes.data), np.int64(x3.ctypes.data)
    s = e0
    while s < e1:
        n = min(sub, e1 - s)
        if used[0]:
            decode_span(c1, a1, bs, s, n, signed[0], x1)
        if used[1]:
            decode_span(c2, a2, bs, s, n, signed[1], x2)
        if used[2]:
            decode_span(c3, a3, bs, s, n, signed[2], x3)
        off = s * isz
        _run(rule, p, pa + off, ga + off, xa1 if used[0] else pa + off, xa2 if used[1] else pa + off,
             xa3 if used[2] else pa + off, n, k)
        if used[0]:
            encode_span(x1, c1, a1, bs, s, n, signed[0], seed, step, nearest)
        if used[1]:
            encode_span(x2, c2, a2, bs, s, n, signed[1], seed, step, nearest)
        if used[2]:
            encode_span(x3, c3, a3, bs, s, n, signed[2], seed, step, nearest)
        s += n


@njit(parallel=True, **_OPTS)
def _codec_parallel(rule, p, g, c1, c2, c3, a1, a2, a3, used, signed, bs, sub, chunk, k, seed, step, nearest):
    n = p.size
    for c in prange((n + chunk - 1) // chunk):
        _codec_range(rule, p, g, c1, c2, c3, a1, a2, a3, used, signed, bs, sub, c * chunk,
                     min(n, (c + 1) * chunk), k, seed, step, nearest)


@njit(**_OPTS)
def _codec_serial(rule, p, g, c1, c2, c3, a1, a2, a3, used, signed, bs, sub, k, seed, step, nearest):
    _codec_range(rule, p, g, c1, c2, c3, a1, a2, a3, used, signed, bs, sub, 0, p.size, k, seed, step, nearest)


def packed_slots(slots: Any) -> Any:
    """The loops' arguments for three compressed slots (:func:`codec_step`'s ``slots``).

    Parameters
    ----------
    slots : sequence of three
        :class:`~fastadapt.backends.compressed.CompressedBuffer` or None (unused slot); the used
        ones share one kind and block size.

    Returns
    -------
    codes, scales : tuple of three ndarrays
        Flat codes and absmax per slot (an unused slot: a 1-element view of a used one's, never
        read or written).
    used, signed : tuple of three bools
    bs : int
        Block length (int8), 1 for bfloat16.
    """
    first = next(s for s in slots if s is not None)
    codes = tuple(s.flat_codes if s is not None else first.flat_codes[:1] for s in slots)
    scales = tuple(s.flat_absmax if s is not None else first.flat_absmax[:1] for s in slots)
    used = tuple(s is not None for s in slots)
    signed = tuple(bool(s.signed) if s is not None else True for s in slots)
    return codes, scales, used, signed, int(first.block)


def sub_block(bs: int) -> int:
    """Elements decoded at once for blocks of ``bs``: :data:`SUB_BLOCK` rounded to whole blocks."""
    return max(bs, (SUB_BLOCK // bs) * bs)


def codec_step(rule: Any, p: np.ndarray, g: np.ndarray, slots: Any, k: Any, seed: int, step: int,
               nearest: bool) -> None:
    """Apply compiled ``rule`` to every element of flat ``p`` and ``g`` with compressed state.

    Parameters
    ----------
    rule : numba dispatcher
        A compiled rule.
    p, g : ndarray
        Flat float32 arrays of one length; ``p`` is updated in place.
    slots : sequence of three
        Per rule slot, a :class:`~fastadapt.backends.compressed.CompressedBuffer` or None for a
        slot the options leave unused.  The used ones share one kind and block size.
    k : tuple
        The rule's per-step scalars.
    seed, step : int
        Key of stochastic rounding (bfloat16): the parameter's seed and its step count.
    nearest : bool
        Round bfloat16 to nearest instead of stochastically.
    """
    codes, scales, used, signed, bs = packed_slots(slots)
    sub = sub_block(bs)
    args = (rule, p, g, *codes, *scales, used, signed, bs, sub)
    key = (rule, fingerprint((p, g, *codes, *scales)))
    if p.size >= config.PARALLEL_THRESHOLD:
        unit = max(sub, (work_unit(p.size) // sub) * sub)
        direct(_codec_parallel, key, *args, unit, k, seed, step, nearest)
    else:
        direct(_codec_serial, key, *args, k, seed, step, nearest)
