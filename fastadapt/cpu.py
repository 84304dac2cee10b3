"""CPU backend: numba loops that walk memory and call the rules of :mod:`fastadapt.rules`.

The loops know nothing about any optimizer.  A rule is passed in as a first-class
function (a numba dispatcher compiled from :mod:`fastadapt.rules` with
``inline="always"``), so each loop is specialised once per rule and dtype, inlined and
vectorised, and cached on disk (``cache=True``).
"""

import hashlib

import numpy as np
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import config, rules

_OPTS = config.NJIT_OPTIONS


def _compile_rule(fn):
    """Compile a rule of :mod:`fastadapt.rules` for inlining into the CPU loops.

    The loops take the rule as an argument, so the rule's numba type is part of each
    loop's signature, and numba's on-disk cache can only find a cached loop again if
    the rule dispatcher unpickles to the same object in a new process.  Numba
    identifies a dispatcher across pickling by its uuid, random by default; here it
    is derived from the rule's name and bytecode, which makes the cache work across
    processes and invalidates it whenever a rule changes.
    """
    # forceinline: LLVM's cost model declines to inline the larger rules (RMSprop) and
    # left a call per element.  cache=False: the loops that inline a rule are cached
    # whole, so a warm start never compiles a rule, and a rule cached on its own would
    # keep whatever LLVM attributes it was first compiled with (its cache key is its
    # bytecode only).
    dispatcher = njit(inline="always", forceinline=True, **dict(_OPTS, cache=False))(fn)
    code = fn.__code__
    digest = hashlib.sha256(code.co_code + repr(code.co_consts).encode()).hexdigest()[:16]
    dispatcher._set_uuid(f"fastadapt.cpu.{fn.__name__}.{digest}")
    return dispatcher


# The rules, compiled for the CPU.  The Python functions in `rules` stay the source.
adagrad = _compile_rule(rules.adagrad_rule)
rmsprop = _compile_rule(rules.rmsprop_rule)
adam = _compile_rule(rules.adam_rule)
sparse_adam = _compile_rule(rules.sparse_adam_rule)
rmsprop_decay = _compile_rule(rules.rmsprop_decay)

#: rule function of :mod:`fastadapt.rules` -> its CPU-compiled dispatcher
COMPILED = {
    rules.adagrad_rule: adagrad,
    rules.rmsprop_rule: rmsprop,
    rules.adam_rule: adam,
    rules.sparse_adam_rule: sparse_adam,
    rules.rmsprop_decay: rmsprop_decay,
}


# --------------------------------------------------------------------------- dense

@intrinsic
def _borrowed(typingctx, a):
    """``a`` without its reference count: the same data, shape and strides, no meminfo.

    A rule called through a first-class function argument is inlined by LLVM, not by
    numba, and brings along the reference-count calls (``NRT_incref``/``NRT_decref``)
    that numba puts around its array arguments.  Where a rule branches (RMSprop's
    momentum and centered variants) LLVM's refcount pruning cannot pair them, the
    calls stay inside the loop and the loop does not vectorise (RMSprop ran at
    1.8 ns per element instead of 0.17).  With a null meminfo every such call is
    ``NRT_incref(NULL)``, which folds away once inlined.  The caller keeps the arrays
    alive for the duration of the loop, so nothing needs counting.
    """
    if not isinstance(a, types.Array):
        return None

    def codegen(context, builder, signature, args):
        src = context.make_array(a)(context, builder, value=args[0])
        out = context.make_array(a)(context, builder)
        for name in ("nitems", "itemsize", "data", "shape", "strides"):
            setattr(out, name, getattr(src, name))
        out.meminfo = cgutils.get_null_value(out.meminfo.type)
        out.parent = cgutils.get_null_value(out.parent.type)
        return out._getvalue()

    return a(a), codegen


@njit(parallel=True, **_OPTS)
def _dense_parallel(rule, p, g, s1, s2, s3, k):
    for i in prange(p.size):
        # borrowed inside the body, so that LLVM sees the null meminfo in the loop
        rule(_borrowed(p), _borrowed(s1), _borrowed(s2), _borrowed(s3), i, g[i], k)


