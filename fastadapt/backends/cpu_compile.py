"""The rules of :mod:`fastadapt.algorithms`, compiled for the CPU loops on first use.

No table of known rules: any plain-Python rule (or scalar helper such as
:func:`fastadapt.algorithms.scale_slots`) handed to a loop is compiled here once and kept.
"""

import hashlib
import inspect
from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from .. import config
from ..algorithms import fma
from ..algorithms._spec import RULE_HELPERS

__all__ = ["compiled", "direct", "type_key"]

_OPTS = config.NJIT_OPTIONS


@intrinsic
def _llvm_fma(typingctx, a, b, c):
    """``llvm.fma``: ``a * b + c`` rounded once, in ``c``'s float type (a vfmadd on x86-64)."""
    if not all(isinstance(t, types.Float) for t in (a, b, c)):
        return None

    def codegen(context, builder, signature, args):
        ty = context.get_value_type(c)
        xs = [context.cast(builder, v, t, c) for v, t in zip(args, (a, b, c))]
        fn = builder.module.declare_intrinsic("llvm.fma", [ty], ir.FunctionType(ty, [ty, ty, ty]))
        return builder.call(fn, xs)

    return c(a, b, c), codegen


@overload(fma, inline="always")
def _fma_cpu(a, b, c):
    """The rules' :func:`fastadapt.algorithms.fma`, compiled for the CPU loops."""
    if all(isinstance(t, types.Float) for t in (a, b, c)):
        return lambda a, b, c: _llvm_fma(a, b, c)
    return None


def _compile_rule(fn: Any) -> Any:
    """Compile a rule (or any scalar helper) of :mod:`fastadapt.algorithms` for inlining
    into the CPU loops.

    The loops take the rule as an argument, so the rule's numba type is part of each
    loop's signature, and numba's on-disk cache can only find a cached loop again if
    the rule dispatcher unpickles to the same object in a new process.  Numba
    identifies a dispatcher across pickling by its uuid, random by default; here it
    is derived from the rule's module, name and bytecode (and the rule helpers' bytecode), which
    makes the cache work across processes and invalidates it whenever a rule or a helper changes.
    """
    # forceinline: LLVM's cost model declines to inline the larger rules (RMSprop) and
    # left a call per element.  cache=False: the loops that inline a rule are cached
    # whole, so a warm start never compiles a rule, and a rule cached on its own would
    # keep whatever LLVM attributes it was first compiled with (its cache key is its
    # bytecode only).
    dispatcher = njit(inline="always", forceinline=True, **dict(_OPTS, cache=False))(fn)
    digest = hashlib.sha256(b"".join(c.co_code + repr(c.co_consts).encode()
                                     for c in [fn.__code__] + [h.__code__ for h in RULE_HELPERS])).hexdigest()[:16]
    dispatcher._set_uuid(f"fastadapt.cpu.{fn.__module__}.{fn.__qualname__}.{digest}")
    return dispatcher


_COMPILED: dict[Any, Any] = {}


def compiled(fn: Any) -> Any:
    """The CPU dispatcher of rule ``fn`` (any plain-Python rule), compiled on first use."""
    d = _COMPILED.get(fn)
    if d is None:
        d = _COMPILED[fn] = _compile_rule(fn)
    return d


def _compile_helper(helper: Any) -> None:
    """Rules call ``helper`` (:func:`fastadapt.algorithms.rule_helper`): numba compiles it inline."""
    def typer(*args: Any) -> Any:
        return helper

    typer.__signature__ = inspect.signature(helper)   # type: ignore[attr-defined]  # numba compares them
    overload(helper, inline="always")(typer)


for _helper in RULE_HELPERS:
    _compile_helper(_helper)


# --------------------------------------------------------------------------- calling compiled loops

_ENTRIES: dict = {}


def direct(loop: Any, key: Any, *args: Any) -> Any:
    """Run the compiled ``loop`` on ``args``, calling its specialisation directly after the first time.

    numba's dispatcher types every argument at every call to pick a specialisation; a rule
    passed as an argument and a NamedTuple of scalars cost ~18 us of that per call (measured:
    20 us through the dispatcher, 1.8 us through the entry point, for a 10-element Adam step).
    ``key`` must determine the numba type of every argument (the rule, the dtype, the arrays'
    alignment and writeability); the entry point found for it is kept and called from then on.
    Returns what the loop returns.
    """
    entry = _ENTRIES.get((loop, key))
    if entry is not None:
        return entry(*args)
    result = loop(*args)                                  # compiles (or loads) and runs
    overloads = getattr(loop, "overloads", None)          # (a test may have put a plain function there)
    if overloads is not None:
        _ENTRIES[(loop, key)] = overloads[tuple(loop.typeof_pyval(a) for a in args)].entry_point
    return result


def type_key(args: Any) -> tuple:
    """A key that fixes every argument's numba type, for :func:`direct`: arrays by dtype, rank,
    alignment, writeability and contiguity; anything else by its Python type (a NamedTuple of
    scalars takes its field types from the arrays' dtype, which the key holds) or, for compiled
    rules, by identity."""
    out: list[Any] = []
    for a in args:
        if type(a) is np.ndarray:
            f = a.flags
            out.append((a.dtype.char, a.ndim, f.aligned, f.writeable, f.c_contiguous))
        elif hasattr(a, "py_func"):                       # a compiled rule
            out.append(a)
        else:
            out.append(type(a))
    return tuple(out)
