"""The primitives every CPU loop is built from: flat views made from raw addresses, the rule run
over ``m`` elements of such views, the arrays' addresses and numba fingerprints, the work unit.

:mod:`fastadapt.backends.cpu` (dense and many-tensor loops) and
:mod:`fastadapt.backends.cpu_codec` (compressed state) both end in :func:`_run`.
"""

from numba import _dispatcher, njit, types
from numba.extending import intrinsic
from numba.np.arrayobj import populate_array

from .. import config

__all__ = ["address", "fingerprint", "work_unit"]

_OPTS = config.NJIT_OPTIONS

#: numba's fingerprint of a value: equal fingerprints mean equal numba types (except for arrays'
#: byte order, alignment and subclass, which it does not record)
fingerprint = _dispatcher.compute_fingerprint


# --------------------------------------------------------------------------- dense
# Every dense loop ends in `_run`: the rule over elements 0..m-1 of views made from raw
# addresses.  Why views from addresses rather than the arrays themselves (each measured):
#
# * A rule passed as a first-class function is inlined by LLVM, not by numba, and brings the
#   reference-count calls numba puts around its array arguments; where a rule branches
#   (RMSprop's momentum and centered variants) LLVM cannot pair them, they stay in the loop
#   and the loop does not vectorise (RMSprop: 1.8 ns per element instead of 0.2).  A view
#   made here has no meminfo, so those calls fold away.
# * A rule indexes with a signed integer; an index that may be negative needs numpy's
#   wraparound, which stops vectorisation.  The loop index runs from 0, and a chunk of a
#   larger array is a view that begins at the chunk.
# * An unused slot gets the parameter's address, not its 1-element dummy's.  The rule never
#   reads it, but where LLVM does not split the loop on the rule's flags it vectorises the
#   flagged-off accesses as masked loads and stores with an all-false mask: they touch no
#   memory, yet on pages past a 1-element dummy (unmapped, or not faulted in) each costs a
#   microcode assist (RMSprop's prange loop: 9-17 ns per element from ~6M elements on).
#   The parameter's pages are mapped and in use.
# * The parallel loop is a prange over chunks, each a call of the same `_run`: inside a
#   parfor body LLVM if-converted the flags into exactly those masked accesses.


@intrinsic
def _view(typingctx, proto, address, n):
    """A 1-D C array of ``proto``'s dtype over ``n`` elements at ``address`` (not owned)."""
    if not (isinstance(proto, types.Array) and isinstance(address, types.Integer)
            and isinstance(n, types.Integer)):
        return None
    rtype = types.Array(proto.dtype, 1, "C")

    def codegen(context, builder, signature, args):
        _, addr, length = args
        out = context.make_array(rtype)(context, builder)
        itemsize = context.get_constant(types.intp, context.get_abi_sizeof(
            context.get_data_type(rtype.dtype)))
        intp = context.get_value_type(types.intp)
        populate_array(out, data=builder.inttoptr(addr, out.data.type),
                       shape=[builder.sext(length, intp) if length.type.width < intp.width else length],
                       strides=[itemsize], itemsize=itemsize, meminfo=None)
        return out._getvalue()

    return rtype(proto, address, n), codegen


@njit(**_OPTS)
def address(a):
    """Address of the first element of the 1-D array ``a`` (~0.1 us; numpy's takes ~1.5)."""
    return a.ctypes.data


@njit(**_OPTS)
def _run(rule, proto, ap, ag, a1, a2, a3, m, k):
    """``rule`` over ``m`` elements of p, g, s1, s2, s3 starting at these addresses."""
    p = _view(proto, ap, m)
    g = _view(proto, ag, m)
    s1 = _view(proto, a1, m)
    s2 = _view(proto, a2, m)
    s3 = _view(proto, a3, m)
    for i in range(m):
        rule(p, s1, s2, s3, i, g[i], k)


def work_unit(n: int) -> int:
    """Elements per work unit of a parallel step over ``n`` elements (see config.PARALLEL_CHUNK)."""
    return min(config.PARALLEL_CHUNK, max(config.PARALLEL_MIN_CHUNK, n // 16))
