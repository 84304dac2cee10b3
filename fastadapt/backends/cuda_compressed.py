"""Compressed optimizer state on CUDA: device buffers and the decode / rule / encode kernels.

The device counterpart of :mod:`fastadapt.backends.compressed` (the buffers) and
:mod:`fastadapt.backends.cpu_codec` (the loops), with the codec of
:mod:`fastadapt.backends.codec` written as numba.cuda device functions:

bfloat16
    One thread per element (grid-stride): ``bits << 16`` into a one-element local array, the
    unchanged rule on local one-element copies of the parameter and state, then round to
    nearest even or stochastically with the *same* counter-based hash as the CPU
    (:func:`fastadapt.backends.codec.sr_bits` of the seed, the step and the global element
    index, in 32-bit integer arithmetic), so both backends store the same codes for the
    same float32 values.
int8 blockwise
    One CUDA block per quantisation block (grid-stride over blocks).  Each thread decodes its
    elements (``qmap[code] * absmax``), runs the rule and keeps the new float32 state in a
    scratch in global memory (one per device and stream, reused: ``SCRATCH_ELEMS`` float32
    values per slot at most); the block's absmax is reduced with a shared-memory atomic max
    of ``|bits|`` (NaN and inf above every finite value), then every element is encoded with
    the exact nearest code, a binary search over the 255 float32 thresholds of
    :func:`fastadapt.backends.codec.q8_tables` (``code = #{i: y > thr[i]}``, the codes the
    CPU's lookup table gives).  A block holding a NaN or inf stores absmax NaN and the codes
    of 0.0; a block of zeros absmax 0.

Construction (``compressed_full`` / ``compressed_from``) encodes on the host with
:meth:`CompressedBuffer.encode` and copies the codes to the device: exact, and done once.

Under ``NUMBA_ENABLE_CUDASIM=1`` the bit casts are numpy views; on a GPU they are the
LLVM bitcasts of :mod:`fastadapt.backends.codec`.
"""

from typing import Any, Dict, Optional, Tuple

import numpy as np

from .. import config
from .codec import q8_tables, sr_key
from .compressed import CompressedBuffer
from .cuda_arrays import SIMULATOR, _context_of, _stream_of, as_device_array, cuda, device_of, launch_dims

__all__ = ["DeviceCompressedBuffer", "CodecKernels", "codec_step", "from_host", "SCRATCH_ELEMS"]

#: most float32 values per slot in the int8 kernels' scratch (it bounds the grid: at least one
#: block of the parameter's block length)
SCRATCH_ELEMS = 1 << 20

_M32 = np.uint64(0xFFFFFFFF)
_U0 = np.uint64(0)
_U1 = np.uint64(1)
_U13 = np.uint64(13)
_U16 = np.uint64(16)
_U32 = np.uint64(32)
_C1 = np.uint64(0x85EBCA6B)
_C2 = np.uint64(0xC2B2AE35)
_GOLDEN = np.uint64(0x9E3779B9)
_HI_MUL = np.uint64(0x27D4EB2F)
_ABS = np.uint64(0x7FFFFFFF)
_RNE = np.uint64(0x7FFF)
_BF16_MAX = np.uint64(0x7F7F0000)
_INF = np.uint64(0x7F800000)
_QUIET = np.uint64(0x40)

# the maps and thresholds as (2, n) tables: row 0 unsigned, row 1 signed (global arrays are
# constants of the kernels)
_QMAPS = np.stack([q8_tables(False).qmap, q8_tables(True).qmap]).astype(np.float32)
_THRS = np.stack([q8_tables(False).thr, q8_tables(True).thr]).astype(np.float32)
_ZEROS = np.array([q8_tables(False).zero, q8_tables(True).zero], np.uint8)


# --------------------------------------------------------------------------- bit casts
if SIMULATOR:
    def _f32_bits(x: Any) -> Any:
        """The bits of float32 ``x`` (simulator: a numpy view)."""
        return np.uint64(np.array(x, np.float32).view(np.uint32)[()])

    def _bits_f32(b: Any) -> Any:
        """The float32 with bits ``b`` (< 2**32; simulator: a numpy view)."""
        return np.array(np.uint64(b) & _M32, np.uint32).view(np.float32)[()]
else:                                                  # pragma: no cover - needs a GPU
    from .codec import _bits_f32 as _bits_f32_ir
    from .codec import _f32_bits as _f32_bits_ir

    @cuda.jit(device=True)
    def _f32_bits(x):
        return np.uint64(_f32_bits_ir(np.float32(x)))

    @cuda.jit(device=True)
    def _bits_f32(b):
        return _bits_f32_ir(np.uint32(b & _M32))


