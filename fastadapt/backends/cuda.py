"""CUDA backend: numba.cuda grid-stride kernels over the rules of :mod:`fastadapt.algorithms`.

Imported only when an optimizer sees a CUDA array (``import fastadapt`` never needs a
GPU).  Every rule is compiled with ``numba.cuda.jit(device=True)`` from the same Python
function the CPU loops inline; the kernels here only walk memory: a grid-stride loop
over a flat array, over the rows of a CSR gradient, over indexed rows.  Launch sizes
come from :mod:`fastadapt.config` (``CUDA_THREADS_PER_BLOCK``, ``CUDA_MAX_BLOCKS``),
read at every launch.

Arrays
    Anything with ``__cuda_array_interface__`` (CuPy, torch CUDA tensors, numba device
    arrays) is used zero-copy and updated in place.  Views are made with ``sync=False``:
    no host synchronisation happens inside ``step()`` except in the non-finite check
    (``nonfinite="skip"`` or ``"raise"``), which must read a flag back to the host.
Streams
    Kernels run on the stream the parameter's interface names (CuPy: its current
    stream); arrays without one (torch exports none) use the legacy default stream.
    torch users working on a non-default stream should synchronise it before
    ``step()``.
Devices
    All parameters of an optimizer, their gradients and state live on one device;
    kernels are launched in that device's context, whatever device is current.
State
    Buffers are numba device arrays of the parameter's shape, allocated once when the
    state is created (never per step); ``state_dict()`` copies them to numpy.  Compressed
    state (``state_dtype`` "bfloat16" / "int8", dense gradients) is
    :mod:`fastadapt.backends.cuda_compressed`'s; sparse gradients with compressed state
    (lazy, exact decay, exact fused) :mod:`fastadapt.backends.cuda_sparse_codec`'s.

Under ``NUMBA_ENABLE_CUDASIM=1`` numba's simulator runs the same kernels on the CPU
(device arrays made with ``numba.cuda.to_device``); objects exposing
``__cuda_array_interface__`` over host memory are accepted there too, so the
interface-handling code is tested without a GPU.
"""

from typing import Any, ContextManager, Dict, Optional, Tuple

import numpy as np

from .. import config
from .cuda_arrays import (INSTALL_HINT, SIMULATOR, _c_contiguous, _context_of, _dtype, _fill, _interface,
                          _is_numba_array, _shape, _stream_of, as_device_array, cuda, device_of, launch_dims)
from . import cuda_compressed as _cc
from .cuda_sparse_codec import KERNELS as _SPARSE_KERNELS
from .cuda_rows import KERNELS as _ROW_KERNELS
from .protocols import RowKernels, SparseKernels
from .cuda_sparse import _fma_cuda  # noqa: F401  (registers the rules' fma for the CUDA target)

__all__ = ["backend", "CUDABackend", "INSTALL_HINT", "SIMULATOR", "kernels"]


# --------------------------------------------------------------------------- kernels

class _RuleKernels:
    """The grid-stride kernels of one rule, compiled lazily (numba compiles per signature).

    numba.cuda kernels cannot take a device function as an argument, so each rule gets
    its own kernels, made here from the one rule function; they differ only in how
    they walk memory.
    """

    def __init__(self, rule: Any) -> None:
        dev = cuda.jit(device=True)(rule)
        self.rule = dev

        @cuda.jit
        def dense(p, g, s1, s2, s3, k):
            i = cuda.grid(1)
            stride = cuda.gridsize(1)
            n = p.size
            while i < n:
                dev(p, s1, s2, s3, i, g[i], k)
                i += stride

        self.dense = dense
        self._codec: Any = None

    @property
    def codec(self) -> Any:
        """The compressed-state kernels (:class:`fastadapt.backends.cuda_compressed.CodecKernels`)."""
        if self._codec is None:
            self._codec = _cc.CodecKernels(self.rule)
        return self._codec


_KERNELS: dict[Any, Any] = {}


def kernels(rule: Any) -> _RuleKernels:
    """The :class:`_RuleKernels` of a rule function of :mod:`fastadapt.algorithms`."""
    ks = _KERNELS.get(rule)
    if ks is None:
        ks = _KERNELS[rule] = _RuleKernels(rule)
    return ks


@cuda.jit
def _flag_nonfinite(a, flag):
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < a.size:
        x = a[i]
        if not (x - x == 0):        # NaN or +-Inf; every writer writes the same 1
            flag[0] = 1
        i += stride


@cuda.jit
def _clear_flag(flag):
    if cuda.grid(1) == 0:
        flag[0] = 0


# --------------------------------------------------------------------------- backend

