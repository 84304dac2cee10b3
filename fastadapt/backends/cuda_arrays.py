"""CUDA arrays: the one place that imports numba.cuda and knows array interfaces.

Shared by :mod:`fastadapt.backends.cuda` (the backend, dense loops) and
:mod:`fastadapt.backends.cuda_sparse` (sparse loops) and the device gradient formats of
:mod:`fastadapt.grads.device`: the array-interface helpers (dtype, shape, device, stream,
zero-copy numba views), the launch geometry and a fill kernel.  Imported only when a CUDA
array is seen.
"""

import contextlib
from typing import Any, Tuple

import numpy as np

from .. import config

INSTALL_HINT = ("fastadapt's GPU path needs numba's CUDA target and an NVIDIA driver: "
                "pip install 'fastadapt[cuda]' (numba-cuda with the CUDA 12 toolkit wheels), "
                "on a machine where nvidia-smi works")

try:
    from numba import cuda
    from numba.core import config as _numba_config
except Exception as exc:                         # pragma: no cover - depends on the install
    raise ImportError(f"a CUDA array was passed but numba.cuda cannot be imported ({exc}); "
                      f"{INSTALL_HINT}") from exc

#: True under NUMBA_ENABLE_CUDASIM=1 (numba's CUDA simulator: one fake device, host memory)
SIMULATOR = bool(getattr(_numba_config, "ENABLE_CUDASIM", False))

__all__ = ["INSTALL_HINT", "SIMULATOR", "cuda", "launch_dims", "as_device_array", "device_of"]



# --------------------------------------------------------------------------- launch geometry

def launch_dims(n: int) -> Tuple[int, int]:
    """(blocks, threads per block) of a grid-stride loop over ``n`` items.

    Read from :mod:`fastadapt.config` at every launch, so tests can patch them small.
    """
    tpb = int(config.CUDA_THREADS_PER_BLOCK)
    blocks = max(1, min(-(-int(n) // tpb), int(config.CUDA_MAX_BLOCKS)))
    return blocks, tpb


# --------------------------------------------------------------------------- kernels


@cuda.jit
def _fill(a, value):
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < a.size:
        a[i] = value
        i += stride




def _is_numba_array(a: Any) -> bool:
    return bool(getattr(a, "__cuda_ndarray__", False))


def _interface(a: Any) -> Any:
    """``a.__cuda_array_interface__``, or None (numba's simulated arrays have none)."""
    try:
        return a.__cuda_array_interface__
    except AttributeError:
        return None


def _dtype(a: Any) -> np.dtype:
    if _is_numba_array(a):
        return np.dtype(a.dtype)
    return np.dtype(_interface(a)["typestr"])


def _shape(a: Any) -> Tuple[int, ...]:
    return tuple(int(n) for n in a.shape)


def _c_contiguous(a: Any) -> bool:
    if _is_numba_array(a):
        return bool(a.is_c_contiguous())
    cai = _interface(a)
    strides = cai.get("strides")
    if strides is None:
        return True
    itemsize = np.dtype(cai["typestr"]).itemsize
    expected = itemsize
    for n, s in zip(reversed(cai["shape"]), reversed(strides)):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True


def _from_host_pointer(cai: Any, owner: Any) -> Any:
    """Simulator only: wrap an interface over host memory as a simulated device array."""
    import ctypes
    dtype = np.dtype(cai["typestr"])
    shape = tuple(cai["shape"])
    count = int(np.prod(shape, dtype=np.int64))
    buf = (ctypes.c_char * (count * dtype.itemsize)).from_address(cai["data"][0]) if count else b""
    host = np.frombuffer(buf, dtype=dtype, count=count).reshape(shape)
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray   # to_device would copy
    arr: Any = FakeCUDAArray(host)
    arr._fastadapt_owner = owner            # keeps the exporting object alive
    return arr


def as_device_array(a: Any) -> Any:
    """A numba device array viewing ``a`` (zero-copy, no stream synchronisation)."""
    if _is_numba_array(a):
        return a
    cai = _interface(a)
    if cai is None:
        raise TypeError(f"{type(a).__name__} is not a CUDA array (no __cuda_array_interface__)")
    if SIMULATOR:
        return _from_host_pointer(cai, a)
    return cuda.from_cuda_array_interface(cai, owner=a, sync=False)


# --------------------------------------------------------------------------- devices

def device_of(a: Any) -> int:
    """Ordinal of the GPU holding array ``a`` (0 under the simulator)."""
    dev = getattr(a, "device", None)         # (numpy 2 arrays, inside simulated ones, have device "cpu")
    if SIMULATOR:                            # one simulated device; test doubles may name another
        return int(getattr(dev, "index", None) or 0) if getattr(dev, "type", None) == "cuda" else 0
    if dev is not None:
        if getattr(dev, "type", None) == "cuda" and getattr(dev, "index", None) is not None:
            return int(dev.index)                                  # torch
        if isinstance(getattr(dev, "id", None), int):
            return int(dev.id)                                     # CuPy
    if _is_numba_array(a):
        gpu_data = getattr(a, "gpu_data", None)
        ctx = getattr(gpu_data, "context", None)
        if ctx is not None:
            return int(ctx.device.id)
    return _pointer_device(_interface(a)["data"][0])


def _pointer_device(ptr: int) -> int:
    """Ask the driver which device a pointer belongs to; the current device if it cannot."""
    if ptr:
        try:
            from cuda.bindings import driver as drv
            err, ordinal = drv.cuPointerGetAttribute(
                drv.CUpointer_attribute.CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, ptr)
            if int(err) == 0:
                return int(ordinal)
        except Exception:                   # pragma: no cover - depends on the install
            pass
    return _current_device()


def _current_device() -> int:
    if SIMULATOR:
        return 0
    return int(cuda.current_context().device.id)


def _context_of(devary: Any) -> Any:
    """A context manager making ``devary``'s device current (a no-op when it already is)."""
    if SIMULATOR:
        return contextlib.nullcontext()
    dev = devary.gpu_data.context.device.id
    if dev == cuda.current_context().device.id:
        return contextlib.nullcontext()
    return cuda.gpus[dev]


def _stream_of(devary: Any) -> Any:
    return getattr(devary, "stream", 0) or 0

