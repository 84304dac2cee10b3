"""A rank that raises in the middle of a step (after the ranks agreed to step).

Run *without* ``python -m mpi4py``: the abort must come from fastadapt itself.  The
last rank's kernel raises; the other ranks are then blocked in the all-gather, and
the job must end promptly with fastadapt's message instead of hanging.
"""

import numpy as np
from mpi4py import MPI

import fastadapt as fa
from fastadapt.distributed import ShardedOptimizer

comm = MPI.COMM_WORLD
w = np.zeros(100)
opt = ShardedOptimizer(fa.Adam, [w], comm=comm, lr=0.1)
opt.step([np.ones(100)])                       # a normal step first
if comm.Get_rank() == comm.Get_size() - 1:
    def broken(grads):
        raise RuntimeError("injected kernel failure")
    opt._inner.step = broken
print(f"rank {comm.Get_rank()} entering the faulty step", flush=True)
opt.step([np.ones(100)])
print("UNREACHABLE: the step returned", flush=True)
