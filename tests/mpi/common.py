"""Helpers shared by the scripts that tests/test_distributed.py runs under mpiexec.

Each script runs many checks in one launch (a launch costs about a second); a failing
check raises AssertionError, which ``python -m mpi4py`` turns into MPI_Abort, so the
whole job ends (no rank waits) and pytest sees a non-zero exit status.  Rank 0
prints ``PASS <name>`` for each check that every rank passed.
"""

import numpy as np
from mpi4py import MPI

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()


def passed(name):
    """Every rank reached this point: report it once."""
    COMM.Barrier()
    if RANK == 0:
        print(f"PASS {name}", flush=True)


def same_everywhere(a):
    """True when array ``a`` is bit-identical on every rank."""
    ref = COMM.bcast(np.asarray(a), root=0)
    return ref.dtype == np.asarray(a).dtype and np.array_equal(ref, a, equal_nan=True) and \
        ref.tobytes() == np.asarray(a).tobytes()


def expect_raise(exc_types, fn, *args, match=None, **kw):
    """Call ``fn``; assert it raises one of ``exc_types`` (on this rank); return the exception."""
    try:
        fn(*args, **kw)
    except exc_types as e:
        if match is not None:
            assert match in str(e), f"{type(e).__name__} message {str(e)!r} lacks {match!r}"
        return e
    raise AssertionError(f"{fn} did not raise {exc_types}")
