"""Shared test constants and the optimizer table (tests/optimizers.py)."""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # reference.py, optimizers.py

#: the dtypes every path is tested in, and their test ids
DTYPES = [np.float64, np.float32]
DTYPE_IDS = ["f64", "f32"]
#: parity tolerances of the spec ("Agreement with torch.optim"): relative error after 50 steps
RTOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5}


def assert_close(actual, desired, rtol, what=""):
    """Relative error <= rtol elementwise, with the array's scale (max |desired|) as absolute floor.

    An element that cancels to near zero (an exp_avg of mixed-sign gradients, say) carries the
    absolute rounding error of the magnitudes it came from, so a pure elementwise rtol would test
    cancellation, not the rule.  Arrays must agree in dtype and shape.  Carried scalars (NAdam's
    ``mu_product``: a Python float in fastadapt and the references, a 0-d tensor of the parameter's
    dtype in torch) compare as numbers.
    """
    if np.ndim(actual) == 0 and np.ndim(desired) == 0 and (isinstance(actual, float) or isinstance(desired, float)):
        np.testing.assert_allclose(float(actual), float(desired), rtol=rtol, err_msg=what)
        return
    assert actual.dtype == desired.dtype, what
    assert actual.shape == desired.shape, what
    scale = float(np.max(np.abs(desired))) if desired.size else 0.0
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=rtol * scale, err_msg=what)


def pytest_collection_modifyitems(config, items):
    """Every optimizer of fastadapt has a case in tests/optimizers.py (checked once per run)."""
    from fastadapt.algorithms import REGISTRY
    from optimizers import CASES
    missing = [a.name for a in REGISTRY if a.name not in CASES]
    if missing:
        raise RuntimeError(f"tests/optimizers.py has no case for {missing}: add one per public optimizer")
