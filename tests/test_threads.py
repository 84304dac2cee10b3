"""Results do not depend on the number of threads.

The parallel loops split the elements among numba's threads; each element's update is the
same arithmetic whichever thread does it, so 1 and 2 threads (``numba.set_num_threads``) must
give bit-identical parameters and state: single large tensors (the prange loop), many tensors
(the many-tensor loop, whose work units span tensors), and the non-finite scan.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest

import fastadapt as fa
from fastadapt import config

from conftest import DTYPE_IDS, DTYPES
from optimizers import rich_and_plain

#: every dense case, its rich config and its plain one
CONFIGS = {f"{c.name}-{label}": (c.cls, o) for c, label, o in rich_and_plain()}
SIZES = {"one tensor": [5003], "many tensors": [1, 7, 300, 2049, 0, 33, 1500]}


def _run(name, dtype, sizes, threads):
    cls, hyper = CONFIGS[name]
    rng = np.random.default_rng(11)
    params = [np.array(rng.standard_normal(n), dtype=dtype) for n in sizes]
    opt = cls(params, nonfinite="skip", **hyper)
    old = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        for _ in range(3):
            assert opt.step([np.array(rng.standard_normal(n), dtype=dtype) for n in sizes])
        bad = [np.array(rng.standard_normal(n), dtype=dtype) for n in sizes]
        bad[-1][:] = np.nan
        assert not opt.step(bad)                       # the parallel non-finite scan, then a skip
    finally:
        numba.set_num_threads(old)
    return params, opt.state_dict()["state"]


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs numba built with 2+ threads")
@pytest.mark.parametrize("layout", sorted(SIZES))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_one_and_two_threads_agree_bitwise(name, dtype, layout, monkeypatch):
    monkeypatch.setattr(config, "PARALLEL_THRESHOLD", 64)      # parallel loops on these sizes
    monkeypatch.setattr(config, "PARALLEL_MIN_CHUNK", 512)    # several work units per thread
    p1, s1 = _run(name, dtype, SIZES[layout], 1)
    p2, s2 = _run(name, dtype, SIZES[layout], 2)
    for a, b in zip(p1, p2):
        assert np.array_equal(a, b)
    assert s1.keys() == s2.keys()
    for j in s1:
        assert s1[j].keys() == s2[j].keys()
        for key in s1[j]:
            assert np.array_equal(s1[j][key], s2[j][key]), (j, key)


def test_threading_layer_is_reported():
    """The bench reports the threading layer; make sure numba can name it once a parallel loop ran."""
    p = np.zeros(config.PARALLEL_THRESHOLD, np.float32)
    fa.Adam([p]).step([np.ones_like(p)])
    assert numba.threading_layer() in ("omp", "tbb", "workqueue")