# --------------------------------------------------------------------------- codec device functions
@cuda.jit(device=True)
def _fmix32(h):
    """murmur3's finaliser in uint32 arithmetic (``h`` a uint64 < 2**32), as codec.fmix32."""
    h = h ^ (h >> _U16)
    h = (h * _C1) & _M32
    h = h ^ (h >> _U13)
    h = (h * _C2) & _M32
    return h ^ (h >> _U16)


@cuda.jit(device=True)
def _sr_bits(key, index):
    """codec.sr_bits: 16 random bits of element ``index`` (uint64) under ``key`` (= sr_key)."""
    kh = (key ^ ((index >> _U32) * _HI_MUL)) & _M32
    return _fmix32((((index & _M32) * _GOLDEN) & _M32) ^ kh) >> _U16


@cuda.jit(device=True)
def _bf16_encode(x, r, nearest):
    """bfloat16 bits of float32 ``x`` rounded with increment ``r``, or to nearest even where
    ``nearest`` or ``|x|`` exceeds the largest finite bfloat16; NaN: quiet, sign kept."""
    b = _f32_bits(x)
    a = b & _ABS
    hi = b >> _U16
    inc = r
    if nearest or a > _BF16_MAX:
        inc = _RNE + (hi & _U1)
    h = ((b + inc) & _M32) >> _U16
    if a > _INF:
        h = hi | _QUIET
    return np.uint16(h)


@cuda.jit(device=True)
def _bf16_decode(code):
    return _bits_f32(np.uint64(code) << _U16)


@cuda.jit(device=True)
def _q8_code(y, sg):
    """Exact nearest code of float32 ``y`` in [-1, 1]: the number of thresholds below ``y``."""
    lo = 0
    hi = 255
    while lo < hi:
        mid = (lo + hi) // 2
        if y > _THRS[sg, mid]:
            lo = mid + 1
        else:
            hi = mid
    return np.uint8(lo)


# --------------------------------------------------------------------------- kernels
class CodecKernels:
    """The compressed-state kernels of one rule (compiled lazily by numba, per signature).

    Parameters
    ----------
    dev : numba.cuda device function
        The rule compiled with ``cuda.jit(device=True)`` (:func:`fastadapt.backends.cuda.kernels`).
    """

    def __init__(self, dev: Any) -> None:
        @cuda.jit
        def bf16(p, g, c1, c2, c3, u1, u2, u3, k, key, nearest):
            lp = cuda.local.array(1, np.float32)
            x1 = cuda.local.array(1, np.float32)
            x2 = cuda.local.array(1, np.float32)
            x3 = cuda.local.array(1, np.float32)
            i = cuda.grid(1)
            stride = cuda.gridsize(1)
            n = p.size
            while i < n:
                if u1:
                    x1[0] = _bf16_decode(c1[i])
                if u2:
                    x2[0] = _bf16_decode(c2[i])
                if u3:
                    x3[0] = _bf16_decode(c3[i])
                lp[0] = p[i]
                dev(lp, x1, x2, x3, 0, g[i], k)
                p[i] = lp[0]
                r = _U0
                if not nearest:
                    r = _sr_bits(key, np.uint64(i))
                if u1:
                    c1[i] = _bf16_encode(x1[0], r, nearest)
                if u2:
                    c2[i] = _bf16_encode(x2[0], r, nearest)
                if u3:
                    c3[i] = _bf16_encode(x3[0], r, nearest)
                i += stride

        @cuda.jit
        def q8(p, g, c1, c2, c3, a1, a2, a3, u1, u2, u3, sg1, sg2, sg3, bs, scratch, k):
            lp = cuda.local.array(1, np.float32)
            x1 = cuda.local.array(1, np.float32)
            x2 = cuda.local.array(1, np.float32)
            x3 = cuda.local.array(1, np.float32)
            red = cuda.shared.array(3, np.uint32)
            t = cuda.threadIdx.x
            ntpb = cuda.blockDim.x
            n = p.size
            nblocks = (n + bs - 1) // bs
            grid = cuda.gridDim.x
            row = cuda.blockIdx.x * bs                     # this block's scratch, per slot
            o1 = row
            o2 = grid * bs + row
            o3 = 2 * grid * bs + row
            b = cuda.blockIdx.x
            while b < nblocks:
                if t == 0:
                    red[0] = 0
                    red[1] = 0
                    red[2] = 0
                cuda.syncthreads()
                start = b * bs
                end = min(start + bs, n)
                m1 = _U0
                m2 = _U0
                m3 = _U0
                s1 = a1[b] if u1 else np.float32(0)
                s2 = a2[b] if u2 else np.float32(0)
                s3 = a3[b] if u3 else np.float32(0)
                e = start + t
                while e < end:
                    j = e - start
                    if u1:
                        x1[0] = _QMAPS[sg1, c1[e]] * s1
                    if u2:
                        x2[0] = _QMAPS[sg2, c2[e]] * s2
                    if u3:
                        x3[0] = _QMAPS[sg3, c3[e]] * s3
                    lp[0] = p[e]
                    dev(lp, x1, x2, x3, 0, g[e], k)
                    p[e] = lp[0]
                    if u1:
                        scratch[o1 + j] = x1[0]
                        m1 = max(m1, _f32_bits(x1[0]) & _ABS)
                    if u2:
                        scratch[o2 + j] = x2[0]
                        m2 = max(m2, _f32_bits(x2[0]) & _ABS)
                    if u3:
                        scratch[o3 + j] = x3[0]
                        m3 = max(m3, _f32_bits(x3[0]) & _ABS)
                    e += ntpb
                cuda.atomic.max(red, 0, np.uint32(m1))
                cuda.atomic.max(red, 1, np.uint32(m2))
                cuda.atomic.max(red, 2, np.uint32(m3))
                cuda.syncthreads()
                if u1:
                    _q8_store(scratch, o1, c1, a1, b, start, end, t, ntpb, np.uint64(red[0]), sg1)
                if u2:
                    _q8_store(scratch, o2, c2, a2, b, start, end, t, ntpb, np.uint64(red[1]), sg2)
                if u3:
                    _q8_store(scratch, o3, c3, a3, b, start, end, t, ntpb, np.uint64(red[2]), sg3)
                cuda.syncthreads()                         # (red is reset for the next block)
                b += grid

        self.bf16 = bf16
        self.q8 = q8