@njit(**_OPTS)
def _dense_serial(rule, p, g, s1, s2, s3, k):
    pb, b1, b2, b3 = _borrowed(p), _borrowed(s1), _borrowed(s2), _borrowed(s3)
    for i in range(p.size):
        rule(pb, b1, b2, b3, i, g[i], k)


def dense_step(rule, p, g, s1, s2, s3, k):
    """Apply ``rule`` to every element of the flat arrays ``p`` and ``g``.

    Parameters
    ----------
    rule : numba dispatcher
        A compiled rule from this module (``adam``, ``adagrad``, ``rmsprop``).
    p, g : ndarray
        1-D, C-contiguous, same length and dtype; ``p`` is updated in place.
    s1, s2, s3 : ndarray
        The rule's state buffers (1-D, ``p``'s length and dtype) or 1-element dummies
        for slots the rule does not use with these flags.
    k : tuple
        The rule's per-step scalars (``rules.*_scalars``).
    """
    if p.size >= config.PARALLEL_THRESHOLD:
        _dense_parallel(rule, p, g, s1, s2, s3, k)
    else:
        _dense_serial(rule, p, g, s1, s2, s3, k)


# --------------------------------------------------------------------------- checks

@njit(parallel=True, **_OPTS)
def _count_nonfinite_parallel(a):
    n = 0
    for i in prange(a.size):
        x = a[i]
        if not (x - x == 0):        # NaN or +-Inf
            n += 1
    return n


@njit(**_OPTS)
def _count_nonfinite_serial(a):
    for i in range(a.size):
        x = a[i]
        if not (x - x == 0):
            return 1
    return 0


def all_finite(a):
    """True when the flat array ``a`` holds no NaN and no infinity."""
    if a.size >= config.PARALLEL_THRESHOLD:
        return _count_nonfinite_parallel(a) == 0
    return _count_nonfinite_serial(a) == 0


# --------------------------------------------------------------------------- backend

class CPUBackend:
    """Host numpy arrays: the loops above, run in the calling thread's numba pool."""

    name = "cpu"

    #: compiled rules, looked up by the rule functions of :mod:`fastadapt.rules`
    compiled = COMPILED

    @staticmethod
    def owns(a):
        return isinstance(a, np.ndarray)

    @staticmethod
    def check_param(p, where):
        if not isinstance(p, np.ndarray):
            raise TypeError(f"{where} must be a numpy array (or a CUDA array), got {type(p).__name__}")
        if p.dtype not in (np.float32, np.float64):
            raise TypeError(f"{where} has dtype {p.dtype}; fastadapt updates float32 or float64 "
                            f"arrays in place (convert with p.astype(np.float32))")
        if not p.flags.c_contiguous:
            raise ValueError(f"{where} is not C-contiguous; pass np.ascontiguousarray(p) and keep "
                             f"that array as the parameter")
        if not p.flags.writeable:
            raise ValueError(f"{where} is read-only; fastadapt updates parameters in place "
                             f"(pass a writeable array, e.g. p.copy())")

    @staticmethod
    def full_like(p, value):
        return np.full(p.shape, value, dtype=p.dtype)

    @staticmethod
    def flat(a):
        return a.reshape(-1)

    @staticmethod
    def to_numpy(a):
        return np.array(a, copy=True)

    @staticmethod
    def copy_into(dst, src):
        np.copyto(dst, src, casting="no")

    @staticmethod
    def memory_span(a):
        """(start, end) byte addresses of ``a``'s buffer, for overlap checks."""
        start = a.__array_interface__["data"][0]
        return start, start + a.nbytes

    @staticmethod
    def dense_step(rule, p, g, s1, s2, s3, k):
        dense_step(COMPILED[rule], p, g, s1, s2, s3, k)

    @staticmethod
    def all_finite(a):
        return all_finite(a)


BACKEND = CPUBackend()
