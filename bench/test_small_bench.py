"""Per-step fixed cost on small models (bench/small_steps.py's cases), group ``small <case>``."""

import numpy as np
import pytest
from conftest import run_benchmark

import fastadapt as fa
from fastadapt import functional as F


def _cases():
    rng = np.random.default_rng(0)
    w, g = rng.standard_normal(10), rng.standard_normal(10)
    one = fa.Adam([w])
    p, m, v = w.copy(), np.zeros(10), np.zeros(10)
    ps = [rng.standard_normal(100) for _ in range(100)]
    gs = [rng.standard_normal(100) for _ in range(100)]
    many = fa.Adam(ps)
    table = np.zeros((1_000_000, 64), np.float32)
    rows = fa.RowGrad(np.sort(rng.choice(1_000_000, 1000, replace=False)), rng.standard_normal((1000, 64)).astype(np.float32))
    sparse = fa.SparseAdam([table])
    return {
        "Adam 1x10": lambda: one.step([g]),
        "functional.adam 10": lambda: F.adam(p, g, m, v, step=3),
        "Adam 100x100": lambda: many.step(gs),
        "SparseAdam RowGrad 1000x64 of 1M": lambda: sparse.step([rows]),
    }


@pytest.mark.parametrize("case", ["Adam 1x10", "functional.adam 10", "Adam 100x100", "SparseAdam RowGrad 1000x64 of 1M"])
def test_small(benchmark, case):
    step = _cases()[case]
    step()
    run_benchmark(benchmark, f"small {case}", step)