@cuda.jit(device=True)
def _q8_store(scratch, off, codes, scales, b, start, end, t, ntpb, m, sg):
    """Encode one int8 block from ``scratch[off:]`` given its reduced ``|bits|`` maximum ``m``
    (q8_encode_block: absmax 0 or NaN write the code of 0.0)."""
    e = start + t
    if m == _U0 or m >= _INF:
        zero = _ZEROS[sg]
        while e < end:
            codes[e] = zero
            e += ntpb
        if t == 0:
            scales[b] = np.float32(0) if m == _U0 else np.float32(np.nan)
        return
    absmax = _bits_f32(m)
    while e < end:
        codes[e] = _q8_code(np.float32(scratch[off + e - start] / absmax), sg)
        e += ntpb
    if t == 0:
        scales[b] = absmax


# --------------------------------------------------------------------------- buffers
class DeviceCompressedBuffer:
    """One compressed state buffer of a float32 CUDA parameter (the interface of
    :class:`fastadapt.backends.compressed.CompressedBuffer`, arrays on the parameter's device).

    Attributes
    ----------
    kind : {"bfloat16", "int8"}
    codes : numba device array
        ``uint16`` (bfloat16 bits) or ``uint8`` (dynamic-map codes), the parameter's shape.
    absmax : numba device array of float32
        int8: one scale per block; bfloat16: one unused element.
    signed : bool
    block : int
    seed : int
    """

    __slots__ = ("kind", "codes", "absmax", "signed", "block", "seed", "flat_codes", "flat_absmax")

    #: what the optimizers test for
    compressed_state = True

    #: the dtype of the decoded values
    dtype = np.dtype(np.float32)

    def __init__(self, kind: str, codes: Any, absmax: Any, signed: bool, block: int, seed: int = 0) -> None:
        self.kind = kind
        self.codes = codes
        self.absmax = absmax
        self.signed = bool(signed)
        self.block = int(block)
        self.seed = int(seed)
        n = int(np.prod(codes.shape, dtype=np.int64))
        self.flat_codes = codes.reshape(n) if len(codes.shape) != 1 else codes
        self.flat_absmax = absmax

    @classmethod
    def from_host(cls, buf: Any, p: Any) -> "DeviceCompressedBuffer":
        """A device copy of a host :class:`CompressedBuffer` ``buf`` on parameter ``p``'s device."""
        view = as_device_array(p)
        with _context_of(view):
            codes = cuda.to_device(np.ascontiguousarray(buf.codes))
            absmax = cuda.to_device(np.ascontiguousarray(buf.absmax, np.float32).reshape(-1))
        return cls(buf.kind, codes, absmax, buf.signed, buf.block, buf.seed)

    def to_host(self) -> CompressedBuffer:
        """A host :class:`CompressedBuffer` holding copies of the codes and scales."""
        with _context_of(self.codes):
            if not SIMULATOR:
                cuda.synchronize()
            codes = np.array(self.codes.copy_to_host(), copy=True).reshape(self.shape)
            absmax = np.array(self.absmax.copy_to_host(), copy=True).reshape(-1)
        return CompressedBuffer(self.kind, codes, absmax, self.signed, self.block, self.seed)

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(int(n) for n in self.codes.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        """Bytes held on the device: codes, plus the scales for int8."""
        item = 2 if self.kind == "bfloat16" else 1
        return int(self.size * item + (int(self.absmax.size) * 4 if self.kind == "int8" else 0))

    def decode(self) -> np.ndarray:
        """The float32 values, on the host (a new array of the parameter's shape)."""
        return self.to_host().decode()

    def __array__(self, dtype: Any = None, copy: Optional[bool] = None) -> np.ndarray:
        out = self.decode()
        return out if dtype is None else out.astype(dtype)

    def copy(self) -> "DeviceCompressedBuffer":
        """A device copy."""
        with _context_of(self.codes):
            codes = cuda.device_array(self.codes.shape, dtype=self.codes.dtype)
            codes.copy_to_device(self.codes)
            absmax = cuda.device_array(self.absmax.shape, dtype=np.float32)
            absmax.copy_to_device(self.absmax)
        return DeviceCompressedBuffer(self.kind, codes, absmax, self.signed, self.block, self.seed)

    def __repr__(self) -> str:
        return (f"DeviceCompressedBuffer({self.kind}, shape={self.shape}, {self.nbytes} bytes"
                + (f", block={self.block}, {'signed' if self.signed else 'unsigned'}" if self.kind == "int8" else "")
                + ")")

    def to_dict(self) -> dict:
        """The compact state_dict form, host copies: exactly :meth:`CompressedBuffer.to_dict`'s."""
        return self.to_host().to_dict()


def from_host(buf: Any, p: Any) -> DeviceCompressedBuffer:
    """``buf`` (a host :class:`CompressedBuffer`, or a device one: returned as is) on ``p``'s device."""
    if isinstance(buf, DeviceCompressedBuffer):
        return buf
    return DeviceCompressedBuffer.from_host(buf, p)


# --------------------------------------------------------------------------- the step
_SCRATCH: Dict[Any, Any] = {}


def _stream_key(stream: Any) -> Any:
    if not stream:
        return 0
    handle: Any = getattr(stream, "handle", None)
    try:
        return int(getattr(handle, "value", handle))
    except (TypeError, ValueError):                     # pragma: no cover - depends on the install
        return id(stream)


def _scratch(p: Any, stream: Any, need: int) -> Any:
    """A float32 device scratch of at least ``need`` elements, one per device and stream (kernels
    on one stream run in order, so they share it)."""
    key = (device_of(p), _stream_key(stream))
    have = _SCRATCH.get(key)
    if have is None or have.size < need:
        have = _SCRATCH[key] = cuda.device_array(max(need, 1), dtype=np.float32)
    return have


def codec_step(ks: CodecKernels, p: Any, g: Any, slots: Any, k: Any, step: int, nearest: bool) -> None:
    """Apply a rule to every element of the flat float32 device arrays ``p``, ``g`` with
    compressed state.

    Parameters
    ----------
    ks : CodecKernels
        The rule's kernels.
    p, g : numba device arrays
        Flat, float32, one length; ``p`` is updated in place.
    slots : sequence of three
        Per rule slot a :class:`DeviceCompressedBuffer`, or None for an unused slot; the used
        ones share one kind and block length.
    k : tuple
        The rule's per-step scalars.
    step : int
        The step count (key of stochastic rounding, with the buffers' seed).
    nearest : bool
        bfloat16: round to nearest even instead of stochastically.
    """
    n = p.size
    live = [s for s in slots if s is not None]
    if n == 0 or not live:
        return
    first = live[0]
    for s in live:
        if not isinstance(s, DeviceCompressedBuffer):
            raise TypeError(f"compressed state of a CUDA parameter must be on the device, got {type(s).__name__}")
    codes = [s.flat_codes if s is not None else first.flat_codes[:1] for s in slots]
    used = [s is not None for s in slots]
    stream = _stream_of(p)
    with _context_of(p):
        if first.kind == "bfloat16":
            key = np.uint64(sr_key(int(first.seed), int(step)))
            blocks, tpb = launch_dims(n)
            ks.bf16[blocks, tpb, stream](p, g, *codes, *used, k, key, bool(nearest))
            return
        bs = first.block
        nblocks = -(-n // bs)
        tpb = int(config.CUDA_THREADS_PER_BLOCK)
        grid = max(1, min(nblocks, int(config.CUDA_MAX_BLOCKS), SCRATCH_ELEMS // bs))
        scales = [s.flat_absmax if s is not None else first.flat_absmax[:1] for s in slots]
        signed = [int(bool(s.signed)) if s is not None else 1 for s in slots]
        scratch = _scratch(p, stream, 3 * grid * bs)
        ks.q8[grid, tpb, stream](p, g, *codes, *scales, *used, *signed, bs, scratch, k)
