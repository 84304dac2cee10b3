"""Every tunable of fastadapt in one place.

Values were measured on the project's 2-core machines (see docs/performance.rst);
change them here, never in the kernels.
"""

from typing import Any

#: Below this many elements a dense CPU step runs the serial loop: a parallel launch
#: costs a few microseconds more than a serial call, which only pays off above it.
PARALLEL_THRESHOLD: int = 32_768

#: Options every numba CPU kernel is compiled with.  ``error_model="numpy"`` lets
#: divisions vectorise; ``fastmath`` stays off (docs/spec.rst, "Conventions": no reassociation).
NJIT_OPTIONS: dict[str, Any] = dict(cache=True, error_model="numpy", nogil=True)

#: Threads per block of the CUDA kernels (grid-stride loops).
CUDA_THREADS_PER_BLOCK = 256

#: Upper bound on the number of CUDA blocks launched by a grid-stride loop.
CUDA_MAX_BLOCKS = 4096

#: fastadapt.distributed's reduce-scatter receives at most this many elements per round
#: (from all ranks together): the bound on its receive buffer, whatever the model size.
MPI_CHUNK_ELEMENTS = 1 << 22

#: Work units of the parallel loops: a prange over chunks of one parameter, or over units of
#: many small tensors (fastadapt.optim.many: small tensors share a unit, large ones are cut).  A
#: step of n elements uses units of n // 16 elements, kept between these two bounds, so that
#: each thread gets several units (balance) from PARALLEL_THRESHOLD on.
PARALLEL_CHUNK = 1 << 16
PARALLEL_MIN_CHUNK = 1 << 11

#: Coalescing a fastadapt.BagGrad groups its lookups by row with a counting sort (O(rows of the
#: table + lookups)) when the table has at most this many rows per lookup, and with a sort
#: (O(lookups log lookups)) otherwise, so that a step's cost never grows with the table.
BAG_COUNTING_SORT_RATIO = 4

#: Parameters with fewer elements keep their state in float32 whatever ``state_dtype`` says
#: (as bitsandbytes does): their state is small, and the many-tensor loops batch them.
STATE_COMPRESS_MIN = 4096
