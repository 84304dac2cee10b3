"""Dense gradients: an array of the parameter's shape and dtype, viewed flat."""

import numpy as np

__all__ = ["dense_host_grad", "DenseGrad"]


class DenseGrad:
    """A dense gradient: the parameter's shape and dtype, C-contiguous, viewed flat."""

    __slots__ = ("g", "backend", "address")

    def __init__(self, g, backend):
        self.g = backend.flat(g)
        self.backend = backend
        self.address = None               # host arrays: set by dense_host_grad

    def all_finite(self):
        return self.backend.all_finite(self.g)

    def apply(self, opt, group, p, state):
        backend = self.backend
        packed = opt._compressed_slots(group, state)
        if packed is not None:              # state_dtype "bfloat16" / "int8": the codec loops
            k = opt._scalars(group, state, backend.dtype_of(p))
            backend.codec_step(opt.rule, backend.flat(p), self.g, packed, k, state["step"],
                               group.get("state_rounding") == "nearest")
            return
        s1, s2, s3 = opt._slot_arrays(group, p, state, backend.flat)
        dtype = backend.dtype_of(p)
        k = opt._scalars(group, state, dtype)
        if opt.algorithm.rows:                  # a row rule: one call per row of the row view
            nrows = p.shape[0] if len(p.shape) else 1         # (a 0-d parameter is one row)
            width = dtype.type(self.g.size // nrows if nrows else 1)
            with backend.context(p):
                backend.row_kernels.dense(opt.rule, backend.flat(p), self.g, s1, s2, s3, width, k, nrows)
            return
        backend.dense_step(opt.rule, backend.flat(p), self.g, s1, s2, s3, k)


def dense_host_grad(g, p, backend, p_span=None):
    """The common case, in about half a microsecond: ``g`` a numpy array that passes every
    dense check of :func:`prepare_grad` for the numpy parameter ``p`` (same shape and dtype,
    C-contiguous, not overlapping ``p``, whose ``backend.memory_span`` is ``p_span`` when
    given).  Returns its :class:`DenseGrad`, which keeps ``g``'s address for the many-tensor
    path, or None for anything else (then :func:`fastadapt.grads.prepare_grad` decides, or raises)."""
    if (type(g) is np.ndarray and type(p) is np.ndarray and g.shape == p.shape and g.dtype == p.dtype
            and g.flags.c_contiguous):
        flat = g.reshape(-1)
        start = backend.address(flat)
        if p_span is None:
            p_span = backend.memory_span(p)
        if start < p_span[1] and p_span[0] < start + flat.nbytes:
            return None                   # overlaps its parameter: prepare_grad says so
        prepared = object.__new__(DenseGrad)
        prepared.g = flat
        prepared.backend = backend
        prepared.address = start
        return prepared
    return None


