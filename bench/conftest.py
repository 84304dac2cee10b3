"""pytest-benchmark suite: ``pytest bench/ --benchmark-only`` (not part of the unit tests, whose
``testpaths`` is ``tests/``).

Every benchmark group holds fastadapt and its comparisons (the seed-style numpy code, torch
``fused=True`` / ``foreach=True`` / ``SparseAdam`` when torch is installed) on the same inputs, so
that one table -- and ``--benchmark-compare`` between two saved runs -- shows the ratios::

    pytest bench/ --benchmark-only --benchmark-group-by=group --benchmark-columns=median,iqr,rounds
    pytest bench/ --benchmark-only --benchmark-autosave          # saved under .benchmarks/
    pytest bench/ --benchmark-only --benchmark-compare           # against the last saved run
    pytest bench/ --benchmark-only -k "dense and 1e+07"          # a subset

Compile time is measured separately (bench/test_compile_bench.py): every other benchmark runs
its step once before timing, so numba's compilation (or cache load) is never in a timed round.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

import pytest  # noqa: E402


def run_benchmark(benchmark, group, step, **extra):
    """Time ``step`` (already warmed up by the caller) in ``group``; skip when it is None."""
    if step is None:
        pytest.skip("not available here (torch missing, or no such torch implementation)")
    benchmark.group = group
    benchmark.extra_info.update(extra)
    benchmark(step)


def pytest_collection_modifyitems(config, items):
    """Run the fastest benchmarks first (``-x`` then fails early on a broken setup)."""
    order = {"test_compile_bench.py": 3, "test_sparse_bench.py": 2, "test_dense_bench.py": 1}
    items.sort(key=lambda item: order.get(os.path.basename(str(item.fspath)), 0))
