"""Dense steps: one parameter of 1e4, 1e6 and 1e7 elements, per optimizer and dtype.

Group ``dense <optimizer> <dtype> <n>``: fastadapt, the seed-style numpy code, torch fused and
torch foreach.  Each step is run once before timing (compile / cache load, state creation).
"""

import numpy as np
import pytest
from conftest import run_benchmark
from seed_numpy import seed_case

from fastadapt.apps import benchmark as B

SIZES = [10_000, 1_000_000, 10_000_000]
IMPLS = ["fastadapt", "numpy", "torch_fused", "torch_foreach"]


def make_step(impl, name, n, dtype):
    if impl == "fastadapt":
        step = B.dense_case(name, n, dtype)
    elif impl == "numpy":
        step = seed_case(name, n, dtype)
    else:
        step = B.torch_dense_case(name, n, impl.split("_")[1], dtype)
    if step is not None:
        step()
    return step


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"1e{len(str(n)) - 1}")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", list(B.OPTIMIZERS))
def test_dense(benchmark, name, dtype, n, impl):
    step = make_step(impl, name, n, np.dtype(dtype))
    run_benchmark(benchmark, f"dense {name} {dtype} {n:.0e}", step, impl=impl, elements=n,
                  bytes_per_step=B.bytes_per_element(name, dtype) * n)


@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"1e{len(str(n)) - 1}")
def test_streaming_ceiling(benchmark, n):
    """The streaming loop a = a*s + b (12 B/element in float32), the memory-bandwidth yardstick."""
    step = B.stream_case(n)
    step()
    run_benchmark(benchmark, f"streaming ceiling float32 {n:.0e}", step, impl="stream", elements=n,
                  bytes_per_step=B.bytes_per_element("stream") * n)


SMALL = B.log_uniform_sizes(200, 100, 200_000, seed=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(B.OPTIMIZERS))
def test_many_small_tensors(benchmark, name, impl):
    """200 float32 tensors of log-uniform sizes 100..200k: per-parameter overhead plus bandwidth."""
    from seed_numpy import seed_many_case

    if impl == "fastadapt":
        step = B.many_case(name, SMALL)
    elif impl == "numpy":
        step = seed_many_case(name, SMALL)
    else:
        step = B.torch_many_case(name, SMALL, impl.split("_")[1])
    if step is not None:
        step()
    run_benchmark(benchmark, f"many tensors {name} float32 200 x 100..200k", step, impl=impl,
                  elements=sum(SMALL))