class CUDABackend:
    """CUDA arrays (implements :class:`fastadapt.backends.protocols.Backend`)."""

    name = "cuda"

    def __init__(self) -> None:
        self._flags: Dict[int, Any] = {}            # device ordinal -> (device flag, host flag), for all_finite

    # -- arrays ---------------------------------------------------------------

    @staticmethod
    def owns(a: Any) -> bool:
        return _is_numba_array(a) or _interface(a) is not None

    @staticmethod
    def check_param(p: Any, where: str) -> None:
        if not CUDABackend.owns(p):
            raise TypeError(f"{where} must be a CUDA array, got {type(p).__name__}")
        dtype = _dtype(p)
        if dtype not in (np.float32, np.float64):
            raise TypeError(f"{where} has dtype {dtype}; fastadapt updates float32 or float64 "
                            "arrays in place (convert it, e.g. p.astype(cupy.float32))")
        if not _c_contiguous(p):
            raise ValueError(f"{where} is not C-contiguous; pass a contiguous copy "
                             "(cupy.ascontiguousarray(p), t.contiguous()) and keep it as the parameter")
        cai = None if _is_numba_array(p) else _interface(p)
        if cai is not None and cai["data"][1]:
            raise ValueError(f"{where} is read-only; fastadapt updates parameters in place")

    @staticmethod
    def dtype_of(a: Any) -> np.dtype:
        """The numpy dtype of CUDA array ``a`` (torch tensors have their own dtype type)."""
        return _dtype(a)

    @staticmethod
    def device_of(a: Any) -> Optional[int]:
        """The ordinal of the GPU holding ``a``."""
        return device_of(a)

    @staticmethod
    def check_same_device(g: Any, p: Any, where: str) -> None:
        """Raise unless gradient ``g`` lives on parameter ``p``'s GPU."""
        dg, dp = device_of(g), device_of(p)
        if dg != dp:
            raise ValueError(f"{where} is on GPU {dg} but its parameter is on GPU {dp}; "
                             "move it to the parameter's device first")

    @staticmethod
    def full_like(p: Any, value: float) -> Any:
        """A new device array of ``p``'s shape and dtype on ``p``'s device, filled with ``value``."""
        dtype = _dtype(p)
        shape = _shape(p)
        view = as_device_array(p)
        with _context_of(view):
            out = cuda.device_array(shape, dtype=dtype)
            flat = out.reshape(out.size) if out.size else out
            if out.size:
                blocks, tpb = launch_dims(out.size)
                _fill[blocks, tpb, _stream_of(view)](flat, dtype.type(value))
        return out

    @staticmethod
    def full_rows(p: Any, value: float) -> Any:
        """A new 1-D device array on ``p``'s device, one element of ``p``'s dtype per row, filled with ``value``."""
        dtype = _dtype(p)
        view = as_device_array(p)
        with _context_of(view):
            out = cuda.device_array(_shape(p)[:1], dtype=dtype)
            if out.size:
                blocks, tpb = launch_dims(out.size)
                _fill[blocks, tpb, _stream_of(view)](out, dtype.type(value))
        return out

    @staticmethod
    def flat(a: Any) -> Any:
        """A 1-D numba device array viewing ``a`` (zero-copy)."""
        view = as_device_array(a)
        n = int(np.prod(_shape(view), dtype=np.int64))
        if len(view.shape) == 1:
            return view
        return view.reshape(n)

    @staticmethod
    def to_numpy(a: Any) -> np.ndarray:
        """A host copy of device array ``a`` (waits for the work queued on its device)."""
        view = as_device_array(a)
        with _context_of(view):
            if not SIMULATOR:
                cuda.synchronize()
            return np.array(view.copy_to_host(), copy=True).reshape(_shape(view))

    @staticmethod
    def copy_into(dst: Any, src: np.ndarray) -> None:
        """Copy host array ``src`` into device array ``dst`` (same shape and dtype)."""
        view = as_device_array(dst)
        src = np.ascontiguousarray(src)
        if src.dtype != _dtype(view) or src.shape != _shape(view):
            raise ValueError(f"cannot copy a {src.dtype} {src.shape} array into a {_dtype(view)} "
                             f"{_shape(view)} device array")
        with _context_of(view):
            view.copy_to_device(src)

    @staticmethod
    def memory_span(a: Any) -> Tuple[int, int]:
        """(start, end) device addresses of ``a``'s buffer, for overlap checks."""
        cai = _interface(a)
        if cai is not None:
            start = int(cai["data"][0] or 0)
            n = int(np.prod(tuple(cai["shape"]), dtype=np.int64))
            return start, start + n * np.dtype(cai["typestr"]).itemsize
        start = int(a.__array_interface__["data"][0])   # simulated array: host memory
        return start, start + int(a.nbytes)

    @staticmethod
    def context(p: Any) -> ContextManager[Any]:
        """Kernels and allocations on ``p``'s device, whatever device is current."""
        return _context_of(as_device_array(p))

    # -- sparse ---------------------------------------------------------------

    @property
    def sparse_kernels(self) -> SparseKernels:
        """The sparse loops (:class:`fastadapt.backends.cuda_sparse.CUDASparseKernels`)."""
        return _SPARSE_KERNELS

    @property
    def row_kernels(self) -> RowKernels:
        """The loops for row rules (:class:`fastadapt.backends.cuda_rows.CUDARowKernels`)."""
        return _ROW_KERNELS

    # -- kernels --------------------------------------------------------------

    @staticmethod
    def dense_step(rule: Any, p: Any, g: Any, s1: Any, s2: Any, s3: Any, k: Any) -> None:
        """Apply ``rule`` to every element of the flat device arrays ``p`` and ``g``."""
        n = p.size
        if n == 0:
            return
        blocks, tpb = launch_dims(n)
        with _context_of(p):
            kernels(rule).dense[blocks, tpb, _stream_of(p)](p, g, s1, s2, s3, k)

    #: sparse gradients with compressed state: the row kernels of cuda_sparse_codec
    sparse_compressed = True

    @staticmethod
    def sparse_compressed_supports(plan: Any) -> bool:
        """Whether a sparse step with compressed state runs on CUDA under ``plan`` (``"lazy"``,
        ``"fused"`` or a :class:`~fastadapt.algorithms.Decay`, :func:`fastadapt.grads.sparse._plan`):
        every plan does (:mod:`fastadapt.backends.cuda_sparse_codec`)."""
        return True

    @staticmethod
    def compressed_full(p: Any, value: float, kind: str, signed: bool, seed: int) -> Any:
        """A :class:`~fastadapt.backends.cuda_compressed.DeviceCompressedBuffer` for ``p`` whose
        values are ``value`` (encoded on the host, copied to ``p``'s device)."""
        from .compressed import CompressedBuffer
        return _cc.from_host(CompressedBuffer.full(_shape(p), value, kind, signed, seed), p)

    @staticmethod
    def compressed_from(p: Any, values: np.ndarray, kind: str, signed: bool, seed: int) -> Any:
        """A device compressed buffer for ``p`` holding the host float ``values`` (rounded to nearest)."""
        from .compressed import CompressedBuffer
        host = CompressedBuffer.encode(np.asarray(values, np.float32).reshape(_shape(p)), kind, signed, seed)
        return _cc.from_host(host, p)

    @staticmethod
    def compressed_load(p: Any, buf: Any) -> Any:
        """A host compressed buffer (a loaded state_dict entry) copied to ``p``'s device, bit for bit."""
        return _cc.from_host(buf, p)

    @staticmethod
    def codec_step(rule: Any, p: Any, g: Any, slots: Any, k: Any, step: int, nearest: bool) -> None:
        """``rule`` over the flat float32 device arrays ``p`` and ``g`` with compressed state ``slots``
        (:func:`fastadapt.backends.cuda_compressed.codec_step`)."""
        _cc.codec_step(kernels(rule).codec, p, g, slots, k, step, nearest)

    def all_finite(self, a: Any) -> bool:
        """True when the device array ``a`` holds no NaN or infinity.

        The one host synchronisation of a step: it runs only for ``nonfinite="skip"`` or
        ``"raise"``, and reads back a one-word flag that lives on the device for good.
        """
        view = as_device_array(a)
        n = int(np.prod(_shape(view), dtype=np.int64))
        if n == 0:
            return True
        flat = view.reshape(n) if len(view.shape) != 1 else view
        dev = device_of(view)
        stream = _stream_of(view)
        with _context_of(view):
            bufs = self._flags.get(dev)
            if bufs is None:
                bufs = self._flags[dev] = (cuda.device_array(1, dtype=np.int32), np.zeros(1, np.int32))
            flag, host = bufs
            _clear_flag[1, 1, stream](flag)
            blocks, tpb = launch_dims(n)
            _flag_nonfinite[blocks, tpb, stream](flat, flag)
            flag.copy_to_host(host, stream=stream)
            if stream:
                stream.synchronize()
        return host[0] == 0


_BACKEND = None


def backend() -> CUDABackend:
    """The CUDA backend, created on first use; raises with install advice when CUDA is unusable."""
    global _BACKEND
    if _BACKEND is None:
        try:
            available = cuda.is_available()
        except Exception as exc:                 # pragma: no cover - depends on the machine
            raise RuntimeError(f"a CUDA array was passed but CUDA cannot be initialised ({exc}); "
                               f"{INSTALL_HINT}") from exc
        if not available:
            raise RuntimeError("a CUDA array was passed but numba finds no usable CUDA GPU "
                               f"(numba.cuda.is_available() is False; numba.cuda.detect() says why); "
                               f"{INSTALL_HINT}")
        _BACKEND = CUDABackend()
    return _BACKEND
