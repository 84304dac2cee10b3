"""MPI scale-out through mpi4py: ZeRO-1 sharded optimizer state and row-sharded tables.

Two classes, both collective (every rank of the communicator builds them and calls
their methods in the same order):

:class:`ShardedOptimizer`
    Dense parameters replicated on every rank, optimizer state split over the ranks
    (ZeRO stage 1).  The parameters' flat index space (one per dtype) is cut into P
    contiguous shards; a step reduce-scatters the gradients (sum or mean), runs an
    ordinary fastadapt optimizer over the local shard -- views of the parameters, with
    only that shard's state -- and all-gathers the updated parameters.

:class:`ShardedTable`
    An embedding table split by rows: rank ``r`` owns rows ``[lo_r, hi_r)`` and their
    optimizer state.  Row gradients from any rank are routed to the owners (Alltoallv)
    and applied there with the sparse kernels; :meth:`ShardedTable.lookup` fetches rows
    from their owners.

The update math is never written here: each rank calls an ordinary optimizer of
:mod:`fastadapt.optim` on its shard, so every rule, option and kernel is the one of a
single process, and a P-rank run gives the parameters that one process would get from
the summed gradients: bit for bit for the dense path (the ranks' gradients are added in
rank order, ``((g_0 + g_1) + g_2) + ...``, whatever the MPI library), and for the
tables whenever the sums of duplicate rows are exact (otherwise within the spec's
tolerances: each rank first sums its own duplicates).

Faults: every step starts with one small agreement (a max-allreduce) that carries
each rank's local validation result, its "which parameters have a gradient" mask and
a checksum of its hyper-parameters.  A rank that rejects its input therefore makes
*every* rank raise, with nothing changed anywhere, instead of leaving the others
blocked in a collective; an exception after that point (inside the communication or
a kernel) prints a message naming the rank and aborts the communicator
(``MPI_Abort``), so no rank waits forever.  Parameter shapes, dtypes, the optimizer
class and hyper-parameters are compared across ranks at construction.

``import fastadapt`` does not import this module; this module imports mpi4py only
when a class is constructed (so :func:`mpiexec_command` works without initialising
MPI).  Install the extra with ``pip install "fastadapt[mpi]"``.

Modules: :mod:`._common` (MPI access, shard bounds, the local launcher, the agreement
and abort guard shared by both classes), :mod:`.zero` (:class:`ShardedOptimizer`),
:mod:`.table` (:class:`ShardedTable`).
"""

from ._common import mpiexec_command, shard_bounds
from .table import ShardedTable
from .zero import ShardedOptimizer

__all__ = ["ShardedOptimizer", "ShardedTable", "mpiexec_command", "shard_bounds"]
