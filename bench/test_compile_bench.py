"""Compile cost, measured apart from the step benchmarks (which never time a compile).

* ``cold``: a fresh process with an empty numba cache directory runs one Adam step in float32
  on a small (serial loop) and a large (parallel loop) parameter: import + compile everything
  those steps need;
* ``warm``: the same in a fresh process after that cache was written: import + cache load.
"""

import os
import subprocess
import sys
import tempfile
import textwrap

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = textwrap.dedent("""
    import numpy as np
    import fastadapt as fa
    for n in (100, 1_000_000):
        w = np.zeros(n, np.float32)
        fa.Adam([w]).step([np.ones_like(w)])
""")


@pytest.fixture(scope="module")
def cache_dir():
    with tempfile.TemporaryDirectory() as d:
        yield d


def _run(cache_dir):
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir,
               PYTHONPATH=os.path.join(HERE, "..") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-c", SCRIPT], check=True, env=env)


def test_compile_cold(benchmark, cache_dir):
    def cold():
        for name in os.listdir(cache_dir):
            path = os.path.join(cache_dir, name)
            if os.path.isdir(path):
                import shutil
                shutil.rmtree(path)
            else:
                os.remove(path)
        _run(cache_dir)
    benchmark.group = "compile: fresh process, Adam float32 (serial + parallel loops)"
    benchmark.extra_info["cache"] = "empty"
    benchmark.pedantic(cold, rounds=2, iterations=1)


def test_compile_warm(benchmark, cache_dir):
    _run(cache_dir)
    benchmark.group = "compile: fresh process, Adam float32 (serial + parallel loops)"
    benchmark.extra_info["cache"] = "warm"
    benchmark.pedantic(_run, args=(cache_dir,), rounds=5, iterations=1)
